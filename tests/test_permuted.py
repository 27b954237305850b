"""The fused-permute ops (``dispatch_permuted`` / ``combine_permuted``) on 1 to 3 gloo ranks.

- bitwise equal to the reference (``reference_dispatch`` + ``ep_ops.permute``, and
  ``unpermute`` + ``reference_combine``) and to the unfused real ops (``dispatch`` then
  ``permute``, ``unpermute`` then ``combine``), each call run twice (determinism): exact and
  static P (``num_out``, with pairs dropped), padding, worst-token N, FP8 scales, zero tokens,
  top-k -1 holes, tokens routed nowhere, float16/32/64;
- ``torch.library.opcheck`` on both ops;
- ``torch.compile(fullgraph=True)`` of dispatch_permuted -> expert -> combine_permuted with
  gradients, against eager and against the unfused ops' gradients;
- bad input: a clear error naming the argument, on every rank, and the group still usable.

The GPU (NVLink) path is tested in tests/gpu/test_permuted_cuda.py with the same workers.
"""

import pytest
import torch
from cases import Case, all_inputs, assert_same, expect_error, for_world, inputs_of
from torch.testing import assert_close

from ep_ops.launch import parallel_launch
from ep_ops.permute import PermuteMap, make_permute_map, permute, permute_probs, unpermute, unpermute_probs
from ep_ops.reference import reference_combine_permuted, reference_dispatch_permuted

ops = torch.ops.ep_ops

# (case, pad_multiple, num_out); a small num_out drops pairs, a large one pads the tail.
PERMUTED_CASES = [
    (Case(), 1, 0),
    (Case(), 4, 0),
    (Case(num_worst_tokens=64), 8, 0),
    (Case(num_worst_tokens=64), 4, 7),  # drops
    (Case(num_worst_tokens=64), 1, 200),  # static P past every group
    (Case(fp8=True), 2, 40),
    (Case(fp8=True, with_weights=False, num_worst_tokens=64), 1, 0),
    (Case(with_weights=False), 3, 0),
    (Case(routing="nowhere"), 4, 0),  # P = 0
    (Case(routing="nowhere", num_worst_tokens=64), 4, 16),  # all padding
    (Case(routing="skewed", num_topk=1, dtype=torch.float32), 2, 0),
    (Case(num_tokens=3), 4, 16),  # ranks with 0 tokens
    (Case(num_tokens=0, num_worst_tokens=4), 1, 0),
    (Case(dtype=torch.float64, hidden=8), 1, 5),
    (Case(dtype=torch.float16, hidden=24, num_experts=6), 2, 0),
]


def _column(inputs, key):
    values = [i[key] for i in inputs]
    return None if values[0] is None else values


def _run_twice(op, *args):
    first, second = op(*args), op(*args)
    assert_same(second, first, "second run of the same call (determinism)")
    return first


def _expert_outputs(permuted, dtype, seed):
    """Deterministic [P_j, H] expert outputs and [P_j] probs per rank (every rank builds all)."""
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(p[0].shape, generator=gen).to(dtype) for p in permuted]
    probs = [torch.rand(p[0].size(0), generator=gen) for p in permuted]
    return hs, probs


