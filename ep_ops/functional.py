"""Typed functional API over the ops, for eager and compiled code.

Thin wrappers: each call is one ``torch.ops.ep_ops`` op, so ``torch.compile(fullgraph=True)``
traces straight through them. Handles are NamedTuples of tensors; ``group`` is a process
group's ``group_name`` (or the group itself, resolved outside compiled regions).
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

ops = torch.ops.ep_ops


def group_name_of(group) -> str:
    """The registered name of ``group`` (a ProcessGroup, or already a name)."""
    if isinstance(group, str):
        return group
    if group is None:
        return dist.group.WORLD.group_name
    return group.group_name


class DispatchHandle(NamedTuple):
    """What combine and cached dispatch need from a dispatch: is_token_in_rank ``[T, R]`` bool,
    rank_prefix_matrix ``[R, R]`` int32, recv_src_idx ``[N]`` int32."""

    is_token_in_rank: torch.Tensor
    rank_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert: torch.Tensor | None
    handle: DispatchHandle


class LowLatencyHandle(NamedTuple):
    """src_info ``[E_local, R*M]`` int32, layout_range ``[E_local, R]`` int64, recv_token_slots
    ``[R, M, K]`` int32, plus the static sizes low-latency combine needs."""

    src_info: torch.Tensor
    layout_range: torch.Tensor
    recv_token_slots: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    num_experts: int


class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_count: torch.Tensor
    handle: LowLatencyHandle


def _present(t: torch.Tensor, given: bool) -> torch.Tensor | None:
    return t if given else None


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank
    [T, R] bool) from topk_idx [T, K] int64."""
    return ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)


def dispatch(
    x: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    group: str,
    *,
    x_scales: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    num_experts: int = 0,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
) -> DispatchResult:
    """See ``ep_ops::dispatch`` (meta/dispatch.py) for shapes. Exact mode (num_worst_tokens=0)
    has a data-dependent row count (an unbacked SymInt under compile); worst-token mode has a
    static one and is CUDA-graph safe."""
    out = ops.dispatch(
        x,
        x_scales,
        topk_idx,
        topk_weights,
        is_token_in_rank,
        num_experts,
        expert_alignment,
        num_worst_tokens,
        group_name_of(group),
    )
    has_topk = topk_idx is not None
    return DispatchResult(
        out[0],
        _present(out[1], x_scales is not None),
        _present(out[2], has_topk),
        _present(out[3], topk_weights is not None),
        _present(out[4], has_topk),
        DispatchHandle(is_token_in_rank, out[5], out[6]),
    )


def cached_dispatch(
    x: torch.Tensor, handle: DispatchHandle, group: str, *, x_scales: torch.Tensor | None = None
):
    """Dispatch along an earlier dispatch's layout: (recv_x, recv_x_scales or None)."""
    recv_x, recv_x_scales = ops.cached_dispatch(x, x_scales, *handle, group_name_of(group))
    return recv_x, _present(recv_x_scales, x_scales is not None)


def combine(
    x: torch.Tensor,
    handle: DispatchHandle,
    group: str,
    *,
    topk_weights: torch.Tensor | None = None,
    bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
):
    """Sum each token's dispatched rows back: (combined_x [T, H], combined_topk_weights or None)."""
    combined_x, combined_w = ops.combine(x, topk_weights, bias[0], bias[1], *handle, group_name_of(group))
    return combined_x, _present(combined_w, topk_weights is not None)


def low_latency_dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    group: str,
    *,
    use_fp8: bool = False,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> LowLatencyDispatchResult:
    """Static-shape dispatch into ``[E_local, R*M, H]`` (see meta/low_latency.py)."""
    out = ops.low_latency_dispatch(
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        round_scale,
        use_ue8m0,
        group_name_of(group),
    )
    handle = LowLatencyHandle(out[3], out[4], out[5], num_max_dispatch_tokens_per_rank, num_experts)
    return LowLatencyDispatchResult(out[0], _present(out[1], use_fp8), out[2], handle)


def low_latency_combine(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    group: str,
    *,
    use_logfmt: bool = False,
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, ``[T, H]`` bfloat16."""
    return ops.low_latency_combine(
        x,
        topk_idx,
        topk_weights,
        handle.recv_token_slots,
        handle.num_max_dispatch_tokens_per_rank,
        use_logfmt,
        group_name_of(group),
    )


def low_latency_dispatch_send(
    x,
    topk_idx,
    num_max_dispatch_tokens_per_rank,
    num_experts,
    group,
    *,
    use_fp8=False,
    round_scale=False,
    use_ue8m0=False,
) -> torch.Tensor:
    """Issue half of low_latency_dispatch; pass its result to low_latency_dispatch_recv. Compute
    placed between the two halves overlaps the exchange where the backend allows it."""
    return ops.low_latency_dispatch_send(
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        round_scale,
        use_ue8m0,
        group_name_of(group),
    )


def low_latency_dispatch_recv(
    recv_packed,
    hidden,
    num_topk,
    num_max_dispatch_tokens_per_rank,
    num_experts,
    group,
    *,
    use_fp8=False,
    use_ue8m0=False,
) -> LowLatencyDispatchResult:
    out = ops.low_latency_dispatch_recv(
        recv_packed,
        num_max_dispatch_tokens_per_rank,
        hidden,
        num_topk,
        num_experts,
        use_fp8,
        use_ue8m0,
        group_name_of(group),
    )
    handle = LowLatencyHandle(out[3], out[4], out[5], num_max_dispatch_tokens_per_rank, num_experts)
    return LowLatencyDispatchResult(out[0], _present(out[1], use_fp8), out[2], handle)


def low_latency_combine_send(x, topk_idx, topk_weights, handle: LowLatencyHandle, group, *, use_logfmt=False):
    return ops.low_latency_combine_send(
        x,
        topk_idx,
        topk_weights,
        handle.recv_token_slots,
        handle.num_max_dispatch_tokens_per_rank,
        use_logfmt,
        group_name_of(group),
    )


def low_latency_combine_recv(
    recv_partials, topk_idx, hidden, handle: LowLatencyHandle, group, *, use_logfmt=False
):
    return ops.low_latency_combine_recv(
        recv_partials,
        topk_idx,
        hidden,
        handle.num_experts,
        handle.num_max_dispatch_tokens_per_rank,
        use_logfmt,
        group_name_of(group),
    )
