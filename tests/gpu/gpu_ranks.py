"""How many ranks the GPU tests launch: EP_OPS_GPU_RANKS (default 2), at most the visible GPUs.
scripts/gpu_check.sh runs the suite once per rank count the machine has (2, 4, 8). Also the
store barrier the dead-peer tests share."""

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
