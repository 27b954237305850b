"""A tiny MoE layer over the ep_ops ops, and its dense single-process reference.

Experts are E linear maps ``W_e [H, H]`` (identical on every rank, rebuilt from a seed); a rank
holds experts ``rank * E_local .. (rank + 1) * E_local - 1`` and applies only those. The MoE of
token t is ``y_t = sum_k w_tk * x_t @ W_{topk_idx[t, k]}`` (k with id -1 skipped), which the dense
reference computes directly on all ranks' tokens in one process.

The distributed functions call ``torch.ops.ep_ops.*`` only (no Python object crosses the graph),
so they trace under ``torch.compile(fullgraph=True)``.
"""

import torch

ops = torch.ops.ep_ops


def expert_weights(num_experts: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[E, H, H]``: the same on every rank (deterministic from ``seed``), entries ~ 1/sqrt(H)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return (torch.randn(num_experts, hidden, hidden, generator=gen) / hidden**0.5).to(dtype)


def local_experts(weights: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's ``[E_local, H, H]`` slice of ``expert_weights``."""
    num_local = weights.size(0) // world_size
    return weights[rank * num_local : (rank + 1) * num_local]


def apply_experts(recv_x, recv_topk_idx, recv_topk_weights, w_local):
    """``h_r = sum_k recv_w[r, k] * recv_x[r] @ W_local[recv_topk_idx[r, k]]`` (-1 skipped).

    recv_x ``[N, H]``, recv_topk_idx ``[N, K]`` local ids, recv_topk_weights ``[N, K]`` float32,
    w_local ``[E_local, H, H]``. Works for N = 0 and for worst-token padding rows (id -1, weight 0).
    """
    num_rows, hidden = recv_x.shape
    per_expert = torch.einsum("nh,ehd->ned", recv_x, w_local.to(recv_x.dtype))  # [N, E_local, H]
    index = recv_topk_idx.clamp(min=0).unsqueeze(-1).expand(num_rows, recv_topk_idx.size(1), hidden)
    chosen = per_expert.gather(1, index)  # [N, K, H]
    weights = torch.where(recv_topk_idx >= 0, recv_topk_weights, torch.zeros_like(recv_topk_weights))
    return (chosen * weights.to(recv_x.dtype).unsqueeze(-1)).sum(dim=1)


def moe(
    x,
    topk_idx,
    topk_weights,
    w_local,
    num_experts: int,
    num_ranks: int,
    group_name: str,
    num_worst_tokens: int = 0,
):
    """Distributed MoE: layout -> dispatch -> local experts -> combine. Returns ``y [T, H]``."""
    _, _, is_token_in_rank = ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    recv_x, _, recv_idx, recv_w, _, rank_prefix_matrix, recv_src_idx = ops.dispatch(
        x, None, topk_idx, topk_weights, is_token_in_rank, num_experts, 1, num_worst_tokens, group_name
    )
    h = apply_experts(recv_x, recv_idx, recv_w, w_local)
    y, _ = ops.combine(h, None, None, None, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name)
    return y


def low_latency_moe(x, topk_idx, topk_weights, w_local, num_max: int, num_experts: int, group_name: str):
    """Low-latency MoE (BF16): low_latency_dispatch -> per-expert matmul -> low_latency_combine."""
    recv_x, _, _, _, _, recv_token_slots = ops.low_latency_dispatch(
        x, topk_idx, num_max, num_experts, False, False, False, group_name
    )
    out = torch.bmm(recv_x.float(), w_local.float()).to(torch.bfloat16)  # unused rows stay 0
    return ops.low_latency_combine(out, topk_idx, topk_weights, recv_token_slots, num_max, False, group_name)


def dense_moe(xs, topk_idxs, topk_weights, weights):
    """Dense reference on every rank's tokens: per rank ``y_t = sum_k w_tk * x_t @ W_e(k)``.

    Computes in the dtype of ``xs`` (weights cast to it); differentiable wrt all inputs.
    """
    outs = []
    for x, idx, w in zip(xs, topk_idxs, topk_weights, strict=True):
        w_all = weights.to(x.dtype)[idx.clamp(min=0)]  # [T, K, H, H]
        per_k = torch.einsum("th,tkhd->tkd", x, w_all)
        coef = torch.where(idx >= 0, w.to(x.dtype), torch.zeros((), dtype=x.dtype))
        outs.append((per_k * coef.unsqueeze(-1)).sum(dim=1))
    return outs
