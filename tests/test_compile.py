"""torch.compile(fullgraph=True) of MoE layers built on the ep_ops ops (Inductor, CPU, gloo).

One launch (2 ranks) compiles every case in turn and compares the compiled forward and backward
with eager; each test below then checks one case's record. The dead-code test has its own short
launch, because a dropped op shows up as a hang there.

Dynamic token counts: the token dim is marked dynamic and a second call with another count must
reuse the graph. Dynamo specializes backed sizes 0 and 1 (a dim marked dynamic becomes a
symbol with the guard ``size >= 2``), so a rank that passes 0 tokens gets a graph of its own on
its first such call; the exact-mode case checks that this graph is right, not that it is shared.
(With ``torch.fx.experimental._config.backed_size_oblivious = True`` the zero-token call reused
the graph on torch 2.13; the default settings are what is tested here.)

Each launch gets a fresh Inductor cache directory: a cached graph compiled under other settings
can bring its guards along (seen with backed_size_oblivious) and turn "one graph" into two.
"""

import operator
import traceback

import pytest
import torch
import torch._dynamo.testing
from cases import Case, inputs_of
from moe import expert_weights, local_experts, low_latency_moe, moe
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.testing import assert_close

from ep_ops.launch import parallel_launch

ops = torch.ops.ep_ops

WORLD_SIZE = 2
HIDDEN = 16  # H = 16, K = 3 keep the collective backend's wire rows aligned (see test_autograd)
NUM_TOPK = 3
NUM_EXPERTS = 4
NUM_MAX = 16  # low-latency num_max_dispatch_tokens_per_rank
WORST_TOKENS = 32  # > the 11 + 12 tokens a rank can receive
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}

# Case.tokens_of gives rank r num_tokens + r tokens (>= 6), or max(0, num_tokens - 3 r): 3 -> 3, 0.
TOKEN_COUNTS = (8, 11)
ZERO_RANK_TOKENS = 3


def case_inputs(num_tokens, rank, world_size, dtype=torch.float32, seed=0):
    case = Case(
        num_tokens=num_tokens,
        hidden=HIDDEN,
        num_topk=NUM_TOPK,
        num_experts=NUM_EXPERTS,
        dtype=dtype,
        seed=seed + num_tokens,
    )
    return inputs_of(case, rank, world_size)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_with_grads(fn, inputs, grad_out, dynamic):
    """fn(*inputs) and the gradients of sum(out * grad_out) wrt the float inputs; ``dynamic``:
    indices of the inputs whose dim 0 (tokens) is marked dynamic."""
    inputs = leaves(*inputs)
    mark_tokens_dynamic(*(inputs[i] for i in dynamic))
    out = fn(*inputs)
    (out.float() * grad_out.float()).sum().backward()
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def mark_tokens_dynamic(*tensors):
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def check_against_eager(fn, compiled, inputs, what, dynamic=(0, 1), **tol):
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(inputs[0].size(0)))
    grad_out = grad_out.to(inputs[0].dtype)
    y_eager, grads_eager = run_with_grads(fn, inputs, grad_out, ())
    y_comp, grads_comp = run_with_grads(compiled, inputs, grad_out, dynamic)
    assert_close(y_comp, y_eager, msg=lambda m: f"{what}: output: {m}", **tol)
    assert len(grads_comp) == len(grads_eager)
    for i, (gc, ge) in enumerate(zip(grads_comp, grads_eager, strict=True)):
        assert gc is not None, f"{what}: compiled gradient {i} missing"
        assert_close(gc, ge, msg=lambda m, i=i: f"{what}: gradient {i}: {m}", **tol)


def graph_targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def dispatch_rows_unbacked(gm):
    """Whether the row count of dispatch's recv_x is an unbacked (data-dependent) SymInt."""
    (node,) = [n for n in gm.graph.nodes if n.target in (ops.dispatch, ops.dispatch.default)]
    return bool(free_unbacked_symbols(node.meta["example_value"][0].size(0)))


def count_calls(gm, op):
    return sum(1 for t in graph_targets(gm) if t in (op, op.default))


# ----- the compile cases (each returns a record the tests check) -------------------------------


