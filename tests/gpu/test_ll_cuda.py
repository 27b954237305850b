"""The low-latency NVLink kernels on GPU_RANKS GPUs of one host: bitwise equal to the CPU
reference (rows past recv_count are unspecified on NVLink, so they are masked), whole ops and
send/recv halves, two dispatches in flight, the FP8 cast's rounding edge cases, captured CUDA
graphs that replay with changing routing (two graphs sharing the buffer, replayed interleaved),
and opcheck on CUDA."""

import os

import pytest
import torch
import torch.distributed as dist
from cases import Case, all_inputs, assert_same
from gpu_ranks import GPU_RANKS, needs_gpu_ranks

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, ll_bytes_needed, release_nvl_buffer
from ep_ops.reference import reference_low_latency_combine, reference_low_latency_dispatch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

MAX_TOKENS, MAX_HIDDEN, MAX_TOPK = 160, 7168, 8

# (case, use_fp8, round_scale, use_ue8m0); expert counts are multiples of 8 (any rank count).
CASES = [
    (Case(hidden=1024, num_topk=4, num_experts=16), False, False, False),
    (Case(hidden=1024, num_topk=4, num_experts=16), True, False, False),
    (Case(hidden=1024, num_topk=4, num_experts=16), True, True, False),
    (Case(hidden=1024, num_topk=4, num_experts=16), True, True, True),
    (Case(hidden=7168, num_topk=8, num_experts=64, num_tokens=128), True, False, False),
    (Case(hidden=7168, num_topk=8, num_experts=64, num_tokens=128), False, False, False),
    (Case(hidden=256, num_topk=2, num_experts=8, routing="nowhere"), False, False, False),
    (Case(hidden=256, num_topk=3, num_experts=8, routing="skewed"), False, False, False),
    (Case(hidden=256, num_topk=3, num_experts=8, num_tokens=3), True, False, False),  # rank 1+: 0 tokens
    # More tokens than SMs (a send block takes two), a top-k that is not a multiple of 8.
    (Case(hidden=512, num_topk=5, num_experts=64, num_tokens=150), True, True, True),
    # More local experts than SMs (520 a rank on 2 ranks): a receive block takes several.
    (Case(hidden=256, num_topk=4, num_experts=1040), False, False, False),
]


def masked(out):
    """The dispatch outputs with recv_x / scales rows past recv_count zeroed (the reference's
    value there; the NVLink kernels leave them unwritten)."""
    recv_x, scales, count = out[0].clone(), out[1].clone(), out[2].cpu()
    for e, n in enumerate(count.tolist()):
        recv_x[e, n:] = 0
        if scales.numel():
            scales[e, n:] = 0
    return (recv_x, scales, *out[2:])


def dispatch_case(case, world_size):
    inputs = all_inputs(case, world_size)
    num_max = max(case.tokens_of(r) for r in range(world_size)) + 2
    return [i["x"] for i in inputs], [i["topk_idx"] for i in inputs], num_max


def ll_worker(rank, world_size, group_name):
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(
        dist.group.WORLD, ll_bytes_needed(MAX_TOKENS, MAX_HIDDEN, world_size, MAX_TOPK), low_latency=True
    )
    for case, use_fp8, round_scale, use_ue8m0 in CASES:
        xs, topk, num_max = dispatch_case(case, world_size)
        E = case.num_experts
        what = f"rank {rank}/{world_size} {case} fp8={use_fp8} round={round_scale} ue8m0={use_ue8m0}"
        expected = reference_low_latency_dispatch(xs, topk, num_max, E, use_fp8, round_scale, use_ue8m0)[rank]
        x, idx = xs[rank].cuda(), topk[rank].cuda()
        args = (x, idx, num_max, E, use_fp8, round_scale, use_ue8m0, group_name)
        for attempt in range(3):  # both slabs, and a slab reused
            out = ops.low_latency_dispatch(*args)
            assert_same(masked(out), expected, f"low_latency_dispatch #{attempt} {what}")
        # Two dispatches in flight (double-batch overlap): send, send, recv, recv.
        recv_args = (num_max, case.hidden, case.num_topk, E, use_fp8, use_ue8m0, group_name)
        first = ops.low_latency_dispatch_send(*args)
        second = ops.low_latency_dispatch_send(*args)
        assert first.data_ptr() != second.data_ptr(), "the two sends must use different slabs"
        for packed in (first, second):
            assert_same(masked(ops.low_latency_dispatch_recv(packed, *recv_args)), expected, f"halves {what}")
        if use_fp8:
            continue

        gen = torch.Generator().manual_seed(7)
        weights = [torch.rand(t.shape, generator=gen) for t in topk]
        expert_out = [
            reference_low_latency_dispatch(xs, topk, num_max, E)[r][0] * (r + 2) for r in range(world_size)
        ]
        expected_combined = reference_low_latency_combine(expert_out, topk, weights, num_max, E)[rank]
        my_out, my_w = expert_out[rank].cuda(), weights[rank].cuda()
        cargs = (my_out, idx, my_w, out[5], num_max, False, group_name)
        for attempt in range(3):
            combined = ops.low_latency_combine(*cargs)
            assert_same(combined, expected_combined, f"low_latency_combine #{attempt} {what}")
        partials = ops.low_latency_combine_send(*cargs)
        halves = ops.low_latency_combine_recv(partials, idx, case.hidden, E, num_max, False, group_name)
        assert_same(halves, expected_combined, f"low_latency_combine halves {what}")
        if case.hidden % 128 == 0:
            check_logfmt_combine(buffer, expert_out, topk, weights, num_max, E, cargs, rank, what)
    torch.cuda.synchronize()
    release_nvl_buffer(group_name, low_latency=True)
    del buffer


