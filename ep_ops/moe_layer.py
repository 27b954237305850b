"""An example expert-parallel MoE layer: router, dispatcher, grouped expert MLPs, combine.

Each rank holds ``E_local = num_experts / R`` experts (rank r: global experts
``r * E_local ... (r + 1) * E_local - 1``), as ``[E_local, H, F]`` and ``[E_local, F, H]`` weights,
and a replica of the router. For token t with top-k experts e_k and weights w_k (a softmax over
the top-k router logits)::

    y_t = sum_k w_k * W2[e_k]^T act(W1[e_k]^T x_t)  (+ shared_expert(x_t))

Three modes, all differentiable and all tracing under ``torch.compile(fullgraph=True)``:

- ``"exact"``: ``MoEFlexTokenDispatcher`` in exact mode; the expert groups have data-dependent
  sizes, read back once per step (``tokens_per_expert.tolist()``, as Megatron's grouped GEMMs
  do) to split the rows into per-expert matmuls.
- ``"static"``: capacity dropping with every expert padded to ``R * capacity`` rows, worst-token
  dispatch and one ``torch.bmm`` over ``[E_local, R * capacity, H]``: static shapes, no host sync.
- ``"low_latency"``: decode batches (``T <= num_max_dispatch_tokens_per_rank``) through the
  low-latency ops into ``[E_local, R * M, H]`` (bfloat16 on the wire), one ``bmm`` per matmul.
  Without autograd (inference) the exchanges are issued as send/recv halves with the shared
  expert computed between them.

``global_weights`` rebuilds every expert's weights from the seed, so a single process can compute
the dense reference.
"""

import torch
import torch.distributed as dist
from torch import nn

from . import functional
from .token_dispatcher import MoEConfig, MoEFlexTokenDispatcher

__all__ = ["MoELayer", "global_weights", "grouped_mlp"]

MODES = ("exact", "static", "low_latency")


def global_weights(num_experts: int, hidden_size: int, ffn_hidden_size: int, seed: int = 0):
    """Every expert's weights and the router's, deterministic from ``seed`` (CPU, float32):
    w1 ``[E, H, F]``, w2 ``[E, F, H]``, router ``[E, H]``."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(num_experts, hidden_size, ffn_hidden_size, generator=gen) / hidden_size**0.5
    w2 = torch.randn(num_experts, ffn_hidden_size, hidden_size, generator=gen) / ffn_hidden_size**0.5
    router = torch.randn(num_experts, hidden_size, generator=gen) / hidden_size**0.5
    return w1, w2, router


def _activation(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(x)  # silu(0) = 0: zero padding rows stay zero


def grouped_mlp(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """Per-expert MLP over rows grouped by expert, with data-dependent group sizes.

    Args:
        x: ``[P, H]`` rows, expert 0's first. tokens_per_expert: ``[E_local]`` int64 group sizes
            (summing to P). w1 ``[E_local, H, F]``, w2 ``[E_local, F, H]``.
    Returns:
        ``[P, H]``. Reads the sizes back to the host once (unbacked SymInts under compile).
    """
    sizes = tokens_per_expert.tolist()
    for size in sizes:
        torch._check(size >= 0)
    torch._check(sum(sizes) == x.size(0))
    segments = torch.split(x, sizes)
    outs = [_activation(seg @ w1[e].to(x.dtype)) @ w2[e].to(x.dtype) for e, seg in enumerate(segments)]
    return torch.cat(outs)


def _batched_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``[E_local, G, H]`` -> ``[E_local, G, H]``: one bmm per matmul."""
    return torch.bmm(_activation(torch.bmm(x, w1.to(x.dtype))), w2.to(x.dtype))


