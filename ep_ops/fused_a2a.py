"""Drop-in for Megatron-LM / NeMo's ``fused_a2a`` module, over the ep_ops ops.

Code that does ``from megatron.core.transformer.moe.fused_a2a import fused_dispatch, ...`` (or
NeMo Automodel's equivalent) runs unchanged with ``from ep_ops.fused_a2a import ...``: same
names, same signatures, same return tuples.

- **DeepEP family** (``fused_dispatch`` / ``fused_combine``, ``FusedDispatch`` / ``FusedCombine``,
  ``get_buffer``, ``get_hidden_bytes``, ``set_deepep_num_sms``): dispatch in source order with
  top-k indices and probabilities; the experts' permute is the caller's.
- **HybridEP family** (``hybrid_ep_dispatch`` / ``hybrid_ep_combine``, ``HybridEPDispatch`` /
  ``HybridEPCombine``, ``init_hybrid_ep_buffer``, ``reset_hybrid_ep_buffer``): takes a dense
  ``routing_map [T, E]`` and ``probs [T, E]`` and returns the tokens already grouped by local
  expert (``ep_ops.permute``'s layout), each group padded to ``pad_multiple``. The grouping is
  fused into the communication (``ep_ops.dispatch_permuted`` / ``combine_permuted``: received
  rows land in their groups, combine sums a row's experts as it sends it back);
  ``fuse_permute=False`` runs the same layout as separate passes (dispatch, then
  ``ep_ops.permute``), bitwise equal. With ``num_permuted_tokens`` every shape is static and
  nothing syncs with the host (worst-token dispatch), so the step can be captured in a CUDA graph.

Two ways in, same results:

- the functions (``fused_dispatch``, ``hybrid_ep_dispatch``, ...) are built from the ops
  themselves, so their gradients come from the ops' registered autograd formulas and
  ``torch.compile`` sees one plain graph;
- the ``torch.autograd.Function`` classes (``FusedDispatch.apply``, ...) run the same forward and
  spell the backward out (a combine for a dispatch, a cached dispatch for a combine), for code
  that calls them directly.

Both trace under ``torch.compile(fullgraph=True)``. Differences from DeepEP-backed Megatron:

- ``tokens_per_expert`` is an int64 tensor on the tokens' device (no host copy);
- handles are tuples of tensors in ep_ops' layout (``Buffer.combine`` accepts the DeepEP-style
  one), not DeepEP handles;
- the ops run on the current stream: ``async_finish`` / ``allocate_on_comm_stream`` are accepted
  and change nothing, and ``fused_combine``'s event is None (as in Megatron);
- ``fp8_dispatch`` is not supported by the HybridEP family (Megatron asserts the same).
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .buffer import Buffer
from .permute import PermuteMap, make_permute_map, permute, permute_probs, slot_pair_of, unpermute

ops = torch.ops.ep_ops

HAVE_DEEP_EP = True
HAVE_HYBRIDEP = True

__all__ = [
    "FusedCombine",
    "FusedDispatch",
    "HybridEPCombine",
    "HybridEPDispatch",
    "HybridEPHandle",
    "fused_combine",
    "fused_dispatch",
    "free_buffer",
    "get_buffer",
    "get_hidden_bytes",
    "hybrid_ep_combine",
    "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer",
    "reset_hybrid_ep_buffer",
    "set_deepep_num_sms",
]


def _group(group) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


# ---------------------------------------------------------------- buffers and settings

_buffers: dict[str, Buffer] = {}  # group_name -> Buffer


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes of one token's payload: ``x.size(1) * max(x.element_size(), 2)``."""
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> Buffer:
    """The cached ``ep_ops.Buffer`` of ``group``, big enough for ``hidden_bytes`` per token.

    Sized from the default dispatch and combine ``Config`` hints; re-created (the old one
    destroyed) when a later call needs more bytes than the cached one has. One Buffer per group
    (Megatron keeps one overall). On an NCCL group of one host the Buffer registers the group's
    NVLink buffer, so the ops use the NVLink kernels: compiled code should call this once before
    compiling, as the forward passes only do it eagerly. Every rank must call it alike.
    """
    group = _group(group)
    num_ranks = group.size()
    configs = (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks))
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    num_rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    buffer = _buffers.get(group.group_name)
    if buffer is None or buffer.num_nvl_bytes < num_nvl_bytes or buffer.num_rdma_bytes < num_rdma_bytes:
        if buffer is not None:
            buffer.destroy()  # releases its hold on the group's NVLink registration
        buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
        _buffers[group.group_name] = buffer
    return buffer


