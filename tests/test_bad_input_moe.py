"""Bad input to the MoE integration (``ep_ops.fused_a2a``, ``ep_ops.token_dispatcher``): a clear
error naming the argument, on every rank, and the group still usable afterwards.

One 2-rank gloo launch runs every case; after each, a good ``fused_dispatch`` -> ``fused_combine``
round trip must give bitwise what it gave before the first case (no rank is one exchange ahead).
Cases where only rank 1 holds the bad input check that rank 0 raises too (the wrappers join the
op's header exchange with a rejected input before raising, as ``Buffer`` does)."""

import torch
import torch.distributed as dist
from cases import expect_error

from ep_ops.launch import parallel_launch

HIDDEN, NUM_EXPERTS, TOPK, TOKENS = 32, 8, 2, 6


def inputs(rank):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    probs, idx = torch.rand(TOKENS, NUM_EXPERTS, generator=gen).softmax(-1).topk(TOPK, dim=1)
    return x, idx, probs


def round_trip(group, x, idx, probs):
    from ep_ops.fused_a2a import fused_combine, fused_dispatch

    recv_x, _, _, _, handle = fused_dispatch(x, idx, probs, NUM_EXPERTS, group)
    return fused_combine(recv_x * 2, group, handle)[0]


def dispatcher(group, **config):
    from ep_ops.token_dispatcher import MoEConfig, MoEFlexTokenDispatcher

    num_local, rank = NUM_EXPERTS // group.size(), group.rank()
    config = MoEConfig(moe_router_topk=TOPK, num_moe_experts=NUM_EXPERTS, **config)
    return MoEFlexTokenDispatcher(
        num_local, list(range(rank * num_local, (rank + 1) * num_local)), config, group
    )


def worker(rank, num_ranks, group_name):
    from ep_ops import fused_a2a
    from ep_ops.token_dispatcher import MoEConfig, MoEFlexTokenDispatcher

    group = dist.group.WORLD
    x, idx, probs = inputs(rank)
    baseline = round_trip(group, x, idx, probs)
    bad = rank == 1
    cases = 0

    def still_in_step():
        nonlocal cases
        cases += 1
        assert torch.equal(round_trip(group, x, idx, probs), baseline), (
            f"case {cases}: the group is out of step"
        )

    # ---- MoEConfig / MoEFlexTokenDispatcher construction (local, every rank)
    for needles, config in (
        (["moe_token_dispatcher_type", "'bogus'"], {"moe_token_dispatcher_type": "bogus"}),
        (["moe_flex_dispatcher_backend"], {"moe_flex_dispatcher_backend": "nccl"}),
        (["moe_router_topk", "larger than num_moe_experts"], {"moe_router_topk": 9, "num_moe_experts": 8}),
        (["moe_router_topk", "positive int"], {"moe_router_topk": 0}),
        (["moe_expert_capacity_factor"], {"moe_expert_capacity_factor": 0.0}),
        (["moe_pad_expert_input_to_capacity needs"], {"moe_pad_expert_input_to_capacity": True}),
        (["moe_max_tokens_per_rank"], {"moe_max_tokens_per_rank": -1}),
    ):
        expect_error(ValueError, ["MoEConfig", *needles], MoEConfig, **config)
        still_in_step()
    config = MoEConfig(moe_router_topk=TOPK, num_moe_experts=NUM_EXPERTS)
    expect_error(ValueError, ["num_local_experts (3)", "num_moe_experts (8)"], MoEFlexTokenDispatcher,
                 3, [0, 1, 2], config, group)  # fmt: skip
    expect_error(ValueError, ["local_expert_indices", f"rank {rank} holds experts"], MoEFlexTokenDispatcher,
                 4, [4, 5, 6, 7][::-1] if rank else [1, 2, 3, 4], config, group)  # fmt: skip
    still_in_step()

    # ---- token_permutation: sizes that disagree (every rank, then rank 1 only)
    d = dispatcher(group)
    dense = torch.zeros(TOKENS, NUM_EXPERTS).scatter(1, idx, probs)
    expect_error(ValueError, ["hidden_states holds 6 tokens", "num_local_tokens is 7"],
                 d.token_permutation2, x, TOKENS + 1, probs, idx)  # fmt: skip
    still_in_step()
    expect_error(
        ValueError, ["probs must hold", "[6, 8]", "(6, 7)"], d.token_permutation, x, TOKENS, dense[:, :7]
    )
    still_in_step()
    if bad:
        expect_error(ValueError, ["num_local_tokens"], d.token_permutation2, x, TOKENS + 1, probs, idx)
    else:
        expect_error(RuntimeError, ["rank 1 rejected its input"], d.token_permutation2, x, TOKENS, probs, idx)
    still_in_step()

    # ---- fused_dispatch: expert ids out of range reach the op's own check
    expect_error(ValueError, ["topk_idx", "num_experts=8"], fused_a2a.fused_dispatch,
                 x, idx + NUM_EXPERTS, probs, NUM_EXPERTS, group)  # fmt: skip
    still_in_step()

    # ---- HybridEP
    expect_error(
        NotImplementedError,
        ["fp8_dispatch"],
        fused_a2a.init_hybrid_ep_buffer,
        group,
        HIDDEN,
        8,
        4,
        24,
        24,
        True,
    )
    expect_error(
        ValueError,
        ["seq_len", "positive int"],
        fused_a2a.init_hybrid_ep_buffer,
        group,
        HIDDEN,
        0,
        4,
        24,
        24,
        False,
    )
    routing_map = dense > 0
    num_local = NUM_EXPERTS // num_ranks
    expect_error(ValueError, ["hybrid_ep_dispatch", "routing_map must be a 2-D bool"],
                 fused_a2a.hybrid_ep_dispatch, x, dense, dense, group, num_local)  # fmt: skip
    still_in_step()
    if bad:
        expect_error(ValueError, ["routing_map must have shape"], fused_a2a.hybrid_ep_dispatch,
                     x, routing_map[:, :7], dense[:, :7], group, num_local)  # fmt: skip
    else:
        expect_error(RuntimeError, ["rank 1 rejected its input"], fused_a2a.hybrid_ep_dispatch,
                     x, routing_map, dense, group, num_local)  # fmt: skip
    still_in_step()
    permuted, _, _, _, handle = fused_a2a.hybrid_ep_dispatch(x, routing_map, dense, group, num_local)
    rows = permuted[:-1] if bad else permuted
    if bad:
        expect_error(ValueError, ["hybrid_ep_combine", "rows"], fused_a2a.hybrid_ep_combine, rows, handle)
    else:
        expect_error(RuntimeError, ["rank 1 rejected its input"], fused_a2a.hybrid_ep_combine, rows, handle)
    still_in_step()
    fused_a2a.reset_hybrid_ep_buffer()
    return cases


def test_moe_integration_rejects_bad_input_on_every_rank():
    counts = parallel_launch(2, worker, timeout=240)
    assert counts[0] == counts[1] and counts[0] >= 15, counts
