// Cross-GPU signalling over NVLink: release/acquire flags with system scope, and a bounded
// spin-wait. A flag holds a monotonically growing epoch, so flags never need resetting (which
// keeps replays of a captured CUDA graph correct: the epochs live on the device, not in the
// graph).
#pragma once

#include <cstdint>
#include <cstdio>

namespace ep_ops::cuda {

// ~10 s at ~2 GHz: far beyond any healthy wait, short enough that a dead peer ends the job.
constexpr long long kSpinTimeoutCycles = 20'000'000'000LL;

// Orders this thread's earlier memory operations (and, after a block barrier, those of the whole
// block) before its later ones, at system or GPU scope. acq_rel rather than sequentially
// consistent: __threadfence_system() / __threadfence() are fence.sc, which costs far more and which
// release/acquire flags do not need.
__device__ __forceinline__ void fence_system() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* flag) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
  return value;
}

__device__ __forceinline__ void store_release(uint64_t* flag, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

__device__ __forceinline__ void add_release(uint64_t* counter, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(counter), "l"(value) : "memory");
}

// Waits until *flag >= target. On timeout prints which rank waited for whom and for what, then
// traps: the kernel fails with an error instead of hanging the stream forever.
__device__ __forceinline__ void wait_at_least(const uint64_t* flag, uint64_t target, int rank,
                                              int peer, const char* what) {
  const long long start = clock64();
  while (load_acquire(flag) < target) {
    if (clock64() - start > kSpinTimeoutCycles) {
      printf("ep_ops: rank %d timed out waiting for rank %d (%s, epoch %llu)\n", rank, peer, what,
             static_cast<unsigned long long>(target));
      __trap();
    }
  }
}

}  // namespace ep_ops::cuda
