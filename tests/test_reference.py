"""Tests of the pure-PyTorch reference (ep_ops/reference.py) itself.

The module is loaded by file path so that these tests never need the compiled ep_ops._C.
"""

import importlib.util
import pathlib

import pytest
import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "ep_ops" / "reference.py"
_SPEC = importlib.util.spec_from_file_location("ep_ops_reference_under_test", _PATH)
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)


def i64(rows):
    return torch.tensor(rows, dtype=torch.int64)


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def f32(rows):
    return torch.tensor(rows, dtype=torch.float32)


def rows_of(values, hidden=4, dtype=torch.float32):
    """[len(values), hidden] with row t filled with values[t]."""
    return torch.tensor(values, dtype=dtype).unsqueeze(1).repeat(1, hidden)


def layouts(topk_idxs, num_experts):
    return [ref.reference_layout(t, num_experts, len(topk_idxs)) for t in topk_idxs]


def random_routing(num_ranks, num_experts, num_topk, tokens, seed, allow_none=True, allow_dup=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for num_tokens in tokens:
        if allow_dup:
            idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=gen)
        else:
            idx = torch.stack(
                [torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(num_tokens)]
            ).reshape(num_tokens, num_topk)
        if allow_none:
            idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
        out.append(idx.to(torch.int64))
    return out


# ---------------------------------------------------------------------------------------------
# hand-made 2-rank example: E = 4 (2 per rank), K = 2
#   rank 0: t0 [0, 3] -> ranks 0, 1; t1 [1, -1] -> rank 0; t2 [2, 2] -> rank 1 (expert twice)
#   rank 1: t0 [3, 1] -> ranks 1, 0; t1 [-1, -1] -> nowhere
# ---------------------------------------------------------------------------------------------