def free_buffer() -> None:
    """Destroys every cached Buffer (NeMo Automodel's ``free_buffer``)."""
    for buffer in _buffers.values():
        buffer.destroy()
    _buffers.clear()


def set_deepep_num_sms(num_sms: int) -> None:
    """Sets the SMs of the normal kernels (``Buffer.set_num_sms``; even)."""
    Buffer.set_num_sms(num_sms)


def _touch_buffer(group, x: torch.Tensor) -> None:
    """Eagerly, make sure ``get_buffer`` has a Buffer for this call, as Megatron's forward does.
    Compiled code skips it: the ops keep their memory inside the library."""
    if not torch.compiler.is_compiling():
        get_buffer(group, get_hidden_bytes(x))


# ---------------------------------------------------------------- DeepEP family


def _dispatch(x, token_indices, token_probs, num_experts, group, num_worst_tokens):
    """Layout + dispatch. Returns (recv_x, recv_idx, recv_probs or None, tokens_per_expert,
    handle); differentiable wrt x and token_probs through the ops' autograd."""
    group = _group(group)
    if token_probs is not None and token_probs.dtype != torch.float32:
        token_probs = token_probs.float()  # the ops carry float32 weights (DeepEP's rule too)
    _, _, is_token_in_rank = ops.get_dispatch_layout(token_indices, num_experts, group.size())
    recv_x, _, recv_idx, recv_probs, counts, rank_prefix_matrix, recv_src_idx = ops.dispatch(
        x, None, token_indices, token_probs, is_token_in_rank,
        num_experts, 1, num_worst_tokens, group.group_name,
    )  # fmt: skip
    handle = (rank_prefix_matrix, recv_src_idx, is_token_in_rank)
    recv_probs = recv_probs if token_probs is not None else None
    return recv_x, recv_idx, recv_probs, counts.to(torch.int64), handle


def _combine(x, group, handle):
    rank_prefix_matrix, recv_src_idx, is_token_in_rank = handle
    combined_x, _ = ops.combine(
        x, None, None, None, is_token_in_rank, rank_prefix_matrix, recv_src_idx, _group(group).group_name
    )
    return combined_x


class FusedDispatch(torch.autograd.Function):
    """Layout + dispatch as one autograd node; its backward is a combine."""

    @staticmethod
    def forward(
        ctx,
        x,
        token_indices,
        token_probs,
        num_experts,
        group,
        async_finish=False,
        allocate_on_comm_stream=False,
        num_worst_tokens=0,
    ):
        """Sends each token to the ranks holding its experts.

        Args:
            x: ``[T, H]`` bfloat16 (or another float dtype).
            token_indices: ``[T, K]`` int64 global expert ids, -1 = none.
            token_probs: ``[T, K]`` float routing probabilities (sent as float32), or None.
            num_experts: total experts, a multiple of the group size.
            group: the expert-parallel ProcessGroup (None = WORLD).
            async_finish, allocate_on_comm_stream: accepted; ep_ops runs on the current stream.
            num_worst_tokens: ep_ops extension: > 0 = every output has this many rows (padding
                rows have index -1, probability 0), no host sync. Must agree on every rank.
        Returns:
            recv_x ``[N, H]``, recv_token_indices ``[N, K]`` int64 local expert ids (-1 = not
            here), recv_token_probs ``[N, K]`` float32 (or None), tokens_per_expert
            ``[E_local]`` int64 (device tensor), handle. Rows come by source rank, then token.
        """
        _touch_buffer(group, x)
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = _dispatch(
            x, token_indices, token_probs, num_experts, group, num_worst_tokens
        )
        ctx.save_for_backward(*handle, recv_idx)
        ctx.group_name = _group(group).group_name
        ctx.x_shape = (recv_x.size(0), x.size(1))
        ctx.x_dtype = x.dtype
        ctx.probs_dtype = token_probs.dtype if token_probs is not None else None
        ctx.mark_non_differentiable(recv_idx, tokens_per_expert)
        return recv_x, recv_idx, recv_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_probs, _grad_counts, _grad_handle):
        rank_prefix_matrix, recv_src_idx, is_token_in_rank, recv_idx = ctx.saved_tensors
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=recv_idx.device)
        grad_probs = None
        if ctx.probs_dtype is not None:
            if grad_recv_probs is None:
                grad_recv_probs = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
            # Probabilities of experts on other ranks were zeroed by the dispatch: no gradient.
            grad_probs = torch.where(recv_idx >= 0, grad_recv_probs.float(), 0.0)
        grad_x, grad_token_probs = ops.combine(
            grad_recv_x.contiguous(), grad_probs, None, None,
            is_token_in_rank, rank_prefix_matrix, recv_src_idx, ctx.group_name,
        )  # fmt: skip
        if ctx.probs_dtype is not None:
            grad_token_probs = grad_token_probs.to(ctx.probs_dtype)
        else:
            grad_token_probs = None
        return grad_x, None, grad_token_probs, None, None, None, None, None