def permuted_worker(rank, world_size, group_name, cases, device="cpu"):
    for case, pad_multiple, num_out in cases:
        case = for_world(case, world_size)
        inputs = all_inputs(case, world_size)
        me = {k: None if v is None else v.to(device) for k, v in inputs[rank].items()}
        what = f"rank {rank} of {world_size}, {case}, pad_multiple={pad_multiple}, num_out={num_out}"
        flags = (case.num_experts, case.num_worst_tokens, pad_multiple, num_out, group_name)
        routing = (me["topk_idx"], me["topk_weights"], me["is_token_in_rank"])

        expected = reference_dispatch_permuted(
            _column(inputs, "x"),
            _column(inputs, "x_scales"),
            _column(inputs, "topk_idx"),
            _column(inputs, "topk_weights"),
            _column(inputs, "is_token_in_rank"),
            case.num_experts,
            case.num_worst_tokens,
            pad_multiple,
            num_out,
        )
        out = _run_twice(ops.dispatch_permuted, me["x"], me["x_scales"], *routing, *flags)
        assert_same(out, expected[rank], f"dispatch_permuted {what}")

        # The unfused real ops give the same layout: dispatch, then ep_ops.permute.
        recv = ops.dispatch(
            me["x"], me["x_scales"], *routing, case.num_experts, 1, case.num_worst_tokens, group_name
        )
        pmap = make_permute_map(
            recv[2], case.num_experts // world_size, pad_multiple=pad_multiple, num_out=num_out or None
        )
        assert_same(out[0], permute(recv[0], pmap, case.num_topk), f"dispatch + permute {what}")
        if me["topk_weights"] is not None:
            assert_same(out[2], permute_probs(recv[3], pmap), f"dispatch + permute_probs {what}")
        assert_same(out[4], pmap.pair_slot, f"pair_slot {what}")

        dtype = torch.bfloat16 if case.fp8 else case.dtype
        hs, probs = _expert_outputs(expected, dtype, seed=case.seed + 17)
        handles = [(inputs[r]["is_token_in_rank"], expected[r][5], expected[r][6]) for r in range(world_size)]
        pair_slots = [expected[r][4] for r in range(world_size)]
        handle = (me["is_token_in_rank"], out[5], out[6], group_name)
        for with_probs in (False, True):
            my_probs = probs[rank].to(device) if with_probs else None
            combined = _run_twice(ops.combine_permuted, hs[rank].to(device), my_probs, out[4], *handle)
            expected_combined = reference_combine_permuted(
                hs, probs if with_probs else None, pair_slots, handles
            )
            assert_same(combined, expected_combined[rank], f"combine_permuted probs={with_probs} {what}")
            # The unfused real ops: unpermute, then combine.
            rows_map = PermuteMap(out[4], None, None)
            rows = unpermute(hs[rank].to(device), rows_map)
            weights = unpermute_probs(my_probs, rows_map) if with_probs else None
            assert_same(
                combined, ops.combine(rows, weights, None, None, *handle), f"unpermute + combine {what}"
            )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_permuted_ops_match_reference(world_size):
    parallel_launch(world_size, permuted_worker, PERMUTED_CASES, timeout=240)


def test_reference_hand_worked():
    """One rank, experts 0 and 1: group 0 = rows 0, 2; group 1 = rows 0, 1 (+ padding)."""
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    idx = torch.tensor([[0, 1], [1, -1], [0, -1]])
    w = torch.tensor([[0.5, 0.25], [0.75, 0.0], [1.0, 0.0]])
    in_rank = torch.ones((3, 1), dtype=torch.bool)
    (out,) = reference_dispatch_permuted([x], None, [idx], [w], [in_rank], 2, 0, 3, 0)
    px, _, probs, tokens_per_expert, pair_slot, _, _ = out
    assert pair_slot.tolist() == [[0, 3], [4, -1], [1, -1]]
    assert tokens_per_expert.tolist() == [3, 3]
    assert px[:, 0].tolist() == [1.0, 3.0, 0.0, 1.0, 2.0, 0.0]
    assert probs.tolist() == [0.5, 1.0, 0.0, 0.25, 0.75, 0.0]
    (dropped,) = reference_dispatch_permuted([x], None, [idx], [w], [in_rank], 2, 0, 3, 4)
    assert dropped[4].tolist() == [[0, 3], [-1, -1], [1, -1]]  # slot 4 is past num_out
    h = torch.arange(4.0).unsqueeze(1).expand(4, 2)
    handle = (in_rank, dropped[5], dropped[6])
    ((combined, combined_probs),) = reference_combine_permuted([h], [torch.ones(4)], [dropped[4]], [handle])
    assert combined[:, 0].tolist() == [0.0 + 3.0, 0.0, 1.0]
    assert combined_probs.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]


