"""All-gather and reduce-scatter with a different token count on every rank, as custom ops.

The all-gather strategy of ``ep_ops.token_dispatcher`` (Megatron's ``allgather`` dispatcher) uses
these instead of the all-to-all ops: every rank gathers every rank's tokens, runs its experts on
the ones routed to them, and a reduce-scatter sums each token's partial outputs back onto its
rank. They are Python ops (``torch.library.custom_op``) over ``torch.distributed``, so they run
wherever the process group does (gloo for CPU tensors, NCCL for CUDA tensors); the compiled
library's ``ep_ops`` namespace belongs to ``csrc/ops.cpp``, so these live in ``ep_ops_py``.

Shapes are static: each rank's rows are padded to ``max_tokens_per_rank`` (M) on the wire and in
the gathered output, so the ops trace without data-dependent sizes and never sync with the host
for a size. Before moving data both ops exchange a small header (token count, M, row shape,
dtype) so that a rank with bad input makes every rank raise the same error instead of hanging.

Deterministic: the reduce-scatter sums the ranks' contributions in ascending rank order, in
float32 (float64 for float64 data), like ``ep_ops::combine``.
"""

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.fx.node import has_side_effect

from .meta._checks import check_value, world_size

__all__ = ["all_gather_v", "reduce_scatter_v"]

_DTYPE_CODES = {
    dtype: code
    for code, dtype in enumerate(
        (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)
    )
}


def _exchange_header(group, op: str, num_tokens: int, max_tokens: int, t: torch.Tensor, problem: str):
    """All-gathers (problem?, tokens, M, row elements, dtype) and raises the same error on every
    rank when any rank reported a problem or the ranks disagree. Returns every rank's token count."""
    row = torch.Size(t.shape[1:]).numel()
    mine = torch.tensor(
        [1 if problem else 0, num_tokens, max_tokens, row, _DTYPE_CODES.get(t.dtype, -1)],
        dtype=torch.int64,
        device=t.device,
    )
    headers = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(headers, mine, group=group)
    headers = torch.stack(headers).cpu()
    if problem:
        raise ValueError(f"ep_ops_py.{op}: {problem}")
    bad = [r for r in range(group.size()) if headers[r, 0]]
    if bad:
        raise ValueError(f"ep_ops_py.{op}: rank {bad[0]} rejected its input")
    for column, what in ((2, "max_tokens_per_rank"), (3, "elements per row"), (4, "dtype")):
        values = headers[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"ep_ops_py.{op}: ranks disagree on {what}: {values} (by rank)")
    return headers[:, 1].clone()


