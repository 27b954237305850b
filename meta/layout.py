import torch

from ._checks import check_experts, check_type, check_value


@torch.library.register_fake("ep_ops::get_dispatch_layout")
def get_dispatch_layout(topk_idx, num_experts, num_ranks):
    """Routing statistics of ``topk_idx``; local, no communication.

    Args:
        topk_idx: ``[num_tokens, num_topk]`` int64, expert ids in ``[0, num_experts)``, -1 = none.
    Returns:
        num_tokens_per_rank ``[num_ranks]`` int32, num_tokens_per_expert ``[num_experts]`` int32,
        is_token_in_rank ``[num_tokens, num_ranks]`` bool. All sizes static.
    """
    op = "get_dispatch_layout"
    check_value(topk_idx.dim() == 2, op, f"topk_idx must be 2-D, got {tuple(topk_idx.shape)}")
    check_type(topk_idx.dtype == torch.int64, op, f"topk_idx must be int64, got {topk_idx.dtype}")
    check_value(num_ranks > 0, op, f"num_ranks must be positive, got {num_ranks}")
    check_experts(num_experts, num_ranks, op)
    num_tokens = topk_idx.size(0)
    return (
        topk_idx.new_empty((num_ranks,), dtype=torch.int32),
        topk_idx.new_empty((num_experts,), dtype=torch.int32),
        topk_idx.new_empty((num_tokens, num_ranks), dtype=torch.bool),
    )
