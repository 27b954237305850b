"""Drop-in for NeMo's / Megatron's flex token dispatcher (``MoEFlexTokenDispatcher``).

The dispatcher moves each token to the ranks of its top-k experts, groups the received rows by
local expert for the grouped expert kernels, and on the way back sums every token's expert
outputs onto its rank. The call sequence is NeMo's::

    permuted, tokens_per_expert, permuted_probs = dispatcher.token_permutation(x, num_tokens, probs)
    expert_out = experts(permuted, tokens_per_expert) * permuted_probs[:, None]
    y = dispatcher.token_unpermutation(expert_out)

or the same split into ``dispatch_preprocess`` / ``dispatch_all_to_all`` / ``dispatch_postprocess``
and ``combine_preprocess`` / ``combine_all_to_all`` / ``combine_postprocess``. The experts apply
the probabilities (Megatron's convention): the combine sums rows unweighted.

Strategies (``MoEConfig.moe_token_dispatcher_type``):

- ``"flex"`` / ``"alltoall"``: ``ep_ops.fused_a2a`` dispatch and combine (all-to-all). With
  ``moe_flex_dispatcher_backend="hybridep"`` the HybridEP functions do the dispatch and the
  grouping in one call; with ``moe_permute_fusion`` (and no pad-to-capacity) the ops
  ``dispatch_permuted`` / ``combine_permuted`` do.
- ``"allgather"``: every rank gathers every rank's tokens (``ep_ops_py::all_gather_v``), keeps
  the rows of its experts, and a reduce-scatter (``ep_ops_py::reduce_scatter_v``) sums the
  outputs back. Ranks may hold different token counts (up to ``moe_max_tokens_per_rank``).
  Same results as the all-to-all.

Capacity (``moe_expert_capacity_factor``): each rank keeps, for every expert, the first
``capacity = ceil(T * topk / num_experts * factor)`` of its (token, expert) pairs in token order
and drops the rest (probability 0, no row sent), as Megatron's router does. With
``moe_pad_expert_input_to_capacity`` every local expert gets exactly ``R * capacity`` rows (zero
padded; rounded up to ``moe_router_expert_pad_multiple``), the dispatch runs in worst-token mode
and nothing syncs with the host: every shape is static. Otherwise shapes follow the routing (one
device-to-host read of the permuted row count; an unbacked SymInt under ``torch.compile``).

Everything here is plain PyTorch over the ops, so it runs eagerly and under
``torch.compile(fullgraph=True)``, with gradients wrt the hidden states and the probabilities.
"""

import dataclasses
import math

import torch
import torch.distributed as dist

from . import fused_a2a
from .gather_scatter import all_gather_v, reduce_scatter_v
from .permute import make_permute_map, permute, permute_probs, unpermute

__all__ = ["MoEConfig", "MoEFlexTokenDispatcher", "TokenDispatcherConfig", "capacity_drop", "get_capacity"]

DISPATCHER_TYPES = ("flex", "alltoall", "allgather")
FLEX_BACKENDS = ("deepep", "hybridep", "uccl_ep")
ROUTER_DTYPES = ("fp32", "fp64", None)


