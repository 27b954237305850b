"""ep_ops.token_dispatcher (NeMo's MoEFlexTokenDispatcher API) and the ep_ops_py gather ops.

Each case builds a dispatcher from a ``MoEConfig``, runs ``token_permutation`` (or its split
steps), the analytic scaling experts of tests/moe_cases.py weighted by the permuted
probabilities, and ``token_unpermutation``, then checks the output and the gradients wrt the
hidden states and the probabilities against the closed form (capacity dropping rebuilt by a
plain loop). Ranks hold different token counts (one holds none on 3 ranks). The all-gather
strategy must give what the all-to-all gives. Compiled cases run on 2 ranks: the all-gather
static path under Inductor, the flex paths under ``aot_eager`` (Inductor compiles them in
test_moe_layer); the static ones must trace without host read-back or unbacked sizes.
"""

import pytest
import torch
import torch._dynamo.testing
from moe_cases import (
    NUM_EXPERTS,
    TOPK,
    analytic,
    capacity_of,
    dense_routing,
    graph_is_static,
    max_tokens,
    records_of,
    reference_drop,
    routing_of,
    scale_by_expert,
    upstream,
)
from torch.testing import assert_close

from ep_ops.gather_scatter import all_gather_v, reduce_scatter_v
from ep_ops.token_dispatcher import MoEConfig, MoEFlexTokenDispatcher

CAPACITY_FACTOR = 1.0
PAD = 4


def make_dispatcher(group, **config):
    num_local = NUM_EXPERTS // group.size()
    rank = group.rank()
    config = MoEConfig(moe_router_topk=TOPK, num_moe_experts=NUM_EXPERTS, **config)
    return MoEFlexTokenDispatcher(
        num_local, list(range(rank * num_local, (rank + 1) * num_local)), config, group
    )


def moe_step(dispatcher, x, idx, weights, dense):
    """token_permutation(2) -> experts (scale by expert + 1, times the permuted prob) ->
    token_unpermutation. Returns (y, tokens_per_expert, permuted_x, permuted_probs)."""
    num_tokens = x.size(0)
    if dense:
        _, probs = dense_routing(idx, weights)  # [T, E], differentiable wrt weights
        permuted, tokens_per_expert, permuted_probs = dispatcher.token_permutation(x, num_tokens, probs)
    else:
        permuted, tokens_per_expert, permuted_probs = dispatcher.token_permutation2(
            x, num_tokens, weights, idx
        )
    first = dispatcher.rank * dispatcher.num_local_experts
    h = scale_by_expert(permuted, tokens_per_expert, first) * permuted_probs.unsqueeze(1)
    y = dispatcher.token_unpermutation(h.to(x.dtype))
    return y, tokens_per_expert, permuted, permuted_probs


def run_and_grad(fn, x, weights, g):
    x, weights = (t.detach().clone().requires_grad_(True) for t in (x, weights))
    y, *extras = fn(x, weights)
    (y * g).sum().backward()
    return y.detach(), x.grad, weights.grad, [e.detach() for e in extras]


def check_analytic(got, x, idx, weights, g, what):
    y, gx, gw, _ = got
    y_ref, gx_ref, gw_ref = analytic(x, idx, weights, g)
    assert_close(y, y_ref, msg=lambda m: f"{what}: output: {m}")
    assert_close(gx, gx_ref, msg=lambda m: f"{what}: grad x: {m}")
    assert_close(gw, gw_ref, msg=lambda m: f"{what}: grad probs: {m}")


def received_counts(rank, world_size, drop=None):
    """Pairs each local expert of ``rank`` receives, over every rank's (dropped) routing."""
    num_local = NUM_EXPERTS // world_size
    counts = [0] * num_local
    for src in range(world_size):
        x, idx, w = routing_of(src, world_size)
        if drop is not None:
            idx, w = drop(src, idx, w)
        for e in range(num_local):
            counts[e] += int((idx == rank * num_local + e).sum())
    return counts


# ----- cases -----------------------------------------------------------------------------------


