"""Kernel times of the low-latency dispatch's send and recv halves, each run alone with the
peers settled (a device sync and a barrier before each half): the send half never waits for a
receiver's freed flags and the recv half never for rows, so each time is the half's own work
(launch to exit, from torch.profiler). profile_ll.py times the halves back to back instead, where
a recv half's time includes its wait for the peers' sends.

python3 scripts/ll_settled_halves.py [--ranks N] [--tokens 128] [--hidden 7168]"""

import argparse

import torch
import torch.distributed as dist
from profile_ll import decode_setup  # scripts/ is on the path when a script here runs

from ep_ops.launch import parallel_launch
from ep_ops.nvl import release_nvl_buffer


def worker(rank, world_size, group_name, tokens=128, hidden=7168, topk=8, experts=256, calls=100):
    ops = torch.ops.ep_ops
    group = dist.group.WORLD
    buffer, x, idx, _ = decode_setup(rank, world_size, tokens, hidden, topk, experts)

    def settle():
        torch.cuda.synchronize()
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])

    def send(use_fp8):
        return ops.low_latency_dispatch_send(x, idx, tokens, experts, use_fp8, False, False, group_name)

    def recv(packed, use_fp8):
        return ops.low_latency_dispatch_recv(
            packed, tokens, hidden, topk, experts, use_fp8, False, group_name
        )

    lines = []
    for use_fp8 in (True, False):
        for _ in range(10):
            recv(send(use_fp8), use_fp8)
        settle()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                settle()
                packed = send(use_fp8)
                settle()
                recv(packed, use_fp8)
            settle()
        for event in prof.key_averages():
            if "ll_dispatch_half_kernel" in event.key:
                half = "send" if "<true>" in event.key else "recv"
                per_call = event.device_time_total / event.count
                kind = "FP8" if use_fp8 else "BF16"
                lines.append(f"{kind} {half} half: {per_call:.2f} us ({event.count} calls)")
    torch.cuda.synchronize()
    release_nvl_buffer(group_name, low_latency=True)
    del buffer
    return "\n".join(lines) if rank == 0 else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    args = parser.parse_args()
    print(
        f"ranks {args.ranks}, tokens {args.tokens}, hidden {args.hidden}: settled halves, kernel us per call"
    )
    result = parallel_launch(
        args.ranks, worker, args.tokens, args.hidden, backend="nccl", device="cuda", timeout=300
    )
    print(result[0])
