"""A peer that stops on the NVLink kernels: the waiting ranks get a Python error, not a hang.

Every NVLink spin-wait gives up after the Buffer's ``timeout_s`` (here TIMEOUT_S). The first
wait to give up trips the buffer's watchdog (csrc/cuda/nvl_watchdog.h): the kernels stop without
touching data, and the host raises ``RuntimeError`` naming the waiting rank, the peer and the
phase: in the same call for an exact-mode dispatch (it syncs anyway), otherwise at the next op
on the buffer or at ``ep_ops.nvl.check_nvl_buffers``. The buffer stays unusable; the CUDA context
stays usable.

One launch on GPU_RANKS GPUs runs the scenarios in turn, each on a fresh Buffer: every rank runs
the step once together (so the group is known to work), then the last rank (LATE) skips the op
under test and waits (on the launch's TCP store, not the GPU) until the others have reported.
A second launch has the last rank exit (as if crashed) after the first round trip: the others
write what they saw to files, since a dead rank fails the launch itself.
"""

import time

import pytest
import torch
import torch.distributed as dist
from gpu_ranks import GPU_RANKS, crash_last_rank, needs_gpu_ranks, store_barrier, survivors_of_crash
from outcomes import write_outcome

from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

TIMEOUT_S = 2.0
SLACK_S = 8.0  # the error must come within TIMEOUT_S + SLACK_S
HIDDEN, EXPERTS_PER_RANK, NUM_TOPK, NUM_MAX = 1024, 4, 4, 16
SCENARIOS = ("dispatch", "combine", "low_latency_dispatch", "low_latency_graph")


def _inputs(rank: int, num_ranks: int, device):
    gen = torch.Generator().manual_seed(rank)
    num_experts = EXPERTS_PER_RANK * num_ranks
    x = torch.randn(NUM_MAX, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(NUM_MAX, num_experts, generator=gen).argsort(dim=1)[:, :NUM_TOPK].contiguous()
    weights = torch.rand(topk_idx.shape, generator=gen)
    return x.to(device), topk_idx.to(device), weights.to(device), num_experts


def _buffer(num_ranks: int, num_experts: int):
    """A Buffer on WORLD for both modes at this file's sizes, waiting TIMEOUT_S for a peer."""
    from ep_ops import Buffer

    return Buffer(
        dist.group.WORLD,
        num_nvl_bytes=Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks),
        num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, num_ranks, num_experts),
        timeout_s=TIMEOUT_S,
    )


def _low_latency_round_trip(buffer, x, topk_idx, weights, num_experts):
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, NUM_MAX, num_experts, use_fp8=False)
    combined, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    return combined


def _scenario(name: str, rank: int, num_ranks: int, late: bool) -> dict:
    """Runs one scenario; returns what a surviving rank saw (nothing for the late rank)."""
    from ep_ops.nvl import check_nvl_buffers

    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device())
    x, topk_idx, weights, num_experts = _inputs(rank, num_ranks, device)
    buffer = _buffer(num_ranks, num_experts)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)

    def dispatch():
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=layout[0],
            num_tokens_per_expert=layout[2], is_token_in_rank=layout[3],
        )  # fmt: skip
        return recv_x, handle

    def low_latency_round_trip():
        return _low_latency_round_trip(buffer, x, topk_idx, weights, num_experts)

    # Together once: the group works.
    recv_x, handle = dispatch()
    buffer.combine(recv_x, handle)
    low_latency_round_trip()
    graph = None
    if name == "low_latency_graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            low_latency_round_trip()
        graph.replay()
    torch.cuda.synchronize()
    store_barrier(f"{name} ready", num_ranks)

    seen = {}
    if not late:
        start = time.monotonic()
        try:
            if name == "dispatch":  # exact mode syncs: the error comes in this call
                dispatch()
                seen["returned"] = True
            elif name == "combine":
                buffer.combine(recv_x, handle)
            elif name == "low_latency_dispatch":
                buffer.low_latency_dispatch(x, topk_idx, NUM_MAX, num_experts, use_fp8=False)
            else:
                graph.replay()
            torch.cuda.synchronize()  # returns: the kernels gave up instead of hanging
            seen["synchronized_after_s"] = time.monotonic() - start
            check_nvl_buffers(group)
            seen["check_passed"] = True
        except RuntimeError as error:
            seen["error"] = str(error)
        seen["error_after_s"] = time.monotonic() - start
        # The buffer stays unusable: the next call of the same kind raises at once.
        start = time.monotonic()
        try:
            if name == "dispatch" or name == "combine":
                dispatch()
            else:
                buffer.low_latency_dispatch(x, topk_idx, NUM_MAX, num_experts, use_fp8=False)
        except RuntimeError as error:
            seen["next_call_error"] = str(error)
        seen["next_call_after_s"] = time.monotonic() - start
        seen["context_usable"] = torch.ones(4, device=device).sum().item() == 4.0
    store_barrier(f"{name} reported", num_ranks)
    del graph
    buffer.destroy()
    torch.cuda.synchronize()
    store_barrier(f"{name} destroyed", num_ranks)
    return seen