def compile_moe_case(rank, world_size, group_name, num_worst_tokens):
    weights = local_experts(expert_weights(NUM_EXPERTS, HIDDEN, torch.float32), rank, world_size)

    def fn(x, topk_idx, topk_weights, w_local):
        return moe(x, topk_idx, topk_weights, w_local, NUM_EXPERTS, world_size, group_name, num_worst_tokens)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    counts = []
    for num_tokens in TOKEN_COUNTS:
        inp = case_inputs(num_tokens, rank, world_size)
        mark_tokens_dynamic(inp["topk_idx"])
        # topk_idx (int64) is passed through; gradients are taken wrt x, topk_weights, experts.
        check_against_eager(
            lambda x, w, wl, idx=inp["topk_idx"]: fn(x, idx, w, wl),
            lambda x, w, wl, idx=inp["topk_idx"]: compiled(x, idx, w, wl),
            [inp["x"], inp["topk_weights"], weights],
            f"moe worst={num_worst_tokens} T={inp['x'].size(0)}",
        )
        counts.append((inp["x"].size(0), counter.frame_count))
    record = {
        "counts": counts,
        "dispatch_calls": count_calls(counter.graphs[0], ops.dispatch),
        "unbacked_rows": dispatch_rows_unbacked(counter.graphs[0]),
    }
    if num_worst_tokens == 0:
        # A rank with no tokens (rank 1 gets 0, rank 0 gets 3): right results; rank 1 may recompile.
        inp = case_inputs(ZERO_RANK_TOKENS, rank, world_size)
        check_against_eager(
            lambda x, w, wl, idx=inp["topk_idx"]: fn(x, idx, w, wl),
            lambda x, w, wl, idx=inp["topk_idx"]: compiled(x, idx, w, wl),
            [inp["x"], inp["topk_weights"], weights],
            f"moe zero-token rank T={inp['x'].size(0)}",
            dynamic=(),
        )
        record["zero_rank"] = (inp["x"].size(0), counter.frame_count)
    return record


def compile_low_latency_case(rank, world_size, group_name):
    weights = local_experts(expert_weights(NUM_EXPERTS, HIDDEN, torch.float32), rank, world_size)

    def fn(x, topk_idx, topk_weights, w_local):
        return low_latency_moe(x, topk_idx, topk_weights, w_local, NUM_MAX, NUM_EXPERTS, group_name)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    counts = []
    for num_tokens in TOKEN_COUNTS:
        inp = case_inputs(num_tokens, rank, world_size, dtype=torch.bfloat16)
        mark_tokens_dynamic(inp["topk_idx"])
        check_against_eager(
            lambda x, w, wl, idx=inp["topk_idx"]: fn(x, idx, w, wl),
            lambda x, w, wl, idx=inp["topk_idx"]: compiled(x, idx, w, wl),
            [inp["x"], inp["topk_weights"], weights],
            f"low latency T={inp['x'].size(0)}",
            **BF16_TOL,
        )
        counts.append((inp["x"].size(0), counter.frame_count))
    return {"counts": counts}


def split_low_latency_moe(x, topk_idx, topk_weights, w_local, a, b, group_name):
    """low_latency_moe with each exchange issued as send + recv and unrelated compute between."""
    hidden, num_topk = x.size(1), topk_idx.size(1)
    packed = ops.low_latency_dispatch_send(x, topk_idx, NUM_MAX, NUM_EXPERTS, False, False, False, group_name)
    c = a @ b  # overlaps the dispatch
    recv_x, _, _, _, _, slots = ops.low_latency_dispatch_recv(
        packed, NUM_MAX, hidden, num_topk, NUM_EXPERTS, False, False, group_name
    )
    out = torch.bmm(recv_x.float(), w_local.float()).to(torch.bfloat16)
    partials = ops.low_latency_combine_send(out, topk_idx, topk_weights, slots, NUM_MAX, False, group_name)
    d = c @ b  # overlaps the combine
    y = ops.low_latency_combine_recv(partials, topk_idx, hidden, NUM_EXPERTS, NUM_MAX, False, group_name)
    return y, d


def compile_send_recv_case(rank, world_size, group_name):
    weights = local_experts(expert_weights(NUM_EXPERTS, HIDDEN, torch.float32), rank, world_size)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)

    def fn(x, topk_idx, topk_weights):
        return split_low_latency_moe(x, topk_idx, topk_weights, weights, a, b, group_name)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    counts = []
    for num_tokens in TOKEN_COUNTS:
        inp = case_inputs(num_tokens, rank, world_size, dtype=torch.bfloat16)
        mark_tokens_dynamic(inp["x"], inp["topk_idx"], inp["topk_weights"])
        args = (inp["x"], inp["topk_idx"], inp["topk_weights"])
        y_eager, d_eager = fn(*args)
        y_comp, d_comp = compiled(*args)
        assert_close(y_comp, y_eager, **BF16_TOL)
        assert_close(d_comp, d_eager)
        # The halves give what the whole ops give.
        whole = low_latency_moe(*args, weights, NUM_MAX, NUM_EXPERTS, group_name)
        assert_close(y_comp, whole, **BF16_TOL)
        counts.append((inp["x"].size(0), counter.frame_count))
    # Program order survives into the graph: each send, then the compute, then its recv.
    targets = graph_targets(counter.graphs[0])

    def where(op):
        return next(i for i, t in enumerate(targets) if t in (op, op.default))

    matmuls = [i for i, t in enumerate(targets) if t in (operator.matmul, torch.matmul)]
    order = [
        where(ops.low_latency_dispatch_send),
        matmuls[0],
        where(ops.low_latency_dispatch_recv),
        where(ops.low_latency_combine_send),
        matmuls[1],
        where(ops.low_latency_combine_recv),
    ]
    return {"counts": counts, "graph_order": order}