class FusedCombine(torch.autograd.Function):
    """Combine as one autograd node; its backward is a cached dispatch."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Sums each token's rows back onto its rank.

        Args:
            x: ``[N, H]`` rows in the order the dispatch delivered them.
            group: the dispatch's ProcessGroup (None = WORLD). handle: the dispatch's handle.
        Returns:
            combined_x ``[T, H]`` (x's dtype), and None (Megatron's event slot).
        """
        _touch_buffer(group, x)
        combined_x = _combine(x, group, handle)
        ctx.save_for_backward(*handle)
        ctx.group_name = _group(group).group_name
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_combined_x, _grad_event=None):
        rank_prefix_matrix, recv_src_idx, is_token_in_rank = ctx.saved_tensors
        grad_x, _ = ops.cached_dispatch(
            grad_combined_x.contiguous(),
            None,
            is_token_in_rank,
            rank_prefix_matrix,
            recv_src_idx,
            ctx.group_name,
        )
        return grad_x, None, None, None, None


def fused_dispatch(
    x,
    token_indices,
    token_probs,
    num_experts,
    group,
    async_finish=False,
    allocate_on_comm_stream=False,
    num_worst_tokens=0,
):
    """Dispatch (see ``FusedDispatch.forward`` for arguments and returns), differentiable wrt
    ``x`` and ``token_probs`` through the ops' own autograd."""
    _touch_buffer(group, x)
    return _dispatch(x.contiguous(), token_indices, token_probs, num_experts, group, num_worst_tokens)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Combine (see ``FusedCombine.forward``): ``(combined_x [T, H], None)``."""
    _touch_buffer(group, x)
    return _combine(x.contiguous(), group, handle), None


# UCCL-EP flavoured names used by NeMo Automodel: the same ops serve both.
uccl_fused_dispatch = fused_dispatch
uccl_fused_combine = fused_combine
UCCLFusedDispatch = FusedDispatch
UCCLFusedCombine = FusedCombine
get_uccl_buffer = get_buffer
set_uccl_num_sms = set_deepep_num_sms
HAVE_UCCL_EP = True


# ---------------------------------------------------------------- HybridEP family


class HybridEPConfig(NamedTuple):
    """What ``init_hybrid_ep_buffer`` recorded. ``max_num_of_tokens_per_rank`` bounds the tokens
    any rank passes; static-shape dispatches receive at most ``R *`` that many rows."""

    group_name: str
    hidden_dim: int
    max_num_of_tokens_per_rank: int
    num_local_experts: int
    num_sms_dispatch_api: int
    num_sms_combine_api: int


_hybrid_ep_buffer: HybridEPConfig | None = None


def init_hybrid_ep_buffer(
    group: dist.ProcessGroup,
    hidden_dim: int,
    seq_len: int,
    num_local_experts: int,
    num_sms_dispatch_api: int,
    num_sms_combine_api: int,
    fp8_dispatch: bool,
) -> None:
    """Records the HybridEP sizes (ep_ops allocates no memory for them).

    Args:
        group: the expert-parallel ProcessGroup. hidden_dim: H.
        seq_len: the most tokens a rank passes to one dispatch; the static (``num_permuted_tokens``)
            path sizes its worst-token receive as ``group.size() * seq_len``, so it must be the
            same on every rank.
        num_local_experts: experts per rank. num_sms_dispatch_api, num_sms_combine_api: kept.
        fp8_dispatch: must be False.
    """
    global _hybrid_ep_buffer
    if fp8_dispatch:
        raise NotImplementedError("init_hybrid_ep_buffer: fp8_dispatch is not supported by the HybridEP API")
    for name, value in (
        ("hidden_dim", hidden_dim),
        ("seq_len", seq_len),
        ("num_local_experts", num_local_experts),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"init_hybrid_ep_buffer: {name} must be a positive int, got {value!r}")
    group = _group(group)
    _hybrid_ep_buffer = HybridEPConfig(
        group.group_name, hidden_dim, seq_len, num_local_experts, num_sms_dispatch_api, num_sms_combine_api
    )


def reset_hybrid_ep_buffer() -> None:
    """Forgets the recorded HybridEP sizes."""
    global _hybrid_ep_buffer
    _hybrid_ep_buffer = None


class HybridEPHandle(NamedTuple):
    """What ``hybrid_ep_combine`` (and the backward passes) need from a HybridEP dispatch: the
    dispatch handle, the permute map and the group. The map's pairs are (row, global expert
    column) of the ``[T, E]`` routing: ``pair_slot`` is ``[N, E]``, -1 outside this rank's
    experts, so the fused and the unfused paths share one handle."""

    rank_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    pair_slot: torch.Tensor
    slot_pair: torch.Tensor
    tokens_per_expert: torch.Tensor
    group_name: str
    rank: int
    num_experts: int

    def permute_map(self) -> PermuteMap:
        return PermuteMap(self.pair_slot, self.slot_pair, self.tokens_per_expert)


def _worst_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> int:
    """Rows a static HybridEP dispatch receives at most: R * (tokens per rank bound)."""
    bound = x.size(0)
    config = _hybrid_ep_buffer
    if config is not None and config.group_name == group.group_name:
        bound = max(bound, config.max_num_of_tokens_per_rank)
    return group.size() * bound


def _raise_everywhere(group, op: str, error: Exception):
    """Raises ``error`` after joining ``op``'s header exchange with an input the op rejects, so
    that the other ranks, already inside ``op``, raise too instead of waiting for this rank
    (the same protocol as ``Buffer``'s own checks). Compiled code checks at trace time."""
    if not torch.compiler.is_compiling():
        buffer = get_buffer(group, 2)
        if op in ("dispatch_permuted", "combine_permuted"):
            _reject_permuted(buffer, op)
        else:
            buffer._reject(op)
    raise error


def _reject_permuted(buffer: Buffer, op: str) -> None:
    """``Buffer._reject`` for the fused-permute ops: calls ``op`` with a 1-D payload, which its
    header exchange flags as this rank's bad input, and swallows the error."""
    num_ranks, device, name = buffer.group_size, buffer.device, buffer.group_name
    empty = torch.empty(0, dtype=torch.bfloat16, device=device)
    no_tokens = torch.empty((0, num_ranks), dtype=torch.bool, device=device)
    ids = torch.empty((0, 1), dtype=torch.int64, device=device)
    try:
        if op == "dispatch_permuted":
            ops.dispatch_permuted(empty, None, ids, None, no_tokens, num_ranks, 0, 1, 0, name)
        else:
            prefix = torch.zeros((num_ranks, num_ranks), dtype=torch.int32, device=device)
            src_idx = torch.empty(0, dtype=torch.int32, device=device)
            ops.combine_permuted(empty, None, ids, no_tokens, prefix, src_idx, name)
    except Exception:  # noqa: BLE001  (the point of the call: every rank raises)
        return
    raise AssertionError(f"_reject_permuted: ep_ops.{op} accepted an input it must reject")


def _hybrid_input_problem(x, routing_map, probs, num_experts) -> str:
    if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
        return (
            "routing_map must be a 2-D bool tensor [num_tokens, num_experts], "
            f"got {routing_map.dtype} of shape {tuple(routing_map.shape)}"
        )
    if x.dim() != 2:
        return f"x must be 2-D [num_tokens, hidden], got {tuple(x.shape)}"
    if routing_map.size(1) != num_experts or routing_map.size(0) != x.size(0):
        return (
            f"routing_map must have shape [{x.size(0)}, {num_experts}] "
            f"(num_tokens, num_local_experts * group size), got {tuple(routing_map.shape)}"
        )
    if probs is not None and probs.shape != routing_map.shape:
        return f"probs must have routing_map's shape {tuple(routing_map.shape)}, got {tuple(probs.shape)}"
    return ""


def _hybrid_dispatch(
    x, routing_map, probs, group, num_local_experts, num_permuted_tokens, pad_multiple, fuse_permute=True
):
    """Dispatch grouped by local expert: ``dispatch_permuted``, or (``fuse_permute=False``)
    dispatch + ``ep_ops.permute``, bitwise equal; differentiable wrt x and probs through the ops'
    autograd."""
    group = _group(group)
    num_ranks, rank = group.size(), group.rank()
    num_experts = num_local_experts * num_ranks
    problem = _hybrid_input_problem(x, routing_map, probs, num_experts)
    if problem:
        op = "dispatch_permuted" if fuse_permute else "dispatch"
        _raise_everywhere(group, op, ValueError(f"hybrid_ep_dispatch: {problem}"))
    # The routing travels as a [T, E] "top-E" list: column e names expert e or -1.
    experts = torch.arange(num_experts, device=routing_map.device).expand(routing_map.shape)
    token_indices = torch.where(routing_map, experts, -1)
    token_probs = None if probs is None else torch.where(routing_map, probs.float(), 0.0)
    if isinstance(num_permuted_tokens, torch.Tensor):  # Megatron passes tokens_per_expert.sum()
        num_permuted_tokens = int(num_permuted_tokens.item())
    num_worst_tokens = 0 if num_permuted_tokens is None else _worst_tokens(x, group)
    if fuse_permute:
        _, _, is_token_in_rank = ops.get_dispatch_layout(token_indices, num_experts, num_ranks)
        permuted_x, _, permuted_probs, tokens_per_expert, pair_slot, prefix, src_idx = ops.dispatch_permuted(
            x.contiguous(), None, token_indices, token_probs, is_token_in_rank, num_experts,
            num_worst_tokens, pad_multiple or 1, num_permuted_tokens or 0, group.group_name,
        )  # fmt: skip
        pmap = PermuteMap(pair_slot, slot_pair_of(pair_slot, permuted_x.size(0)), tokens_per_expert)
        handle = (prefix, src_idx, is_token_in_rank)
    else:
        recv_x, recv_idx, recv_probs, _, handle = _dispatch(
            x.contiguous(), token_indices, token_probs, num_experts, group, num_worst_tokens
        )
        # recv_idx holds local ids in this rank's columns and -1 elsewhere: exactly the pairs.
        pmap = make_permute_map(
            recv_idx, num_local_experts, pad_multiple=pad_multiple, num_out=num_permuted_tokens
        )
        permuted_x = permute(recv_x, pmap, num_experts)
        permuted_probs = None if probs is None else permute_probs(recv_probs, pmap)
    permuted_probs = None if probs is None else permuted_probs
    hybrid_handle = HybridEPHandle(*handle, *pmap, group.group_name, rank, num_experts)
    return permuted_x, permuted_probs, None, pmap.tokens_per_expert, hybrid_handle


def _hybrid_combine(x, handle: HybridEPHandle, fuse_permute=True):
    """combine_permuted, or (``fuse_permute=False``) unpermute + combine, bitwise equal;
    differentiable wrt x through the ops' autograd."""
    in_rank, prefix, src_idx = handle.is_token_in_rank, handle.rank_prefix_matrix, handle.recv_src_idx
    if fuse_permute:
        combined_x, _ = ops.combine_permuted(
            x, None, handle.pair_slot, in_rank, prefix, src_idx, handle.group_name
        )
    else:
        rows = unpermute(x, handle.permute_map())
        combined_x, _ = ops.combine(rows, None, None, None, in_rank, prefix, src_idx, handle.group_name)
    return combined_x


def _check_combine_size(x, handle: HybridEPHandle, num_permuted_tokens, fuse_permute=True):
    if torch.compiler.is_compiling():
        # Dynamo needs constant check messages; the sizes may be symbolic here.
        torch._check(
            x.size(0) == handle.slot_pair.size(0),
            lambda: "hybrid_ep_combine: x must have the row count the dispatch produced",
        )
        return
    problem = ""
    if x.dim() != 2:
        problem = f"x must be 2-D [num_permuted_tokens, hidden], got {tuple(x.shape)}"
    elif x.size(0) != handle.slot_pair.size(0):
        problem = f"x has {x.size(0)} rows, the dispatch produced {handle.slot_pair.size(0)}"
    elif isinstance(num_permuted_tokens, int) and x.size(0) != num_permuted_tokens:
        problem = f"x has {x.size(0)} rows but num_permuted_tokens is {num_permuted_tokens}"
    if problem:
        group = dist.distributed_c10d._resolve_process_group(handle.group_name)
        op = "combine_permuted" if fuse_permute else "combine"
        _raise_everywhere(group, op, ValueError(f"hybrid_ep_combine: {problem}"))


def _maybe_init_hybrid(group, x, num_local_experts, num_sms_dispatch_api, num_sms_combine_api):
    """Like Megatron: the first dispatch records the sizes when nobody did (eager only)."""
    if torch.compiler.is_compiling() or _hybrid_ep_buffer is not None or x.dim() != 2 or x.size(0) == 0:
        return
    num_tokens, hidden_dim = x.shape
    init_hybrid_ep_buffer(
        group, hidden_dim, num_tokens, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, False
    )


class HybridEPDispatch(torch.autograd.Function):
    """Dispatch with the permute for the experts (fused); its backward is combine_permuted."""

    @staticmethod
    def forward(
        ctx,
        x,
        routing_map,
        probs,
        group,
        num_local_experts,
        num_sms_dispatch_api=24,
        num_sms_combine_api=24,
        num_permuted_tokens=None,
        pad_multiple=None,
    ):
        """Sends each token to the ranks of its experts and groups the received rows by expert.

        Args:
            x: ``[T, H]`` float tokens. routing_map: ``[T, E]`` bool, E = num_local_experts * R.
            probs: ``[T, E]`` float (values where routing_map is False are ignored), or None.
            group: the expert-parallel ProcessGroup (None = WORLD).
            num_local_experts: experts per rank.
            num_sms_dispatch_api, num_sms_combine_api: recorded (``init_hybrid_ep_buffer``).
            num_permuted_tokens: static row count of the output (worst-token dispatch, no host
                sync). Rows past it are dropped, so size it for the worst case, e.g.
                ``R * seq_len * min(topk, num_local_experts)`` plus padding.
            pad_multiple: each expert group is padded with zero rows to this multiple.
        Returns:
            permuted x ``[P, H]`` (grouped by local expert, rows of a group by source rank then
            token), permuted probs ``[P]`` float32 (0 on padding; None without probs), None
            (scaling factor), tokens_per_expert ``[E_local]`` int64 device tensor (padded group
            sizes), handle.
        """
        _maybe_init_hybrid(group, x, num_local_experts, num_sms_dispatch_api, num_sms_combine_api)
        out = _hybrid_dispatch(
            x, routing_map, probs, group, num_local_experts, num_permuted_tokens, pad_multiple
        )
        permuted_x, permuted_probs, _, tokens_per_expert, handle = out
        ctx.group_name = handle.group_name
        ctx.save_for_backward(routing_map, *handle[:6])
        ctx.x_shape, ctx.x_dtype = permuted_x.shape, permuted_x.dtype
        ctx.probs_dtype = probs.dtype if probs is not None else None
        ctx.mark_non_differentiable(tokens_per_expert)
        return out

    @staticmethod
    def backward(ctx, grad_x, grad_probs, _grad_scaling, _grad_counts, _grad_handle):
        routing_map, prefix, src_idx, in_rank, pair_slot, slot_pair, _ = ctx.saved_tensors
        if grad_x is None:
            grad_x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=pair_slot.device)
        grad_permuted_probs = None
        if ctx.probs_dtype is not None:
            if grad_probs is None:
                grad_probs = torch.zeros(slot_pair.shape, dtype=torch.float32, device=slot_pair.device)
            grad_permuted_probs = grad_probs.float().contiguous()
        # Each token gets its rows' slot sums (x) and its pairs' probability gradients ([T, E]).
        grad_in, grad_token_probs = ops.combine_permuted(
            grad_x.contiguous(), grad_permuted_probs, pair_slot, in_rank, prefix, src_idx, ctx.group_name
        )
        grad_in_probs = None
        if ctx.probs_dtype is not None:
            grad_in_probs = torch.where(routing_map, grad_token_probs, 0.0).to(ctx.probs_dtype)
        return grad_in, None, grad_in_probs, None, None, None, None, None, None