TWO_TOPK = [i64([[0, 3], [1, -1], [2, 2]]), i64([[3, 1], [-1, -1]])]
TWO_WEIGHTS = [f32([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), f32([[0.7, 0.8], [0.9, 1.0]])]
TWO_X = [rows_of([1, 2, 3]), rows_of([11, 12])]


def two_rank_dispatch(**kwargs):
    masks = [layout[2] for layout in layouts(TWO_TOPK, 4)]
    return ref.reference_dispatch(TWO_X, None, TWO_TOPK, TWO_WEIGHTS, masks, 4, **kwargs), masks


def test_layout_two_ranks():
    (r0, r1) = layouts(TWO_TOPK, 4)
    assert torch.equal(r0[0], i32([2, 2]))
    assert torch.equal(r0[1], i32([1, 1, 2, 1]))
    assert torch.equal(r0[2], torch.tensor([[True, True], [True, False], [False, True]]))
    assert torch.equal(r1[0], i32([1, 1]))
    assert torch.equal(r1[1], i32([0, 1, 0, 1]))
    assert torch.equal(r1[2], torch.tensor([[True, True], [False, False]]))
    assert r0[0].dtype == r0[1].dtype == torch.int32


def test_dispatch_two_ranks_by_hand():
    (d0, d1), _ = two_rank_dispatch()
    rpm = i32([[2, 2], [3, 3]])
    for d in (d0, d1):
        assert torch.equal(d[5], rpm)
        assert d[1].numel() == 0 and d[1].dtype == torch.float32
    # rank 0 receives (r0, t0), (r0, t1), (r1, t0)
    assert torch.equal(d0[0], rows_of([1, 2, 11]))
    assert torch.equal(d0[2], i64([[0, -1], [1, -1], [-1, 1]]))
    assert torch.equal(d0[3], f32([[0.1, 0.0], [0.3, 0.0], [0.0, 0.8]]))
    assert torch.equal(d0[4], i32([1, 2]))
    assert torch.equal(d0[6], i32([0, 1, 0]))
    # rank 1 receives (r0, t0), (r0, t2), (r1, t0); t2 holds local expert 0 twice: counted once
    assert torch.equal(d1[0], rows_of([1, 3, 11]))
    assert torch.equal(d1[2], i64([[-1, 1], [0, 0], [1, -1]]))
    assert torch.equal(d1[3], f32([[0.0, 0.2], [0.5, 0.6], [0.7, 0.0]]))
    assert torch.equal(d1[4], i32([1, 2]))
    assert torch.equal(d1[6], i32([0, 2, 0]))


def test_dispatch_alignment():
    (d0, d1), _ = two_rank_dispatch(expert_alignment=4)
    assert torch.equal(d0[4], i32([4, 4]))
    assert torch.equal(d1[4], i32([4, 4]))
    (d0, _), _ = two_rank_dispatch(expert_alignment=2)
    assert torch.equal(d0[4], i32([2, 2]))
    with pytest.raises(ValueError):
        two_rank_dispatch(expert_alignment=0)


def test_dispatch_worst_token_padding():
    exact, masks = two_rank_dispatch()
    worst, _ = two_rank_dispatch(num_worst_tokens=5)
    for e, w in zip(exact, worst, strict=True):
        n = e[0].size(0)
        assert w[0].shape == (5, 4) and w[2].shape == (5, 2) and w[3].shape == (5, 2) and w[6].shape == (5,)
        assert torch.equal(w[0][:n], e[0]) and torch.all(w[0][n:] == 0)
        assert torch.equal(w[2][:n], e[2]) and torch.all(w[2][n:] == -1)
        assert torch.equal(w[3][:n], e[3]) and torch.all(w[3][n:] == 0)
        assert torch.equal(w[6][:n], e[6]) and torch.all(w[6][n:] == -1)
        assert torch.equal(w[4], e[4]) and torch.equal(w[5], e[5])
    with pytest.raises(ValueError):
        two_rank_dispatch(num_worst_tokens=2)  # rank 0 receives 3 rows


def test_worst_token_cached_dispatch_and_combine_ignore_padding():
    worst, masks = two_rank_dispatch(num_worst_tokens=6)
    handles = [(m, d[5], d[6]) for m, d in zip(masks, worst, strict=True)]
    cached = ref.reference_cached_dispatch(TWO_X, None, handles)
    for c, d in zip(cached, worst, strict=True):
        assert torch.equal(c[0], d[0]) and c[1].numel() == 0
    # garbage in the padding rows must not reach the result
    xs = []
    for j, d in enumerate(worst):
        x = d[0].clone()
        x[int(d[5][-1, j]) :] = 1000.0
        xs.append(x)
    combined = ref.reference_combine(xs, None, None, None, handles)
    assert torch.equal(combined[0][0], rows_of([2, 2, 3]))
    assert torch.equal(combined[1][0], rows_of([22, 0]))


def test_dispatch_three_ranks_by_hand():
    # E = 3 (one per rank), K = 2
    topk = [i64([[2, -1], [0, 1]]), i64([[1, 2]]), i64([[-1, -1], [0, 0], [2, 0]])]
    xs = [rows_of([1, 2]), rows_of([11]), rows_of([21, 22, 23])]
    masks = [layout[2] for layout in layouts(topk, 3)]
    out = ref.reference_dispatch(xs, None, topk, None, masks, 3)
    rpm = i32([[1, 1, 1], [1, 2, 2], [3, 2, 3]])
    expected = [
        # (recv_x rows, recv_topk_idx, counts, recv_src_idx)
        ([2, 22, 23], [[0, -1], [0, 0], [-1, 0]], [3], [1, 1, 2]),
        ([2, 11], [[-1, 0], [0, -1]], [2], [1, 0]),
        ([1, 11, 23], [[0, -1], [-1, 0], [0, -1]], [3], [0, 0, 2]),
    ]
    for d, (rows, local, counts, src) in zip(out, expected, strict=True):
        assert torch.equal(d[0], rows_of(rows))
        assert torch.equal(d[2], i64(local))
        assert torch.equal(d[4], i32(counts))
        assert torch.equal(d[5], rpm)
        assert torch.equal(d[6], i32(src))
        assert d[3].numel() == 0 and d[3].dtype == torch.float32


def test_dispatch_without_topk_gives_empty_optionals():
    masks = [layout[2] for layout in layouts(TWO_TOPK, 4)]
    out = ref.reference_dispatch(TWO_X, None, None, None, masks, 4)
    for d in out:
        assert d[2].dtype == torch.int64 and d[2].numel() == 0
        assert d[3].dtype == torch.float32 and d[3].numel() == 0
        assert d[4].dtype == torch.int32 and d[4].numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_dispatch_combine_round_trip(num_ranks, dtype):
    num_experts, hidden = 4 * num_ranks, 16
    topk = random_routing(num_ranks, num_experts, 3, [5 + r for r in range(num_ranks)], seed=num_ranks)
    gen = torch.Generator().manual_seed(7)
    # small integers: every sum is exact in each dtype
    xs = [torch.randint(-8, 8, (t.size(0), hidden), generator=gen).to(dtype) for t in topk]
    weights = [torch.rand(t.shape, generator=gen) for t in topk]
    masks = [layout[2] for layout in layouts(topk, num_experts)]
    out = ref.reference_dispatch(xs, None, topk, weights, masks, num_experts)
    handles = [(m, d[5], d[6]) for m, d in zip(masks, out, strict=True)]
    recv_w = [d[3] for d in out]
    combined = ref.reference_combine([d[0] for d in out], recv_w, None, None, handles)
    for x, m, w, t, (cx, cw) in zip(xs, masks, weights, topk, combined, strict=True):
        copies = m.sum(dim=1, keepdim=True).to(dtype)
        assert cx.dtype == dtype
        assert torch.equal(cx, x * copies)
        # each weight lives on exactly one rank: the reduced weights are the weights (0 for -1)
        assert torch.equal(cw, torch.where(t >= 0, w, 0.0))


def test_combine_bias_and_order():
    masks = [layout[2] for layout in layouts(TWO_TOPK, 4)]
    out = ref.reference_dispatch(TWO_X, None, TWO_TOPK, None, masks, 4)
    handles = [(m, d[5], d[6]) for m, d in zip(masks, out, strict=True)]
    # bfloat16 with values whose sum depends on the order: 256 + 1 + 1 in float32 then rounded
    xs = [torch.full_like(d[0], 1.0, dtype=torch.bfloat16) for d in out]
    b0 = [torch.full((3, 4), 256.0, dtype=torch.bfloat16), torch.full((2, 4), 256.0, dtype=torch.bfloat16)]
    b1 = [torch.full((3, 4), 0.5, dtype=torch.bfloat16), torch.full((2, 4), 0.5, dtype=torch.bfloat16)]
    combined = ref.reference_combine(xs, None, b0, b1, handles)
    # r0 t0 went to 2 ranks: (0 + 1 + 1 + 256 + 0.5) in float32 = 258.5 -> bf16 258
    assert combined[0][0][0, 0].item() == 258.0
    # r1 t1 went nowhere: biases only
    assert torch.equal(combined[1][0][1], torch.full((4,), 256.5).to(torch.bfloat16))
    assert combined[0][1].numel() == 0 and combined[0][1].dtype == torch.float32


def test_fp8_dispatch_scales_travel_with_rows():
    gen = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(3, 256, generator=gen).to(torch.bfloat16),
        torch.randn(2, 256, generator=gen).to(torch.bfloat16),
    ]
    casts = [ref.per_token_cast_to_fp8(x) for x in xs]
    masks = [layout[2] for layout in layouts(TWO_TOPK, 4)]
    out = ref.reference_dispatch(
        [q for q, _ in casts], [s for _, s in casts], TWO_TOPK, None, masks, 4, num_worst_tokens=4
    )
    for j, d in enumerate(out):
        assert d[0].dtype == torch.float8_e4m3fn and d[1].shape == (4, 2)
        for p in range(int(d[5][-1, j])):
            src_rank = int((d[5][:, j] <= p).sum())
            t = int(d[6][p])
            assert torch.equal(d[0][p].view(torch.uint8), casts[src_rank][0][t].view(torch.uint8))
            assert torch.equal(d[1][p], casts[src_rank][1][t])
        n = int(d[5][-1, j])
        assert torch.all(d[0][n:].view(torch.uint8) == 0) and torch.all(d[1][n:] == 0)
    handles = [(m, d[5], d[6]) for m, d in zip(masks, out, strict=True)]
    cached = ref.reference_cached_dispatch([q for q, _ in casts], [s for _, s in casts], handles)
    for c, d in zip(cached, out, strict=True):
        assert torch.equal(c[0].view(torch.uint8), d[0].view(torch.uint8)) and torch.equal(c[1], d[1])


