"""Gradients of dispatch / cached dispatch / combine / low-latency ops against a dense reference.

Every rank runs a tiny MoE (tests/moe.py) through the real ops and backpropagates a random
upstream gradient; it then rebuilds all ranks' inputs from the seed, runs the dense single-process
MoE on them and compares its own outputs and gradients (x, topk_weights, its local experts, biases,
the cached-dispatched input). One launch per world size: the cases loop inside the worker.
"""

import dataclasses

import pytest
import torch
from cases import Case, all_inputs
from moe import apply_experts, dense_moe, expert_weights, local_experts, low_latency_moe, moe
from torch.testing import assert_close

from ep_ops.launch import parallel_launch

ops = torch.ops.ep_ops

NUM_EXPERTS = 6  # a multiple of 1, 2 and 3
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}

# Token counts per rank (Case.tokens_of): 7 -> 7, 8, 9; 5 -> 5, 2, 0 (a rank without tokens).
# The cases whose ranks may receive no rows are float32 with H = 16, K = 3: with those, every
# field of the collective backend's wire rows is aligned to its element size, which the kernels
# need when no rows arrive (see test_zero_rows_with_unaligned_wire_rows).
CASES = [
    Case(num_tokens=7, hidden=16, num_topk=3, num_experts=NUM_EXPERTS, dtype=torch.float64, seed=2),
    Case(num_tokens=5, hidden=16, num_topk=3, num_experts=NUM_EXPERTS, dtype=torch.float32, seed=1),
    Case(
        num_tokens=7,
        hidden=16,
        num_topk=3,
        num_experts=NUM_EXPERTS,
        dtype=torch.float32,
        seed=3,
        routing="skewed",
    ),
]


def upstream(shape, dtype, seed, rank, salt=0):
    gen = torch.Generator().manual_seed(7919 * seed + 31 * rank + salt)
    return torch.randn(*shape, generator=gen).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


class Problem:
    """All ranks' inputs of one case, as the dense reference sees them."""

    def __init__(self, case: Case, world_size: int):
        inputs = all_inputs(case, world_size)
        self.case, self.world_size = case, world_size
        self.xs = [i["x"] for i in inputs]
        self.idxs = [i["topk_idx"] for i in inputs]
        self.ws = [i["topk_weights"] for i in inputs]
        self.weights = expert_weights(case.num_experts, case.hidden, torch.float64, case.seed)
        self.zs = [upstream(x.shape, x.dtype, case.seed, r, salt=1) for r, x in enumerate(self.xs)]
        self.gs = [upstream(x.shape, x.dtype, case.seed, r, salt=2) for r, x in enumerate(self.xs)]
        self.gws = [upstream(w.shape, torch.float32, case.seed, r, salt=3) for r, w in enumerate(self.ws)]
        self.b0s = [upstream(x.shape, x.dtype, case.seed, r, salt=4) for r, x in enumerate(self.xs)]
        self.b1s = [upstream(x.shape, x.dtype, case.seed, r, salt=5) for r, x in enumerate(self.xs)]

    def worst_tokens(self) -> int:
        """More rows than any rank can receive."""
        return sum(x.size(0) for x in self.xs) + 3


def close(actual, expected, what, **tol):
    assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


# ----- normal dispatch / cached dispatch / combine ---------------------------------------------


def full_moe(
    x, z, topk_idx, topk_weights, w_local, b0, b1, num_experts, num_ranks, group_name, num_worst_tokens
):
    """MoE on x + z where z travels by cached_dispatch along x's handle; combine also reduces
    the squared received weights and adds two biases. Returns (y, combined_weights)."""
    _, _, in_rank = ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    recv_x, _, recv_idx, recv_w, _, rpm, src = ops.dispatch(
        x, None, topk_idx, topk_weights, in_rank, num_experts, 1, num_worst_tokens, group_name
    )
    recv_z, _ = ops.cached_dispatch(z, None, in_rank, rpm, src, group_name)
    h = apply_experts(recv_x + recv_z, recv_idx, recv_w, w_local)
    return ops.combine(h, recv_w * recv_w, b0, b1, in_rank, rpm, src, group_name)


