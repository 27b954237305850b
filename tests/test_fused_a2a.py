"""ep_ops.fused_a2a, imported as Megatron/NeMo code imports it, on 2 and 3 gloo ranks.

Every case runs a dispatch, the analytic scaling experts of tests/moe_cases.py and a combine, and
checks the output and the gradients wrt x and the probabilities against the closed form, eagerly
and under ``torch.compile(fullgraph=True)``; the HybridEP cases also check the permuted layout row
by row against one rebuilt from every rank's routing. Both ways in are checked: the functions
(built on the ops' autograd) and the ``torch.autograd.Function`` classes (``.apply``).

The compiled cases run on 2 ranks: the HybridEP static path under Inductor (and its graph must
have no host read-back and no unbacked size), the others under ``aot_eager`` (Dynamo and
AOTAutograd trace them in full; Inductor lowers the same ops in test_moe_layer's training steps),
which keeps the suite's compile time down. One 2-rank launch for this module; the 3-rank eager
cases share one launch with the other MoE modules (moe_cases.three_rank_records).
"""

import pytest
import torch
import torch._dynamo.testing
from moe_cases import (
    HIDDEN,
    NUM_EXPERTS,
    analytic,
    dense_routing,
    graph_is_static,
    max_tokens,
    records_of,
    routing_of,
    scale_by_expert,
    upstream,
)
from torch.testing import assert_close

from ep_ops.fused_a2a import (
    FusedCombine,
    FusedDispatch,
    HybridEPCombine,
    HybridEPDispatch,
    fused_combine,
    fused_dispatch,
    get_buffer,
    get_hidden_bytes,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
    init_hybrid_ep_buffer,
    reset_hybrid_ep_buffer,
    set_deepep_num_sms,
)

PAD = 4


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ----- the MoE steps under test ----------------------------------------------------------------


def fused_step(x, idx, probs, group, use_class):
    """fused_dispatch -> scale rows by (expert + 1), weighted -> fused_combine."""
    num_local = NUM_EXPERTS // group.size()
    first = group.rank() * num_local
    if use_class:
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = FusedDispatch.apply(
            x, idx, probs, NUM_EXPERTS, group
        )
    else:
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = fused_dispatch(
            x, idx, probs, NUM_EXPERTS, group
        )
    scale = torch.where(recv_idx >= 0, (recv_idx + first + 1).to(recv_probs.dtype), 0.0)
    h = recv_x * (recv_probs * scale).sum(dim=1, keepdim=True)
    if use_class:
        y, event = FusedCombine.apply(h, group, handle)
    else:
        y, event = fused_combine(h, group, handle)
    assert event is None
    return y, recv_x, recv_idx, tokens_per_expert


def hybrid_step(x, routing_map, probs, group, use_class, num_permuted_tokens=None, pad_multiple=None):
    """hybrid_ep_dispatch (grouped rows) -> scale by (expert + 1) * prob -> hybrid_ep_combine."""
    num_local = NUM_EXPERTS // group.size()
    if use_class:
        out = HybridEPDispatch.apply(
            x, routing_map, probs, group, num_local, 24, 24, num_permuted_tokens, pad_multiple
        )
    else:
        out = hybrid_ep_dispatch(
            x, routing_map, probs, group, num_local,
            num_permuted_tokens=num_permuted_tokens, pad_multiple=pad_multiple,
        )  # fmt: skip
    permuted_x, permuted_probs, scaling, tokens_per_expert, handle = out
    assert scaling is None
    h = scale_by_expert(permuted_x, tokens_per_expert, group.rank() * num_local) * permuted_probs.unsqueeze(1)
    if use_class:
        y = HybridEPCombine.apply(h, handle, num_permuted_tokens, pad_multiple)
    else:
        y = hybrid_ep_combine(h, handle, num_permuted_tokens, pad_multiple)
    return y, permuted_x, tokens_per_expert