@torch.library.custom_op("ep_ops_py::all_gather_v", mutates_args=())
def all_gather_v(
    x: torch.Tensor, max_tokens_per_rank: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, each rank's block padded to M = ``max_tokens_per_rank`` rows.

    Args:
        x: ``[T, ...]`` this rank's rows, T <= M (T may differ between ranks).
        max_tokens_per_rank: M, the same on every rank.
        group_name: the process group's registered name.
    Returns:
        gathered ``[R * M, ...]`` (x's dtype): rank r's rows at ``[r * M, r * M + T_r)``, zeros
        after them; counts ``[R]`` int64: T_r of every rank.
    """
    group = _resolve_process_group(group_name)
    num_tokens = x.size(0)
    problem = ""
    if max_tokens_per_rank <= 0:
        problem = f"max_tokens_per_rank must be positive, got {max_tokens_per_rank}"
    elif num_tokens > max_tokens_per_rank:
        problem = f"x has {num_tokens} rows, more than max_tokens_per_rank ({max_tokens_per_rank})"
    counts = _exchange_header(group, "all_gather_v", num_tokens, max_tokens_per_rank, x, problem)
    padded = x.new_zeros((max_tokens_per_rank, *x.shape[1:]))
    padded[:num_tokens] = x
    blocks = [torch.empty_like(padded) for _ in range(group.size())]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat(blocks), counts.to(x.device)


@all_gather_v.register_fake
def _all_gather_v_fake(x, max_tokens_per_rank, group_name):
    num_ranks = world_size(group_name)
    check_value(max_tokens_per_rank > 0, "all_gather_v", "max_tokens_per_rank must be positive")
    check_value(x.size(0) <= max_tokens_per_rank, "all_gather_v", "x has more rows than max_tokens_per_rank")
    gathered = x.new_empty((num_ranks * max_tokens_per_rank, *x.shape[1:]))
    return gathered, x.new_empty((num_ranks,), dtype=torch.int64)


@torch.library.custom_op("ep_ops_py::reduce_scatter_v", mutates_args=())
def reduce_scatter_v(x: torch.Tensor, num_tokens: int, group_name: str) -> torch.Tensor:
    """Inverse layout of ``all_gather_v``: rank r gets the sum over ranks of block r.

    Args:
        x: ``[R * M, ...]`` float, block r (rows ``[r * M, (r + 1) * M)``) is for rank r.
        num_tokens: T, the rows this rank keeps (T <= M; may differ between ranks).
        group_name: the process group's registered name.
    Returns:
        ``[T, ...]`` (x's dtype): the first T rows of the sum of every rank's block for this
        rank, summed in ascending rank order in float32 (float64 for float64).
    """
    group = _resolve_process_group(group_name)
    num_ranks = group.size()
    max_tokens = x.size(0) // num_ranks if x.dim() >= 1 else 0
    problem = ""
    if x.dim() < 1 or x.size(0) % num_ranks != 0:
        problem = f"x must have R * max_tokens_per_rank rows (R = {num_ranks}), got shape {tuple(x.shape)}"
    elif not x.is_floating_point():
        problem = f"x must be a floating dtype, got {x.dtype}"
    elif not 0 <= num_tokens <= max_tokens:
        problem = f"num_tokens must be in [0, {max_tokens}] (max_tokens_per_rank), got {num_tokens}"
    _exchange_header(group, "reduce_scatter_v", num_tokens, max_tokens, x, problem)
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x.contiguous(), group=group)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = received.view(num_ranks, max_tokens, *x.shape[1:])[:, :num_tokens].to(acc_dtype)
    out = blocks[0].clone()
    for r in range(1, num_ranks):
        out += blocks[r]
    return out.to(x.dtype)


@reduce_scatter_v.register_fake
def _reduce_scatter_v_fake(x, num_tokens, group_name):
    num_ranks = world_size(group_name)
    check_value(x.dim() >= 1, "reduce_scatter_v", "x must have a row dimension")
    check_value(x.size(0) % num_ranks == 0, "reduce_scatter_v", "x must have R * max_tokens_per_rank rows")
    check_value(
        num_tokens <= x.size(0) // num_ranks, "reduce_scatter_v", "num_tokens is above max_tokens_per_rank"
    )
    return x.new_empty((num_tokens, *x.shape[1:]))


# ----- autograd: each op's backward is the other -----------------------------------------------


def _all_gather_v_setup(ctx, inputs, output):
    x, _, group_name = inputs
    ctx.num_tokens, ctx.group_name = x.size(0), group_name


def _all_gather_v_backward(ctx, grad_gathered, _grad_counts):
    # Every rank used every rank's rows: rank r's gradient is the sum of the ranks' block r.
    return reduce_scatter_v(grad_gathered.contiguous(), ctx.num_tokens, ctx.group_name), None, None


def _reduce_scatter_v_setup(ctx, inputs, output):
    x, _, group_name = inputs
    ctx.max_tokens, ctx.group_name = x.size(0) // world_size(group_name), group_name


def _reduce_scatter_v_backward(ctx, grad_out):
    gathered, _ = all_gather_v(grad_out.contiguous(), ctx.max_tokens, ctx.group_name)
    return gathered, None, None


all_gather_v.register_autograd(_all_gather_v_backward, setup_context=_all_gather_v_setup)
reduce_scatter_v.register_autograd(_reduce_scatter_v_backward, setup_context=_reduce_scatter_v_setup)

# Both talk to every rank: the compiler must never drop one on one rank (see _side_effects.py).
has_side_effect(torch.ops.ep_ops_py.all_gather_v.default)
has_side_effect(torch.ops.ep_ops_py.reduce_scatter_v.default)
