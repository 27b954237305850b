"""Fakes of the low-latency ops. Every shape here is static: these ops are meant for CUDA graphs.

R = world size, M = num_max_dispatch_tokens_per_rank, E_local = num_experts / R.
"""

import torch

from ._checks import check_experts, check_matrix, check_same_device, check_type, check_value, world_size
from .wire import FP8_BLOCK, UE8M0_PACK, combine_row_bytes, dispatch_row_bytes


def check_tokens(x, topk_idx, num_max, op):
    check_value(x.dim() == 2, op, f"x must be 2-D [num_tokens, hidden], got {tuple(x.shape)}")
    check_type(x.dtype == torch.bfloat16, op, f"x must be bfloat16, got {x.dtype}")
    check_matrix(topk_idx, op, "topk_idx", torch.int64, x.size(0))
    check_same_device(topk_idx, x, op, "topk_idx")
    check_value(num_max > 0, op, f"num_max_dispatch_tokens_per_rank must be positive, got {num_max}")
    check_value(
        x.size(0) <= num_max,
        op,
        f"x has {x.size(0)} tokens, more than num_max_dispatch_tokens_per_rank ({num_max})",
    )


def check_fp8_options(hidden, use_fp8, round_scale, use_ue8m0, op):
    if use_fp8:
        check_value(hidden % FP8_BLOCK == 0, op, f"FP8 hidden size must be a multiple of 128, got {hidden}")
    check_value(not use_ue8m0 or use_fp8, op, "use_ue8m0 needs use_fp8")
    check_value(not use_ue8m0 or round_scale, op, "use_ue8m0 needs round_scale")
    if use_ue8m0:
        check_value(
            hidden % (FP8_BLOCK * UE8M0_PACK) == 0,
            op,
            f"UE8M0 hidden size must be a multiple of 512, got {hidden}",
        )


def column_major_scales(like, num_local_experts, slots, columns, dtype):
    """``[E_local, slots, columns]`` with the last two dims column-major, like DeepEP."""
    return like.new_empty_strided(
        (num_local_experts, slots, columns), (columns * slots, 1, slots), dtype=dtype
    )