def eager_cases(rank, world_size, group):
    x, idx, weights = routing_of(rank, world_size)
    g = upstream(x.shape, rank)
    num_local = NUM_EXPERTS // world_size
    bound = max_tokens(world_size)

    def run(config, dense=False):
        dispatcher = make_dispatcher(group, **config)
        return run_and_grad(lambda x, w: moe_step(dispatcher, x, idx, w, dense), x, weights, g)

    def exact():
        results = {}
        for strategy in ("flex", "alltoall", "allgather"):
            for pad in (None, PAD):
                config = {"moe_token_dispatcher_type": strategy, "moe_router_expert_pad_multiple": pad}
                # The all-gather blocks need the bound when ranks hold different token counts.
                results[strategy, pad] = run({**config, "moe_max_tokens_per_rank": bound})
        for pad in (None, PAD):
            fused = {"moe_token_dispatcher_type": "alltoall", "moe_permute_fusion": True}
            results["fused permute", pad] = run({**fused, "moe_router_expert_pad_multiple": pad})
        results["dense"] = run({}, dense=True)
        results["fp64"] = run({"moe_router_dtype": "fp64"})
        results["hybridep"] = run(
            {"moe_flex_dispatcher_backend": "hybridep", "moe_router_expert_pad_multiple": PAD}
        )
        counts = received_counts(rank, world_size)
        for key, result in results.items():
            check_analytic(result, x, idx, weights, g, f"exact {key}")
        for (strategy, pad), result in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
            want = counts if pad is None else [-(-c // pad) * pad for c in counts]
            assert result[3][0].tolist() == want, f"{strategy} pad={pad}: {result[3][0].tolist()} != {want}"
            # The all-gather strategy gives what the all-to-all gives.
            for a, b in zip(result[:3], results["alltoall", pad][:3], strict=True):
                assert_close(a, b, rtol=1e-6, atol=1e-6)
            if strategy == "fused permute":  # the fused ops give what the separate passes give, bitwise
                for a, b in zip(result[:3], results["alltoall", pad][:3], strict=True):
                    assert_close(a, b, rtol=0, atol=0)
        assert results["fp64"][3][2].dtype == torch.float64
        assert results["flex", None][3][2].dtype == torch.float32

    def capacity():
        results = {}
        for strategy in ("flex", "allgather"):
            config = {"moe_token_dispatcher_type": strategy, "moe_expert_capacity_factor": CAPACITY_FACTOR}
            results[strategy] = run({**config, "moe_max_tokens_per_rank": bound})
        # Exact mode: each rank's capacity comes from its own token count.
        dropped_idx, dropped_w = reference_drop(idx, weights, capacity_of(x.size(0), CAPACITY_FACTOR))
        for strategy, result in results.items():
            check_analytic(result, x, dropped_idx, dropped_w, g, f"capacity {strategy}")

    def static():
        cap = capacity_of(bound, CAPACITY_FACTOR)
        group_rows = -(-world_size * cap // PAD) * PAD
        static_config = {
            "moe_expert_capacity_factor": CAPACITY_FACTOR,
            "moe_pad_expert_input_to_capacity": True,
            "moe_router_expert_pad_multiple": PAD,
            "moe_max_tokens_per_rank": bound,
        }
        results = {s: run({**static_config, "moe_token_dispatcher_type": s}) for s in ("flex", "allgather")}
        hybrid = run({**static_config, "moe_flex_dispatcher_backend": "hybridep"})
        dropped_idx, dropped_w = reference_drop(idx, weights, cap)
        for strategy, result in results.items():
            check_analytic(result, x, dropped_idx, dropped_w, g, f"static {strategy}")
            tokens_per_expert, permuted, _ = result[3]
            assert tokens_per_expert.tolist() == [group_rows] * num_local
            assert permuted.shape == (num_local * group_rows, x.size(1))
        # HybridEP packs the padded groups back to back in the same static row count.
        check_analytic(hybrid, x, dropped_idx, dropped_w, g, "static hybridep")
        assert hybrid[3][1].shape == (num_local * group_rows, x.size(1))
        # Every expert receives at most R * capacity pairs, so nothing past the groups is lost.
        assert (
            max(received_counts(rank, world_size, lambda s, i, w: reference_drop(i, w, cap)))
            <= world_size * cap
        )

    def gather_ops():
        name = group.group_name
        rows = torch.randn(x.size(0), 3, 2, generator=torch.Generator().manual_seed(rank))
        gathered, counts = all_gather_v(rows, bound, name)
        assert counts.tolist() == [routing_of(r, world_size)[0].size(0) for r in range(world_size)]
        assert gathered.shape == (world_size * bound, 3, 2)
        assert torch.equal(gathered[rank * bound : rank * bound + x.size(0)], rows)
        back = reduce_scatter_v(gathered, x.size(0), name)
        assert torch.equal(back, rows * world_size)
        for op, args in (
            (torch.ops.ep_ops_py.all_gather_v.default, (rows.requires_grad_(), bound, name)),
            (torch.ops.ep_ops_py.reduce_scatter_v.default, (gathered.requires_grad_(), x.size(0), name)),
        ):
            torch.library.opcheck(op, args)
        # One rank with too many rows: every rank raises, nobody hangs.
        too_many = bound + 1 if rank == 0 else 1
        try:
            all_gather_v(torch.zeros(too_many, 2), bound, name)
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError("all_gather_v accepted more rows than max_tokens_per_rank")
        assert ("more than max_tokens_per_rank" if rank == 0 else "rank 0 rejected its input") in message, (
            message
        )

    return {"exact": exact, "capacity": capacity, "static": static, "gather_ops": gather_ops}


def compiled_cases(rank, world_size, group):
    x, idx, weights = routing_of(rank, world_size, seed=2)
    g = upstream(x.shape, rank, salt=2)
    bound = max_tokens(world_size)

    def compiled(config, backend="inductor"):
        dispatcher = make_dispatcher(group, **config)

        def fn(x, w):
            return moe_step(dispatcher, x, idx, w, dense=False)[0]

        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled_fn = torch.compile(fn, backend=counter, fullgraph=True)
        got = run_and_grad(lambda x, w: (compiled_fn(x, w),), x, weights, g)
        eager = run_and_grad(lambda x, w: (fn(x, w),), x, weights, g)
        for a, b in zip(got[:3], eager[:3], strict=True):
            assert_close(a, b)
        static, problems = graph_is_static(counter.graphs[0])
        return got, {"graphs": counter.frame_count, "static": static, "problems": problems}

    def flex_exact():
        got, record = compiled({"moe_router_expert_pad_multiple": PAD}, "aot_eager")
        check_analytic(got, x, idx, weights, g, "compiled flex exact")
        return record

    def static(strategy, backend):
        def run():
            config = {
                "moe_token_dispatcher_type": strategy,
                "moe_expert_capacity_factor": CAPACITY_FACTOR,
                "moe_pad_expert_input_to_capacity": True,
                "moe_max_tokens_per_rank": bound,
            }
            got, record = compiled(config, backend)
            dropped_idx, dropped_w = reference_drop(idx, weights, capacity_of(bound, CAPACITY_FACTOR))
            check_analytic(got, x, dropped_idx, dropped_w, g, f"compiled static {strategy}")
            return record

        return run

    def unused_gather_is_kept():
        """Rank 1 ignores the gathered rows; a dropped all_gather_v would leave rank 0 waiting."""
        name = group.group_name

        def fn(x):
            gathered, _ = all_gather_v(x, bound, name)
            return x * 2 if rank == 1 else gathered.sum() + x.sum()

        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        assert_close(torch.compile(fn, backend=counter, fullgraph=True)(x), fn(x))
        targets = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
        return {"kept": sum(1 for t in targets if "all_gather_v" in str(t))}

    return {
        "compiled_unused_gather": unused_gather_is_kept,
        "compiled_flex_exact": flex_exact,
        "compiled_flex_static": static("flex", "aot_eager"),
        "compiled_allgather_static": static("allgather", "inductor"),
    }


MODULE = "test_token_dispatcher"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", ["exact", "capacity", "static", "gather_ops"])
def test_dispatcher_eager(world_size, case):
    records_of(MODULE, world_size, case)


def test_compiled_exact_mode():
    for record in records_of(MODULE, 2, "compiled_flex_exact"):
        assert record["graphs"] == 1


@pytest.mark.parametrize("case", ["compiled_flex_static", "compiled_allgather_static"])
def test_compiled_static_capacity_has_no_host_sync(case):
    for record in records_of(MODULE, 2, case):
        assert record["graphs"] == 1
        assert record["static"], record["problems"]


def test_unused_gather_survives_compilation():
    for record in records_of(MODULE, 2, "compiled_unused_gather"):
        assert record["kept"] == 1