def check_moe(p: Problem, rank: int, group_name: str, num_worst_tokens: int, full: bool) -> None:
    case, world_size = p.case, p.world_size
    tag = f"{case} worst={num_worst_tokens} full={full}"
    w_local_full = local_experts(p.weights, rank, world_size).to(case.dtype)

    # Distributed.
    x, w, w_local = leaf(p.xs[rank]), leaf(p.ws[rank]), leaf(w_local_full)
    z, b0, b1 = leaf(p.zs[rank]), leaf(p.b0s[rank]), leaf(p.b1s[rank])
    if full:
        y, cw = full_moe(
            x, z, p.idxs[rank], w, w_local, b0, b1, case.num_experts, world_size, group_name, num_worst_tokens
        )
        loss = (y * p.gs[rank]).sum() + (cw * p.gws[rank]).sum()
    else:
        y = moe(x, p.idxs[rank], w, w_local, case.num_experts, world_size, group_name, num_worst_tokens)
        loss = (y * p.gs[rank]).sum()
    loss.backward()

    # Dense, on every rank's tokens.
    dx, dw, dz = [leaf(t) for t in p.xs], [leaf(t) for t in p.ws], [leaf(t) for t in p.zs]
    db0, db1 = [leaf(t) for t in p.b0s], [leaf(t) for t in p.b1s]
    d_weights = leaf(p.weights.to(case.dtype))
    inputs = [a + b for a, b in zip(dx, dz, strict=True)] if full else dx
    ys = dense_moe(inputs, p.idxs, dw, d_weights)
    dense_loss = 0
    for r in range(world_size):
        yr = ys[r] + db0[r] + db1[r] if full else ys[r]
        dense_loss = dense_loss + (yr * p.gs[r]).sum()
        if full:
            cw_r = torch.where(p.idxs[r] >= 0, dw[r] * dw[r], torch.zeros(()))
            dense_loss = dense_loss + (cw_r * p.gws[r]).sum()
            if r == rank:
                expected_cw = cw_r.detach()
        if r == rank:
            expected_y = yr.detach()
    dense_loss.backward()

    close(y, expected_y, f"y ({tag})")
    close(x.grad, dx[rank].grad, f"grad x ({tag})")
    close(w.grad, dw[rank].grad, f"grad topk_weights ({tag})")
    close(w_local.grad, local_experts(d_weights.grad, rank, world_size), f"grad experts ({tag})")
    if full:
        close(cw, expected_cw, f"combined_topk_weights ({tag})")
        close(z.grad, dz[rank].grad, f"grad cached_dispatch input ({tag})")
        close(b0.grad, db0[rank].grad, f"grad bias_0 ({tag})")
        close(b1.grad, db1[rank].grad, f"grad bias_1 ({tag})")


def check_unused_dispatch_outputs(p: Problem, rank: int, group_name: str) -> None:
    """Only recv_topk_weights is used: dispatch's backward must still send zeros for recv_x
    (every rank runs the exchange) and the weight gradient must come back."""
    case = p.case
    x, w = leaf(p.xs[rank]), leaf(p.ws[rank])
    _, _, in_rank = ops.get_dispatch_layout(p.idxs[rank], case.num_experts, p.world_size)
    out = ops.dispatch(x, None, p.idxs[rank], w, in_rank, case.num_experts, 1, 0, group_name)
    out[3].sum().backward()
    close(x.grad, torch.zeros_like(x), "grad x without a recv_x gradient")
    close(w.grad, (p.idxs[rank] >= 0).to(torch.float32), "grad topk_weights of sum(recv_topk_weights)")


# ----- low latency ------------------------------------------------------------------------------


def check_low_latency(p: Problem, rank: int, group_name: str, num_max: int) -> None:
    """BF16 low_latency_dispatch -> experts -> low_latency_combine vs the float64 dense MoE."""
    case, world_size = p.case, p.world_size
    xs = [t.to(torch.bfloat16) for t in p.xs]
    weights32 = p.weights.to(torch.float32)
    x, w = leaf(xs[rank]), leaf(p.ws[rank])
    w_local = leaf(local_experts(weights32, rank, world_size))
    y = low_latency_moe(x, p.idxs[rank], w, w_local, num_max, case.num_experts, group_name)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    (y.float() * p.gs[rank].float()).sum().backward()

    dx = [leaf(t.double()) for t in xs]
    dw = [leaf(t.double()) for t in p.ws]
    d_weights = leaf(p.weights)
    ys = dense_moe(dx, p.idxs, dw, d_weights)
    sum((yr * g.double()).sum() for yr, g in zip(ys, p.gs, strict=True)).backward()

    tag = f"low latency {case}"
    close(y.double(), ys[rank].detach(), f"y ({tag})", **BF16_TOL)
    close(x.grad.double(), dx[rank].grad, f"grad x ({tag})", **BF16_TOL)
    close(w.grad.double(), dw[rank].grad, f"grad topk_weights ({tag})", **BF16_TOL)
    expected = local_experts(d_weights.grad, rank, world_size)
    close(w_local.grad.double(), expected, f"grad experts ({tag})", **BF16_TOL)


# ----- the launch -------------------------------------------------------------------------------


