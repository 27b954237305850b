"""ep_ops.moe_layer.MoELayer against a dense single-process reference, eager and compiled.

Every rank runs the layer on its own tokens and backpropagates a fixed upstream gradient; it then
rebuilds all ranks' tokens and the global weights from the seeds, runs the dense MoE in one
process and compares its output and its gradients: x, its router replica, its slice of the expert
weights and its shared expert. Modes: exact (all-to-all and all-gather), static capacity
(worst-token dispatch, bmm experts) and low-latency decode (bfloat16). Compiled: a training step in
exact and static mode and an inference decode step (send/recv halves with the shared expert
between them), all ``fullgraph=True``, on 2 ranks.
"""

import pytest
import torch
import torch._dynamo.testing
from moe_cases import (
    HIDDEN,
    NUM_EXPERTS,
    TOPK,
    capacity_of,
    graph_is_static,
    max_tokens,
    records_of,
    reference_drop,
)
from torch.testing import assert_close

from ep_ops.moe_layer import MoELayer, global_weights

FFN = 8
SHARED_FFN = 4
SEED = 3
CAPACITY_FACTOR = 1.0
PAD = 4
F32_TOL = {"rtol": 1e-4, "atol": 1e-5}
BF16_TOL = {"rtol": 3e-2, "atol": 3e-2}


def tokens(rank, world_size):
    num_tokens = {2: (5, 8), 3: (5, 8, 0)}[world_size][rank]
    gen = torch.Generator().manual_seed(700 + 10 * world_size + rank)
    return torch.randn(num_tokens, HIDDEN, generator=gen), torch.randn(num_tokens, HIDDEN, generator=gen)


def make_layer(group, world_size, mode, **kw):
    kw.setdefault("shared_ffn_hidden_size", SHARED_FFN)
    return MoELayer(
        HIDDEN, FFN, NUM_EXPERTS, TOPK, group, mode=mode, seed=SEED,
        max_tokens_per_rank=max_tokens(world_size), num_max_dispatch_tokens_per_rank=max_tokens(world_size), **kw,
    )  # fmt: skip


@torch.enable_grad()
def dense_reference(layer, world_size, capacity=None):
    """Output and gradients of every rank's tokens through the dense MoE (float64): returns this
    rank's (y, grad x, grad router, grad w1 slice, grad w2 slice, grad shared weights)."""
    rank = layer.group.rank()
    w1, w2, router = (t.double().requires_grad_(True) for t in global_weights(NUM_EXPERTS, HIDDEN, FFN, SEED))
    shared = (
        [lin.weight.detach().double() for lin in (layer.shared[0], layer.shared[2])] if layer.shared else []
    )
    mine = None
    for r in range(world_size):
        x, g = tokens(r, world_size)
        x = x.double().requires_grad_(True)
        router_r = router.detach().clone().requires_grad_(True)  # every rank has its own replica
        shared_r = [w.clone().requires_grad_(True) for w in shared]
        logits = x @ router_r.t()
        top, idx = torch.topk(logits, TOPK, dim=-1)
        weights = torch.softmax(top, dim=-1)
        if capacity is not None:
            idx, weights = reference_drop(idx, weights, capacity)
        expert_out = torch.einsum(
            "tkf,tkfh->tkh",
            torch.nn.functional.silu(torch.einsum("th,tkhf->tkf", x, w1[idx.clamp(min=0)])),
            w2[idx.clamp(min=0)],
        )
        y = (expert_out * torch.where(idx >= 0, weights, 0.0).unsqueeze(-1)).sum(1)
        if shared_r:
            y = y + torch.nn.functional.silu(x @ shared_r[0].t()) @ shared_r[1].t()
        (y * g.double()).sum().backward(retain_graph=True)
        if r == rank:
            mine = (y.detach(), x, router_r, shared_r)
    y, x, router_r, shared_r = mine
    local = slice(rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts)
    return y, x.grad, router_r.grad, w1.grad[local], w2.grad[local], [w.grad for w in shared_r]