# ---------------------------------------------------------------------------------------------
# FP8 cast / UE8M0 / LogFMT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_cast_error_small(round_scale):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 512, generator=gen) * torch.logspace(-3, 3, 16).unsqueeze(1)).to(torch.bfloat16)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (16, 4)
    back = ref.per_token_cast_back(q, s).float()
    groups = x.float().view(16, 4, 128)
    amax = groups.abs().amax(-1, keepdim=True)
    err = (back.view(16, 4, 128) - groups).abs() / amax
    assert err.max() < 2**-3  # e4m3: 3 mantissa bits
    assert (back - x.float()).norm() / x.float().norm() < 0.05
    if round_scale:
        mantissa = s.view(torch.int32) & 0x7FFFFF
        assert torch.all(mantissa == 0)
        assert torch.all(s >= amax.squeeze(-1) / 448.0)
        assert torch.all(s < 2 * amax.squeeze(-1) / 448.0)


def test_fp8_cast_zero_row_uses_amax_floor():
    q, s = ref.per_token_cast_to_fp8(torch.zeros(1, 128, dtype=torch.bfloat16))
    assert torch.equal(s, torch.tensor([[1e-4 / 448.0]], dtype=torch.float32))
    assert torch.all(q.float() == 0)


def test_ue8m0_decode_equals_float_scales():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 1024, generator=gen) * 100).to(torch.bfloat16)
    x[0, :128] = -1e4  # exponent byte >= 128 somewhere: the packed int32 may be negative
    q, s = ref.per_token_cast_to_fp8(x, round_scale=True)
    packed = ref.pack_ue8m0(s)
    assert packed.dtype == torch.int32 and packed.shape == (8, 2)
    assert torch.equal(ref.unpack_ue8m0(packed), s)
    assert torch.equal(ref.per_token_cast_back(q, packed), ref.per_token_cast_back(q, s))
    # byte layout: group 4j in the lowest byte
    expected_low = (s[:, 0].view(torch.int32) >> 23) & 0xFF
    assert torch.equal(packed[:, 0] & 0xFF, expected_low)


