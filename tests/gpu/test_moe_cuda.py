"""The example MoELayer on GPU_RANKS GPUs of one host (NCCL, NVLink kernels), compiled.

Training: the compiled training steps of tests/test_moe_layer.py (exact and static mode,
``torch.compile(fullgraph=True)``) run on CUDA ranks with a registered NVLink buffer; each checks
its output and gradients against the eager layer and against the dense single-process reference.

Decoding: the low-latency layer under ``torch.compile(mode="reduce-overhead", fullgraph=True)``
with a registered low-latency NVLink buffer, over several steps whose tokens (and so routing)
change: every step matches the eager layer and the dense reference, nothing recompiles, and the
step runs as one replayed CUDA graph: Inductor skips no graph (``triton.cudagraph_or_error``
turns a skip into an error, and the skip and partition counters stay 0), and a profiled replay
dispatches no ep_ops op on the host while the eager step does.
"""

import contextlib

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from moe_cases import HIDDEN, TOPK
from test_moe_layer import BF16_TOL, compiled_cases, dense_reference, make_layer
from torch._dynamo.utils import counters
from torch.testing import assert_close

from ep_ops import nvl
from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

LAUNCH = {"backend": "nccl", "device": "cuda", "timeout": 300, "pg_timeout": 120}

# Training: room for every token of every rank (float32 rows of HIDDEN) arriving at one rank.
TRAIN_NVL_ROWS = 64 * GPU_RANKS

# Decoding: M tokens at most per rank; rank r decodes M - 3 (r % 2) of them (never 0); hidden 256
# as in the CPU suite's low-latency cases.
DECODE_M = 16
DECODE_HIDDEN = 256
DECODE_STEPS = 6


def device_of(rank):
    return torch.device("cuda", rank)


def train_worker(rank, world_size, group_name, case):
    buffer = nvl.init_nvl_buffer(dist.group.WORLD, nvl.nvl_bytes_needed(TRAIN_NVL_ROWS, 4 * HIDDEN, TOPK))
    record = compiled_cases(rank, world_size, dist.group.WORLD, device=device_of(rank))[case]()
    torch.cuda.synchronize()
    del buffer
    return record


@pytest.mark.parametrize("case", ["compiled_exact", "compiled_static"])
def test_compiled_training_step_matches_eager_and_dense(case):
    for record in parallel_launch(GPU_RANKS, train_worker, case, **LAUNCH):
        assert record["graphs"] == 1, record
        if case == "compiled_static":
            assert record["static"], record["problems"]


def decode_tokens(rank, world_size, step):
    """Rank ``rank``'s tokens at decoding step ``step``: ``[M - 3 (rank % 2), DECODE_HIDDEN]``
    float32 holding bfloat16 values (the layer sends bfloat16; the dense reference sees the same)."""
    gen = torch.Generator().manual_seed(9000 + 100 * step + 10 * world_size + rank)
    return torch.randn(DECODE_M - 3 * (rank % 2), DECODE_HIDDEN, generator=gen).bfloat16().float()


def host_ep_ops(fn):
    """Runs ``fn()`` under the profiler; returns its result and the ep_ops ops the host dispatched
    (a replayed CUDA graph dispatches none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, sorted({e.name for e in prof.events() if e.name.startswith("ep_ops::")})


def unwatched(fn):
    return fn(), None


def cudagraph_or_error():
    """Inductor raises instead of silently running a graph without CUDA graphs (where the
    installed torch has the switch; the skip counter is checked either way)."""
    if hasattr(inductor_config.triton, "cudagraph_or_error"):
        return inductor_config.patch("triton.cudagraph_or_error", True)
    return contextlib.nullcontext()


def decode_worker(rank, world_size, group_name):
    group, device = dist.group.WORLD, device_of(rank)
    layer = make_layer(
        group, world_size, "low_latency", hidden=DECODE_HIDDEN, num_max_dispatch_tokens_per_rank=DECODE_M
    ).to(device)
    nbytes = nvl.ll_bytes_needed(DECODE_M, DECODE_HIDDEN, world_size, layer.topk)
    buffer = nvl.init_nvl_buffer(group, nbytes, low_latency=True)

    host_ep_ops(lambda: None)  # the profiler's first start is slow: not while peers wait in a kernel
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    routes, host_ops = [], {}
    with torch.no_grad(), cudagraph_or_error():
        for step in range(DECODE_STEPS):
            xs = [decode_tokens(r, world_size, step) for r in range(world_size)]
            x = xs[rank].to(device)
            # Step 0 compiles and warms up, step 1 records the CUDA graph, later steps replay it.
            no_recompile = (
                torch._dynamo.config.patch(error_on_recompile=True) if step else contextlib.nullcontext()
            )
            # The last step's host activity is watched: a replayed graph dispatches no ep_ops op.
            watch = host_ep_ops if step == DECODE_STEPS - 1 else unwatched
            torch.compiler.cudagraph_mark_step_begin()
            with no_recompile:
                # .clone(): the next replay overwrites the graph's output.
                got, host_ops["compiled"] = watch(lambda x=x: compiled(x).clone())
            eager, host_ops["eager"] = watch(lambda x=x: layer(x))
            assert_close(got, eager, msg=lambda m, s=step: f"step {s}: compiled vs eager: {m}", **BF16_TOL)
            inputs = [(xr, torch.zeros_like(xr)) for xr in xs]
            want = dense_reference(layer, world_size, inputs=inputs)[0].float()
            assert_close(
                got.cpu(), want, msg=lambda m, s=step: f"step {s}: compiled vs dense: {m}", **BF16_TOL
            )
            routes.append(layer.route(x)[0].cpu())
    torch.cuda.synchronize()
    del buffer

    assert any(not torch.equal(routes[0], r) for r in routes[1:]), "the routing never changed"
    inductor = counters["inductor"]
    assert counters["stats"]["unique_graphs"] == 1, f"compiled {counters['stats']['unique_graphs']} graphs"
    assert inductor["cudagraph_skips"] == 0, (
        f"Inductor skipped CUDA graphs {inductor['cudagraph_skips']} times"
    )
    assert inductor["cudagraph_partitions"] == 0, (
        f"graph split in {inductor['cudagraph_partitions']} partitions"
    )
    assert host_ops["eager"], (
        "the profiler saw no ep_ops op in the eager step: the replay check means nothing"
    )
    assert not host_ops["compiled"], (
        f"the compiled step ran {host_ops['compiled']} on the host, not in a graph"
    )
    return {"eager_host_ops": host_ops["eager"]}


def test_decode_step_replays_as_cuda_graph_without_recompiling():
    records = parallel_launch(GPU_RANKS, decode_worker, **LAUNCH)
    assert all(r["eager_host_ops"] for r in records), records
