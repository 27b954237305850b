"""The NVLink kernels (dispatch, cached dispatch, combine) on GPU_RANKS GPUs of one host
(EP_OPS_GPU_RANKS, default 2): bitwise equal to the CPU reference (the CPU suite's cases, made
valid on GPU_RANKS ranks by ``for_world``, each run twice), and a captured CUDA graph of
worst-token dispatch -> expert -> combine -> dispatch with the handle that replays correctly while
the routing changes.
Skipped without GPU_RANKS GPUs."""

import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
from cases import Case, all_inputs, assert_same, expect_error, fit_worst_tokens, for_world, inputs_of
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from test_ops_vs_reference import NORMAL_CASES, normal_worker

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, nvl_bytes_needed
from ep_ops.reference import (
    reference_cached_dispatch,
    reference_combine,
    reference_dispatch,
    reference_layout,
)

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

# Room for 4096 received rows of up to 8 KiB: above every case below on up to 8 ranks (the
# largest, the graph test's worst-token bound, is 1024 rows on 8 ranks).
NVL_BYTES = nvl_bytes_needed(4096, 8 * 1024, 16, 8)


def nvl_worker(rank, world_size, group_name):
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    normal_worker(rank, world_size, group_name, [for_world(c, world_size) for c in NORMAL_CASES], "cuda")
    del buffer


def test_nvl_ops_match_reference():
    parallel_launch(GPU_RANKS, nvl_worker, backend="nccl", device="cuda", timeout=300)


SHAPE_SWITCHES = ("EP_OPS_NVL_OVERLAP", "EP_OPS_NVL_EXACT_SPLIT", "EP_OPS_NVL_SLICED")


def kernel_shapes_worker(rank, world_size, group_name):
    """The same cases with the separate send and receive kernels (EP_OPS_NVL_OVERLAP=0, what a GPU
    that cannot hold the overlapped kernel's blocks at once runs), then with the overlapped kernel
    launched whole after exact mode's host read (EP_OPS_NVL_EXACT_SPLIT=0; the dispatch with a
    handle then runs its one launch without notify, as under a capture), then split with the
    packed layout (EP_OPS_NVL_SLICED=0), then split and sliced (the default) on the same buffer:
    every shape keeps the buffer's counters in step for the others."""
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    cases = [for_world(c, world_size) for c in NORMAL_CASES]
    for shape in (("0", "1", "1"), ("1", "0", "1"), ("1", "1", "0"), ("1", "1", "1")):
        for name, value in zip(SHAPE_SWITCHES, shape, strict=True):
            os.environ[name] = value  # read at every call
        normal_worker(rank, world_size, group_name, cases, "cuda")
    for name in SHAPE_SWITCHES:
        del os.environ[name]
    del buffer


def test_nvl_ops_match_reference_with_separate_kernels_then_overlapped():
    parallel_launch(GPU_RANKS, kernel_shapes_worker, backend="nccl", device="cuda", timeout=400)


def long_streams_worker(rank, world_size, group_name):
    """Streams of over 512 x 16 rows (kMaxDispatchChunks chunks of a block's 16 warps,
    csrc/cuda/nvl_dispatch_overlap.cu) are cut into wider chunks, sized from the stream alone:
    ~9,400 rows from each source on 2 ranks (top-2 of 8 experts, 12,000 tokens), exact BF16 and
    worst-token FP8, match the reference."""
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    exact = for_world(Case(hidden=128, num_topk=2, num_experts=8, num_tokens=12000), world_size)
    worst = dataclasses.replace(exact, fp8=True, num_worst_tokens=fit_worst_tokens(1024, exact, world_size))
    normal_worker(rank, world_size, group_name, [exact, worst], "cuda")
    del buffer


def test_long_streams_take_wider_chunks():
    parallel_launch(GPU_RANKS, long_streams_worker, backend="nccl", device="cuda", timeout=300)


