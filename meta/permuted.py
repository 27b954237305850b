"""Fakes of the fused-permute ops: ``dispatch_permuted`` and ``combine_permuted``."""

import torch

from ._checks import (
    FLOAT_DTYPES,
    check_experts,
    check_matrix,
    check_payload,
    check_same_device,
    check_type,
    check_value,
    world_size,
)
from .dispatch import check_handle, check_routing


@torch.library.register_fake("ep_ops::dispatch_permuted")
def dispatch_permuted(
    x,
    x_scales,
    topk_idx,
    topk_weights,
    is_token_in_rank,
    num_experts,
    num_worst_tokens,
    pad_multiple,
    num_out,
    group_name,
):
    """Dispatch whose received rows come grouped by local expert (``ep_ops.permute``'s layout).

    Args: as ``dispatch`` (``topk_idx`` required, each expert at most once per row, at least one
    column), and
        pad_multiple: every expert group is padded with zero rows to this multiple (1 = none).
        num_out: 0 = exact (P is the padded total); > 0 = P is num_out, and pairs that land at
            or past it are dropped (no row, no expert output), as ``make_permute_map(num_out=)``.
    Returns:
        permuted_x ``[P, hidden]`` (x's dtype; group e holds the rows of local expert e in
        source-rank, then source-token order, then zero padding rows),
        permuted_x_scales ``[P, hidden / 128]`` float32 (FP8; 0 on padding) or empty,
        permuted_probs ``[P]`` float32 (the topk weight of each row's pair, 0 on padding) or
        empty without topk_weights,
        tokens_per_expert ``[num_experts / num_ranks]`` int64 (padded group sizes),
        pair_slot ``[N, num_topk]`` int64 (permuted row of each received (row, slot) pair; -1 =
        expert elsewhere, no expert, or dropped), rank_prefix_matrix ``[num_ranks, num_ranks]``
        int32, recv_src_idx ``[N]`` int32: with is_token_in_rank, the handle of
        ``combine_permuted``.

    Data-dependent sizes: N is num_worst_tokens when > 0 (padding rows: pair_slot -1,
    recv_src_idx -1), else an unbacked SymInt; P is num_out when > 0, else an unbacked SymInt.
    With both static nothing syncs with the host.
    """
    op = "dispatch_permuted"
    num_ranks = world_size(group_name)
    num_scales = check_payload(x, x_scales, op)
    check_value(topk_idx is not None, op, "topk_idx is required")
    num_topk = check_routing(x, topk_idx, topk_weights, is_token_in_rank, num_ranks, op)
    num_local = check_experts(num_experts, num_ranks, op)
    check_value(
        num_topk >= 1, op, f"topk_idx needs at least one column (an expert slot), got {tuple(topk_idx.shape)}"
    )
    check_value(num_worst_tokens >= 0, op, f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
    check_value(pad_multiple >= 1, op, f"pad_multiple must be >= 1 (1 = no padding), got {pad_multiple}")
    check_value(num_out >= 0, op, f"num_out must be >= 0 (0 = exact), got {num_out}")

    ctx = torch.library.get_ctx()
    num_recv = num_worst_tokens if num_worst_tokens > 0 else ctx.new_dynamic_size()
    num_permuted = num_out if num_out > 0 else ctx.new_dynamic_size()
    return (
        x.new_empty((num_permuted, x.size(1))),
        x.new_empty((num_permuted, num_scales) if x_scales is not None else (0,), dtype=torch.float32),
        x.new_empty((num_permuted,) if topk_weights is not None else (0,), dtype=torch.float32),
        x.new_empty((num_local,), dtype=torch.int64),
        x.new_empty((num_recv, num_topk), dtype=torch.int64),
        x.new_empty((num_ranks, num_ranks), dtype=torch.int32),
        x.new_empty((num_recv,), dtype=torch.int32),
    )


@torch.library.register_fake("ep_ops::combine_permuted")
def combine_permuted(h, probs, pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name):
    """Inverse of ``dispatch_permuted``.

    Args:
        h: ``[P, hidden]`` float expert outputs in the permuted layout.
        probs: optional ``[P]`` float32 in the permuted layout (e.g. a gradient of
            permuted_probs); each pair's value comes back to its token's slot.
        pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx: the dispatch's handle
            (pair_slot ``[N, num_topk]`` int64).
    Returns:
        combined_x ``[num_tokens, hidden]`` (h's dtype): each received row is first the sum of
        its pairs' rows of h (float32, float64 for float64 h, in slot order, rounded once:
        ``ep_ops.permute.unpermute``), then the rows are summed per token over ranks as
        ``combine`` does; combined_probs ``[num_tokens, num_topk]`` float32 (0 where a slot had
        no permuted row) or empty without probs. All sizes static.
    """
    op = "combine_permuted"
    num_ranks = world_size(group_name)
    check_value(h.dim() == 2, op, f"h must be 2-D [num_permuted_tokens, hidden], got shape {tuple(h.shape)}")
    check_type(h.dtype in FLOAT_DTYPES, op, f"h must be a floating dtype (not FP8), got {h.dtype}")
    check_matrix(pair_slot, op, "pair_slot", torch.int64, recv_src_idx.size(0))
    check_same_device(pair_slot, h, op, "pair_slot")
    check_value(
        pair_slot.size(1) >= 1, op, f"pair_slot needs at least one column, got shape {tuple(pair_slot.shape)}"
    )
    if probs is not None:
        check_value(
            probs.dim() == 1 and probs.size(0) == h.size(0),
            op,
            f"probs must be 1-D [{h.size(0)}] like h's rows, got shape {tuple(probs.shape)}",
        )
        check_type(probs.dtype == torch.float32, op, f"probs must be float32, got {probs.dtype}")
        check_value(probs.device == h.device, op, f"probs must be on {h.device} like h, got {probs.device}")
    check_handle(is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op, h.device)
    num_tokens = is_token_in_rank.size(0)
    combined_probs = (
        h.new_empty((num_tokens, pair_slot.size(1)), dtype=torch.float32)
        if probs is not None
        else h.new_empty((0,), dtype=torch.float32)
    )
    return h.new_empty((num_tokens, h.size(1))), combined_probs
