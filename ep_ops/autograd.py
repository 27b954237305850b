"""Autograd formulas of the ep_ops ops (registered with torch.library.register_autograd).

dispatch and combine are each other's backward: the gradient of dispatch is a combine of the
received gradients (the topk_weights gradient rides along in combine's weight reduction), the
gradient of combine is a cached dispatch along the same handle. The low-latency pair works the
same way through low_latency_combine and low_latency_combine_backward, and the fused-permute pair
through combine_permuted (dispatch_permuted's gradient) and a cached dispatch plus
ep_ops.permute's gathers (combine_permuted's).

Every backward communicates, so every rank must run it: a missing output gradient becomes zeros
rather than a skipped exchange, and all ranks must agree on which inputs require grad.
"""

import torch

from .permute import PermuteMap, permute, permute_probs, slot_pair_of

ops = torch.ops.ep_ops


def _grad_or_zeros(grad, like_shape, dtype, device):
    return torch.zeros(like_shape, dtype=dtype, device=device) if grad is None else grad.contiguous()


# ----- dispatch --------------------------------------------------------------------------------


def _dispatch_setup(ctx, inputs, output):
    x, x_scales, _, topk_weights, is_token_in_rank, *_, group_name = inputs
    _, _, recv_topk_idx, _, _, rank_prefix_matrix, recv_src_idx = output
    ctx.save_for_backward(is_token_in_rank, rank_prefix_matrix, recv_src_idx, recv_topk_idx)
    ctx.group_name = group_name
    ctx.hidden = x.size(1)
    ctx.is_fp8 = x_scales is not None
    ctx.grad_dtype = torch.bfloat16 if ctx.is_fp8 else x.dtype
    ctx.has_weights = topk_weights is not None
    ctx.num_topk = topk_weights.size(1) if ctx.has_weights else 0


def _dispatch_backward(ctx, grad_recv_x, _gs, _gi, grad_recv_topk_weights, _gc, _gr, _gsrc):
    is_token_in_rank, rank_prefix_matrix, recv_src_idx, recv_topk_idx = ctx.saved_tensors
    num_recv, device = recv_src_idx.size(0), recv_src_idx.device
    grad_recv_x = _grad_or_zeros(grad_recv_x, (num_recv, ctx.hidden), ctx.grad_dtype, device)
    grad_weights = None
    if ctx.has_weights:
        grad_weights = _grad_or_zeros(grad_recv_topk_weights, (num_recv, ctx.num_topk), torch.float32, device)
        # Weights of experts on other ranks were zeroed in the forward: no gradient flows there.
        grad_weights = torch.where(recv_topk_idx >= 0, grad_weights, torch.zeros_like(grad_weights))
    grad_x, grad_topk_weights = ops.combine(
        grad_recv_x,
        grad_weights,
        None,
        None,
        is_token_in_rank,
        rank_prefix_matrix,
        recv_src_idx,
        ctx.group_name,
    )
    return (
        None if ctx.is_fp8 else grad_x,
        None,
        None,
        grad_topk_weights if ctx.has_weights else None,
        None,
        None,
        None,
        None,
        None,
    )


# ----- cached dispatch and combine -------------------------------------------------------------


def _cached_dispatch_setup(ctx, inputs, output):
    x, x_scales, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name = inputs
    ctx.save_for_backward(is_token_in_rank, rank_prefix_matrix, recv_src_idx)
    ctx.group_name = group_name
    ctx.hidden = x.size(1)
    ctx.is_fp8 = x_scales is not None
    ctx.grad_dtype = torch.bfloat16 if ctx.is_fp8 else x.dtype


def _cached_dispatch_backward(ctx, grad_recv_x, _grad_scales):
    is_token_in_rank, rank_prefix_matrix, recv_src_idx = ctx.saved_tensors
    grad_recv_x = _grad_or_zeros(
        grad_recv_x, (recv_src_idx.size(0), ctx.hidden), ctx.grad_dtype, recv_src_idx.device
    )
    grad_x, _ = ops.combine(
        grad_recv_x, None, None, None, is_token_in_rank, rank_prefix_matrix, recv_src_idx, ctx.group_name
    )
    return None if ctx.is_fp8 else grad_x, None, None, None, None, None


