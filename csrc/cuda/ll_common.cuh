// Block-level building blocks of the low-latency kernels: which ranks a token goes to (a token's
// slot in every slab is its own index, so no slot scan is needed), a block-wide count scan, and the
// per-block epochs and shares with which no block waits for another: every counter of
// LowLatencyControl grows by kLLUnit per launch, each block adding its share, and each block
// learns the launch's epoch from the counter as it starts (begin_launch; dispatch and combine
// alike).
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

// A launch's epoch without a grid-wide barrier, the slow way (begin_launch takes it so only when
// the layout moved): one thread of every block adds the block's share to the local counter and
// gets the value before. Launches on a stream do not overlap, so every block of the n-th launch
// sees a value in [n * kLLUnit, (n + 1) * kLLUnit): value / kLLUnit = n. The block whose add
// completes the unit is the last to start; acq_rel orders each block's earlier reads (the layout
// key and send counters of the drain) before its add.
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

// What a block with epoch `ticket` (begin_launch) waits for on the peers' counters: everything
// before its launch (the previous sends' slabs read), or its launch's whole unit (every block of
// the peer's matching launch has added its share).
__device__ __forceinline__ uint64_t units_before(uint64_t ticket) { return ticket / kLLUnit * kLLUnit; }
__device__ __forceinline__ uint64_t unit_done(uint64_t ticket) { return units_before(ticket) + kLLUnit; }

// One thread's wait (no barrier; the caller ends with block_waits_ok): source `source`'s send into
// our slab `which` of `phase` that our read with epoch `ticket` is for has fully arrived.
__device__ __forceinline__ bool wait_unit_arrived(const PeerView& v, int phase, int which,
                                                  int source, uint64_t ticket, WaitPhase what) {
  const LowLatencyControl* mine = ll_control(v.base[v.rank]);
  return wait_at_least(v.watchdog, &mine->arrivals[phase][which][source], unit_done(ticket),
                       v.rank, source, what);
}

// One thread's wait (no barrier): receiver `peer` has read every earlier send of ours into slab
// `which` of `phase` (our send with epoch `ticket` may overwrite it).
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

// The sending side, when this send's slab layout differs from the last send's (begin_launch's
// slow path): every receiver has read everything we sent into any slab of any phase, so that none
// is still reading where the new offsets put rows. Every block drains before it adds its share to
// any counter: the send counters it reads then hold only whole units (the running launch's unit
// is incomplete without this block's share), so it never waits for its own launch's rows.
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

// The counters a launch's block takes its epochs on, one per phase it runs (nullptr: a phase it
// does not run; at[0] is the first send phase's when the launch sends), and what that send phase
// checks as it starts.
constexpr int kMaxStartCounters = 4;
struct StartCounters {
  uint64_t* at[kMaxStartCounters];
  const uint64_t* freed;  // our freed counters of the first send phase's slab, [R] (nullptr: none)
  int64_t key;            // that send's layout key (the launch sends when `freed` is set)
};

// What a block read as it started (shared memory): its epoch on each counter, and the receivers'
// freed counters of its first send phase.
struct LaunchStart {
  uint64_t epoch[kMaxStartCounters];
  uint64_t freed[kMaxNvlRanks];
};

// Every thread of the block calls it first. In one memory round trip and one barrier, the block
// reads its epoch on every counter (warp i's lane 0 reads at[i]), the layout key (thread 0) and
// the freed counters (warp 4), then adds its share to each counter without waiting for the add.
// Every block of the n-th launch reads a value in [n * kLLUnit, (n + 1) * kLLUnit): the unit is
// complete only once every block has added its share, which each does after its own read (the
// same word, so the read cannot see it). The drain check, atomic start tickets and freed wait one
// after the other cost the send ~1.3 us more than a bare send (scripts/ll_floor.cu, session 23).
// When the layout key moved (rare), the block drains instead (every receiver has read everything
// we sent into any slab of any phase, so that none is still reading where the new offsets put
// rows), reading our send counters before its share as the slow path needs; then it takes its
// epochs as atomic tickets, and the block whose ticket completes the unit records the new key
// (every block has read the old one before its ticket). Every block of a launch sees the same key:
// it changes only when all of them have taken their tickets. false: a wait gave up.
__device__ inline bool begin_launch(const PeerView& v, const StartCounters& c, LaunchStart& s) {
  LowLatencyControl* mine = ll_control(v.base[v.rank]);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // Constant indices only: c.at[warp] would put the struct in local memory.
  uint64_t* const counter = warp == 0   ? c.at[0]
                            : warp == 1 ? c.at[1]
                            : warp == 2 ? c.at[2]
                            : warp == 3 ? c.at[3]
                                        : nullptr;
  const bool takes = lane == 0 && counter != nullptr;
  const bool sends = c.freed != nullptr;
  bool moved = false;
  if (takes) s.epoch[warp] = *reinterpret_cast<volatile const uint64_t*>(counter);
  if (sends && threadIdx.x == 0) {
    moved = *reinterpret_cast<volatile const int64_t*>(&mine->layout_key) != c.key;
  }
  if (sends && warp == kMaxStartCounters && lane < v.num_ranks) s.freed[lane] = load_acquire(c.freed + lane);
  if (__syncthreads_or(moved) == 0) {
    if (takes) {
      asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(counter), "l"(block_share())
                   : "memory");
    }
    return true;
  }
  if (!wait_all_freed(mine, v.watchdog.tripped, v.watchdog.record, v.watchdog.timeout_ns, v.rank,
                      v.num_ranks)) {
    return false;
  }
  if (takes) s.epoch[warp] = take_start_ticket(counter);
  __syncthreads();
  if (threadIdx.x == 0 && completes_unit(s.epoch[0])) mine->layout_key = c.key;
  return true;
}

// The sending side, with the block's start: every receiver has read what we sent into the slab
// before (`sends_before`). The freed counters read at the start usually say so already: then no
// wait and no barrier.
__device__ inline bool wait_freed_since_start(const PeerView& v, const LaunchStart& s, int phase,
                                              int which, uint64_t sends_before, WaitPhase what) {
  bool seen = true;
  for (int d = 0; d < v.num_ranks; ++d) seen &= s.freed[d] >= sends_before;
  return seen || wait_freed(v, phase, which, sends_before, what);
}

}  // namespace ep_ops::cuda
