// Block-level building blocks of the low-latency kernels: which ranks a token goes to, a
// token's slot among this rank's tokens for each destination, a block-wide count scan, the
// "last block out" ticket that lets one block signal the peers once every block is done (combine),
// and the per-block start tickets and shares with which no block waits for another (dispatch).
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

// counts[d] (shared, kMaxNvlRanks) = tokens before t bound for rank d: token t's slot in d's
// block. Called by every thread of the block.
__device__ inline void slots_before(const int64_t* topk_idx, int t, int K, int64_t num_experts,
                                    int64_t per_rank, int R, int* counts) {
  if (threadIdx.x < kMaxNvlRanks) counts[threadIdx.x] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int local[kMaxNvlRanks] = {};
  for (int first = warp * 32; first < t; first += warps * 32) {  // whole warps iterate alike
    const int u = first + lane;
    const uint32_t mask = u < t ? token_rank_mask(topk_idx, u, K, num_experts, per_rank) : 0u;
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) {
      if (d < R) local[d] += __popc(__ballot_sync(0xffffffffu, (mask >> d) & 1u));
    }
  }
  if (lane == 0) {
    for (int d = 0; d < R; ++d) {
      if (local[d] != 0) atomicAdd(&counts[d], local[d]);
    }
  }
  __syncthreads();
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

// True in exactly one block: the last to finish, which then sees every block's writes (after the
// block barrier one thread fences for the whole block, as cooperative groups' grid sync does; a
// fence per thread costs ~10 us over a grid). The ticket goes back to 0 for the next launch.
__device__ inline bool last_block_done(uint32_t* ticket) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_system();
    const uint32_t taken = atomicAdd(ticket, 1u);
    last = taken == gridDim.x - 1;
    if (last) {
      *ticket = 0;
      fence_system();
    }
  }
  __syncthreads();
  return last;
}

// This block's share of a dispatch counter's unit: 1, and block 0 the rest, so that a launch
// adds exactly kLLUnit whatever its grid (up to kLLUnit blocks).
__device__ __forceinline__ uint64_t block_share() {
  return blockIdx.x == 0 ? kLLUnit - (gridDim.x - 1) : 1;
}

// A launch's epoch without a grid-wide barrier: one thread of every block adds the block's share
// to the local counter as the block starts and gets the value before. Launches on a stream do not
// overlap, so every block of the n-th launch sees a value in [n * kLLUnit, (n + 1) * kLLUnit):
// value / kLLUnit = n. The block whose add completes the unit is the last to start; acq_rel
// orders each block's earlier reads (the layout key) before its add.
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
// that peer's counter, ordered after everything the block wrote or read there before.
__device__ __forceinline__ void add_share_release(uint64_t* counter) {
  fence_system();
  add_release(counter, block_share());
}

// The receiving side: every source's rows for our next read of slab `which` are in. Every
// thread of the block calls; false: a wait gave up (the watchdog tripped), return at once.
__device__ inline bool wait_arrivals(const PeerView& v, int phase, int which,
                                     uint64_t reads_before, WaitPhase what) {
  const int me = v.rank;
  const LowLatencyControl* mine = ll_control(v.base[me]);
  const bool ok = threadIdx.x >= v.num_ranks ||
                  wait_at_least(v.watchdog, &mine->arrivals[phase][which][threadIdx.x],
                                reads_before + 1, me, threadIdx.x, what);
  return block_waits_ok(ok);
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

// The sending side, when this send's slab layout (`key`) differs from the last send's: every
// receiver has read everything we sent into any slab of any phase, so that none is still reading
// where the new offsets put rows. Every block calls it at its start; the key is recorded after
// all blocks have read the old one: by the last block of a combine send (remember_layout), by the
// last block to take its start ticket in a dispatch (ll_dispatch.cu).
__device__ inline bool wait_all_freed(const PeerView& v) {
  const int me = v.rank, R = v.num_ranks;
  const LowLatencyControl* mine = ll_control(v.base[me]);
  bool ok = true;
  for (int i = threadIdx.x; i < kLLPhases * 2 * R; i += blockDim.x) {
    const int phase = i / (2 * R), which = (i / R) % 2, peer = i % R;
    // Whole sends only: a dispatch launch in flight has added part of its unit (start tickets).
    const uint64_t sent = mine->sends[phase][which] / ll_unit(phase) * ll_unit(phase);
    ok = ok && wait_at_least(v.watchdog, &mine->freed[phase][which][peer], sent, me, peer,
                             kWaitLowLatencyAllFreed);
  }
  return block_waits_ok(ok);
}

__device__ inline bool wait_all_freed_if_moved(const PeerView& v, int64_t key) {
  if (ll_control(v.base[v.rank])->layout_key == key) return true;
  return wait_all_freed(v);
}

__device__ inline void remember_layout(LowLatencyControl* mine, int64_t key) {
  if (threadIdx.x == 0) mine->layout_key = key;
}

// Last block of a sender: tell every receiver our rows of this send are in.
__device__ inline void post_arrivals(const PeerView& v, int phase, int which) {
  LowLatencyControl* mine = ll_control(v.base[v.rank]);
  const uint64_t sent = mine->sends[phase][which] + 1;
  __syncthreads();
  if (threadIdx.x < v.num_ranks) {
    fence_system();  // this block's own writes (seen through the barrier), before the flag
    store_release(&ll_control(v.base[threadIdx.x])->arrivals[phase][which][v.rank], sent);
  }
  __syncthreads();
  if (threadIdx.x == 0) mine->sends[phase][which] = sent;
}

// Last block of a receiver: tell every source we are done reading its rows in this slab.
__device__ inline void post_freed(const PeerView& v, int phase, int which) {
  LowLatencyControl* mine = ll_control(v.base[v.rank]);
  const uint64_t read = mine->recvs[phase][which] + 1;
  __syncthreads();
  if (threadIdx.x < v.num_ranks) {
    fence_system();
    store_release(&ll_control(v.base[threadIdx.x])->freed[phase][which][v.rank], read);
  }
  __syncthreads();
  if (threadIdx.x == 0) mine->recvs[phase][which] = read;
}

}  // namespace ep_ops::cuda
