"""Kernel-level times of the NVLink normal-mode ops (torch.profiler), for tuning:
python3 scripts/profile_nvl.py [--ranks N]. Prints rank 0's CUDA kernel table.
--loop: no profiler; times each step of the same back-to-back loop (layout, dispatch, cached
dispatch, combine, no barrier between steps) with CUDA events and prints the median and the
slowest steps, so a step that stalls (ranks falling out of step) shows without the profiler."""

import argparse

import torch
import torch.distributed as dist

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, nvl_bytes_needed


def reference_inputs(rank, tokens=4096, hidden=7168, topk=8, experts=256):
    """This rank's inputs of the reference workload (HARDWARE.md): x [tokens, hidden] bf16,
    topk_idx, topk_weights; random routing."""
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    topk_idx = torch.rand(tokens, experts, device="cuda", generator=gen).topk(topk, dim=1).indices
    weights = torch.rand(tokens, topk, device="cuda", generator=gen)
    return x, topk_idx, weights


def reference_workload(rank, world_size, tokens=4096, hidden=7168, topk=8, experts=256):
    """An NVLink buffer for the reference workload and this rank's inputs:
    (buffer, x, topk_idx, topk_weights)."""
    buffer = init_nvl_buffer(dist.group.WORLD, nvl_bytes_needed(tokens * world_size, 2 * hidden, topk))
    return (buffer, *reference_inputs(rank, tokens, hidden, topk, experts))


def step_times_us(step, steps=50):
    """Each of `steps` back-to-back calls of step(), GPU-timed by events between them (no sync)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        step()
        events[i + 1].record()
    torch.cuda.synchronize()
    return [1000.0 * events[i].elapsed_time(events[i + 1]) for i in range(steps)]


def worker(rank, world_size, group_name, experts=256, loop=False):
    ops = torch.ops.ep_ops
    buffer, x, topk_idx, weights = reference_workload(rank, world_size, experts=experts)

    def step():
        _, _, in_rank = ops.get_dispatch_layout(topk_idx, experts, world_size)
        out = ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, group_name)
        ops.cached_dispatch(x, None, in_rank, out[5], out[6], group_name)
        ops.combine(out[0], out[3], None, None, in_rank, out[5], out[6], group_name)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    if loop:
        times = step_times_us(step)
        ordered = sorted(times)
        return (
            f"rank {rank}: {len(times)} steps, median {ordered[len(times) // 2]:.1f} us, "
            f"slowest {', '.join(f'{t:.1f}' for t in ordered[-5:][::-1])} us"
        )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    del buffer
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25) if rank == 0 else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2, help="GPUs of this host (default 2)")
    parser.add_argument("--loop", action="store_true", help="time each step without the profiler")
    args = parser.parse_args()
    results = parallel_launch(args.ranks, worker, 256, args.loop, backend="nccl", device="cuda", timeout=300)
    print("\n".join(results) if args.loop else results[0])
