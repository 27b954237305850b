import torch

from ._checks import FLOAT_DTYPES, check_matrix, check_same_device, check_type, check_value, world_size
from .dispatch import check_handle


@torch.library.register_fake("ep_ops::combine")
def combine(x, topk_weights, bias_0, bias_1, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name):
    """Inverse of dispatch: each original token receives the sum of the rows dispatched from it.

    Args:
        x: ``[N, hidden]`` float rows in the order dispatch delivered them (N =
            ``recv_src_idx.size(0)``; worst-token padding rows are ignored).
        topk_weights: optional ``[N, num_topk]`` float32, summed the same way.
        bias_0, bias_1: optional ``[num_tokens, hidden]`` of x's dtype, added to the sum.
        is_token_in_rank, rank_prefix_matrix, recv_src_idx: the dispatch handle.
    Returns:
        combined_x ``[num_tokens, hidden]`` (x's dtype), combined_topk_weights
        ``[num_tokens, num_topk]`` float32 or empty. Sums run in float32 (float64 for float64
        input) in ascending source-rank order. All sizes static.
    """
    op = "combine"
    num_ranks = world_size(group_name)
    check_value(x.dim() == 2, op, f"x must be 2-D [num_recv_tokens, hidden], got {tuple(x.shape)}")
    check_type(x.dtype in FLOAT_DTYPES, op, f"x must be a floating dtype (not FP8), got {x.dtype}")
    check_handle(is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op, x.device)
    check_value(
        x.size(0) == recv_src_idx.size(0),
        op,
        f"x has {x.size(0)} rows but the handle received {recv_src_idx.size(0)}",
    )
    num_tokens, hidden = is_token_in_rank.size(0), x.size(1)
    if topk_weights is not None:
        check_value(topk_weights.dim() == 2, op, "topk_weights must be 2-D [num_recv_tokens, num_topk]")
        check_matrix(topk_weights, op, "topk_weights", torch.float32, x.size(0))
        check_same_device(topk_weights, x, op, "topk_weights")
    for name, bias in (("bias_0", bias_0), ("bias_1", bias_1)):
        if bias is not None:
            check_matrix(bias, op, name, x.dtype, num_tokens, hidden)
            check_same_device(bias, x, op, name)
    combined_topk_weights = (
        x.new_empty((num_tokens, topk_weights.size(1)), dtype=torch.float32)
        if topk_weights is not None
        else x.new_empty((0,), dtype=torch.float32)
    )
    return x.new_empty((num_tokens, hidden)), combined_topk_weights
