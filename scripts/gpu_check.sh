#!/usr/bin/env bash
# One call on a lent GPU machine: build against its torch, run the GPU suite, then the benchmark.
# Logs go to $OUT (or ./gpu-logs). Usage: bash scripts/gpu_check.sh [extra bench args]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi topo -m > "$out/topology.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))' | tee "$out/env.txt"
MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee "$out/gpu-tests.log" | tail -5
python3 -m ep_ops.bench "$@" 2>&1 | tee "$out/bench.log" | tail -40
