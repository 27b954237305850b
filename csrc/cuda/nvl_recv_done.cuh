// The end of a receive (dispatch or combine): the last of its blocks to finish tells every
// source that its rows in our buffer are consumed. A ticket in the buffer counts the blocks
// (cumulative, never reset, so graph replays stay in step); every receiving kernel that ends a
// dispatch runs kDispatchRecvBlocks tickets' worth of blocks (a combine kCombineRecvBlocks) and
// takes its tickets once per block.
#pragma once

#include "nvl_buffer.h"
#include "nvl_dispatch.h"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {

// Called by every thread of the block after its last read of the dispatch region. A kernel with
// fewer blocks (the overlapped dispatch and combine) has block i add tickets_for_block(i, blocks,
// total): the tickets of one call still sum to `total` (kDispatchRecvBlocks here; the combine's
// own count for its tickets), and only the last add lands on a multiple of it.
__host__ __device__ inline uint64_t tickets_for_block(int block, int blocks, int total = kDispatchRecvBlocks) {
  return total / blocks + (block < total % blocks ? 1 : 0);
}

// Thread 0 of a block, after the block's last read (and a block barrier): adds the block's
// `tickets` to the cumulative `counter` and returns true for the block whose add lands on a
// multiple of `total`, the call's last block, which then sees every other block's reads and
// counter resets (made before their tickets) done. Receive ends use it, and the overlapped
// combine's end over all its blocks.
__device__ inline bool last_block_done(uint64_t* counter, uint64_t tickets, int total) {
  fence_gpu();
  const uint64_t ticket = atomicAdd(reinterpret_cast<unsigned long long*>(counter), tickets) + tickets;
  if (ticket % total != 0) return false;
  fence_gpu();
  return true;
}

__device__ inline void dispatch_recv_block_done(const PeerView& v, uint64_t epoch,
                                                uint64_t tickets = 1) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const int me = v.rank;
    Control* mine = v.control(me);
    if (last_block_done(&mine->dispatch_recv_tickets, tickets, kDispatchRecvBlocks)) {
      for (int s = 0; s < v.num_ranks; ++s) store_release(&v.control(s)->dispatch_freed[me], epoch);
    }
  }
}

}  // namespace ep_ops::cuda