def autograd_worker(rank, world_size, group_name):
    done = []
    for case in CASES:
        p = Problem(case, world_size)
        for num_worst_tokens in (0, p.worst_tokens()):
            for full in (False, True):
                check_moe(p, rank, group_name, num_worst_tokens, full)
                done.append(f"moe worst={num_worst_tokens > 0} full={full} seed={case.seed}")
        check_unused_dispatch_outputs(p, rank, group_name)
        done.append(f"unused outputs seed={case.seed}")
        if case.routing == "random":
            ll_case = dataclasses.replace(case, dtype=torch.bfloat16)
            ll = Problem(ll_case, world_size)
            num_max = max(ll_case.tokens_of(r) for r in range(world_size)) + 1
            check_low_latency(ll, rank, group_name, num_max)
            done.append(f"low latency seed={case.seed}")
    return done


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_gradients_match_dense_reference(world_size):
    results = parallel_launch(world_size, autograd_worker, timeout=180)
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 4 * len(CASES) + len(CASES) + 2


# ----- regression: a rank that receives no rows (0-row outputs must be fresh, aligned tensors) ---


def zero_rows_inputs(dtype, num_topk, world_size):
    """Two tokens routed nowhere: the rank receives no rows (and gets none back in combine)."""
    topk_idx = torch.full((2, num_topk), -1, dtype=torch.int64)
    _, _, in_rank = ops.get_dispatch_layout(topk_idx, 2, world_size)
    x = torch.zeros(2, 16, dtype=dtype)
    return (x, None, topk_idx, torch.zeros(2, num_topk), in_rank, 2, 1, 0)


def unaligned_zero_rows_worker(rank, world_size, group_name):
    """float64 x, K = 2: the dispatch wire row is 16 * 8 + 2 * 8 + 2 * 4 + 4 = 156 bytes, not a
    multiple of 8, so a view of the 0-row slice as float64 / int64 would fail."""
    args = zero_rows_inputs(torch.float64, 2, world_size)
    out = ops.dispatch(*args, group_name)
    ops.combine(out[0], out[3], None, None, args[4], out[5], out[6], group_name)
    return tuple(out[0].shape)


def aliasing_zero_rows_worker(rank, world_size, group_name):
    """float32 x, K = 3 (aligned): 0-row outputs that were views of one receive buffer would
    alias (opcheck: "Outputs 0 and 6 alias unexpectedly")."""
    args = zero_rows_inputs(torch.float32, 3, world_size)
    torch.library.opcheck(ops.dispatch.default, (*args, group_name), test_utils=("test_schema",))
    return True


def test_zero_rows_with_unaligned_wire_rows():
    assert parallel_launch(1, unaligned_zero_rows_worker, timeout=60) == [(0, 16)]


def test_zero_rows_outputs_do_not_alias():
    assert parallel_launch(1, aliasing_zero_rows_worker, timeout=60) == [True]


def test_fast_path_covers_exactly_the_differentiable_ops():
    """csrc/autograd_fast_path.cpp registers a kernel on AutogradCPU/AutogradCUDA for each op with
    a Python formula, so calls that need no gradient skip the Python autograd kernel; an op it
    missed would still work, only slower, so the lists are compared here."""
    from ep_ops.autograd import DIFFERENTIABLE_OPS

    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    names = {
        schema.name.split("::")[1]
        for schema in torch._C._jit_get_all_schemas()
        if schema.name.startswith("ep_ops::")
    }
    for name in sorted(names):
        for key in ("AutogradCPU", "AutogradCUDA"):
            assert has_kernel(f"ep_ops::{name}", key) == (name in DIFFERENTIABLE_OPS), (name, key)
    assert set(DIFFERENTIABLE_OPS) <= names


def _python_autograd_kernel_calls(rank, world_size, group_name):
    """How often torch's Python autograd kernel ran for a cached_dispatch without gradients, and
    for one with them: it asks torch._C._any_requires_grad first on every call it gets."""
    import torch._library.autograd as python_autograd

    import ep_ops  # noqa: F401  (loads the ops)

    ops = torch.ops.ep_ops
    x, idx = torch.randn(4, 8), torch.tensor([[0], [1], [0], [1]])
    _, _, mask = ops.get_dispatch_layout(idx, 2, 1)
    out = ops.dispatch(x, None, idx, None, mask, 2, 1, 0, group_name)
    calls = []
    real = python_autograd._C._any_requires_grad

    def counting(*args):
        calls.append(1)
        return real(*args)

    python_autograd._C._any_requires_grad = counting
    try:
        ops.cached_dispatch(x, None, mask, out[5], out[6], group_name)
        without_grad = len(calls)
        ops.cached_dispatch(x.requires_grad_(), None, mask, out[5], out[6], group_name)[0].sum().backward()
        with_grad = len(calls) - without_grad
    finally:
        python_autograd._C._any_requires_grad = real
    return without_grad, with_grad, x.grad is not None


def test_no_grad_call_skips_the_python_autograd_kernel():
    without_grad, with_grad, got_grad = parallel_launch(1, _python_autograd_kernel_calls, timeout=60)[0]
    assert without_grad == 0, "a call without gradients went through the Python autograd kernel"
    assert with_grad > 0 and got_grad, "a call with gradients must use the Python formula"
