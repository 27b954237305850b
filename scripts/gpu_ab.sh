#!/usr/bin/env bash
# Same-machine A/B of source trees on a lent GPU machine: each tree is built in place (once; a
# tree with a .built file is reused), then the timing commands run on the trees alternately,
# ROUNDS times, so that drift of the machine shows as spread within a tree, not as a difference
# between trees. Timings of different machines are not comparable (BENCHMARKS.md).
#
# Usage: bash scripts/gpu_ab.sh TREE [TREE ...]
#   A TREE is a directory holding a copy of the repository, e.g. made on the CPU machine with
#     mkdir -p snap/base && git archive main | tar -x -C snap/base && ln -s ../meta snap/base/ep_ops/meta
#   (snap/ is carried to the device by the call; list it in .git/info/exclude).
# Environment:
#   AB_ROUNDS=2                    rounds over the trees
#   AB_RANKS=2                     ranks (GPUs 0..AB_RANKS-1)
#   AB_COMMANDS="bench profile_ll" which timings: bench (python3 -m ep_ops.bench), profile_ll
#                                  (scripts/profile_ll.py --no-profile: CUDA-graph times of the
#                                  low-latency ops), profile_nvl (scripts/profile_nvl.py: kernels)
#   AB_SITE=/tmp/site              extra PYTHONPATH entry (e.g. expecttest installed with --target)
#   MAX_JOBS                       compile jobs per tree (trees build in parallel; default
#                                  cores / trees)
# Logs go to $OUT (or ./ab-logs): build-<tree>.log, <command>-<tree>-r<round>.log, summary.txt.
set -uo pipefail
# Multicast off, the system compiler: why in gpu_env.sh.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_ab.sh TREE [TREE ...]"; exit 2; }
out=${OUT:-ab-logs}
mkdir -p "$out"
rounds=${AB_ROUNDS:-2}
ranks=${AB_RANKS:-2}
commands=${AB_COMMANDS:-bench profile_ll}
jobs=${MAX_JOBS:-$(($(nproc) / $#))}
status=0

note() {
  echo "$*" | tee -a "$out/summary.txt"
}

build() {  # build TREE: in place, once
  local tree=$1 name start=$SECONDS
  name=$(basename "$tree")
  if [ -f "$tree/.built" ]; then
    note "build $name: already built"
    return 0
  fi
  if (cd "$tree" && MAX_JOBS=$jobs python3 setup.py build_ext --inplace) > "$out/build-$name.log" 2>&1; then
    touch "$tree/.built"
    note "build $name: ok in $((SECONDS - start)) s"
  else
    note "build $name: FAILED (tail of $out/build-$name.log below)"
    tail -20 "$out/build-$name.log"
    return 1
  fi
}

timing() {  # timing COMMAND TREE ROUND
  local command=$1 tree=$2 round=$3 name log start=$SECONDS
  name=$(basename "$tree")
  log="$out/$command-$name-r$round.log"
  local args
  case $command in
    bench) args=(-m ep_ops.bench --ranks "$ranks") ;;
    profile_ll) args=(scripts/profile_ll.py --no-profile --ranks "$ranks") ;;
    profile_nvl) args=(scripts/profile_nvl.py --ranks "$ranks") ;;
    *) note "unknown command $command"; status=1; return ;;
  esac
  if (cd "$tree" && PYTHONPATH="$PWD:${AB_SITE:-/tmp/site}" timeout 300 python3 "${args[@]}") > "$log" 2>&1; then
    note "$command $name round $round: ok in $((SECONDS - start)) s"
  else
    note "$command $name round $round: FAILED (see $log)"
    status=1
  fi
}

pids=()
for tree in "$@"; do
  build "$tree" &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
[ "$status" -eq 0 ] || exit 1

for ((round = 1; round <= rounds; round++)); do
  for command in $commands; do
    for tree in "$@"; do
      timing "$command" "$tree" "$round"
    done
  done
done
exit "$status"