# ----- opcheck ---------------------------------------------------------------------------------

ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_samples(world_size, rank, group_name, device="cpu"):
    samples = []
    for case, pad_multiple, num_out in (
        (Case(dtype=torch.float32, hidden=16, num_experts=6), 2, 0),
        (Case(dtype=torch.float32, hidden=16, num_experts=6, num_worst_tokens=40), 4, 24),
        (Case(fp8=True, hidden=128, num_experts=6), 1, 32),
    ):
        case = for_world(case, world_size)
        me = {k: None if v is None else v.to(device) for k, v in inputs_of(case, rank, world_size).items()}
        grad = not case.fp8
        x = me["x"].clone().requires_grad_(grad)
        w = me["topk_weights"].clone().requires_grad_(grad)
        args = (
            x,
            me["x_scales"],
            me["topk_idx"],
            w,
            me["is_token_in_rank"],
            case.num_experts,
            case.num_worst_tokens,
            pad_multiple,
            num_out,
            group_name,
        )
        samples.append((f"dispatch_permuted {case}", ops.dispatch_permuted.default, args))
        if case.fp8:
            continue
        out = ops.dispatch_permuted(*args)
        h = out[0].detach().clone().requires_grad_()
        probs = out[2].detach().clone().requires_grad_()
        handle = (out[4], me["is_token_in_rank"], out[5], out[6], group_name)
        samples.append((f"combine_permuted {case}", ops.combine_permuted.default, (h, probs, *handle)))
        samples.append(
            (f"combine_permuted no probs {case}", ops.combine_permuted.default, (h, None, *handle))
        )
    return samples


def opcheck_worker(rank, world_size, group_name, device="cpu"):
    for name, op, args in opcheck_samples(world_size, rank, group_name, device):
        has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
        try:  # CPU torch has no float8 multiply, which opcheck's schema test needs
            torch.library.opcheck(op, args, test_utils=ALL_TESTS[1:] if has_fp8 else ALL_TESTS)
        except Exception as error:
            raise AssertionError(f"opcheck failed for {name} on rank {rank}: {error}") from error


def test_opcheck_permuted():
    parallel_launch(2, opcheck_worker, timeout=300)


# ----- compile with gradients ------------------------------------------------------------------

NUM_EXPERTS, HIDDEN, TOPK = 4, 16, 3


def row_scale(scale, tokens_per_expert, num_rows):
    """[P, 1]: the scale of each permuted row's expert (rows past the groups, dropped-pair
    padding under a static P, take the last expert's; they are zero rows)."""
    bounds = tokens_per_expert.cumsum(0)
    expert = torch.searchsorted(bounds, torch.arange(num_rows), right=True).clamp(max=scale.size(0) - 1)
    return scale[expert].unsqueeze(1)


def permuted_moe(x, topk_weights, topk_idx, is_token_in_rank, scale, flags):
    """dispatch_permuted -> a per-expert scale, weighted -> combine_permuted."""
    px, _, pp, tokens_per_expert, pair_slot, prefix, src = ops.dispatch_permuted(
        x, None, topk_idx, topk_weights, is_token_in_rank, *flags
    )
    h = px * row_scale(scale, tokens_per_expert, px.size(0)) * pp.unsqueeze(1)
    y, _ = ops.combine_permuted(h, None, pair_slot, is_token_in_rank, prefix, src, flags[-1])
    return y


def unfused_moe(x, topk_weights, topk_idx, is_token_in_rank, scale, flags):
    """The same with dispatch + ep_ops.permute and unpermute + combine."""
    num_experts, num_worst_tokens, pad_multiple, num_out, group_name = flags
    recv_x, _, local, recv_w, _, prefix, src = ops.dispatch(
        x, None, topk_idx, topk_weights, is_token_in_rank, num_experts, 1, num_worst_tokens, group_name
    )
    pmap = make_permute_map(local, scale.size(0), pad_multiple=pad_multiple, num_out=num_out or None)
    px, pp = permute(recv_x, pmap, local.size(1)), permute_probs(recv_w, pmap)
    h = px * row_scale(scale, pmap.tokens_per_expert, px.size(0)) * pp.unsqueeze(1)
    y, _ = ops.combine(unpermute(h, pmap), None, None, None, is_token_in_rank, prefix, src, group_name)
    return y