def _combine_setup(ctx, inputs, output):
    x, topk_weights, bias_0, bias_1, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name = inputs
    ctx.save_for_backward(is_token_in_rank, rank_prefix_matrix, recv_src_idx)
    ctx.group_name = group_name
    ctx.hidden, ctx.dtype = x.size(1), x.dtype
    ctx.num_topk = topk_weights.size(1) if topk_weights is not None else 0
    ctx.has_weights = topk_weights is not None
    ctx.has_bias = (bias_0 is not None, bias_1 is not None)


def _combine_backward(ctx, grad_combined_x, grad_combined_topk_weights):
    is_token_in_rank, rank_prefix_matrix, recv_src_idx = ctx.saved_tensors
    handle = (is_token_in_rank, rank_prefix_matrix, recv_src_idx, ctx.group_name)
    num_tokens, device = is_token_in_rank.size(0), is_token_in_rank.device
    grad_out = _grad_or_zeros(grad_combined_x, (num_tokens, ctx.hidden), ctx.dtype, device)
    grad_x, _ = ops.cached_dispatch(grad_out, None, *handle)
    grad_weights = None
    if ctx.has_weights:
        grad_w = _grad_or_zeros(grad_combined_topk_weights, (num_tokens, ctx.num_topk), torch.float32, device)
        grad_weights, _ = ops.cached_dispatch(grad_w, None, *handle)
    grad_bias = [grad_out if given else None for given in ctx.has_bias]
    return grad_x, grad_weights, grad_bias[0], grad_bias[1], None, None, None, None


# ----- fused permute -----------------------------------------------------------------------------


def _dispatch_permuted_setup(ctx, inputs, output):
    x, x_scales, _, topk_weights, is_token_in_rank, *_, group_name = inputs
    permuted_x, _, _, _, pair_slot, rank_prefix_matrix, recv_src_idx = output
    ctx.save_for_backward(pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx)
    ctx.group_name = group_name
    ctx.permuted_shape = permuted_x.shape
    ctx.is_fp8 = x_scales is not None
    ctx.grad_dtype = torch.bfloat16 if ctx.is_fp8 else x.dtype
    ctx.has_weights = topk_weights is not None


def _dispatch_permuted_backward(ctx, grad_permuted_x, _gs, grad_permuted_probs, _gt, _gp, _gr, _gsrc):
    # The transpose of "dispatch, then copy each row to its pairs' slots" is "sum each row's
    # slots, then combine": combine_permuted. The probs ride along per slot.
    pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx = ctx.saved_tensors
    device = pair_slot.device
    grad_x = _grad_or_zeros(grad_permuted_x, ctx.permuted_shape, ctx.grad_dtype, device)
    grad_probs = None
    if ctx.has_weights:
        grad_probs = _grad_or_zeros(grad_permuted_probs, ctx.permuted_shape[:1], torch.float32, device)
    grad_in, grad_weights = ops.combine_permuted(
        grad_x, grad_probs, pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx, ctx.group_name
    )
    return (
        None if ctx.is_fp8 else grad_in,
        None,
        None,
        grad_weights if ctx.has_weights else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _combine_permuted_setup(ctx, inputs, output):
    h, probs, pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name = inputs
    ctx.save_for_backward(pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx)
    ctx.group_name = group_name
    ctx.num_permuted, ctx.hidden, ctx.dtype = h.size(0), h.size(1), h.dtype
    ctx.has_probs = probs is not None


def _combine_permuted_backward(ctx, grad_combined_x, grad_combined_probs):
    # The transpose of "sum each row's slots, then combine" is "dispatch along the handle, then
    # copy each row to its pairs' slots": a cached dispatch and ep_ops.permute's gathers.
    pair_slot, is_token_in_rank, rank_prefix_matrix, recv_src_idx = ctx.saved_tensors
    handle = (is_token_in_rank, rank_prefix_matrix, recv_src_idx, ctx.group_name)
    num_tokens, device = is_token_in_rank.size(0), is_token_in_rank.device
    pmap = PermuteMap(pair_slot, slot_pair_of(pair_slot, ctx.num_permuted), None)
    grad_out = _grad_or_zeros(grad_combined_x, (num_tokens, ctx.hidden), ctx.dtype, device)
    grad_rows, _ = ops.cached_dispatch(grad_out, None, *handle)
    grad_h = permute(grad_rows, pmap, pair_slot.size(1))
    grad_probs = None
    if ctx.has_probs:
        num_topk = pair_slot.size(1)
        grad_p = _grad_or_zeros(grad_combined_probs, (num_tokens, num_topk), torch.float32, device)
        grad_pairs, _ = ops.cached_dispatch(grad_p, None, *handle)
        grad_probs = permute_probs(grad_pairs, pmap)
    return grad_h, grad_probs, None, None, None, None, None


# ----- low latency -----------------------------------------------------------------------------


def _first_occurrence(topk_idx):
    """[T, K] bool: topk_idx[t, k] is valid and no earlier k of token t names the same expert
    (a token reaches each expert once, however often top-k lists it)."""
    same = topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)
    earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=topk_idx.device).tril(-1)
    return (topk_idx >= 0) & ~(same & earlier).any(-1)