def compile_worker(rank, world_size, group_name):
    """Runs every compile case; a case's failure is recorded (with its traceback), not raised, so
    the other cases still report. Cases fail alike on all ranks (same code, same shapes)."""
    cases = {
        "exact": lambda: compile_moe_case(rank, world_size, group_name, 0),
        "worst_token": lambda: compile_moe_case(rank, world_size, group_name, WORST_TOKENS),
        "low_latency": lambda: compile_low_latency_case(rank, world_size, group_name),
        "send_recv": lambda: compile_send_recv_case(rank, world_size, group_name),
    }
    records = {}
    for name, run in cases.items():
        torch._dynamo.reset()
        try:
            records[name] = {"ok": True, **run()}
        except Exception:
            records[name] = {"ok": False, "error": traceback.format_exc()}
    return records


@pytest.fixture(scope="module")
def compile_records(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
        return parallel_launch(WORLD_SIZE, compile_worker, timeout=400)


def records_of(compile_records, name):
    records = [r[name] for r in compile_records]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank}, case {name}:\n{record['error']}"
    return records


def expected_counts(world_size=WORLD_SIZE):
    """(tokens, graphs compiled so far) per call: one graph for every token count."""
    return [[(n + rank, 1) for n in TOKEN_COUNTS] for rank in range(world_size)]


def test_exact_mode_forward_backward_one_graph(compile_records):
    records = records_of(compile_records, "exact")
    assert [r["counts"] for r in records] == expected_counts()
    assert all(r["dispatch_calls"] == 1 and r["unbacked_rows"] for r in records)
    # The zero-token rank: 0/1 specialization gives it a second graph; rank 0 (3 tokens) reuses.
    assert records[0]["zero_rank"] == (ZERO_RANK_TOKENS, 1)
    assert records[1]["zero_rank"][0] == 0 and records[1]["zero_rank"][1] <= 2


def test_worst_token_mode_forward_backward_one_graph(compile_records):
    records = records_of(compile_records, "worst_token")
    assert [r["counts"] for r in records] == expected_counts()
    assert all(r["dispatch_calls"] == 1 and not r["unbacked_rows"] for r in records)


def test_low_latency_forward_backward_one_graph(compile_records):
    records = records_of(compile_records, "low_latency")
    assert [r["counts"] for r in records] == expected_counts()


def test_send_recv_halves_with_compute_between(compile_records):
    records = records_of(compile_records, "send_recv")
    assert [r["counts"] for r in records] == expected_counts()
    for record in records:
        assert record["graph_order"] == sorted(record["graph_order"]), record["graph_order"]


# ----- dead-code elimination ---------------------------------------------------------------------


def dce_worker(rank, world_size, group_name):
    """Rank 1 ignores every output of dispatch and low_latency_dispatch; rank 0 uses them. A
    dropped op would leave rank 0 waiting in the exchange (the launch timeout ends it)."""
    inp = case_inputs(8, rank, world_size)
    x, topk_idx, topk_weights = inp["x"], inp["topk_idx"], inp["topk_weights"]
    x_bf16 = x.to(torch.bfloat16)

    def communicate(x, topk_idx, topk_weights, x_bf16):
        _, _, in_rank = ops.get_dispatch_layout(topk_idx, NUM_EXPERTS, world_size)
        out = ops.dispatch(x, None, topk_idx, topk_weights, in_rank, NUM_EXPERTS, 1, 0, group_name)
        ll = ops.low_latency_dispatch(x_bf16, topk_idx, NUM_MAX, NUM_EXPERTS, False, False, False, group_name)
        return out, ll

    def uses(x, topk_idx, topk_weights, x_bf16):
        out, ll = communicate(x, topk_idx, topk_weights, x_bf16)
        return x * 2, out[0].sum(), out[3].sum(), ll[0].float().sum()

    def ignores(x, topk_idx, topk_weights, x_bf16):
        communicate(x, topk_idx, topk_weights, x_bf16)
        return x * 2

    fn = uses if rank == 0 else ignores
    expected = fn(x, topk_idx, topk_weights, x_bf16)
    record = {}
    recorder = torch._dynamo.testing.AotEagerAndRecordGraphs()
    for name, backend in (("inductor", "inductor"), ("aot_eager", recorder)):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        got = compiled(x, topk_idx, topk_weights, x_bf16)
        assert_close(got, expected, msg=lambda m, name=name: f"{name}: {m}")
        record[name] = True
    (forward,) = recorder.fw_graphs
    record["dynamo_graph"] = [
        count_calls(recorder.graphs[0], op) for op in (ops.dispatch, ops.low_latency_dispatch)
    ]
    record["forward_graph"] = [count_calls(forward, op) for op in (ops.dispatch, ops.low_latency_dispatch)]
    return record


def test_unused_outputs_keep_the_op(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
        records = parallel_launch(WORLD_SIZE, dce_worker, timeout=120)
    for rank, record in enumerate(records):
        assert record["inductor"] and record["aot_eager"]
        assert record["dynamo_graph"] == [1, 1], f"rank {rank}: {record}"
        assert record["forward_graph"] == [1, 1], f"rank {rank}: {record}"