def dead_peer_worker(rank: int, num_ranks: int, group_name: str) -> dict:
    late = rank == num_ranks - 1
    return {name: _scenario(name, rank, num_ranks, late) for name in SCENARIOS}


PHASES = {
    "dispatch": "dispatch: the peer's token counts",
    "combine": "combine: the peer's rows",
    "low_latency_dispatch": "low-latency dispatch: the peer's rows",
    "low_latency_graph": "low-latency dispatch: the peer's rows",
}


def test_stopped_peer_raises_on_every_waiting_rank():
    results = parallel_launch(GPU_RANKS, dead_peer_worker, backend="nccl", device="cuda", timeout=300)
    late = GPU_RANKS - 1
    for rank, seen_by_rank in enumerate(results[:late]):
        for name in SCENARIOS:
            seen = seen_by_rank[name]
            where = f"rank {rank}, {name}: {seen}"
            error = seen.get("error", "")
            assert f"rank {rank} waited" in error and f"for rank {late} (" in error, where
            assert PHASES[name] in error and f"timeout of {TIMEOUT_S:g} s" in error, where
            assert TIMEOUT_S * 0.9 < seen["error_after_s"] < TIMEOUT_S + SLACK_S, where
            assert "returned" not in seen and "check_passed" not in seen, where
            assert "unusable" in seen.get("next_call_error", ""), where
            assert seen["next_call_after_s"] < 1.0, where
            assert seen["context_usable"], where
    assert all(seen == {} for seen in results[late].values()), results[late]


def crashed_peer_worker(rank: int, num_ranks: int, group_name: str, out_dir: str) -> str:
    """One low-latency round trip together; then the last rank exits and the others try
    another low-latency dispatch and record the outcome in ``out_dir``."""
    from ep_ops.nvl import check_nvl_buffers

    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device())
    x, topk_idx, weights, num_experts = _inputs(rank, num_ranks, device)
    buffer = _buffer(num_ranks, num_experts)
    _low_latency_round_trip(buffer, x, topk_idx, weights, num_experts)
    crash_last_rank("crash: round trip done", rank, num_ranks)
    start = time.monotonic()
    outcome = {}
    try:
        buffer.low_latency_dispatch(x, topk_idx, NUM_MAX, num_experts, use_fp8=False)
        torch.cuda.synchronize()
        check_nvl_buffers(group)
    except RuntimeError as error:
        outcome["error"] = str(error)
    outcome["error_after_s"] = time.monotonic() - start
    write_outcome(out_dir, rank, outcome)
    return "survived"


def test_crashed_peer_raises_on_every_other_rank(tmp_path):
    late = GPU_RANKS - 1
    for rank, seen in survivors_of_crash(crashed_peer_worker, tmp_path).items():
        error = seen.get("error", "")
        assert f"rank {rank} waited" in error and f"for rank {late} (" in error, seen
        assert "low-latency dispatch: the peer's rows" in error, seen
        assert TIMEOUT_S * 0.9 < seen["error_after_s"] < TIMEOUT_S + SLACK_S, seen