def test_logfmt_relative_error_small():
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(1024, generator=gen)
    v[:128] *= 1e-3
    v[300] = 0.0
    back = ref.logfmt_roundtrip(v)
    assert back.dtype == torch.float32 and back[300] == 0
    nz = v != 0
    rel = ((back - v).abs() / v.abs())[nz]
    assert torch.all(torch.sign(back[nz]) == torch.sign(v[nz]))
    assert rel.max() < 1e-2 * 4  # worst element: half a step of log2 range / 510
    assert (back - v).norm() / v.norm() < 1e-2
    # elementwise bound from the encoding: |log2|back| - log2|v|| <= step / 2 (+ float slack)
    codes, lmin, step = ref.logfmt_encode(v)
    bound = (step / 2).repeat_interleave(128)[nz] + 1e-5
    assert torch.all((torch.log2(back[nz].abs()) - torch.log2(v[nz].abs())).abs() <= bound)


def test_logfmt_special_groups():
    v = torch.zeros(384)
    v[128:256] = -3.0  # constant group: step 0, exact up to libm's exp2(log2(v))
    v[256] = 5.0  # single nonzero
    back = ref.logfmt_roundtrip(v)
    assert torch.all(back[:128] == 0)
    assert torch.allclose(back[128:256], v[128:256], rtol=1e-6, atol=0)
    assert abs(back[256].item() - 5.0) < 1e-5 and torch.all(back[257:] == 0)
    codes, lmin, step = ref.logfmt_encode(v)
    assert torch.all(codes[:128] == 0) and lmin[0] == 0 and step[0] == 0
    assert torch.all(codes[128:256] == (1 << 9) | 1)


# ---------------------------------------------------------------------------------------------
# low-latency
# ---------------------------------------------------------------------------------------------