def uneven_streams_worker(rank, world_size, group_name):
    """Exact mode's sliced layout (csrc/cuda/nvl_rows.cuh, sliced_row) on a buffer that holds
    exactly the rows rank 0 receives: every token goes to rank 0, which has 8 tokens while the
    others have 60 or more, so their streams to rank 0 run past their slices (1/R of the region)
    into the room rank 0's own slice leaves (its rows to itself skip the buffer). Both layouts
    (EP_OPS_NVL_SLICED=1, 0), twice each, match the reference, and so does a random case after."""
    case = for_world(Case(hidden=256, num_topk=3, num_experts=8, routing="skewed"), world_size)
    inputs = [inputs_of(dataclasses.replace(case, num_tokens=8 if r == 0 else 59), r, world_size)
              for r in range(world_size)]  # fmt: skip
    most = max(sum(int(i["is_token_in_rank"][:, d].sum()) for i in inputs) for d in range(world_size))
    assert most == 8 + sum(59 + r for r in range(1, world_size)), "every token should reach rank 0"
    buffer = init_nvl_buffer(dist.group.WORLD, nvl_bytes_needed(most, 2 * case.hidden, case.num_topk))
    expected = reference_dispatch(
        [i["x"] for i in inputs], None, [i["topk_idx"] for i in inputs],
        [i["topk_weights"] for i in inputs], [i["is_token_in_rank"] for i in inputs],
        case.num_experts, 1, 0,
    )[rank]  # fmt: skip
    me = {k: v.cuda() for k, v in inputs[rank].items() if v is not None}
    for sliced in ("1", "1", "0", "0"):
        os.environ["EP_OPS_NVL_SLICED"] = sliced
        out = torch.ops.ep_ops.dispatch(
            me["x"], None, me["topk_idx"], me["topk_weights"], me["is_token_in_rank"],
            case.num_experts, 1, 0, group_name,
        )  # fmt: skip
        assert_same(out, expected, f"rank {rank}: uneven streams, EP_OPS_NVL_SLICED={sliced}")
    del os.environ["EP_OPS_NVL_SLICED"]
    small = for_world(Case(hidden=256, num_topk=3, num_experts=8, num_tokens=4), world_size)
    normal_worker(rank, world_size, group_name, [small], "cuda")
    del buffer


def test_exact_mode_uneven_streams_fill_other_slices():
    parallel_launch(GPU_RANKS, uneven_streams_worker, backend="nccl", device="cuda", timeout=300)


COMBINE_KNOBS = ("EP_OPS_NVL_COMBINE_SEND_BLOCKS", "EP_OPS_NVL_COMBINE_RECV_BLOCKS")


def combine_splits_worker(rank, world_size, group_name):
    """The overlapped combine's block split: a bad EP_OPS_NVL_COMBINE_SEND_BLOCKS or _RECV_BLOCKS
    fails on every rank before any kernel, naming the variable; then splits whose send blocks do
    not divide 256 (3 + 5: shares of 86/85/85 arrivals), one too large to be resident (the separate
    kernels run instead) and the default all match the reference on one buffer, in turn."""
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    cases = [for_world(c, world_size) for c in (NORMAL_CASES[0], NORMAL_CASES[5], NORMAL_CASES[9])]
    ops = torch.ops.ep_ops
    case = cases[0]
    me = {k: v.cuda() for k, v in all_inputs(case, world_size)[rank].items() if v is not None}
    out = ops.dispatch(
        me["x"], None, me["topk_idx"], me["topk_weights"], me["is_token_in_rank"],
        case.num_experts, 1, 0, group_name,
    )  # fmt: skip
    combine_args = (out[0], out[3], None, None, me["is_token_in_rank"], out[5], out[6], group_name)
    for name in COMBINE_KNOBS:
        for value, needle in (("0", "must be a positive integer"), ("many", "must be a positive integer"),
                              ("257", "must be at most 256")):  # fmt: skip
            os.environ[name] = value
            expect_error(ValueError, [name, needle], ops.combine, *combine_args)
            del os.environ[name]
    for send, recv in (("3", "5"), ("256", "256"), (None, None)):
        for name, value in zip(COMBINE_KNOBS, (send, recv), strict=True):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        normal_worker(rank, world_size, group_name, cases, "cuda")
    del buffer


def test_combine_block_splits():
    parallel_launch(GPU_RANKS, combine_splits_worker, backend="nccl", device="cuda", timeout=300)


def graph_worker(rank, world_size, group_name):
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    case = for_world(
        Case(dtype=torch.bfloat16, hidden=256, num_experts=8, num_tokens=64, num_worst_tokens=256), world_size
    )
    worst = case.num_worst_tokens
    me = all_inputs(case, world_size)[rank]
    static = {k: v.cuda() for k, v in me.items() if v is not None}

    def step():
        _, _, in_rank = ops.get_dispatch_layout(static["topk_idx"], case.num_experts, world_size)
        out = ops.dispatch(
            static["x"],
            None,
            static["topk_idx"],
            static["topk_weights"],
            in_rank,
            case.num_experts,
            1,
            worst,
            group_name,
        )
        expert = out[0] * 2
        combined = ops.combine(expert, out[3], None, None, in_rank, out[5], out[6], group_name)
        # A dispatch with the handle: its one launch opens its own epoch, without notify.
        again, _ = ops.cached_dispatch(static["x"] * 3, None, in_rank, out[5], out[6], group_name)
        return (*combined, again)

    step()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined_x, combined_w, again = step()
    for seed in (11, 12, 13):
        inputs = all_inputs(Case(**{**case.__dict__, "seed": seed}), world_size)
        for key in static:
            static[key].copy_(inputs[rank][key])
        graph.replay()
        torch.cuda.synchronize()
        xs = [i["x"] for i in inputs]
        expected = reference_dispatch(
            xs,
            None,
            [i["topk_idx"] for i in inputs],
            [i["topk_weights"] for i in inputs],
            [i["is_token_in_rank"] for i in inputs],
            case.num_experts,
            1,
            worst,
        )
        handles = [(inputs[r]["is_token_in_rank"], expected[r][5], expected[r][6]) for r in range(world_size)]
        combined = reference_combine(
            [e[0] * 2 for e in expected], [e[3] for e in expected], None, None, handles
        )
        assert torch.equal(combined_x.cpu(), combined[rank][0]), f"replay {seed}: combined_x"
        assert torch.equal(combined_w.cpu(), combined[rank][1]), f"replay {seed}: combined weights"
        recached = reference_cached_dispatch([x * 3 for x in xs], None, handles)
        assert torch.equal(again.cpu(), recached[rank][0]), f"replay {seed}: dispatch with the handle"
    del buffer