def check_logfmt_combine(buffer, expert_out, topk, weights, num_max, E, cargs, rank, what):
    """use_logfmt=True on the NVLink kernels (the partials are a view of the group's buffer, not
    the collective backend's tensor): within the tolerance the CPU suite allows the collective
    backend against the reference (LogFMT-10 is lossy; log2/exp2 bits are not part of the
    contract)."""
    ops = torch.ops.ep_ops
    my_out, idx, my_w, slots, _, _, group_name = cargs
    expected = reference_low_latency_combine(expert_out, topk, weights, num_max, E, True)[rank]
    largs = (my_out, idx, my_w, slots, num_max, True, group_name)
    partials = ops.low_latency_combine_send(*largs)
    start = buffer.data_ptr()
    assert start <= partials.data_ptr() < start + buffer.numel(), (
        f"LogFMT took the collective backend: {what}"
    )
    hidden = my_out.shape[-1]
    halves = ops.low_latency_combine_recv(partials, idx, hidden, E, num_max, True, group_name)
    for name, result in (("halves", halves), ("whole op", ops.low_latency_combine(*largs))):
        label = f"LogFMT {name} {what}"
        torch.testing.assert_close(
            result.cpu(), expected, rtol=2e-2, atol=1e-2, msg=lambda m, label=label: f"{label}: {m}"
        )


def test_ll_nvl_ops_match_reference():
    parallel_launch(GPU_RANKS, ll_worker, backend="nccl", device="cuda", timeout=300)


def fp8_edge_rows(rank, num_tokens=6):
    """[T, 512] bfloat16 rows whose FP8 cast meets every rounding case. Group 0 holds 448 * 2^-t,
    so its scale is 2^-t and the other values cast as they are, times 2^t: ties between e4m3
    neighbours, subnormals and their ties, the normal-subnormal boundary, values next to 448 and
    -0. Group 1 is group 0 negated, group 2 stays below the amax floor (1e-4), group 3 is random."""
    sub = 2.0**-9  # e4m3's smallest subnormal
    edges = [1.0625, 1.1875, 1.3125, 2.125, 3.75, 416.0, 424.0, 432.0, 440.0, 444.0]
    edges += (
        [2.0**-6, 1.0625 * 2.0**-6]
        + [k * sub for k in (0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 3.5, 6.5, 7.5)]
        + [-0.0]
    )
    group = torch.tensor(([448.0] + edges * 12)[:128])
    gen = torch.Generator().manual_seed(100 + rank)
    rows = []
    for t in range(num_tokens):
        tiny = (torch.rand(128, generator=gen) - 0.5) * 1e-4
        rows.append(torch.cat([group * 2.0**-t, -group * 2.0**-t, tiny, torch.randn(128, generator=gen)]))
    return torch.stack(rows).to(torch.bfloat16)


def fp8_edges_worker(rank, world_size, group_name):
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(dist.group.WORLD, ll_bytes_needed(8, 512, world_size, 4), low_latency=True)
    E, num_max = 4 * world_size, 8
    xs = [fp8_edge_rows(r) for r in range(world_size)]
    topk = [(torch.arange(6).unsqueeze(1) + torch.arange(4)) % E for _ in range(world_size)]
    for round_scale in (False, True):
        expected = reference_low_latency_dispatch(xs, topk, num_max, E, True, round_scale)[rank]
        args = (xs[rank].cuda(), topk[rank].cuda(), num_max, E, True, round_scale, False, group_name)
        what = f"rank {rank} round_scale={round_scale}"
        assert_same(masked(ops.low_latency_dispatch(*args)), expected, what)
    torch.cuda.synchronize()
    release_nvl_buffer(group_name, low_latency=True)
    del buffer


