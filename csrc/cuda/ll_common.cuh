// Block-level building blocks of the low-latency kernels: which ranks a token goes to (a token's
// slot in every slab is its own index, so no slot scan is needed), a block-wide count scan, and the
// per-block start tickets and shares with which no block waits for another: every counter of
// LowLatencyControl grows by kLLUnit per launch, each block adding its share, and each block
// learns the launch's epoch from its own start ticket (dispatch and combine alike).
#pragma once

#include <cstdint>
#include <cstdio>

#include "ll_layout.h"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {

constexpr int kLLThreads = 512;
constexpr int kLLWarps = kLLThreads / 32;

// Bit d set when token t has an expert on rank d. The K ids are loaded together (one memory
// latency, not K). An expert id outside [-1, num_experts) is a caller bug the host cannot check
// without a sync: the kernel stops with a message (like PyTorch's device-side index asserts).
__device__ __forceinline__ uint32_t token_rank_mask(const int64_t* topk_idx, int64_t t, int K,
                                                    int64_t num_experts, int64_t per_rank) {
  constexpr int kBatch = 8;
  uint32_t mask = 0;
  bool bad = false;
  for (int k0 = 0; k0 < K; k0 += kBatch) {
    int64_t ids[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) ids[i] = k0 + i < K ? __ldg(topk_idx + t * K + k0 + i) : -1;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      bad |= ids[i] < -1 || ids[i] >= num_experts;
      if (ids[i] >= 0 && ids[i] < num_experts) mask |= 1u << static_cast<int>(ids[i] / per_rank);
    }
  }
  if (bad) {
    printf("ep_ops: topk_idx row %lld holds an expert id outside [-1, %lld)\n",
           static_cast<long long>(t), static_cast<long long>(num_experts));
    __trap();
  }
  return mask;
}

// Exclusive count of `flag` over the block's threads in thread order; *total gets the sum.
// Called by every thread; `warp_sums` is shared scratch of kLLWarps ints.
__device__ inline int block_exclusive_count(bool flag, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
  const int before_in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_sums[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kLLWarps; ++w) {
    if (w < warp) before += warp_sums[w];
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused right after
  *total = sum;
  return before + before_in_warp;
}

// This block's share of a counter's unit: 1, and block 0 the rest, so that a launch
// adds exactly kLLUnit whatever its grid (up to kLLUnit blocks).
__device__ __forceinline__ uint64_t block_share() {
  return blockIdx.x == 0 ? kLLUnit - (gridDim.x - 1) : 1;
}

// A launch's epoch without a grid-wide barrier: one thread of every block adds the block's share
// to the local counter as the block starts and gets the value before. Launches on a stream do not
// overlap, so every block of the n-th launch sees a value in [n * kLLUnit, (n + 1) * kLLUnit):
// value / kLLUnit = n. The block whose add completes the unit is the last to start; acq_rel
// orders each block's earlier reads (the layout key and send counters of drain_if_moved) before
// its add.
__device__ __forceinline__ uint64_t take_start_ticket(uint64_t* counter) {
  uint64_t before;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;"
               : "=l"(before)
               : "l"(counter), "l"(block_share())
               : "memory");
  return before;
}
__device__ __forceinline__ bool completes_unit(uint64_t ticket) {
  return (ticket + block_share()) % kLLUnit == 0;
}

// One thread per peer (threadIdx.x < num_ranks), after a block barrier: add the block's share to
// that peer's counter (and to `also`, if given), ordered after everything the block wrote or read
// there before.
__device__ __forceinline__ void add_share_release(uint64_t* counter, uint64_t* also = nullptr) {
  add_release(counter, block_share());
  if (also != nullptr) add_release(also, block_share());
}