def test_low_latency_dispatch_by_hand():
    # R = 2, E = 4 (2 per rank), M = 3, K = 2
    topk = [i64([[1, 2], [1, 1]]), i64([[3, -1], [0, 1], [-1, -1]])]
    xs = [
        rows_of([1, 2], hidden=8, dtype=torch.bfloat16),
        rows_of([11, 12, 13], hidden=8, dtype=torch.bfloat16),
    ]
    (r0, r1) = ref.reference_low_latency_dispatch(xs, topk, 3, 4)

    def packed(pairs):
        return torch.tensor([[(b << 32) | c for b, c in row] for row in pairs], dtype=torch.int64)

    recv_x, scales, count, src_info, layout_range, slots = r0
    assert recv_x.shape == (2, 6, 8) and recv_x.dtype == torch.bfloat16
    assert scales.numel() == 0 and scales.dtype == torch.float32
    assert torch.equal(count, i32([1, 3]))
    assert torch.equal(src_info, i32([[1, -1, -1, -1, -1, -1], [0, 1, 1, -1, -1, -1]]))
    assert torch.equal(recv_x[0, :, 0].float(), f32([12, 0, 0, 0, 0, 0]))
    assert torch.equal(recv_x[1, :, 0].float(), f32([1, 2, 12, 0, 0, 0]))
    assert torch.equal(layout_range, packed([[(0, 0), (0, 1)], [(0, 2), (2, 1)]]))
    # indexed by (source rank, source token): rank 1's token 1 (not its first token) is [1][1]
    assert torch.equal(slots, i32([[[6, -1], [7, 7], [-1, -1]], [[-1, -1], [0, 8], [-1, -1]]]))

    recv_x, scales, count, src_info, layout_range, slots = r1
    assert torch.equal(count, i32([1, 1]))
    assert torch.equal(src_info, i32([[0, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1]]))
    assert torch.equal(recv_x[:, 0, 0].float(), f32([1, 11]))
    assert torch.all(recv_x[:, 1:] == 0)
    assert torch.equal(layout_range, packed([[(0, 1), (1, 0)], [(0, 0), (0, 1)]]))
    assert torch.equal(slots, i32([[[-1, 0], [-1, -1], [-1, -1]], [[6, -1], [-1, -1], [-1, -1]]]))


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_low_latency_dispatch_fp8(use_ue8m0):
    num_ranks, num_experts, num_max, hidden = 2, 4, 4, 512
    topk = random_routing(num_ranks, num_experts, 2, [4, 3], seed=11)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(t.size(0), hidden, generator=gen).to(torch.bfloat16) for t in topk]
    out = ref.reference_low_latency_dispatch(
        xs, topk, num_max, num_experts, use_fp8=True, round_scale=True, use_ue8m0=use_ue8m0
    )
    bf16 = ref.reference_low_latency_dispatch(xs, topk, num_max, num_experts)
    slots = num_ranks * num_max
    for (q, s, count, _, _, _), b in zip(out, bf16, strict=True):
        cols = hidden // (512 if use_ue8m0 else 128)
        assert q.dtype == torch.float8_e4m3fn and q.shape == (2, slots, hidden)
        assert s.shape == (2, slots, cols) and s.stride() == (cols * slots, 1, slots)
        assert s.dtype == (torch.int32 if use_ue8m0 else torch.float32)
        for e in range(2):
            n = int(count[e])
            decoded = ref.per_token_cast_back(q[e, :n], s[e, :n])
            assert torch.allclose(decoded.float(), b[0][e, :n].float(), rtol=0.07, atol=0.05)
            assert torch.all(q[e, n:].view(torch.uint8) == 0) and torch.all(s[e, n:] == 0)
    if use_ue8m0:
        floats = ref.reference_low_latency_dispatch(
            xs, topk, num_max, num_experts, use_fp8=True, round_scale=True
        )
        for o, f in zip(out, floats, strict=True):
            assert torch.equal(ref.unpack_ue8m0(o[1]), f[1])


