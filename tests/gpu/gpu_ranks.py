"""How many ranks the GPU tests launch: EP_OPS_GPU_RANKS (default 2), at most the visible GPUs.
scripts/gpu_check.sh runs the suite once per rank count the machine has (2, 4, 8). Also the
store barrier and the crash the dead-peer tests share."""

import os

import pytest
import torch

GPU_RANKS = int(os.environ.get("EP_OPS_GPU_RANKS", "2"))

needs_gpu_ranks = pytest.mark.skipif(
    torch.cuda.device_count() < GPU_RANKS, reason=f"needs {GPU_RANKS} CUDA GPUs (EP_OPS_GPU_RANKS)"
)


def store_barrier(name: str, num_ranks: int) -> None:
    """Every rank got here: counter `name` on the launch's TCP store (no GPU work, no NCCL)."""
    import time

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.add(name, 1)
    while int(store.add(name, 0)) < num_ranks:
        time.sleep(0.01)


def crash_last_rank(name: str, rank: int, num_ranks: int) -> None:
    """Once every rank's GPU work so far is done and every rank got here (barrier `name`), the
    last rank exits: no exception, no goodbye, like a crash. The others return."""
    torch.cuda.synchronize()
    store_barrier(name, num_ranks)
    if rank == num_ranks - 1:
        os._exit(1)


def survivors_of_crash(worker, out_dir, **launch_options) -> dict:
    """Runs worker(rank, num_ranks, group_name, out_dir) on GPU_RANKS ranks over NCCL, whose last
    rank crashes (crash_last_rank): the launch must fail naming that rank. Returns the other
    ranks' outcomes {rank: outcome} (outcomes.py)."""
    from outcomes import read_outcomes

    from ep_ops.launch import parallel_launch

    late = GPU_RANKS - 1
    with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{late}\]"):
        parallel_launch(
            GPU_RANKS, worker, str(out_dir), backend="nccl", device="cuda", timeout=120, **launch_options
        )
    return read_outcomes(out_dir, range(late))
