#!/usr/bin/env bash
# One call on a lent GPU machine: build against its torch, then for each rank count of
# EP_OPS_RANK_COUNTS that the machine has GPUs for, the GPU suite on that many ranks
# (EP_OPS_GPU_RANKS=n) and the benchmark (python3 -m ep_ops.bench --ranks n).
#
# Usage: bash scripts/gpu_check.sh [extra bench args]
# Logs go to $OUT (or ./gpu-logs): env.txt, topology.txt, build.log, gpu-tests-ep$n.log,
# bench-ep$n.log, bench-ep$n.json, and summary.txt (one line per step: status and seconds).
# Exits non-zero if the build or any step failed.
#
# Device time is scarce and one machine call lasts at most 10 minutes, so the environment picks
# what runs:
#   EP_OPS_RANK_COUNTS="2 4 8"  rank counts, in order (default "2 4 8"; a count above the
#                               machine's GPUs is skipped and said so)
#   GPU_CHECK_SKIP_TESTS=1      no GPU suite
#   GPU_CHECK_SKIP_BENCH=1      no benchmark
#   GPU_CHECK_PYTEST_ARGS="..." extra pytest arguments (e.g. "-k nvl -x")
#   GPU_CHECK_SHARDS=4          run the suite's files in 4 concurrent pytest processes (each
#                               on all the ranks' GPUs; logs gpu-tests-ep$n-shard$i.log), then
#                               the files that need the GPUs to themselves one by one (the
#                               dead-peer file times how fast survivors raise; the lifecycle
#                               file measures free GPU memory). At 8 ranks on
#                               8 x H200 one process takes ~10 min, 4 shards ~5 min.
set -uo pipefail
# Multicast off, the system compiler: why in gpu_env.sh.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
out=${OUT:-gpu-logs}
mkdir -p "$out"
counts=${EP_OPS_RANK_COUNTS:-2 4 8}
: > "$out/summary.txt"
status=0

note() {
  echo "$*" | tee -a "$out/summary.txt"
}

# step NAME LOG TAIL CMD...: runs CMD with its output in LOG (the last TAIL lines shown here).
step() {
  local name=$1 log=$2 lines=$3
  shift 3
  local start=$SECONDS rc
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$log" | tail -n "$lines"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    status=1
  fi
  note "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
}

# Slowest first (8-rank times, 2026-11-22), dealt round-robin so the shards end close together.
SHARDED_FILES=(test_moe_cuda test_nvl_cuda test_stress_cuda test_permuted_cuda test_ll_cuda
  test_collective_cuda test_layout_cuda)
# Run alone, after the shards: the dead-peer file asserts how fast survivors raise, and the
# lifecycle file reads the device's free memory, which a concurrent shard changes (seen
# 2026-11-22: "the Buffer held 430 MB, expected at least 1 GB" beside three other shards).
LONE_FILES=(test_dead_peer_cuda test_dead_peer_nccl test_lifecycle_cuda)

# sharded_tests RANKS SHARDS: the suite on RANKS ranks as SHARDS concurrent pytest processes.
sharded_tests() {
  local n=$1 shards=$2 i pids=() start=$SECONDS listed
  listed=$(printf 'tests/gpu/%s.py\n' "${SHARDED_FILES[@]}" "${LONE_FILES[@]}" | sort)
  if [ "$listed" != "$(printf '%s\n' tests/gpu/test_*.py | sort)" ]; then
    note "EP$n sharded tests: FAILED: tests/gpu has files SHARDED_FILES does not list (or lists gone ones)"
    status=1
    return
  fi
  for ((i = 0; i < shards; i++)); do
    local files=() j
    for ((j = i; j < ${#SHARDED_FILES[@]}; j += shards)); do
      files+=("tests/gpu/${SHARDED_FILES[j]}.py")
    done
    # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of words
    EP_OPS_GPU_RANKS="$n" python3 -m pytest -q -m gpu "${files[@]}" ${GPU_CHECK_PYTEST_ARGS:-} \
      > "$out/gpu-tests-ep$n-shard$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < shards; i++)); do
    local rc=0
    wait "${pids[i]}" || rc=$?
    [ "$rc" -eq 0 ] || status=1
    note "EP$n tests shard $i: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)"): $(tail -n 1 "$out/gpu-tests-ep$n-shard$i.log")"
  done
  note "EP$n sharded tests: $((SECONDS - start)) s"
  local lone
  for lone in "${LONE_FILES[@]}"; do
    # shellcheck disable=SC2086
    step "EP$n tests $lone" "$out/gpu-tests-ep$n-$lone.log" 3 \
      env EP_OPS_GPU_RANKS="$n" python3 -m pytest -q -m gpu "tests/gpu/$lone.py" ${GPU_CHECK_PYTEST_ARGS:-}
  done
}

nvidia-smi topo -m > "$out/topology.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))' | tee "$out/env.txt"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
start=$SECONDS
MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || {
  tail -40 "$out/build.log"
  note "build: FAILED in $((SECONDS - start)) s"
  exit 1
}
note "build: ok in $((SECONDS - start)) s"

for n in $counts; do
  if [ "$n" -gt "$gpus" ]; then
    note "EP$n: skipped, the machine has $gpus GPUs"
    continue
  fi
  if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
    if [ "${GPU_CHECK_SHARDS:-1}" -gt 1 ]; then
      sharded_tests "$n" "$GPU_CHECK_SHARDS"
    else
      # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of words
      step "EP$n tests" "$out/gpu-tests-ep$n.log" 5 \
        env EP_OPS_GPU_RANKS="$n" python3 -m pytest -q -m gpu tests/gpu ${GPU_CHECK_PYTEST_ARGS:-}
    fi
  fi
  if [ -z "${GPU_CHECK_SKIP_BENCH:-}" ]; then
    step "EP$n bench" "$out/bench-ep$n.log" 40 \
      python3 -m ep_ops.bench --ranks "$n" "$@" --json "$out/bench-ep$n.json"
  fi
done
exit "$status"