@pytest.mark.parametrize("use_logfmt", [False, True])
@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_low_latency_dispatch_combine_weighted_sum(num_ranks, use_logfmt):
    num_experts, num_max, hidden = 2 * num_ranks, 5, 256
    tokens = [5, 3, 4][:num_ranks]
    topk = random_routing(num_ranks, num_experts, 3, tokens, seed=num_ranks, allow_dup=True)
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16) for t in tokens]
    weights = [torch.rand(t, 3, generator=gen) for t in tokens]
    recv = ref.reference_low_latency_dispatch(xs, topk, num_max, num_experts)
    combined = ref.reference_low_latency_combine(
        [r[0] for r in recv], topk, weights, num_max, num_experts, use_logfmt=use_logfmt
    )
    for x, t, w, c in zip(xs, topk, weights, combined, strict=True):
        expected = (torch.where(t >= 0, w, 0.0).unsqueeze(-1) * x.float().unsqueeze(1)).sum(dim=1)
        assert c.dtype == torch.bfloat16 and c.shape == x.shape
        tol = 5e-2 if use_logfmt else 2e-2
        assert torch.allclose(c.float(), expected, rtol=tol, atol=tol)
        assert torch.all(c[(t < 0).all(dim=1)] == 0)


def test_low_latency_combine_exact_numerics():
    # one token, experts 0 and 1 on rank 0 and expert 2 on rank 1: partials rounded per rank
    topk = [i64([[0, 2, 1]])]
    topk.append(i64([[-1, -1, -1]]))
    xs = [torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(1, 8, dtype=torch.bfloat16)]
    weights = [f32([[1.0, 1.0, 2.0**-9]]), f32([[0.0, 0.0, 0.0]])]
    recv = ref.reference_low_latency_dispatch(xs, topk, 2, 4)
    out = ref.reference_low_latency_combine([r[0] for r in recv], topk, weights, 2, 4)
    # rank 0 partial: 1 + 2^-9 rounds to 1 in bf16; plus rank 1's 1 -> 2 (a dense sum gives 2.00195)
    assert torch.all(out[0][0].float() == 2.0)
    assert torch.all(out[1] == 0)


def test_low_latency_combine_backward_matches_autograd():
    num_ranks, num_experts, num_max, hidden = 2, 4, 4, 16
    tokens = [4, 3]
    topk = random_routing(num_ranks, num_experts, 3, tokens, seed=4, allow_dup=True)
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16) for t in tokens]
    weights = [torch.rand(t, 3, generator=gen) for t in tokens]
    grads = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16) for t in tokens]
    recv = ref.reference_low_latency_dispatch(xs, topk, num_max, num_experts)
    expert_out = [r[0] for r in recv]
    back = ref.reference_low_latency_combine_backward(grads, expert_out, topk, weights, num_max, num_experts)

    # dense float32 autograd: out[t] = sum_k w[t, k] * x_row(t, k)
    leaves = [x.float().requires_grad_() for x in expert_out]
    wleaves = [w.clone().requires_grad_() for w in weights]
    loss = 0
    for s in range(num_ranks):
        for t in range(tokens[s]):
            for k in range(3):
                g = int(topk[s][t, k])
                if g < 0:
                    continue
                j, e = g // 2, g % 2
                pos = next(
                    p
                    for p in range(num_ranks * num_max)
                    if int(recv[j][3][e, p]) == t
                    and p < int(recv[j][2][e])
                    and _source_rank(recv[j][4][e], p) == s
                )
                loss = loss + (grads[s][t].float() * wleaves[s][t, k] * leaves[j][e, pos]).sum()
    loss.backward()
    for j in range(num_ranks):
        assert back[j][0].dtype == torch.bfloat16
        assert torch.allclose(back[j][0].float(), leaves[j].grad, rtol=1e-2, atol=1e-2)
    for s in range(num_ranks):
        assert back[s][1].dtype == torch.float32
        assert torch.allclose(back[s][1], wleaves[s].grad, rtol=1e-4, atol=1e-4)
        assert torch.all(back[s][1][topk[s] < 0] == 0)


def _source_rank(layout_range_row, pos):
    for s, packed in enumerate(layout_range_row.tolist()):
        begin, count = packed >> 32, packed & 0xFFFFFFFF
        if begin <= pos < begin + count:
            return s
    return -1


def test_low_latency_rejects_too_many_tokens():
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        ref.reference_low_latency_dispatch([x], [torch.zeros(3, 1, dtype=torch.int64)], 2, 2)