// What a block with start ticket `ticket` waits for on the peers' counters: everything before its
// launch (the previous sends' slabs read), or its launch's whole unit (every block of the peer's
// matching launch has added its share).
__device__ __forceinline__ uint64_t units_before(uint64_t ticket) { return ticket / kLLUnit * kLLUnit; }
__device__ __forceinline__ uint64_t unit_done(uint64_t ticket) { return units_before(ticket) + kLLUnit; }

// One thread's wait (no barrier; the caller ends with block_waits_ok): source `source`'s send into
// our slab `which` of `phase` that our read with start ticket `ticket` is for has fully arrived.
__device__ __forceinline__ bool wait_unit_arrived(const PeerView& v, int phase, int which,
                                                  int source, uint64_t ticket, WaitPhase what) {
  const LowLatencyControl* mine = ll_control(v.base[v.rank]);
  return wait_at_least(v.watchdog, &mine->arrivals[phase][which][source], unit_done(ticket),
                       v.rank, source, what);
}

// One thread's wait (no barrier): receiver `peer` has read every earlier send of ours into slab
// `which` of `phase` (our send with start ticket `ticket` may overwrite it).
__device__ __forceinline__ bool wait_peer_freed(const PeerView& v, int phase, int which, int peer,
                                                uint64_t ticket, WaitPhase what) {
  const LowLatencyControl* mine = ll_control(v.base[v.rank]);
  return wait_at_least(v.watchdog, &mine->freed[phase][which][peer], units_before(ticket), v.rank,
                       peer, what);
}

// The sending side: every receiver has read what we sent into slab `which` before.
__device__ inline bool wait_freed(const PeerView& v, int phase, int which, uint64_t sends_before,
                                  WaitPhase what) {
  const int me = v.rank;
  const LowLatencyControl* mine = ll_control(v.base[me]);
  const bool ok = threadIdx.x >= v.num_ranks ||
                  wait_at_least(v.watchdog, &mine->freed[phase][which][threadIdx.x], sends_before,
                                me, threadIdx.x, what);
  return block_waits_ok(ok);
}

// The sending side, when this send's slab layout differs from the last send's: every receiver
// has read everything we sent into any slab of any phase, so that none is still reading where the
// new offsets put rows. Every block of a send calls drain_if_moved at its start, *before* taking
// its start ticket: the send counters it reads then hold only whole units (the running launch's
// unit is incomplete without this block's share), so it never waits for its own launch's rows.
// The key is recorded after every block has read the old one, by the block whose start ticket
// completes the unit (completes_unit).
// Out of line (the drain is rare: its loop stays out of the hot kernels' code); it takes
// plain values, not a reference into the kernel's argument struct (see trip_watchdog).
static __device__ __noinline__ bool wait_all_freed(const LowLatencyControl* mine, uint32_t* tripped,
                                                   WaitFailure* record, uint64_t timeout_ns,
                                                   int me, int R) {
  const Watchdog w{tripped, record, nullptr, timeout_ns};
  bool ok = true;
  for (int i = threadIdx.x; i < kLLPhases * 2 * R; i += blockDim.x) {
    const int phase = i / (2 * R), which = (i / R) % 2, peer = i % R;
    const uint64_t sent = units_before(mine->sends[phase][which]);
    ok = ok && wait_at_least(w, &mine->freed[phase][which][peer], sent, me, peer,
                             kWaitLowLatencyAllFreed);
  }
  return block_waits_ok(ok);
}

// Every thread of the block calls, before the block's start ticket on a send counter. false: a
// wait gave up (the watchdog tripped), return at once.
__device__ inline bool drain_if_moved(const PeerView& v, int64_t key) {
  const bool moved =
      __syncthreads_or(threadIdx.x == 0 && ll_control(v.base[v.rank])->layout_key != key) != 0;
  return !moved || wait_all_freed(ll_control(v.base[v.rank]), v.watchdog.tripped, v.watchdog.record,
                                   v.watchdog.timeout_ns, v.rank, v.num_ranks);
}

}  // namespace ep_ops::cuda