@dataclasses.dataclass
class MoEConfig:
    """The MoE settings the dispatcher reads (NeMo's names and defaults; the last ones are
    ep_ops additions)."""

    moe_enable_deepep: bool = True
    """Use the fused (DeepEP-style) dispatch; accepted for compatibility, ep_ops always does."""

    moe_permute_fusion: bool = False
    """All-to-all dispatcher without pad-to-capacity: group the rows by expert inside the
    dispatch and combine ops (``dispatch_permuted`` / ``combine_permuted``) instead of separate
    ``ep_ops.permute`` passes; same results. (The HybridEP backend always fuses; the static
    capacity layout is always a separate pass.)"""

    moe_expert_capacity_factor: float | None = None
    """Per-expert capacity factor; None = no token is dropped."""

    moe_router_topk: int = 2
    """Experts per token."""

    moe_router_expert_pad_multiple: int | None = None
    """Each expert's row group is padded with zero rows to this multiple (e.g. FP8 GEMM tiles)."""

    num_moe_experts: int = 64
    """Experts in total (over the expert-parallel group)."""

    moe_router_dtype: str | None = "fp32"
    """Dtype of the permuted probabilities: "fp32" or "fp64" (None = fp32). The wire carries fp32."""

    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor: every expert gets exactly R * capacity rows (static shapes)."""

    moe_token_dispatcher_type: str = "flex"
    """"flex" or "alltoall" (all-to-all dispatch), or "allgather" (all-gather / reduce-scatter)."""

    moe_flex_dispatcher_backend: str = "deepep"
    """Flex backend: "deepep" or "uccl_ep" (top-k dispatch, then grouping), "hybridep" (both in
    one call, from a dense routing map)."""

    moe_deepep_num_sms: int = 20
    """SMs of the normal kernels (``set_deepep_num_sms``)."""

    moe_hybridep_num_sms: int = 24
    """SMs of the HybridEP dispatch and combine (recorded)."""

    moe_share_token_dispatcher: bool = False
    """Accepted for compatibility; every dispatcher keeps its own per-call state."""

    moe_deepep_async_dispatch: bool = False
    """Accepted for compatibility; the ops run on the current stream."""

    moe_max_tokens_per_rank: int | None = None
    """ep_ops: the most tokens any rank passes at once. Sizes the all-gather blocks and the
    static (pad-to-capacity) path; must be the same on every rank. None = this call's token
    count (then every rank must pass the same count on those paths)."""

    def __post_init__(self) -> None:
        if self.moe_token_dispatcher_type not in DISPATCHER_TYPES:
            raise ValueError(
                f"MoEConfig: moe_token_dispatcher_type must be one of {DISPATCHER_TYPES}, "
                f"got {self.moe_token_dispatcher_type!r}"
            )
        if self.moe_flex_dispatcher_backend not in FLEX_BACKENDS:
            raise ValueError(
                f"MoEConfig: moe_flex_dispatcher_backend must be one of {FLEX_BACKENDS}, "
                f"got {self.moe_flex_dispatcher_backend!r}"
            )
        if self.moe_router_dtype not in ROUTER_DTYPES:
            raise ValueError(
                f"MoEConfig: moe_router_dtype must be one of {ROUTER_DTYPES}, got {self.moe_router_dtype!r}"
            )
        for name in ("moe_router_topk", "num_moe_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig: {name} must be a positive int, got {value!r}")
        if self.moe_router_topk > self.num_moe_experts:
            raise ValueError(
                f"MoEConfig: moe_router_topk ({self.moe_router_topk}) is larger than num_moe_experts "
                f"({self.num_moe_experts})"
            )
        for name in ("moe_router_expert_pad_multiple", "moe_max_tokens_per_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"MoEConfig: {name} must be None or a positive int, got {value!r}")
        factor = self.moe_expert_capacity_factor
        if factor is not None and not factor > 0:
            raise ValueError(f"MoEConfig: moe_expert_capacity_factor must be None or > 0, got {factor!r}")
        if self.moe_pad_expert_input_to_capacity and factor is None:
            raise ValueError("MoEConfig: moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor")


TokenDispatcherConfig = MoEConfig  # NeMo Automodel's newer name


def get_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Megatron's per-expert capacity: ``ceil(num_tokens * topk / num_experts * capacity_factor)``."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def capacity_drop(token_indices, token_probs, num_experts: int, capacity: int):
    """Keeps, for every expert, its first ``capacity`` (token, expert) pairs in token order.

    Args:
        token_indices: ``[T, K]`` int64 global expert ids, -1 = none (distinct within a row).
        token_probs: ``[T, K]`` float.
    Returns:
        (token_indices, token_probs) with the dropped pairs set to -1 and 0. Static shapes.
    """
    valid = token_indices >= 0
    expert = torch.where(valid, token_indices, num_experts)
    onehot = torch.zeros((token_indices.size(0), num_experts + 1), dtype=torch.int64, device=expert.device)
    onehot.scatter_(1, expert, 1)
    position = (torch.cumsum(onehot, dim=0) - onehot).gather(1, expert)
    keep = valid & (position < capacity)
    return torch.where(keep, token_indices, -1), torch.where(keep, token_probs, torch.zeros_like(token_probs))


class MoEFlexTokenDispatcher:
    """Token dispatcher over one expert-parallel group (NeMo's constructor and methods).

    Args:
        num_local_experts: experts on this rank (``num_moe_experts / group size``).
        local_expert_indices: their global ids, ``rank * E_local ... (rank + 1) * E_local - 1``.
        config: ``MoEConfig``.
        ep_group: the expert-parallel ProcessGroup (None = WORLD).
    """

    def __init__(self, num_local_experts: int, local_expert_indices, config: MoEConfig, ep_group):
        self.config = config
        self.group = dist.group.WORLD if ep_group is None else ep_group
        self.ep_size = self.group.size()
        self.rank = self.group.rank()
        self.tp_size = 1
        self.shared_experts = None
        if num_local_experts * self.ep_size != config.num_moe_experts:
            raise ValueError(
                f"MoEFlexTokenDispatcher: num_local_experts ({num_local_experts}) times the group size "
                f"({self.ep_size}) must equal config.num_moe_experts ({config.num_moe_experts})"
            )
        expected = list(range(self.rank * num_local_experts, (self.rank + 1) * num_local_experts))
        if list(local_expert_indices) != expected:
            raise ValueError(
                f"MoEFlexTokenDispatcher: rank {self.rank} holds experts {expected} (contiguous blocks "
                f"by rank), got local_expert_indices {list(local_expert_indices)}"
            )
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        if config.moe_token_dispatcher_type == "allgather":
            self.strategy = "allgather"
        elif config.moe_flex_dispatcher_backend == "hybridep":
            self.strategy = "hybridep"
        else:
            self.strategy = "alltoall"
            fused_a2a.set_deepep_num_sms(config.moe_deepep_num_sms)
        self.static = config.moe_pad_expert_input_to_capacity
        # The fused ops lay groups out back to back, not at the capacity layout's fixed offsets.
        self.fused_permute = self.strategy == "alltoall" and config.moe_permute_fusion and not self.static
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self.hidden_shape = None
        self.num_tokens = None
        self.token_indices = None
        self.token_probs = None
        self.handle = None
        self.permute_map = None
        self.dispatched_indices = None
        self.dispatched_probs = None
        self.tokens_per_expert = None

    def _max_tokens(self, num_tokens: int) -> int:
        return self.config.moe_max_tokens_per_rank or num_tokens

    def _rows_per_expert(self, num_tokens: int) -> int:
        """Static group size: R * capacity (capacity from the per-rank token bound)."""
        config = self.config
        capacity = get_capacity(
            self._max_tokens(num_tokens), config.num_moe_experts, config.moe_router_topk,
            config.moe_expert_capacity_factor,
        )  # fmt: skip
        return self.ep_size * capacity

    # ------------------------------------------------------------------ dispatch

    def _reject(self, problem: str):
        """Raises ``ValueError(problem)``; on the all-to-all paths after joining the dispatch's
        header exchange with a rejected input, so the other ranks (already in the dispatch)
        raise too instead of waiting for this one."""
        error = ValueError(f"MoEFlexTokenDispatcher: {problem}")
        if self.strategy == "allgather":
            raise error
        op = "dispatch_permuted" if self.fused_permute else "dispatch"
        fused_a2a._raise_everywhere(self.group, op, error)

    def _set_routing(self, hidden_states, num_local_tokens, token_probs, token_indices):
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_shape[-1])
        if not torch.compiler.is_compiling() and hidden_states.size(0) != num_local_tokens:
            self._reject(
                f"hidden_states holds {hidden_states.size(0)} tokens, num_local_tokens is {num_local_tokens}"
            )
        config = self.config
        if token_probs.dtype != torch.float32:
            token_probs = token_probs.float()  # the dispatch carries float32 probabilities
        if config.moe_expert_capacity_factor is not None:
            capacity = get_capacity(
                self._max_tokens(num_local_tokens) if self.static else num_local_tokens,
                config.num_moe_experts, config.moe_router_topk, config.moe_expert_capacity_factor,
            )  # fmt: skip
            token_indices, token_probs = capacity_drop(
                token_indices, token_probs, config.num_moe_experts, capacity
            )
        self.num_tokens = num_local_tokens
        self.token_indices, self.token_probs = token_indices, token_probs
        return hidden_states, token_probs

    def dispatch_preprocess(self, hidden_states: torch.Tensor, num_local_tokens: int, probs: torch.Tensor):
        """Flattens ``hidden_states`` ([..., H]) to ``[T, H]`` and turns ``probs`` ([T, E] dense
        router probabilities, 0 for unselected experts) into top-k indices and probabilities,
        then applies the capacity. Returns (hidden_states [T, H], token_probs [T, K] float32)."""
        self._reset()
        num_experts = self.config.num_moe_experts
        if not torch.compiler.is_compiling() and probs.numel() != num_local_tokens * num_experts:
            self._reject(
                f"probs must hold [num_local_tokens, num_moe_experts] = [{num_local_tokens}, "
                f"{num_experts}] values, got shape {tuple(probs.shape)}"
            )
        probs = probs.reshape(num_local_tokens, num_experts)
        token_probs, token_indices = torch.topk(probs, self.config.moe_router_topk, dim=-1)
        if self.config.moe_expert_capacity_factor is not None:
            # Megatron: a zero probability marks a pair the router already dropped.
            token_indices = token_indices.masked_fill(token_probs == 0, -1)
        return self._set_routing(hidden_states, num_local_tokens, token_probs, token_indices)

    def dispatch_preprocess2(
        self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor, token_indices
    ):
        """``dispatch_preprocess`` from top-k routing: token_probs ``[T, K]`` float, token_indices
        ``[T, K]`` int64 global expert ids (-1 = none)."""
        self._reset()
        return self._set_routing(hidden_states, num_local_tokens, token_probs, token_indices)

    def dispatch_all_to_all(
        self,
        hidden_states: torch.Tensor,
        probs: torch.Tensor | None = None,
        async_finish: bool = True,
        allocate_on_comm_stream: bool = True,
    ):
        """Moves the rows (``async_finish`` / ``allocate_on_comm_stream``: no effect). Returns (rows this rank's experts need, their probabilities):
        alltoall: ``[N, H]`` and ``[N, K]``; allgather: ``[R * M, H]`` and ``[R * M, K]``;
        hybridep and moe_permute_fusion: already grouped, ``[P, H]`` and ``[P]``."""
        config = self.config
        num_experts = config.num_moe_experts
        if self.fused_permute:
            recv_x, recv_probs = self._dispatch_permuted(hidden_states)
            recv_idx = None
        elif self.strategy == "alltoall":
            worst = self.ep_size * self._max_tokens(self.num_tokens) if self.static else 0
            recv_x, recv_idx, recv_probs, counts, handle = fused_a2a.fused_dispatch(
                hidden_states, self.token_indices, self.token_probs, num_experts, self.group,
                async_finish, allocate_on_comm_stream, num_worst_tokens=worst,
            )  # fmt: skip
            self.handle, self.tokens_per_expert = handle, counts
        elif self.strategy == "allgather":
            recv_x, recv_idx, recv_probs = self._all_gather(hidden_states)
        else:
            recv_x, recv_probs = self._hybrid_dispatch(hidden_states)
            recv_idx = None
        self.dispatched_indices, self.dispatched_probs = recv_idx, recv_probs
        return recv_x, recv_probs

    def _dispatch_permuted(self, hidden_states):
        """Dispatch with the rows landing grouped by local expert: ``[P, H]`` and ``[P]``."""
        config = self.config
        name = self.group.group_name
        fused_a2a._touch_buffer(self.group, hidden_states)
        _, _, is_token_in_rank = torch.ops.ep_ops.get_dispatch_layout(
            self.token_indices, config.num_moe_experts, self.ep_size
        )
        permuted_x, _, permuted_probs, self.tokens_per_expert, pair_slot, prefix, src_idx = (
            torch.ops.ep_ops.dispatch_permuted(
                hidden_states.contiguous(), None, self.token_indices, self.token_probs, is_token_in_rank,
                config.num_moe_experts, 0, config.moe_router_expert_pad_multiple or 1, 0, name,
            )
        )  # fmt: skip
        self.handle = (pair_slot, is_token_in_rank, prefix, src_idx, name)
        return permuted_x, permuted_probs

    def _all_gather(self, hidden_states):
        name = self.group.group_name
        max_tokens = self._max_tokens(self.num_tokens)
        gathered_x, counts = all_gather_v(hidden_states, max_tokens, name)
        gathered_idx, _ = all_gather_v(self.token_indices, max_tokens, name)
        gathered_probs, _ = all_gather_v(self.token_probs, max_tokens, name)
        slot = torch.arange(max_tokens, device=counts.device)
        real = (slot.unsqueeze(0) < counts.unsqueeze(1)).reshape(-1, 1)  # padding rows are not tokens
        first = self.rank * self.num_local_experts
        local = gathered_idx - first
        is_local = real & (gathered_idx >= first) & (local < self.num_local_experts)
        recv_idx = torch.where(is_local, local, -1)
        recv_probs = torch.where(is_local, gathered_probs, 0.0)
        return gathered_x, recv_idx, recv_probs

    def _hybrid_dispatch(self, hidden_states):
        config = self.config
        num_experts = config.num_moe_experts
        valid = self.token_indices >= 0
        column = torch.where(valid, self.token_indices, num_experts)
        shape = (self.token_indices.size(0), num_experts + 1)
        routing_map = torch.zeros(shape, dtype=torch.bool, device=column.device).scatter(1, column, True)
        dense = torch.zeros(shape, dtype=torch.float32, device=column.device).scatter(
            1, column, torch.where(valid, self.token_probs, 0.0)
        )
        num_permuted = None
        if self.static:
            group = self._rows_per_expert(self.num_tokens)
            pad = config.moe_router_expert_pad_multiple or 1
            num_permuted = self.num_local_experts * (-(-group // pad) * pad)
            # The worst-token receive of the static path is R * (recorded tokens per rank).
            recorded = fused_a2a._hybrid_ep_buffer
            bound = self._max_tokens(self.num_tokens)
            stale = (
                recorded is None
                or recorded.group_name != self.group.group_name
                or recorded.max_num_of_tokens_per_rank < bound
            )
            if stale and not torch.compiler.is_compiling():
                fused_a2a.init_hybrid_ep_buffer(
                    self.group, hidden_states.size(1), bound, self.num_local_experts,
                    config.moe_hybridep_num_sms, config.moe_hybridep_num_sms, False,
                )  # fmt: skip
        out = fused_a2a.hybrid_ep_dispatch(
            hidden_states, routing_map[:, :num_experts], dense[:, :num_experts], self.group,
            self.num_local_experts, config.moe_hybridep_num_sms, config.moe_hybridep_num_sms,
            num_permuted_tokens=num_permuted, pad_multiple=config.moe_router_expert_pad_multiple,
        )  # fmt: skip
        permuted_x, permuted_probs, _, self.tokens_per_expert, self.handle = out
        return permuted_x, permuted_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor):
        """Groups the received rows by local expert. Returns (permuted hidden ``[P, H]``,
        tokens_per_expert ``[E_local]`` int64 device tensor (padded group sizes), permuted
        probabilities ``[P]`` (float32, or float64 for moe_router_dtype "fp64"))."""
        if self.strategy == "hybridep" or self.fused_permute:
            permuted, permuted_probs = hidden_states, self.dispatched_probs
        else:
            config = self.config
            self.permute_map = make_permute_map(
                self.dispatched_indices,
                self.num_local_experts,
                pad_multiple=config.moe_router_expert_pad_multiple,
                rows_per_expert=self._rows_per_expert(self.num_tokens) if self.static else None,
            )
            self.tokens_per_expert = self.permute_map.tokens_per_expert
            permuted = permute(hidden_states, self.permute_map, self.dispatched_indices.size(1))
            permuted_probs = permute_probs(self.dispatched_probs, self.permute_map)
        if self.config.moe_router_dtype == "fp64":
            permuted_probs = permuted_probs.to(torch.float64)
        return permuted, self.tokens_per_expert, permuted_probs

    def token_permutation(self, hidden_states: torch.Tensor, num_local_tokens: int, probs: torch.Tensor):
        """Dispatch from dense probabilities ``probs [T, E]``: preprocess, move, group. Returns
        (permuted hidden ``[P, H]``, tokens_per_expert ``[E_local]``, permuted probs ``[P]``)."""
        hidden_states, _ = self.dispatch_preprocess(hidden_states, num_local_tokens, probs)
        hidden_states, _ = self.dispatch_all_to_all(hidden_states)
        return self.dispatch_postprocess(hidden_states)

    def token_permutation2(
        self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor, token_indices
    ):
        """``token_permutation`` from top-k routing (``token_probs``, ``token_indices`` [T, K])."""
        hidden_states, _ = self.dispatch_preprocess2(
            hidden_states, num_local_tokens, token_probs, token_indices
        )
        hidden_states, _ = self.dispatch_all_to_all(hidden_states)
        return self.dispatch_postprocess(hidden_states)

    # ------------------------------------------------------------------ combine

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Ungroups the expert outputs (``[P, H]``): each received row gets the sum of its
        experts' rows (hybridep and moe_permute_fusion: the combine does it)."""
        if self.strategy == "hybridep" or self.fused_permute:
            return hidden_states
        return unpermute(hidden_states, self.permute_map)

    def combine_all_to_all(
        self, hidden_states: torch.Tensor, async_finish: bool = True, allocate_on_comm_stream: bool = True
    ) -> torch.Tensor:
        """Sums every token's rows back onto its rank: ``[T, H]``."""
        if self.fused_permute:
            out, _ = torch.ops.ep_ops.combine_permuted(hidden_states.contiguous(), None, *self.handle)
        elif self.strategy == "alltoall":
            out, _ = fused_a2a.fused_combine(
                hidden_states, self.group, self.handle, async_finish, allocate_on_comm_stream
            )
        elif self.strategy == "allgather":
            out = reduce_scatter_v(hidden_states.contiguous(), self.num_tokens, self.group.group_name)
        else:
            out = fused_a2a.hybrid_ep_combine(hidden_states, self.handle)
        self.handle = None
        return out

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Restores the input's shape (``[..., H]``)."""
        return hidden_states.view(self.hidden_shape)

    def token_unpermutation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Inverse of ``token_permutation``: expert outputs ``[P, H]`` (already multiplied by the
        permuted probabilities) -> ``[..., H]`` in the input's shape."""
        hidden_states = self.combine_preprocess(hidden_states)
        hidden_states = self.combine_all_to_all(hidden_states, False, False)
        return self.combine_postprocess(hidden_states)