def expected_layout(rank, world_size, pad_multiple, num_rows=None):
    """The grouped rows rank ``rank`` must get: for each local expert, the tokens routed to it
    by source rank then token, then zero rows up to the pad multiple (and up to num_rows)."""
    num_local = NUM_EXPERTS // world_size
    groups, sizes = [], []
    for e in range(rank * num_local, (rank + 1) * num_local):
        rows = []
        for src in range(world_size):
            x, idx, _ = routing_of(src, world_size)
            rows += [x[t] for t in range(x.size(0)) if bool((idx[t] == e).any())]
        size = len(rows)
        if pad_multiple:
            size = -(-size // pad_multiple) * pad_multiple
        rows += [torch.zeros(HIDDEN)] * (size - len(rows))
        groups += rows
        sizes.append(size)
    if num_rows is not None:
        groups += [torch.zeros(HIDDEN)] * (num_rows - len(groups))
    return torch.stack(groups) if groups else torch.zeros(0, HIDDEN), sizes


def run_and_grad(step, x, idx_or_map, probs, g, **kw):
    x, probs = leaves(x, probs)
    y, *extras = step(x, idx_or_map, probs, **kw)
    (y * g).sum().backward()
    return y.detach(), x.grad, probs.grad, extras


def check_analytic(got, x, idx, weights, g, what, dense_map=None):
    y, gx, gp, _ = got
    y_ref, gx_ref, gw_ref = analytic(x, idx, weights, g)
    assert_close(y, y_ref, msg=lambda m: f"{what}: output: {m}")
    assert_close(gx, gx_ref, msg=lambda m: f"{what}: grad x: {m}")
    if dense_map is not None:  # probs came as [T, E]: scatter the closed form there
        _, gw_ref = dense_routing(idx, gw_ref)
    assert_close(gp, gw_ref, msg=lambda m: f"{what}: grad probs: {m}")


# ----- cases -----------------------------------------------------------------------------------


def eager_cases(rank, world_size, group):
    x, idx, weights = routing_of(rank, world_size)
    routing_map, probs = dense_routing(idx, weights)
    g = upstream(x.shape, rank)
    num_local = NUM_EXPERTS // world_size
    # The static bound: every rank receives at most R * max tokens rows, each in <= E_local groups.
    num_permuted = world_size * max_tokens(world_size) * num_local + num_local * PAD

    def fused():
        got = {
            c: run_and_grad(fused_step, x, idx, weights, g, group=group, use_class=c) for c in (False, True)
        }
        for use_class, result in got.items():
            check_analytic(result, x, idx, weights, g, f"fused class={use_class}")
            _, recv_idx, tokens_per_expert = result[3]
            counts = [int(((recv_idx == e).any(1)).sum()) for e in range(num_local)]
            assert tokens_per_expert.dtype == torch.int64 and tokens_per_expert.tolist() == counts
        # Both ways in give identical results.
        for a, b in zip(got[False][:3], got[True][:3], strict=True):
            assert torch.equal(a, b)
        buffer = get_buffer(group, get_hidden_bytes(x))
        assert buffer is get_buffer(group, get_hidden_bytes(x)), "get_buffer must cache per group"
        assert get_buffer(group, 4 * get_hidden_bytes(x)).num_nvl_bytes > buffer.num_nvl_bytes

    def hybrid():
        reset_hybrid_ep_buffer()
        init_hybrid_ep_buffer(group, HIDDEN, max_tokens(world_size), num_local, 24, 24, False)
        results = {}
        for use_class in (False, True):
            for name, kw in (
                ("exact", {}),
                ("pad", {"pad_multiple": PAD}),
                ("static", {"num_permuted_tokens": num_permuted, "pad_multiple": PAD}),
            ):
                results[name, use_class] = run_and_grad(
                    hybrid_step, x, routing_map, probs, g, group=group, use_class=use_class, **kw
                )
        for (name, use_class), result in results.items():
            what = f"hybrid {name} class={use_class}"
            check_analytic(result, x, idx, weights, g, what, dense_map=routing_map)
            permuted_x, tokens_per_expert = result[3]
            pad = None if name == "exact" else PAD
            layout, sizes = expected_layout(rank, world_size, pad, num_permuted if name == "static" else None)
            assert tokens_per_expert.tolist() == sizes, f"{what}: {tokens_per_expert.tolist()} != {sizes}"
            assert torch.equal(permuted_x.detach(), layout), f"{what}: permuted layout"
            if name == "static":
                assert permuted_x.shape == (num_permuted, HIDDEN)
        set_deepep_num_sms(24)  # the SM setter exists and takes Megatron's argument

    return {"fused": fused, "hybrid": hybrid}


def compiled_cases(rank, world_size, group):
    x, idx, weights = routing_of(rank, world_size, seed=1)
    routing_map, probs = dense_routing(idx, weights)
    g = upstream(x.shape, rank, salt=1)
    num_local = NUM_EXPERTS // world_size
    num_permuted = world_size * max_tokens(world_size) * num_local + num_local * PAD

    def compiled(step, idx_or_map, p, dense, backend="inductor", **kw):
        def fn(x, p):
            return step(x, idx_or_map, p, group=group, **kw)[0]

        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        got = run_and_grad(
            lambda x, _, p: (torch.compile(fn, backend=counter, fullgraph=True)(x, p),), x, None, p, g
        )
        check_analytic(
            got,
            x,
            idx,
            weights,
            g,
            f"compiled {step.__name__} {kw}",
            dense_map=routing_map if dense else None,
        )
        eager = run_and_grad(lambda x, _, p: (fn(x, p),), x, None, p, g)
        for a, b in zip(got[:3], eager[:3], strict=True):
            assert_close(a, b)
        return counter

    def fused_functions():
        counter = compiled(fused_step, idx, weights, False, backend="aot_eager", use_class=False)
        return {"graphs": counter.frame_count}

    def fused_classes():
        counter = compiled(fused_step, idx, weights, False, backend="aot_eager", use_class=True)
        return {"graphs": counter.frame_count}

    def hybrid_static():
        reset_hybrid_ep_buffer()
        init_hybrid_ep_buffer(group, HIDDEN, max_tokens(world_size), num_local, 24, 24, False)
        counter = compiled(
            hybrid_step,
            routing_map,
            probs,
            True,
            use_class=False,
            num_permuted_tokens=num_permuted,
            pad_multiple=PAD,
        )
        static, problems = graph_is_static(counter.graphs[0])
        return {"graphs": counter.frame_count, "static": static, "problems": problems}

    def hybrid_exact_classes():
        # aot_eager: Dynamo and AOTAutograd trace the autograd.Function; Inductor lowers the same
        # ops in the function-path cases.
        counter = compiled(
            hybrid_step, routing_map, probs, True, backend="aot_eager", use_class=True, pad_multiple=PAD
        )
        return {"graphs": counter.frame_count}

    return {
        "fused_functions": fused_functions,
        "fused_classes": fused_classes,
        "hybrid_static": hybrid_static,
        "hybrid_exact_classes": hybrid_exact_classes,
    }


MODULE = "test_fused_a2a"


@pytest.mark.parametrize("world_size", [2, 3])
def test_fused_dispatch_combine_eager(world_size):
    records_of(MODULE, world_size, "fused")


@pytest.mark.parametrize("world_size", [2, 3])
def test_hybrid_ep_layout_pad_and_static(world_size):
    records_of(MODULE, world_size, "hybrid")


@pytest.mark.parametrize("case", ["fused_functions", "fused_classes", "hybrid_exact_classes"])
def test_compiled_fullgraph_with_gradients(case):
    for record in records_of(MODULE, 2, case):
        assert record["graphs"] == 1


def test_hybrid_static_compiles_without_host_sync():
    for record in records_of(MODULE, 2, "hybrid_static"):
        assert record["graphs"] == 1
        assert record["static"], record["problems"]