class HybridEPCombine(torch.autograd.Function):
    """Unpermute + combine (fused: combine_permuted); its backward is cached dispatch + permute."""

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Sums each token's expert rows back onto its rank.

        Args:
            x: ``[P, H]`` expert outputs in the layout ``HybridEPDispatch`` returned.
            handle: that dispatch's handle. num_permuted_tokens, pad_multiple: as given to it
                (the layout is in the handle; a given num_permuted_tokens is checked).
        Returns:
            combined ``[T, H]`` (x's dtype): per token the sum over its experts' rows.
        """
        _check_combine_size(x, handle, num_permuted_tokens)
        ctx.group_name = handle.group_name
        ctx.save_for_backward(*handle[:6])
        return _hybrid_combine(x.contiguous(), handle)

    @staticmethod
    def backward(ctx, grad_combined):
        prefix, src_idx, in_rank, pair_slot, slot_pair, tokens_per_expert = ctx.saved_tensors
        grad_rows, _ = ops.cached_dispatch(
            grad_combined.contiguous(), None, in_rank, prefix, src_idx, ctx.group_name
        )
        pmap = PermuteMap(pair_slot, slot_pair, tokens_per_expert)
        return permute(grad_rows, pmap, pair_slot.size(1)), None, None, None


def hybrid_ep_dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    num_sms_dispatch_api=24,
    num_sms_combine_api=24,
    num_permuted_tokens=None,
    pad_multiple=None,
    *,
    num_blocks_permute=None,
    num_blocks_unpermute=None,
    fused=False,
    fuse_permute=True,
    num_sms_preprocessing_api=None,
):
    """Dispatch + permute (see ``HybridEPDispatch.forward``), differentiable wrt x and probs
    through the ops' own autograd: ``(permuted_x, permuted_probs, None, tokens_per_expert,
    handle)``. ``fuse_permute`` (default True): one ``dispatch_permuted``; False: dispatch, then
    ``ep_ops.permute`` (same results). The other keyword-only arguments are newer Megatron/NeMo
    tuning knobs of HybridEP's kernels, accepted and ignored."""
    _maybe_init_hybrid(group, x, num_local_experts, num_sms_dispatch_api, num_sms_combine_api)
    return _hybrid_dispatch(
        x, routing_map, probs, group, num_local_experts, num_permuted_tokens, pad_multiple, fuse_permute
    )


def hybrid_ep_combine(
    x, handle, num_permuted_tokens=None, pad_multiple=None, *, fused=False, fuse_permute=True
):
    """Unpermute + combine (see ``HybridEPCombine.forward``): ``[T, H]``. ``fuse_permute``
    (default True): one ``combine_permuted``; False: ``ep_ops.permute.unpermute``, then combine
    (same results). ``fused`` (newer Megatron/NeMo) is accepted and ignored."""
    _check_combine_size(x, handle, num_permuted_tokens, fuse_permute)
    return _hybrid_combine(x.contiguous(), handle, fuse_permute)
