"""What an op call costs beyond its kernels, on the reference workload (HARDWARE.md): each call
timed on the GPU (CUDA events around the call after a barrier) with the GPU idle at the start
(the bench's --idle-start: the time includes the launch) and after the bench's 256 MB L2 flush
(its default: the host enqueues the call while the GPU is busy), and on the host (perf_counter
until it returns), rank 0's median; the raw ops against Buffer's methods, and a trivial op
(small.add_) as the floor of this way of timing.

python3 scripts/host_overhead.py [--ranks N]. Results: BENCHMARKS.md, sessions 7 and 15."""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from profile_nvl import reference_inputs  # this folder is on sys.path when run as a script

from ep_ops import Buffer
from ep_ops.bench import Timer
from ep_ops.launch import parallel_launch


def median_us(call, timer, iters=30):
    """Median time of ``call`` after a barrier, 3 warm-up calls first: on the GPU by ``timer``
    (the bench's Timer: idle start or after its L2 flush), or with ``timer`` None on the host
    (perf_counter until it returns)."""
    times = []
    for _ in range(iters + 3):
        if timer is not None:
            times += timer([lambda _: call()])
            continue
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times[3:])


def worker(rank, world_size, group_name, experts=256):
    ops = torch.ops.ep_ops
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=int(1e9))
    x, topk_idx, weights = reference_inputs(rank, experts=experts)
    small = torch.zeros(16, device="cuda")
    layout_d = ops.get_dispatch_layout.default
    npr, _, npe, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, None, npr, None, in_rank, npe, topk_idx, weights)
    raw = ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, group_name)
    rows = []
    device = torch.device("cuda", torch.cuda.current_device())
    timers = (Timer(device, idle_start=True), Timer(device), None)  # idle start, flushed, host

    def row(name, call):
        times = [median_us(call, timer) for timer in timers]
        rows.append(f"| {name} | " + " | ".join(f"{us:.1f}" for us in times) + " |")

    row("small.add_(1)", lambda: small.add_(1))
    row(
        "torch.empty x3 (int, cuda)",
        lambda: [torch.empty(256, dtype=torch.int, device="cuda") for _ in range(3)],
    )
    row("layout packet", lambda: ops.get_dispatch_layout(topk_idx, experts, world_size))
    row("layout .default", lambda: layout_d(topk_idx, experts, world_size))

    def inference_layout():
        with torch.inference_mode():
            ops.get_dispatch_layout(topk_idx, experts, world_size)

    row("layout in inference_mode", inference_layout)
    row("Buffer.get_dispatch_layout", lambda: buffer.get_dispatch_layout(topk_idx, experts))
    row("dispatch raw", lambda: ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, group_name))
    row("Buffer.dispatch", lambda: buffer.dispatch(x, None, npr, None, in_rank, npe, topk_idx, weights))
    row("cached raw", lambda: ops.cached_dispatch(x, None, in_rank, raw[5], raw[6], group_name))
    row("Buffer.dispatch(handle)", lambda: buffer.dispatch(x, handle=handle))
    row("combine raw", lambda: ops.combine(raw[0], raw[3], None, None, in_rank, raw[5], raw[6], group_name))
    row("Buffer.combine", lambda: buffer.combine(recv_x, handle, recv_w))
    dist.barrier()
    buffer.destroy()
    return (
        "\n".join(
            ["| call | GPU us, idle start | GPU us, after flush | host us |", "|---|---:|---:|---:|", *rows]
        )
        if rank == 0
        else None
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2, help="GPUs of this host (default 2)")
    args = parser.parse_args()
    print(parallel_launch(args.ranks, worker, backend="nccl", device="cuda", timeout=300)[0])