def compile_worker(rank, world_size, group_name):
    torch.manual_seed(0)
    scale = torch.arange(1.0, 1.0 + NUM_EXPERTS // world_size)
    results = []
    for num_tokens, worst, pad, num_out in ((8, 0, 2, 0), (11, 32, 4, 40)):
        case = Case(
            num_tokens=num_tokens, hidden=HIDDEN, num_topk=TOPK, num_experts=NUM_EXPERTS, dtype=torch.float32
        )
        me = inputs_of(case, rank, world_size)
        flags = (NUM_EXPERTS, worst, pad, num_out, group_name)
        grad_out = torch.randn(me["x"].shape)

        def run(fn, me=me, flags=flags, grad_out=grad_out):
            x = me["x"].clone().requires_grad_()
            w = me["topk_weights"].clone().requires_grad_()
            y = fn(x, w, me["topk_idx"], me["is_token_in_rank"], scale, flags)
            (y * grad_out).sum().backward()
            return y.detach(), x.grad, w.grad

        eager = run(permuted_moe)
        what = f"rank {rank}, T={num_tokens}, num_worst_tokens={worst}, num_out={num_out}"
        for got, want, name in zip(eager, run(unfused_moe), ("y", "grad x", "grad weights"), strict=True):
            assert_close(
                got, want, msg=lambda m, name=name, what=what: f"{what}: eager vs unfused {name}: {m}"
            )
        compiled = torch.compile(permuted_moe, backend="inductor", fullgraph=True)
        for got, want, name in zip(run(compiled), eager, ("y", "grad x", "grad weights"), strict=True):
            assert_close(
                got, want, msg=lambda m, name=name, what=what: f"{what}: compiled vs eager {name}: {m}"
            )
        results.append(what)
    return results


def test_compile_permuted_with_gradients():
    results = parallel_launch(2, compile_worker, timeout=300)
    assert all(len(r) == 2 for r in results)


# ----- bad input -------------------------------------------------------------------------------


def bad_input_worker(rank, world_size, group_name):
    case = Case(dtype=torch.float32, hidden=16, num_experts=4)
    me = inputs_of(case, rank, world_size)
    x, idx, w, mask = me["x"], me["topk_idx"], me["topk_weights"], me["is_token_in_rank"]

    def dispatch(x=x, idx=idx, w=w, pad=1, num_out=0, worst=0):
        return ops.dispatch_permuted(x, None, idx, w, mask, case.num_experts, worst, pad, num_out, group_name)

    def good():
        out = dispatch()
        assert_same(dispatch(), out, "a good dispatch_permuted after an error")
        return out

    expect_error(ValueError, ["pad_multiple", ">= 1", "0"], dispatch, pad=0)
    good()
    expect_error(ValueError, ["num_out", ">= 0"], dispatch, num_out=-1)
    good()
    twice = idx.clone()
    twice[:, 1] = twice[:, 0]
    expect_error(ValueError, ["topk_idx", "twice"], dispatch, idx=twice)
    good()
    expect_error(ValueError, ["topk_idx", "at least one column"], dispatch, idx=idx[:, :0], w=w[:, :0])
    expect_error(TypeError, ["topk_weights", "Float"], dispatch, w=w.double())
    expect_error(ValueError, ["num_worst_tokens (1)"], dispatch, worst=1)
    out = good()

    handle = (out[4], mask, out[5], out[6], group_name)
    h = torch.ones(out[0].shape)
    expect_error(TypeError, ["h must be a floating dtype"], ops.combine_permuted, h.int(), None, *handle)
    expect_error(ValueError, ["probs must be 1-D"], ops.combine_permuted, h, out[2][:-1], *handle)
    expect_error(TypeError, ["probs must be float32"], ops.combine_permuted, h, out[2].double(), *handle)
    expect_error(ValueError, ["pair_slot must have"], ops.combine_permuted, h, None, out[4][1:], *handle[1:])
    # 12 and 13 tokens with 3 of 4 experts: every rank's last permuted row holds a pair.
    expect_error(ValueError, ["pair_slot names permuted row"], ops.combine_permuted, h[:-1], None, *handle)
    combined, _ = ops.combine_permuted(h, None, *handle)
    return combined.shape


def test_bad_input_permuted():
    shapes = parallel_launch(2, bad_input_worker, timeout=120)
    assert shapes[0][1] == 16