def dispatch_outputs(like, num_ranks, num_max, hidden, num_topk, num_experts, use_fp8, use_ue8m0):
    num_local = num_experts // num_ranks
    slots = num_ranks * num_max
    if use_fp8:
        recv_x = like.new_empty((num_local, slots, hidden), dtype=torch.float8_e4m3fn)
        if use_ue8m0:
            scales = column_major_scales(
                like, num_local, slots, hidden // (FP8_BLOCK * UE8M0_PACK), torch.int32
            )
        else:
            scales = column_major_scales(like, num_local, slots, hidden // FP8_BLOCK, torch.float32)
    else:
        recv_x = like.new_empty((num_local, slots, hidden), dtype=torch.bfloat16)
        scales = like.new_empty((0,), dtype=torch.float32)
    return (
        recv_x,
        scales,
        like.new_empty((num_local,), dtype=torch.int32),
        like.new_empty((num_local, slots), dtype=torch.int32),
        like.new_empty((num_local, num_ranks), dtype=torch.int64),
        like.new_empty((num_ranks, num_max, num_topk), dtype=torch.int32),
    )


@torch.library.register_fake("ep_ops::low_latency_dispatch")
def low_latency_dispatch(
    x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, group_name
):
    """Dispatch of a decode-sized batch into a static per-expert layout.

    Args:
        x: ``[T, H]`` bfloat16, T <= M. topk_idx: ``[T, K]`` int64 global expert ids (-1 = none).
        use_fp8: cast to float8_e4m3fn with one float32 scale per 128 channels (amax / 448);
        round_scale: scales rounded up to a power of 2; use_ue8m0: scales packed as UE8M0 bytes,
        four per int32 (needs round_scale).
    Returns:
        recv_x ``[E_local, R*M, H]`` (bfloat16 or float8_e4m3fn); recv_x_scales
        ``[E_local, R*M, H/128]`` float32 or ``[E_local, R*M, H/512]`` int32 (UE8M0), both
        column-major in the last two dims, or empty (BF16); recv_count ``[E_local]`` int32;
        src_info ``[E_local, R*M]`` int32 source token index per received row; layout_range
        ``[E_local, R]`` int64 = (begin << 32) | count of each source rank's rows;
        recv_token_slots ``[R, M, K]`` int32: ``[s, t, k]`` is where token t of source rank s has
        its k-th expert row in the flattened ``[E_local * R*M]`` rows (-1 = not on this rank),
        used by combine.
        Rows of an expert are ordered by source rank, then source token. Rows past recv_count are
        zero on the collective backend and left unwritten by the NVLink kernels (as in DeepEP).
        All sizes static (no data-dependent shape).
    """
    op = "low_latency_dispatch"
    num_ranks = world_size(group_name)
    check_tokens(x, topk_idx, num_max_dispatch_tokens_per_rank, op)
    check_experts(num_experts, num_ranks, op)
    check_fp8_options(x.size(1), use_fp8, round_scale, use_ue8m0, op)
    return dispatch_outputs(
        x,
        num_ranks,
        num_max_dispatch_tokens_per_rank,
        x.size(1),
        topk_idx.size(1),
        num_experts,
        use_fp8,
        use_ue8m0,
    )


@torch.library.register_fake("ep_ops::low_latency_dispatch_send")
def low_latency_dispatch_send(
    x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, group_name
):
    """Send half of low_latency_dispatch. Returns recv_packed ``[R, M, row_bytes]`` uint8: the
    rows this rank received, one per (source rank, token slot; a token's slot is its index among
    its rank's tokens, and a slot whose token does not come here has source -1), in the wire
    format of ``meta/wire.py``; pass it to low_latency_dispatch_recv. On the NVLink kernels it is a view of
    the group's low-latency buffer that the peers are still filling: only the recv half (which
    waits for them) may read it, and the group's second-next send reuses it."""
    op = "low_latency_dispatch_send"
    num_ranks = world_size(group_name)
    check_tokens(x, topk_idx, num_max_dispatch_tokens_per_rank, op)
    check_experts(num_experts, num_ranks, op)
    check_fp8_options(x.size(1), use_fp8, round_scale, use_ue8m0, op)
    row_bytes = dispatch_row_bytes(x.size(1), topk_idx.size(1), use_fp8)
    return x.new_empty((num_ranks, num_max_dispatch_tokens_per_rank, row_bytes), dtype=torch.uint8)


@torch.library.register_fake("ep_ops::low_latency_dispatch_recv")
def low_latency_dispatch_recv(
    recv_packed,
    num_max_dispatch_tokens_per_rank,
    hidden,
    num_topk,
    num_experts,
    use_fp8,
    use_ue8m0,
    group_name,
):
    """Recv half of low_latency_dispatch: unpacks recv_packed into the outputs of
    low_latency_dispatch (same shapes, same values)."""
    op = "low_latency_dispatch_recv"
    num_ranks = world_size(group_name)
    check_experts(num_experts, num_ranks, op)
    check_fp8_options(hidden, use_fp8, use_ue8m0, use_ue8m0, op)
    row_bytes = dispatch_row_bytes(hidden, num_topk, use_fp8)
    expected = (num_ranks, num_max_dispatch_tokens_per_rank, row_bytes)
    check_type(recv_packed.dtype == torch.uint8, op, f"recv_packed must be uint8, got {recv_packed.dtype}")
    check_value(
        tuple(recv_packed.shape) == expected,
        op,
        f"recv_packed must have shape {expected}, got {tuple(recv_packed.shape)}",
    )
    return dispatch_outputs(
        recv_packed,
        num_ranks,
        num_max_dispatch_tokens_per_rank,
        hidden,
        num_topk,
        num_experts,
        use_fp8,
        use_ue8m0,
    )


def check_combine_inputs(x, topk_idx, topk_weights, recv_token_slots, num_max, num_ranks, op):
    check_value(x.dim() == 3, op, f"x must be 3-D [E_local, R*M, H], got {tuple(x.shape)}")
    check_type(x.dtype == torch.bfloat16, op, f"x must be bfloat16, got {x.dtype}")
    check_value(
        x.size(1) == num_ranks * num_max,
        op,
        f"x must have {num_ranks * num_max} rows per expert (R*M), got {x.size(1)}",
    )
    check_value(topk_idx.dim() == 2, op, f"topk_idx must be 2-D, got {tuple(topk_idx.shape)}")
    check_type(topk_idx.dtype == torch.int64, op, f"topk_idx must be int64, got {topk_idx.dtype}")
    check_value(
        topk_idx.size(0) <= num_max,
        op,
        f"topk_idx has {topk_idx.size(0)} tokens, more than num_max_dispatch_tokens_per_rank ({num_max})",
    )
    check_matrix(topk_weights, op, "topk_weights", torch.float32, topk_idx.size(0), topk_idx.size(1))
    expected = (num_ranks, num_max, topk_idx.size(1))
    check_type(
        recv_token_slots.dtype == torch.int32,
        op,
        f"recv_token_slots must be int32, got {recv_token_slots.dtype}",
    )
    check_value(
        tuple(recv_token_slots.shape) == expected,
        op,
        f"recv_token_slots must have shape {expected} (from the dispatch handle), "
        f"got {tuple(recv_token_slots.shape)}",
    )
    for name, t in (
        ("topk_idx", topk_idx),
        ("topk_weights", topk_weights),
        ("recv_token_slots", recv_token_slots),
    ):
        check_same_device(t, x, op, name)


@torch.library.register_fake("ep_ops::low_latency_combine")
def low_latency_combine(
    x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, use_logfmt, group_name
):
    """Weighted sum over each token's top-k experts.

    Args:
        x: ``[E_local, R*M, H]`` bfloat16 expert outputs in low_latency_dispatch's layout.
        topk_idx, topk_weights: this rank's ``[T, K]`` routing (int64, float32).
        recv_token_slots: ``[R, M, K]`` int32 from the dispatch handle.
        use_logfmt: partial sums cross the link LogFMT-10 encoded (lossy, ~35% fewer bytes).
    Returns:
        combined_x ``[T, H]`` bfloat16: sum over k of topk_weights[t, k] * expert row, where each
        rank first reduces its own experts (float32, in k order, rounded to bfloat16 once) and the
        token's rank sums those partials in float32 in ascending rank order. Static shape.
    """
    op = "low_latency_combine"
    num_ranks = world_size(group_name)
    check_combine_inputs(
        x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, num_ranks, op
    )
    return x.new_empty((topk_idx.size(0), x.size(2)))


@torch.library.register_fake("ep_ops::low_latency_combine_send")
def low_latency_combine_send(
    x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, use_logfmt, group_name
):
    """Send half of low_latency_combine. Returns recv_partials ``[R, M, row_bytes]`` uint8: the
    partial sums this rank received for its own tokens, one per (expert rank, token index). On the
    NVLink kernels a view of the group's buffer, as for low_latency_dispatch_send."""
    op = "low_latency_combine_send"
    num_ranks = world_size(group_name)
    check_combine_inputs(
        x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, num_ranks, op
    )
    hidden = x.size(2)
    if use_logfmt:
        check_value(
            hidden % FP8_BLOCK == 0, op, f"LogFMT hidden size must be a multiple of 128, got {hidden}"
        )
    row_bytes = combine_row_bytes(hidden, use_logfmt)
    return x.new_empty((num_ranks, num_max_dispatch_tokens_per_rank, row_bytes), dtype=torch.uint8)


@torch.library.register_fake("ep_ops::low_latency_combine_recv")
def low_latency_combine_recv(
    recv_partials, topk_idx, hidden, num_experts, num_max_dispatch_tokens_per_rank, use_logfmt, group_name
):
    """Recv half of low_latency_combine: sums the partials into ``[T, H]`` bfloat16."""
    op = "low_latency_combine_recv"
    num_ranks = world_size(group_name)
    check_experts(num_experts, num_ranks, op)
    check_value(topk_idx.dim() == 2, op, f"topk_idx must be 2-D, got {tuple(topk_idx.shape)}")
    check_type(topk_idx.dtype == torch.int64, op, f"topk_idx must be int64, got {topk_idx.dtype}")
    expected = (num_ranks, num_max_dispatch_tokens_per_rank, combine_row_bytes(hidden, use_logfmt))
    check_type(
        recv_partials.dtype == torch.uint8, op, f"recv_partials must be uint8, got {recv_partials.dtype}"
    )
    check_value(
        tuple(recv_partials.shape) == expected,
        op,
        f"recv_partials must have shape {expected}, got {tuple(recv_partials.shape)}",
    )
    return recv_partials.new_empty((topk_idx.size(0), hidden), dtype=torch.bfloat16)


@torch.library.register_fake("ep_ops::low_latency_combine_backward")
def low_latency_combine_backward(
    grad_combined_x, x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, group_name
):
    """Gradient of low_latency_combine: grad_x ``[E_local, R*M, H]`` bfloat16 (zero in unused
    rows) and grad_topk_weights ``[T, K]`` float32."""
    op = "low_latency_combine_backward"
    num_ranks = world_size(group_name)
    check_combine_inputs(
        x, topk_idx, topk_weights, recv_token_slots, num_max_dispatch_tokens_per_rank, num_ranks, op
    )
    check_matrix(grad_combined_x, op, "grad_combined_x", torch.bfloat16, topk_idx.size(0), x.size(2))
    return x.new_empty(x.shape), topk_weights.new_empty(topk_weights.shape)