def test_worst_token_graph_replays_with_changing_routing():
    parallel_launch(GPU_RANKS, graph_worker, backend="nccl", device="cuda", timeout=300)


def capacity_limits_worker(rank, world_size, group_name):
    """Exact mode on a buffer too small for the rows: every rank raises the error naming the size
    needed, and the failed call closes its epoch (abort_kernel): a dispatch that fits then matches
    the reference. Both with the send split from the receive (the default: its send blocks, which
    start before the host's check, send nothing) and without (EP_OPS_NVL_EXACT_SPLIT=0). Worst-token
    mode past the buffer raises before any kernel, the buffer in step after it too. Under CUDA
    graph capture, exact mode is refused before any kernel is captured."""
    ops = torch.ops.ep_ops
    small = for_world(Case(hidden=256, num_topk=2, num_experts=8, num_tokens=4), world_size)
    big = for_world(Case(hidden=256, num_topk=2, num_experts=8, num_tokens=64), world_size)
    buffer = init_nvl_buffer(dist.group.WORLD, nvl_bytes_needed(small.num_tokens * world_size, 512, 2))

    def mine_on_gpu(inputs):
        return {k: v.cuda() for k, v in inputs[rank].items() if v is not None}

    def dispatch(case, me):
        return ops.dispatch(
            me["x"], None, me["topk_idx"], me["topk_weights"], me["is_token_in_rank"],
            case.num_experts, 1, 0, group_name,
        )  # fmt: skip

    for split in ("1", "0", "1"):  # the failed call closes its epoch: the next one finds the buffer in step
        os.environ["EP_OPS_NVL_EXACT_SPLIT"] = split
        expect_error(ValueError, ["NVLink buffer is too small", "num_nvl_bytes must be at least"],
                     dispatch, big, mine_on_gpu(all_inputs(big, world_size)))  # fmt: skip
        inputs = all_inputs(small, world_size)
        expected = reference_dispatch(
            [i["x"] for i in inputs], None, [i["topk_idx"] for i in inputs],
            [i["topk_weights"] for i in inputs], [i["is_token_in_rank"] for i in inputs],
            small.num_experts, 1, 0,
        )  # fmt: skip
        assert_same(
            dispatch(small, mine_on_gpu(inputs)), expected[rank], f"rank {rank}: dispatch after the error"
        )
    del os.environ["EP_OPS_NVL_EXACT_SPLIT"]

    # Worst-token mode knows its rows on the host: past the buffer it raises before any kernel
    # (it used to raise after notify, and the next dispatch then timed out waiting for the
    # receive that would have closed notify's epoch).
    me = mine_on_gpu(inputs)  # also the capture's below: copies from the host cannot be captured
    expect_error(ValueError, ["NVLink buffer holds", "num_nvl_bytes must be at least"],
                 lambda: ops.dispatch(me["x"], None, me["topk_idx"], me["topk_weights"], me["is_token_in_rank"],
                                      small.num_experts, 1, big.num_tokens * world_size, group_name))  # fmt: skip
    assert_same(dispatch(small, me), expected[rank], f"rank {rank}: dispatch after the worst-token error")

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    message = ""
    try:
        with torch.cuda.graph(graph):
            dispatch(small, me)
    except RuntimeError as error:
        message = str(error)
    assert "capture with num_worst_tokens > 0" in message, f"rank {rank}: {message!r}"
    dist.barrier()
    del buffer


def test_capacity_errors_and_capture_refusal():
    parallel_launch(GPU_RANKS, capacity_limits_worker, backend="nccl", device="cuda", timeout=300)


