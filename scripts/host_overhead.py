"""Host time per call of the normal-mode NVLink ops on the reference workload: how long the Python
call takes to return (perf_counter), with the GPU idle before each call. A GPU timing of a call
(the benchmark's) includes the host's time until the first kernel starts, and, for an exact-mode
dispatch, the host's turn-around at its sync; this script shows that part on its own.

python3 scripts/host_overhead.py [--ranks N]: rank 0's median over 50 calls per op, in us."""

import argparse
import time

import torch
import torch.distributed as dist
from profile_nvl import reference_workload  # this folder is on sys.path when run as a script

from ep_ops.launch import parallel_launch


def worker(rank, world_size, group_name, tokens=4096, experts=256, iters=50):
    ops = torch.ops.ep_ops
    buffer, x, topk_idx, weights = reference_workload(rank, world_size, tokens=tokens, experts=experts)
    _, _, in_rank = ops.get_dispatch_layout(topk_idx, experts, world_size)
    out = ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, group_name)
    calls = {
        "layout": lambda: ops.get_dispatch_layout(topk_idx, experts, world_size),
        "dispatch (exact: includes its sync)": lambda: ops.dispatch(
            x, None, topk_idx, weights, in_rank, experts, 1, 0, group_name
        ),
        "dispatch worst-token": lambda: ops.dispatch(
            x, None, topk_idx, weights, in_rank, experts, 1, tokens * world_size, group_name
        ),
        "cached dispatch": lambda: ops.cached_dispatch(x, None, in_rank, out[5], out[6], group_name),
        "combine": lambda: ops.combine(out[0], out[3], None, None, in_rank, out[5], out[6], group_name),
    }
    rows = []
    for name, call in calls.items():
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        rows.append(f"| {name} | {sorted(times)[len(times) // 2]:.1f} |")
    del buffer
    return "\n".join(["| op | host us per call |", "|---|---:|", *rows]) if rank == 0 else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2, help="GPUs of this host (default 2)")
    args = parser.parse_args()
    print(parallel_launch(args.ranks, worker, backend="nccl", device="cuda", timeout=300)[0])
