// Cross-GPU signalling over NVLink: release/acquire flags with system scope, and a bounded
// spin-wait. A flag holds a monotonically growing epoch, so flags never need resetting (which
// keeps replays of a captured CUDA graph correct: the epochs live on the device, not in the
// graph).
#pragma once

#include <cstdint>
#include <cstdio>

#include "nvl_watchdog.h"

namespace ep_ops::cuda {

// Orders this thread's earlier memory operations (and, after a block barrier, those of the whole
// block) before its later ones at GPU scope. acq_rel rather than sequentially consistent:
// __threadfence() is fence.sc, which costs far more and which release/acquire flags do not need.
__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* flag) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
  return value;
}

// The release store and add below order this thread's earlier writes before the flag and, being
// cumulative, every write it has seen through a block or warp barrier: a flag needs no fence of
// its own before them. A fence.acq_rel.sys there (the code before session 16) cost a second
// system-scope barrier per flag: 2 x H200, dispatch FP8 5-7 us, combine BF16 7-27 us, low-latency
// dispatch and combine (graph) 2.6 and 4.1 us more (BENCHMARKS.md, session 16).
__device__ __forceinline__ void store_release(uint64_t* flag, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

__device__ __forceinline__ void add_release(uint64_t* counter, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(counter), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ bool watchdog_tripped(const Watchdog& w) {
  return *reinterpret_cast<volatile const uint32_t*>(w.tripped) != 0u;
}

// The first wait to time out on a buffer reports it (printf for logs, the mapped record for the
// host); later ones only print. Kept out of line (static: one copy per kernel file) so the waits
// stay small in the hot kernels, and it takes the two pointers by value: a reference to the
// Watchdog inside a kernel's argument struct would make the compiler copy that whole struct to
// local memory at every launch (measured: +7 us on a low-latency dispatch under CUDA graphs).
static __device__ __noinline__ void trip_watchdog(uint32_t* tripped, WaitFailure* failure, int rank,
                                                  int peer, int32_t phase, uint64_t target,
                                                  uint64_t waited_ns) {
  printf("ep_ops: rank %d timed out after %.1f s waiting for rank %d (%s, counter %llu)\n", rank,
         static_cast<double>(waited_ns) * 1e-9, peer, wait_phase_name(phase),
         static_cast<unsigned long long>(target));
  if (atomicCAS(tripped, 0u, 1u) != 0u) return;
  volatile WaitFailure* record = failure;
  record->rank = rank;
  record->peer = peer;
  record->phase = phase;
  record->target = target;
  record->waited_ns = waited_ns;
  __threadfence_system();  // the fields before the flag the host polls
  record->failed = 1;
  __threadfence_system();
}

// Waits until *flag >= target and returns true; returns false when the buffer's timeout passes
// first (the watchdog trips, naming this rank, the peer and the phase) or when an earlier wait on
// the buffer tripped it. On false the caller must stop without touching the peers' data.
__device__ __forceinline__ bool wait_at_least(const Watchdog& w, const uint64_t* flag,
                                              uint64_t target, int rank, int peer,
                                              WaitPhase phase) {
  if (load_acquire(flag) >= target) return true;
  const uint64_t start = global_ns();
  for (uint32_t spins = 1;; ++spins) {
    if (load_acquire(flag) >= target) return true;
    if (spins % 256 != 0) continue;  // the clock and the trip word now and then, not every poll
    if (watchdog_tripped(w)) return false;
    const uint64_t waited = global_ns() - start;
    if (waited > w.timeout_ns) {
      trip_watchdog(w.tripped, w.record, rank, peer, phase, target, waited);
      return false;
    }
  }
}

// A block barrier that also tells whether every thread's waits succeeded: false means return
// now. (A wait whose flag is already set succeeds even on a tripped buffer: what follows then
// moves stale data within the buffer's bounds, which the host reports at the next call; reading
// the trip word here as well would put one more memory round trip on every healthy call.)
__device__ __forceinline__ bool block_waits_ok(bool ok) { return __syncthreads_and(ok) != 0; }

}  // namespace ep_ops::cuda
