// Each token's index among this rank's tokens bound for each destination rank (an exclusive
// scan down the columns of is_token_in_rank), by one block of 1024 threads. A generic scan over
// a [T, R] tensor's outer dimension costs ~230 us at T = 4096; this costs a few.
#pragma once

#include <cstdint>

#include "nvl_buffer.h"

namespace ep_ops::cuda {

constexpr int kScanThreads = 1024;

// Writes positions[t * R + d] and, if totals is given, totals[d] (tokens bound for d). Must be
// called by all kScanThreads threads of the block.
__device__ inline void token_positions(const bool* in_rank, int num_tokens, int R,
                                       int32_t* positions, int32_t* totals) {
  __shared__ int32_t scan[kMaxNvlRanks][kScanThreads];
  const int tid = threadIdx.x;
  const int chunk = (num_tokens + kScanThreads - 1) / kScanThreads;
  const int begin = min(num_tokens, tid * chunk), end = min(num_tokens, begin + chunk);
  int32_t local[kMaxNvlRanks];
#pragma unroll
  for (int d = 0; d < kMaxNvlRanks; ++d) local[d] = 0;
  for (int t = begin; t < end; ++t) {
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) {
      if (d < R) local[d] += in_rank[static_cast<int64_t>(t) * R + d];
    }
  }
#pragma unroll
  for (int d = 0; d < kMaxNvlRanks; ++d) scan[d][tid] = local[d];
  __syncthreads();
  for (int step = 1; step < kScanThreads; step *= 2) {  // inclusive scan across threads
    int32_t add[kMaxNvlRanks];
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) add[d] = tid >= step ? scan[d][tid - step] : 0;
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) scan[d][tid] += add[d];
    __syncthreads();
  }
  int32_t running[kMaxNvlRanks];
#pragma unroll
  for (int d = 0; d < kMaxNvlRanks; ++d) running[d] = scan[d][tid] - local[d];
  for (int t = begin; t < end; ++t) {
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) {
      if (d >= R) continue;
      const int64_t at = static_cast<int64_t>(t) * R + d;
      positions[at] = running[d];
      running[d] += in_rank[at];
    }
  }
  if (totals != nullptr && tid < R) totals[tid] = scan[tid][kScanThreads - 1];
  __syncthreads();
}

}  // namespace ep_ops::cuda