def layer_grads(layer, x, g, fn=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (layer if fn is None else fn)(x)
    (y.float() * g).sum().backward()
    shared = [lin.weight.grad for lin in (layer.shared[0], layer.shared[2])] if layer.shared else []
    return y.detach(), x.grad, layer.router.grad, layer.w1.grad, layer.w2.grad, shared


def compare(got, want, what, **tol):
    tol = tol or F32_TOL  # the layer computes in float32, the reference in float64
    names = ("output", "grad x", "grad router", "grad w1", "grad w2", "grad shared")
    for name, a, b in zip(names, got, want, strict=True):
        if isinstance(a, list):
            for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
                assert_close(
                    ai.double(), bi.double(), msg=lambda m, n=name, i=i: f"{what}: {n}[{i}]: {m}", **tol
                )
        else:
            assert_close(a.double(), b.double(), msg=lambda m, n=name: f"{what}: {n}: {m}", **tol)


# ----- cases -----------------------------------------------------------------------------------


def eager_cases(rank, world_size, group):
    x, g = tokens(rank, world_size)
    static_capacity = capacity_of(max_tokens(world_size), CAPACITY_FACTOR)

    def exact():
        for dispatcher_type in ("flex", "allgather"):
            layer = make_layer(group, world_size, "exact", dispatcher_type=dispatcher_type, pad_multiple=PAD)
            compare(layer_grads(layer, x, g), dense_reference(layer, world_size), f"exact {dispatcher_type}")

    def static():
        for dispatcher_type in ("flex", "allgather"):
            layer = make_layer(
                group,
                world_size,
                "static",
                capacity_factor=CAPACITY_FACTOR,
                pad_multiple=PAD,
                dispatcher_type=dispatcher_type,
            )
            want = dense_reference(layer, world_size, capacity=static_capacity)
            compare(layer_grads(layer, x, g), want, f"static {dispatcher_type}")

    def low_latency():
        layer = make_layer(group, world_size, "low_latency")
        compare(layer_grads(layer, x, g), dense_reference(layer, world_size), "low latency", **BF16_TOL)
        with torch.no_grad():  # the send/recv halves with the shared expert between them
            assert_close(layer(x), dense_reference(layer, world_size)[0].float(), **BF16_TOL)

    return {"exact": exact, "static": static, "low_latency": low_latency}


def compiled_cases(rank, world_size, group):
    x, g = tokens(rank, world_size)
    static_capacity = capacity_of(max_tokens(world_size), CAPACITY_FACTOR)

    def train(mode, **kw):
        layer = make_layer(group, world_size, mode, **kw)
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        got = layer_grads(layer, x, g, compiled)
        compare(got, layer_grads(layer, x, g), f"compiled {mode} vs eager", rtol=1e-5, atol=1e-5)
        capacity = static_capacity if mode == "static" else None
        compare(got, dense_reference(layer, world_size, capacity), f"compiled {mode} vs dense")
        static, problems = graph_is_static(counter.graphs[0])
        return {"graphs": counter.frame_count, "static": static, "problems": problems}

    def decode():
        layer = make_layer(group, world_size, "low_latency")
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        with torch.no_grad():
            got, eager = compiled(x), layer(x)
        assert_close(got, eager, **BF16_TOL)
        assert_close(got, dense_reference(layer, world_size)[0].float(), **BF16_TOL)
        names = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
        order = [
            next(i for i, t in enumerate(names) if op in t)
            for op in ("dispatch_send", "linear", "dispatch_recv")
        ]
        static, problems = graph_is_static(counter.graphs[0])
        return {"graphs": counter.frame_count, "order": order, "static": static, "problems": problems}

    return {
        "compiled_exact": lambda: train("exact", pad_multiple=PAD),
        "compiled_static": lambda: train("static", capacity_factor=CAPACITY_FACTOR, pad_multiple=PAD),
        "compiled_decode": decode,
    }


MODULE = "test_moe_layer"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", ["exact", "static", "low_latency"])
def test_layer_matches_dense_reference(world_size, case):
    records_of(MODULE, world_size, case)


def test_compiled_training_step_exact():
    for record in records_of(MODULE, 2, "compiled_exact"):
        assert record["graphs"] == 1


def test_compiled_training_step_static_has_no_host_sync():
    for record in records_of(MODULE, 2, "compiled_static"):
        assert record["graphs"] == 1
        assert record["static"], record["problems"]


def test_compiled_decode_overlaps_shared_expert():
    for record in records_of(MODULE, 2, "compiled_decode"):
        assert record["graphs"] == 1 and record["static"], record["problems"]
        assert record["order"] == sorted(record["order"]), record["order"]
