"""The multi-process harness: results come back by rank, errors and hangs end the launch."""

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

try:
    from ep_ops.launch import intra_op_threads, parallel_launch
except ImportError:
    # ep_ops/__init__.py loads the compiled extension; the launcher itself needs only torch.
    # Import it as a top-level module instead; spawned ranks inherit sys.path and find it too.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ep_ops"))
    from launch import intra_op_threads, parallel_launch


def all_reduce_worker(rank, world_size, group_name, scale):
    group = dist.distributed_c10d._resolve_process_group(group_name)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value, group=group)
    env = {key: os.environ.get(key) for key in ("NCCL_NVLS_ENABLE", "OMP_NUM_THREADS")}
    return rank, group.size(), scale * value.item(), env


def raise_on_rank_1(rank, world_size, group_name):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    dist.barrier()  # waits for rank 1, which never arrives
    return rank


def sleep_forever(rank, world_size, group_name):
    while True:
        time.sleep(60)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_all_reduce(world_size):
    results = parallel_launch(world_size, all_reduce_worker, 2.0, timeout=120)
    total = 2.0 * world_size * (world_size + 1) / 2
    env = {"NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1"}
    assert results == [(rank, world_size, total, env) for rank in range(world_size)]


def test_worker_error_names_rank_and_exception():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        parallel_launch(2, raise_on_rank_1, timeout=120)
    message = str(info.value)
    assert "rank 1" in message
    assert "ValueError: bad input on rank 1" in message
    assert time.monotonic() - start < 60  # the waiting peer is stopped, not waited for


def test_hanging_worker_times_out():
    timeout = 10
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] of 2 still running"):
        parallel_launch(2, sleep_forever, timeout=timeout)
    assert time.monotonic() - start < timeout + 15


def test_gpu_ranks_share_the_cores_and_cpu_ranks_take_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    assert intra_op_threads("cuda", 8) == 16  # not 128 threads in each of 8 processes
    assert intra_op_threads("cuda", 1) == 128
    assert intra_op_threads("cpu", 8) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert intra_op_threads("cuda", 8) == 1
