"""ep_ops.moe_layer.MoELayer against a dense single-process reference, eager and compiled.

Every rank runs the layer on its own tokens and backpropagates a fixed upstream gradient; it then
rebuilds all ranks' tokens and the global weights from the seeds, runs the dense MoE in one
process and compares its output and its gradients: x, its router replica, its slice of the expert
weights and its shared expert. Modes: exact (all-to-all and all-gather), static capacity
(worst-token dispatch, bmm experts) and low-latency decode (bfloat16). Compiled: a training step in
exact and static mode and an inference decode step (send/recv halves with the shared expert
between them), all ``fullgraph=True``, on 2 ranks.

The cases take a ``device``: tests/gpu/test_moe_cuda.py runs the compiled training steps on CUDA
ranks (NCCL, NVLink kernels) against the same references.
"""

import math

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
    tokens_of,
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


def num_experts_for(world_size):
    """NUM_EXPERTS, or the least multiple of it that the group size divides (4 and 8 GPU ranks)."""
    return math.lcm(NUM_EXPERTS, world_size)


def tokens(rank, world_size):
    """This rank's tokens x and upstream gradient g, both ``[T, HIDDEN]`` float32 on the CPU."""
    num_tokens = tokens_of(rank, world_size)
    gen = torch.Generator().manual_seed(700 + 10 * world_size + rank)
    return torch.randn(num_tokens, HIDDEN, generator=gen), torch.randn(num_tokens, HIDDEN, generator=gen)


def make_layer(group, world_size, mode, *, hidden=HIDDEN, **kw):
    kw.setdefault("shared_ffn_hidden_size", SHARED_FFN)
    kw.setdefault("max_tokens_per_rank", max_tokens(world_size))
    kw.setdefault("num_max_dispatch_tokens_per_rank", max_tokens(world_size))
    return MoELayer(hidden, FFN, num_experts_for(world_size), TOPK, group, mode=mode, seed=SEED, **kw)


@torch.enable_grad()
def dense_reference(layer, world_size, capacity=None, inputs=None):
    """Output and gradients of every rank's tokens through the dense MoE (float64, on the CPU):
    returns this rank's (y, grad x, grad router, grad w1 slice, grad w2 slice, grad shared
    weights). ``inputs``: every rank's (x, g) (default ``tokens(r, world_size)``)."""
    rank = layer.group.rank()
    num_experts, topk = layer.num_experts, layer.topk
    all_weights = global_weights(num_experts, layer.hidden_size, layer.w1.size(-1), SEED)
    w1, w2, router = (t.double().requires_grad_(True) for t in all_weights)
    shared = (
        [lin.weight.detach().double().cpu() for lin in (layer.shared[0], layer.shared[2])]
        if layer.shared
        else []
    )
    if inputs is None:
        inputs = [tokens(r, world_size) for r in range(world_size)]
    mine = None
    for r, (x, g) in enumerate(inputs):
        x = x.double().cpu().requires_grad_(True)
        router_r = router.detach().clone().requires_grad_(True)  # every rank has its own replica
        shared_r = [w.clone().requires_grad_(True) for w in shared]
        logits = x @ router_r.t()
        top, idx = torch.topk(logits, topk, dim=-1)
        weights = torch.softmax(top, dim=-1)
        if capacity is not None:
            idx, weights = reference_drop(idx, weights, capacity, num_experts)
        expert_out = torch.einsum(
            "tkf,tkfh->tkh",
            torch.nn.functional.silu(torch.einsum("th,tkhf->tkf", x, w1[idx.clamp(min=0)])),
            w2[idx.clamp(min=0)],
        )
        y = (expert_out * torch.where(idx >= 0, weights, 0.0).unsqueeze(-1)).sum(1)
        if shared_r:
            y = y + torch.nn.functional.silu(x @ shared_r[0].t()) @ shared_r[1].t()
        (y * g.double().cpu()).sum().backward(retain_graph=True)
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
    """Compares two ``layer_grads``/``dense_reference`` tuples on the CPU (either may be on CUDA)."""
    tol = tol or F32_TOL  # the layer computes in float32, the reference in float64

    def cpu(t):
        return t.detach().double().cpu()

    names = ("output", "grad x", "grad router", "grad w1", "grad w2", "grad shared")
    for name, a, b in zip(names, got, want, strict=True):
        if isinstance(a, list):
            for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
                assert_close(cpu(ai), cpu(bi), msg=lambda m, n=name, i=i: f"{what}: {n}[{i}]: {m}", **tol)
        else:
            assert_close(cpu(a), cpu(b), msg=lambda m, n=name: f"{what}: {n}: {m}", **tol)


# ----- cases -----------------------------------------------------------------------------------


def eager_cases(rank, world_size, group, device="cpu"):
    x, g = (t.to(device) for t in tokens(rank, world_size))
    static_capacity = capacity_of(
        max_tokens(world_size), CAPACITY_FACTOR, num_experts=num_experts_for(world_size)
    )

    def exact():
        for dispatcher_type in ("flex", "allgather"):
            layer = make_layer(group, world_size, "exact", dispatcher_type=dispatcher_type, pad_multiple=PAD)
            layer = layer.to(device)
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
            ).to(device)
            want = dense_reference(layer, world_size, capacity=static_capacity)
            compare(layer_grads(layer, x, g), want, f"static {dispatcher_type}")

    def low_latency():
        layer = make_layer(group, world_size, "low_latency").to(device)
        compare(layer_grads(layer, x, g), dense_reference(layer, world_size), "low latency", **BF16_TOL)
        with torch.no_grad():  # the send/recv halves with the shared expert between them
            assert_close(layer(x).cpu(), dense_reference(layer, world_size)[0].float(), **BF16_TOL)

    return {"exact": exact, "static": static, "low_latency": low_latency}


def compiled_cases(rank, world_size, group, device="cpu"):
    x, g = (t.to(device) for t in tokens(rank, world_size))
    static_capacity = capacity_of(
        max_tokens(world_size), CAPACITY_FACTOR, num_experts=num_experts_for(world_size)
    )

    def train(mode, **kw):
        layer = make_layer(group, world_size, mode, **kw).to(device)
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        got = layer_grads(layer, x, g, compiled)
        compare(got, layer_grads(layer, x, g), f"compiled {mode} vs eager", rtol=1e-5, atol=1e-5)
        capacity = static_capacity if mode == "static" else None
        compare(got, dense_reference(layer, world_size, capacity), f"compiled {mode} vs dense")
        static, problems = graph_is_static(counter.graphs[0])
        return {"graphs": counter.frame_count, "static": static, "problems": problems}

    def decode():
        layer = make_layer(group, world_size, "low_latency").to(device)
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        with torch.no_grad():
            got, eager = compiled(x), layer(x)
        assert_close(got, eager, **BF16_TOL)
        assert_close(got.cpu(), dense_reference(layer, world_size)[0].float(), **BF16_TOL)
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
