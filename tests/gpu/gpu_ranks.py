"""How many ranks the GPU tests launch: EP_OPS_GPU_RANKS (default 2), at most the visible GPUs.
scripts/gpu_check.sh runs the suite once per rank count the machine has (2, 4, 8)."""

import os

import pytest
import torch

GPU_RANKS = int(os.environ.get("EP_OPS_GPU_RANKS", "2"))

needs_gpu_ranks = pytest.mark.skipif(
    torch.cuda.device_count() < GPU_RANKS, reason=f"needs {GPU_RANKS} CUDA GPUs (EP_OPS_GPU_RANKS)"
)