class MoELayer(nn.Module):
    """Expert-parallel MoE layer over one process group.

    Args:
        hidden_size: H. ffn_hidden_size: F of every expert.
        num_experts: E in total, a multiple of the group size. topk: experts per token.
        ep_group: the expert-parallel ProcessGroup (None = WORLD).
        mode: "exact", "static" or "low_latency" (see the module docstring).
        capacity_factor: per-expert capacity factor (needed by "static"; in "exact" it drops
            tokens past capacity without padding).
        pad_multiple: expert groups padded to this multiple ("exact" and "static").
        dispatcher_type: "flex"/"alltoall" or "allgather" (``MoEConfig.moe_token_dispatcher_type``).
        max_tokens_per_rank: bound on any rank's token count (``MoEConfig.moe_max_tokens_per_rank``).
        num_max_dispatch_tokens_per_rank: M of the low-latency mode.
        shared_ffn_hidden_size: F of a dense shared expert added to the output (0 = none).
        seed: weights come from ``global_weights(..., seed)`` (the same on every rank).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        topk: int,
        ep_group=None,
        *,
        mode: str = "exact",
        capacity_factor: float | None = None,
        pad_multiple: int | None = None,
        dispatcher_type: str = "flex",
        max_tokens_per_rank: int | None = None,
        num_max_dispatch_tokens_per_rank: int = 128,
        shared_ffn_hidden_size: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"MoELayer: mode must be one of {MODES}, got {mode!r}")
        if mode == "static" and capacity_factor is None:
            raise ValueError("MoELayer: mode 'static' needs a capacity_factor")
        group = dist.group.WORLD if ep_group is None else ep_group
        num_ranks, rank = group.size(), group.rank()
        if num_experts % num_ranks != 0:
            raise ValueError(
                f"MoELayer: num_experts ({num_experts}) must be a multiple of the group size ({num_ranks})"
            )
        self.group, self.mode = group, mode
        self.hidden_size, self.num_experts, self.topk = hidden_size, num_experts, topk
        self.num_local_experts = num_experts // num_ranks
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank

        w1, w2, router = global_weights(num_experts, hidden_size, ffn_hidden_size, seed)
        local = slice(rank * self.num_local_experts, (rank + 1) * self.num_local_experts)
        self.router = nn.Parameter(router)
        self.w1 = nn.Parameter(w1[local].clone())
        self.w2 = nn.Parameter(w2[local].clone())
        self.shared = None
        if shared_ffn_hidden_size > 0:
            gen = torch.Generator().manual_seed(seed + 1)
            self.shared = nn.Sequential(
                nn.Linear(hidden_size, shared_ffn_hidden_size, bias=False),
                nn.SiLU(),
                nn.Linear(shared_ffn_hidden_size, hidden_size, bias=False),
            )
            with torch.no_grad():
                for linear in (self.shared[0], self.shared[2]):
                    linear.weight.copy_(
                        torch.randn(linear.weight.shape, generator=gen) / linear.in_features**0.5
                    )

        self.dispatcher = None
        if mode != "low_latency":
            config = MoEConfig(
                moe_router_topk=topk,
                num_moe_experts=num_experts,
                moe_expert_capacity_factor=capacity_factor,
                moe_pad_expert_input_to_capacity=mode == "static",
                moe_router_expert_pad_multiple=pad_multiple,
                moe_token_dispatcher_type=dispatcher_type,
                moe_max_tokens_per_rank=max_tokens_per_rank,
            )
            indices = list(range(rank * self.num_local_experts, (rank + 1) * self.num_local_experts))
            self.dispatcher = MoEFlexTokenDispatcher(self.num_local_experts, indices, config, group)

    def route(self, x: torch.Tensor):
        """Top-k of the router logits (float32) and a softmax over them: (topk_idx ``[T, K]``
        int64, topk_weights ``[T, K]`` float32)."""
        logits = x.float() @ self.router.t()
        top_logits, topk_idx = torch.topk(logits, self.topk, dim=-1)
        return topk_idx, torch.softmax(top_logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., H]`` -> ``[..., H]`` (x's dtype; "low_latency" computes in bfloat16)."""
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        topk_idx, topk_weights = self.route(x)
        if self.mode == "low_latency":
            y, shared = self._low_latency(x, topk_idx, topk_weights)
        else:
            y, shared = self._dispatched(x, topk_idx, topk_weights), None
        if self.shared is not None:
            y = y + (shared if shared is not None else self.shared(x))
        return y.reshape(shape)

    def _dispatched(self, x, topk_idx, topk_weights):
        dispatcher = self.dispatcher
        permuted, tokens_per_expert, probs = dispatcher.token_permutation2(
            x, x.size(0), topk_weights, topk_idx
        )
        if dispatcher.static:
            rows = permuted.view(self.num_local_experts, -1, self.hidden_size)
            out = _batched_mlp(rows, self.w1, self.w2).view(-1, self.hidden_size)
        else:
            out = grouped_mlp(permuted, tokens_per_expert, self.w1, self.w2)
        out = (out * probs.unsqueeze(-1).to(out.dtype)).to(x.dtype)
        return dispatcher.token_unpermutation(out)

    def _low_latency(self, x, topk_idx, topk_weights):
        """Low-latency dispatch -> bmm experts -> low-latency combine, in bfloat16."""
        group, num_max, num_experts = self.group, self.num_max_dispatch_tokens_per_rank, self.num_experts
        x_bf16 = x.to(torch.bfloat16)
        shared = None
        if torch.is_grad_enabled():
            # The whole ops carry the autograd formulas.
            recv = functional.low_latency_dispatch(x_bf16, topk_idx, num_max, num_experts, group)
        else:
            packed = functional.low_latency_dispatch_send(x_bf16, topk_idx, num_max, num_experts, group)
            if self.shared is not None:
                shared = self.shared(x)  # runs while the dispatch is in flight
            recv = functional.low_latency_dispatch_recv(
                packed, x.size(1), topk_idx.size(1), num_max, num_experts, group
            )
        out = _batched_mlp(recv.recv_x.float(), self.w1, self.w2).to(torch.bfloat16)
        y = functional.low_latency_combine(out, topk_idx, topk_weights, recv.handle, group)
        return y.to(x.dtype), shared
