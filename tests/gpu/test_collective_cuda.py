"""The collective backend on CUDA tensors over NCCL (the multi-node path), checked against the
same reference as the CPU suite. Needs 2 GPUs; skipped otherwise."""

import pytest
import torch
from test_ops_vs_reference import LOW_LATENCY_CASES, NORMAL_CASES, low_latency_worker, normal_worker

from ep_ops.launch import parallel_launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def test_normal_ops_on_cuda_over_nccl():
    parallel_launch(2, normal_worker, NORMAL_CASES, "cuda", backend="nccl", device="cuda", timeout=300)


def test_low_latency_ops_on_cuda_over_nccl():
    parallel_launch(
        2, low_latency_worker, LOW_LATENCY_CASES, "cuda", backend="nccl", device="cuda", timeout=300
    )