def test_ll_fp8_cast_rounds_like_the_reference():
    """The in-kernel cast (hardware cvt) against c10's conversion in the reference, bit for bit."""
    parallel_launch(GPU_RANKS, fp8_edges_worker, backend="nccl", device="cuda", timeout=300)


def split_kernels_worker(rank, world_size, group_name):
    """The same cases with each op run as separate launches (EP_OPS_LL_DISPATCH_SPLIT=1: send and
    receive; EP_OPS_LL_COMBINE_SPLIT=1: weights, partials, receive): the fallback forms, which
    need no co-resident grid. Read once per process, so set before the first op."""
    os.environ["EP_OPS_LL_DISPATCH_SPLIT"] = "1"
    os.environ["EP_OPS_LL_COMBINE_SPLIT"] = "1"
    ll_worker(rank, world_size, group_name)


def test_ll_nvl_ops_match_reference_as_split_kernels():
    parallel_launch(GPU_RANKS, split_kernels_worker, backend="nccl", device="cuda", timeout=300)


def graph_worker(rank, world_size, group_name):
    """Two graphs (decode steps of different expert scales) captured on one buffer and replayed
    interleaved, with new tokens and routing copied into their static inputs before each replay."""
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(
        dist.group.WORLD, ll_bytes_needed(MAX_TOKENS, MAX_HIDDEN, world_size, MAX_TOPK), low_latency=True
    )
    base = Case(hidden=512, num_topk=4, num_experts=16, num_tokens=24)
    num_max = 32
    E = base.num_experts

    def inputs(seed):
        case = Case(**{**base.__dict__, "seed": seed})
        data = all_inputs(case, world_size)
        xs, topk = [d["x"] for d in data], [d["topk_idx"] for d in data]
        gen = torch.Generator().manual_seed(seed)
        weights = [torch.rand(t.shape, generator=gen) for t in topk]
        return xs, topk, weights

    def expected(xs, topk, weights, scale):
        recv = reference_low_latency_dispatch(xs, topk, num_max, E)
        return reference_low_latency_combine([r[0] * scale for r in recv], topk, weights, num_max, E)[rank]

    graphs, statics = [], []
    for scale in (2.0, 3.0):
        xs, topk, weights = inputs(0)
        static = {"x": xs[rank].cuda(), "idx": topk[rank].cuda(), "w": weights[rank].cuda()}

        def step(static=static, scale=scale):
            out = ops.low_latency_dispatch(
                static["x"], static["idx"], num_max, E, False, False, False, group_name
            )
            return ops.low_latency_combine(
                out[0] * scale, static["idx"], static["w"], out[5], num_max, False, group_name
            )

        step()  # warm-up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = step()
        graphs.append((graph, result, scale))
        statics.append(static)

    for seed, which in zip((11, 12, 13, 14, 15), (0, 1, 1, 0, 1), strict=True):
        xs, topk, weights = inputs(seed)
        graph, result, scale = graphs[which]
        static = statics[which]
        static["x"].copy_(xs[rank])
        static["idx"].copy_(topk[rank])
        static["w"].copy_(weights[rank])
        graph.replay()
        torch.cuda.synchronize()
        assert_same(result, expected(xs, topk, weights, scale), f"replay seed {seed} of graph {which}")
    release_nvl_buffer(group_name, low_latency=True)
    del buffer


def test_ll_graphs_share_a_buffer_and_replay_interleaved():
    parallel_launch(GPU_RANKS, graph_worker, backend="nccl", device="cuda", timeout=300)


def opcheck_worker(rank, world_size, group_name):
    """opcheck on the NVLink kernels. Every token goes to every expert, so no row is past
    recv_count (those rows are unspecified and would differ between opcheck's calls)."""
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(
        dist.group.WORLD, ll_bytes_needed(8, 256, world_size, world_size), low_latency=True
    )
    num_max, hidden, E = 8, 256, world_size
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(num_max, hidden, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.arange(E).repeat(num_max, 1).cuda()
    w = torch.rand(num_max, E, generator=gen).cuda()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for use_fp8 in (False, True):
        args = (x, idx, num_max, E, use_fp8, use_fp8, False, group_name)
        torch.library.opcheck(ops.low_latency_dispatch.default, args, test_utils=tests)
    out = ops.low_latency_dispatch(x, idx, num_max, E, False, False, False, group_name)
    cargs = (out[0], idx, w, out[5], num_max, False, group_name)
    torch.library.opcheck(ops.low_latency_combine.default, cargs, test_utils=tests)
    torch.cuda.synchronize()
    release_nvl_buffer(group_name, low_latency=True)
    del buffer


def test_ll_nvl_opcheck_on_cuda():
    parallel_launch(GPU_RANKS, opcheck_worker, backend="nccl", device="cuda", timeout=300)