def _low_latency_dispatch_setup(ctx, inputs, output):
    x, topk_idx, num_max, num_experts, use_fp8, *_, group_name = inputs
    recv_x, *_, recv_token_slots = output
    ctx.save_for_backward(topk_idx, recv_token_slots)
    ctx.num_max, ctx.group_name, ctx.use_fp8 = num_max, group_name, use_fp8
    ctx.recv_shape = recv_x.shape


def _low_latency_dispatch_backward(ctx, grad_recv_x, *_unused):
    if ctx.use_fp8:  # the FP8 payload is not differentiable
        return None, None, None, None, None, None, None, None
    topk_idx, recv_token_slots = ctx.saved_tensors
    grad_recv_x = _grad_or_zeros(grad_recv_x, ctx.recv_shape, torch.bfloat16, topk_idx.device)
    weights = _first_occurrence(topk_idx).to(torch.float32)
    grad_x = ops.low_latency_combine(
        grad_recv_x, topk_idx, weights, recv_token_slots, ctx.num_max, False, ctx.group_name
    )
    return grad_x, None, None, None, None, None, None, None


def _low_latency_combine_setup(ctx, inputs, output):
    x, topk_idx, topk_weights, recv_token_slots, num_max, _use_logfmt, group_name = inputs
    ctx.save_for_backward(x, topk_idx, topk_weights, recv_token_slots)
    ctx.num_max, ctx.group_name = num_max, group_name


def _low_latency_combine_backward(ctx, grad_combined_x):
    # LogFMT rounding is treated as the identity (straight-through) in the gradient.
    x, topk_idx, topk_weights, recv_token_slots = ctx.saved_tensors
    grad_out = _grad_or_zeros(grad_combined_x, (topk_idx.size(0), x.size(2)), torch.bfloat16, x.device)
    grad_x, grad_topk_weights = ops.low_latency_combine_backward(
        grad_out, x, topk_idx, topk_weights, recv_token_slots, ctx.num_max, ctx.group_name
    )
    return grad_x, None, grad_topk_weights, None, None, None, None


def _formulas() -> dict:
    """op name -> (backward, setup_context). csrc/autograd_fast_path.cpp lists the same names: it
    skips these Python kernels on calls that need no gradient."""
    return {
        "dispatch": (_dispatch_backward, _dispatch_setup),
        "cached_dispatch": (_cached_dispatch_backward, _cached_dispatch_setup),
        "combine": (_combine_backward, _combine_setup),
        "dispatch_permuted": (_dispatch_permuted_backward, _dispatch_permuted_setup),
        "combine_permuted": (_combine_permuted_backward, _combine_permuted_setup),
        "low_latency_dispatch": (_low_latency_dispatch_backward, _low_latency_dispatch_setup),
        "low_latency_combine": (_low_latency_combine_backward, _low_latency_combine_setup),
    }


def _register():
    for name, (backward, setup_context) in _formulas().items():
        torch.library.register_autograd(f"ep_ops::{name}", backward, setup_context=setup_context)


_register()
DIFFERENTIABLE_OPS = tuple(_formulas())
