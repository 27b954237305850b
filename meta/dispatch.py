import torch

from ._checks import (
    check_experts,
    check_matrix,
    check_payload,
    check_same_device,
    check_type,
    check_value,
    world_size,
)


def check_routing(x, topk_idx, topk_weights, is_token_in_rank, num_ranks, op):
    """Checks the optional top-k pair and is_token_in_rank; returns num_topk (0 without top-k)."""
    num_tokens = x.size(0)
    check_matrix(is_token_in_rank, op, "is_token_in_rank", torch.bool, num_tokens, num_ranks)
    check_same_device(is_token_in_rank, x, op, "is_token_in_rank")
    if topk_idx is None:
        check_value(topk_weights is None, op, "topk_weights needs topk_idx")
        return 0
    check_matrix(topk_idx, op, "topk_idx", torch.int64, num_tokens)
    check_same_device(topk_idx, x, op, "topk_idx")
    num_topk = topk_idx.size(1)
    if topk_weights is not None:
        check_matrix(topk_weights, op, "topk_weights", torch.float32, num_tokens, num_topk)
        check_same_device(topk_weights, x, op, "topk_weights")
    return num_topk


@torch.library.register_fake("ep_ops::dispatch")
def dispatch(
    x,
    x_scales,
    topk_idx,
    topk_weights,
    is_token_in_rank,
    num_experts,
    expert_alignment,
    num_worst_tokens,
    group_name,
):
    """Sends each token once to every rank that holds one of its experts.

    Args:
        x: ``[num_tokens, hidden]`` bfloat16/float16/float32/float64, or float8_e4m3fn with
            x_scales ``[num_tokens, hidden / 128]`` float32.
        topk_idx: optional ``[num_tokens, num_topk]`` int64 global expert ids (-1 = none).
        topk_weights: optional ``[num_tokens, num_topk]`` float32 (needs topk_idx).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, from get_dispatch_layout.
        num_experts: total experts (a multiple of the world size); used with top-k.
        expert_alignment: per-expert receive counts are rounded up to this multiple.
        num_worst_tokens: 0 = exact mode; > 0 = worst-token mode with that many rows.
    Returns:
        recv_x ``[N, hidden]`` (x's dtype), recv_x_scales ``[N, hidden / 128]`` float32 (FP8) or
        empty, recv_topk_idx ``[N, num_topk]`` int64 local expert ids (-1 = not here) or empty,
        recv_topk_weights ``[N, num_topk]`` float32 (0 where not here) or empty,
        num_recv_tokens_per_expert ``[num_experts / num_ranks]`` int32 or empty (no top-k),
        rank_prefix_matrix ``[num_ranks, num_ranks]`` int32, recv_src_idx ``[N]`` int32.
        Rows are ordered by source rank, then by source token index.

    Data-dependent size: in exact mode N (rows received) is an unbacked SymInt; in worst-token
    mode N = num_worst_tokens and padding rows have recv_topk_idx -1, recv_src_idx -1 and zeros.
    """
    op = "dispatch"
    num_ranks = world_size(group_name)
    num_scales = check_payload(x, x_scales, op)
    num_topk = check_routing(x, topk_idx, topk_weights, is_token_in_rank, num_ranks, op)
    if topk_idx is not None:
        check_experts(num_experts, num_ranks, op)
    check_value(expert_alignment >= 1, op, f"expert_alignment must be >= 1, got {expert_alignment}")
    check_value(num_worst_tokens >= 0, op, f"num_worst_tokens must be >= 0, got {num_worst_tokens}")

    if num_worst_tokens > 0:
        num_recv = num_worst_tokens
    else:
        num_recv = torch.library.get_ctx().new_dynamic_size()
    hidden = x.size(1)
    recv_x = x.new_empty((num_recv, hidden))
    recv_x_scales = x.new_empty((num_recv, num_scales) if x_scales is not None else (0,), dtype=torch.float32)
    if topk_idx is None:
        recv_topk_idx = x.new_empty((0,), dtype=torch.int64)
        counts = x.new_empty((0,), dtype=torch.int32)
    else:
        recv_topk_idx = x.new_empty((num_recv, num_topk), dtype=torch.int64)
        counts = x.new_empty((num_experts // num_ranks,), dtype=torch.int32)
    recv_topk_weights = x.new_empty(
        (num_recv, num_topk) if topk_weights is not None else (0,), dtype=torch.float32
    )
    return (
        recv_x,
        recv_x_scales,
        recv_topk_idx,
        recv_topk_weights,
        counts,
        x.new_empty((num_ranks, num_ranks), dtype=torch.int32),
        x.new_empty((num_recv,), dtype=torch.int32),
    )


def check_handle(is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op, device):
    check_value(
        is_token_in_rank.dim() == 2 and is_token_in_rank.size(1) == num_ranks,
        op,
        f"is_token_in_rank must be [num_tokens, {num_ranks}], got {tuple(is_token_in_rank.shape)}",
    )
    check_type(
        is_token_in_rank.dtype == torch.bool,
        op,
        f"is_token_in_rank must be bool, got {is_token_in_rank.dtype}",
    )
    check_matrix(rank_prefix_matrix, op, "rank_prefix_matrix", torch.int32, num_ranks, num_ranks)
    check_value(recv_src_idx.dim() == 1, op, f"recv_src_idx must be 1-D, got {tuple(recv_src_idx.shape)}")
    check_type(recv_src_idx.dtype == torch.int32, op, f"recv_src_idx must be int32, got {recv_src_idx.dtype}")
    for name, t in (
        ("is_token_in_rank", is_token_in_rank),
        ("rank_prefix_matrix", rank_prefix_matrix),
        ("recv_src_idx", recv_src_idx),
    ):
        check_value(t.device == device, op, f"{name} must be on {device}, got {t.device}")


@torch.library.register_fake("ep_ops::cached_dispatch")
def cached_dispatch(x, x_scales, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name):
    """Dispatch along the layout of an earlier dispatch, given its handle tensors.

    Returns recv_x ``[N, hidden]`` and recv_x_scales ``[N, hidden / 128]`` float32 (FP8) or
    empty, where N = ``recv_src_idx.size(0)``: static, known from the handle (worst-token
    handles give worst-token padded outputs, padding rows zero). No layout work, no host sync.
    """
    op = "cached_dispatch"
    num_ranks = world_size(group_name)
    num_scales = check_payload(x, x_scales, op)
    check_value(
        is_token_in_rank.size(0) == x.size(0),
        op,
        f"x has {x.size(0)} tokens but the handle's is_token_in_rank has {is_token_in_rank.size(0)}",
    )
    check_handle(is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op, x.device)
    num_recv = recv_src_idx.size(0)
    recv_x_scales = (
        x.new_empty((num_recv, num_scales), dtype=torch.float32)
        if x_scales is not None
        else x.new_empty((0,), dtype=torch.float32)
    )
    return x.new_empty((num_recv, x.size(1))), recv_x_scales