def host_counts_worker(rank, world_size, group_name):
    """The per-expert counts an exact-mode dispatch leaves for Buffer.dispatch when asked (notify
    counts them, csrc/dispatch_counts.h) equal the reference's, repeated experts in a row counted
    once and expert_alignment applied; unasked, worst-token mode and more than 512 experts per rank
    leave none (Buffer.dispatch then reads the device tensor). Rank 0 alone asking once more: the
    other ranks post no counts, so it is left none rather than wrong ones."""
    from ep_ops import _C

    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    for per_rank, alignment, worst in ((4, 1, 0), (32, 4, 0), (4, 1, 48 * world_size), (600, 1, 0)):
        case = for_world(
            Case(hidden=256, num_topk=3, num_experts=per_rank * world_size, num_tokens=48, seed=per_rank),
            world_size,
        )
        inputs = all_inputs(case, world_size)
        for i in inputs:  # token 0 names its first expert twice: it counts once
            i["topk_idx"][0, 1] = i["topk_idx"][0, 0]
            i["is_token_in_rank"] = reference_layout(i["topk_idx"], case.num_experts, world_size)[2]
        expected = reference_dispatch(
            [i["x"] for i in inputs], None, [i["topk_idx"] for i in inputs],
            [i["topk_weights"] for i in inputs], [i["is_token_in_rank"] for i in inputs],
            case.num_experts, alignment, worst,
        )[rank]  # fmt: skip
        me = {k: v.cuda() for k, v in inputs[rank].items() if v is not None}

        dispatch = functools.partial(
            ops.dispatch, me["x"], None, me["topk_idx"], me["topk_weights"], me["is_token_in_rank"],
            case.num_experts, alignment, worst, group_name,
        )  # fmt: skip

        dispatch()  # not asked for: a raw call leaves nothing
        assert _C.take_dispatch_counts(group_name) is None, f"rank {rank}: left counts unasked"
        _C.request_dispatch_counts(group_name)
        out = dispatch()
        left = _C.take_dispatch_counts(group_name)
        what = f"rank {rank}, {per_rank} experts per rank, alignment {alignment}, worst {worst}"
        assert_same(out[4], expected[4], f"{what}: num_recv_tokens_per_expert")
        if worst or per_rank > 512:
            assert left is None, f"{what}: left {left}"
        else:
            assert left == expected[4].tolist(), f"{what}: left {left}, expected {expected[4].tolist()}"
        assert _C.take_dispatch_counts(group_name) is None, f"{what}: taken twice"
        if world_size > 1:
            if rank == 0:
                _C.request_dispatch_counts(group_name)
            dispatch()
            assert _C.take_dispatch_counts(group_name) is None, f"{what}: left counts not every rank made"
    del buffer


def test_exact_mode_leaves_host_counts():
    parallel_launch(GPU_RANKS, host_counts_worker, backend="nccl", device="cuda", timeout=300)


def opcheck_and_compile_worker(rank, world_size, group_name):
    from moe import dense_moe, expert_weights, local_experts, moe
    from test_opcheck import ALL_TESTS, FP8_INPUT_TESTS, _dispatch_samples

    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    for name, op, args in _dispatch_samples(world_size, rank, group_name, "cuda"):
        has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
        try:
            torch.library.opcheck(op, args, test_utils=FP8_INPUT_TESTS if has_fp8 else ALL_TESTS)
        except Exception as error:
            raise AssertionError(f"opcheck on CUDA failed for {name} on rank {rank}: {error}") from error

    case = for_world(Case(dtype=torch.float32, hidden=16, num_experts=4), world_size)
    inputs = all_inputs(case, world_size)
    weights = expert_weights(case.num_experts, case.hidden, torch.float32)
    me = {k: v.cuda() for k, v in inputs[rank].items() if v is not None}
    w_local = local_experts(weights, rank, world_size).cuda()
    expected = dense_moe(
        [i["x"] for i in inputs],
        [i["topk_idx"] for i in inputs],
        [i["topk_weights"] for i in inputs],
        weights,
    )[rank]
    for worst in (0, fit_worst_tokens(64, case, world_size)):
        x = me["x"].clone().requires_grad_()
        args = (
            x,
            me["topk_idx"],
            me["topk_weights"],
            w_local,
            case.num_experts,
            world_size,
            group_name,
            worst,
        )
        compiled = torch.compile(moe, fullgraph=True)(*args)
        eager = moe(*args)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(compiled.cpu(), expected, rtol=1e-4, atol=1e-4)
        (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
        (grad_eager,) = torch.autograd.grad(eager.sum(), x)
        torch.testing.assert_close(grad_compiled, grad_eager)
    del buffer


def test_nvl_opcheck_and_fullgraph_compile_on_cuda():
    parallel_launch(GPU_RANKS, opcheck_and_compile_worker, backend="nccl", device="cuda", timeout=500)
