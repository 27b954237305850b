"""The collective backend on CUDA tensors over NCCL (the multi-node path), checked against the
same reference as the CPU suite, on GPU_RANKS ranks (EP_OPS_GPU_RANKS, default 2). Skipped
without that many GPUs."""

import pytest
from cases import for_world
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from test_ops_vs_reference import LOW_LATENCY_CASES, NORMAL_CASES, low_latency_worker, normal_worker

from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

# The CPU suite's cases, with expert counts and worst-token bounds valid on GPU_RANKS ranks
# (identical to the CPU cases on 2 ranks).
NORMAL = [for_world(case, GPU_RANKS) for case in NORMAL_CASES]
LOW_LATENCY = [(for_world(case, GPU_RANKS), *flags) for case, *flags in LOW_LATENCY_CASES]


def test_normal_ops_on_cuda_over_nccl():
    parallel_launch(GPU_RANKS, normal_worker, NORMAL, "cuda", backend="nccl", device="cuda", timeout=300)


def test_low_latency_ops_on_cuda_over_nccl():
    parallel_launch(
        GPU_RANKS, low_latency_worker, LOW_LATENCY, "cuda", backend="nccl", device="cuda", timeout=300
    )
