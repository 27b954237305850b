// Each token's index among this rank's tokens bound for each destination rank (an exclusive
// scan down the columns of is_token_in_rank), by one block (1024 threads in notify and begin, 512
// in each receive block of the overlapped combine). A generic scan over a [T, R] tensor's outer
// dimension costs ~230 us at T = 4096.
//
// One block, a few KB in and out: latency is what counts. The previous version (8 columns
// whatever R, a 10-step Hillis-Steele scan across the threads in 32 KB of shared memory with two
// barriers a step, byte loads and stores) left begin_kernel, little more than this scan, at 13.5 us
// per call (H200, torch profiler, T = 4096, R = 2; 2026-11-22). With this one begin_kernel takes
// 5.9 us and notify_kernel 19.9 us instead of 27.5 (same machine and day, BENCHMARKS.md):
//  - R is a template parameter (one instance per R up to kMaxNvlRanks): only R columns, and each
//    byte's column known at compile time, so the counts stay in registers.
//  - A thread takes a run of whole groups of 4 tokens: 4R bytes in (R words, by the widest vector
//    loads that 4R and in_rank's alignment allow), 4R positions out (R int4 stores). At T = 4096
//    that is one group per thread. The tail group, and every group when a pointer is misaligned,
//    go by bytes. For large T the vector loop is unrolled so that several groups' loads overlap.
//  - Across threads, per column: a 5-step shuffle scan in each warp, then warp 0 scans the (up to)
//    32 warp sums (1 KB of shared memory). 3 block barriers in all, the last one on the way out.
//  - Each thread reads its bytes twice (to count, then to write); for small T the second read
//    should hit L1.
#pragma once

#include <cstdint>

#include "nvl_buffer.h"

namespace ep_ops::cuda {

constexpr int kScanThreads = 1024;

namespace positions_detail {

constexpr int kMaxWarps = 32;  // warp 0 scans the warp sums, one per lane
constexpr int kGroup = 4;      // tokens per group: 4R bytes, a whole number of 4-byte words

// The widest load that divides a group's 4R bytes; in_rank must be aligned to it.
template <int R>
constexpr int kLoadBytes = R % 4 == 0 ? 16 : (R % 2 == 0 ? 8 : 4);

template <int R>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[R]) {
#pragma unroll
  for (int i = 0; i < R; i += kLoadBytes<R> / 4) {
    if constexpr (kLoadBytes<R> == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + 4 * i));
      w[i] = v.x, w[i + 1] = v.y, w[i + 2] = v.z, w[i + 3] = v.w;
    } else if constexpr (kLoadBytes<R> == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p + 4 * i));
      w[i] = v.x, w[i + 1] = v.y;
    } else {
      w[i] = __ldg(reinterpret_cast<const uint32_t*>(p + 4 * i));
    }
  }
}

// The group's bytes of its first `n` tokens (zeros after), one byte load each.
template <int R>
__device__ __forceinline__ void load_bytes(const uint8_t* p, int64_t n, uint32_t (&w)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) w[i] = 0;
#pragma unroll
  for (int j = 0; j < kGroup * R; ++j) {
    if (j / R < n) w[j / 4] |= static_cast<uint32_t>(p[j]) << (8 * (j % 4));
  }
}

template <int R>
__device__ __forceinline__ uint32_t byte_at(const uint32_t (&w)[R], int j) {
  return (w[j / 4] >> (8 * (j % 4))) & 0xff;
}

// Calls f(t, w, full) for each group of this thread's tokens [begin, end): t its first token, w
// its bytes, full whether it came by vector loads (then all its 4 tokens exist).
template <int R, typename F>
__device__ __forceinline__ void for_each_group(const uint8_t* in, int64_t begin, int64_t end,
                                               bool vector, F&& f) {
  int64_t t = begin;
  if (vector) {
#pragma unroll 4
    for (; t + kGroup <= end; t += kGroup) {
      uint32_t w[R];
      load_words<R>(in + t * R, w);
      f(t, w, true);
    }
  }
  for (; t < end; t += kGroup) {  // the tail group, or every group when misaligned
    uint32_t w[R];
    load_bytes<R>(in + t * R, end - t, w);
    f(t, w, false);
  }
}

// Inclusive scan of x across the warp's lanes.
__device__ __forceinline__ int32_t warp_scan(int32_t x, int lane) {
#pragma unroll
  for (int s = 1; s < 32; s *= 2) {
    const int32_t y = __shfl_up_sync(0xffffffffu, x, s);
    if (lane >= s) x += y;
  }
  return x;
}

template <int kThreads, int R, typename Keep>
__device__ __forceinline__ void scan(const bool* in_rank, int num_tokens, int32_t* positions,
                                     int32_t* totals, int32_t (&warp_sums)[kMaxNvlRanks][kMaxWarps],
                                     const Keep& keep) {
  static_assert(kThreads % 32 == 0 && kThreads / 32 <= kMaxWarps);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const auto* in = reinterpret_cast<const uint8_t*>(in_rank);
  const int groups = (num_tokens + kGroup - 1) / kGroup;
  const int per_thread = (groups + kThreads - 1) / kThreads;
  const int64_t begin = static_cast<int64_t>(min(groups, tid * per_thread)) * kGroup;
  const int64_t end = min(static_cast<int64_t>(num_tokens), begin + per_thread * kGroup);
  const bool vector = reinterpret_cast<uintptr_t>(in) % kLoadBytes<R> == 0 &&
                      reinterpret_cast<uintptr_t>(positions) % 16 == 0;

  int32_t count[R];
#pragma unroll
  for (int d = 0; d < R; ++d) count[d] = 0;
  for_each_group<R>(in, begin, end, vector, [&](int64_t, const uint32_t (&w)[R], bool) {
#pragma unroll
    for (int j = 0; j < kGroup * R; ++j) count[j % R] += byte_at<R>(w, j);
  });

  // Threads' counts to their exclusive prefixes: within the warp, then over the warps.
  int32_t run[R];
#pragma unroll
  for (int d = 0; d < R; ++d) {
    run[d] = warp_scan(count[d], lane);
    if (lane == 31) warp_sums[d][warp] = run[d];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int d = 0; d < R; ++d) {
      const int32_t mine = lane < kThreads / 32 ? warp_sums[d][lane] : 0;
      const int32_t through = warp_scan(mine, lane);
      warp_sums[d][lane] = through - mine;
      if (lane == 31 && totals != nullptr) totals[d] = through;
    }
  }
  __syncthreads();
#pragma unroll
  for (int d = 0; d < R; ++d) run[d] += warp_sums[d][warp] - count[d];

  for_each_group<R>(in, begin, end, vector, [&](int64_t t, const uint32_t (&w)[R], bool full) {
    if (!keep(t)) {  // a group the caller does not need: only its counts matter
#pragma unroll
      for (int j = 0; j < kGroup * R; ++j) run[j % R] += byte_at<R>(w, j);
      return;
    }
    int32_t out[kGroup * R];
#pragma unroll
    for (int j = 0; j < kGroup * R; ++j) {
      out[j] = run[j % R];
      run[j % R] += byte_at<R>(w, j);
    }
    int32_t* p = positions + t * R;
    if (full) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        *reinterpret_cast<int4*>(p + 4 * i) =
            make_int4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kGroup * R; ++j) {
        if (t + j / R < end) p[j] = out[j];
      }
    }
  });
}

// scan<R> for the runtime R (1 <= R <= kMaxNvlRanks).
template <int kThreads, int kR = 1, typename Keep>
__device__ __forceinline__ void scan_r(int R, const bool* in_rank, int num_tokens,
                                       int32_t* positions, int32_t* totals,
                                       int32_t (&warp_sums)[kMaxNvlRanks][kMaxWarps],
                                       const Keep& keep) {
  if (R == kR) {
    scan<kThreads, kR>(in_rank, num_tokens, positions, totals, warp_sums, keep);
  } else if constexpr (kR < kMaxNvlRanks) {
    scan_r<kThreads, kR + 1>(R, in_rank, num_tokens, positions, totals, warp_sums, keep);
  }
}

}  // namespace positions_detail

// Writes positions[t * R + d] (for every t < num_tokens and d < R, also where the token does not
// go to d) and, if totals is given, totals[d] (tokens bound for d). Must be called by all
// kThreads threads of the block, with 1 <= R <= kMaxNvlRanks; ends with a block barrier, so the
// outputs are visible to the block on return. keep(t) (t a multiple of 4): whether the caller
// needs tokens t..t+3; the others are counted but not written (the overlapped combine's receive
// blocks each write only the tokens they sum).
template <int kThreads = kScanThreads, typename Keep>
__device__ inline void token_positions(const bool* in_rank, int num_tokens, int R,
                                       int32_t* positions, int32_t* totals, const Keep& keep) {
  __shared__ int32_t warp_sums[kMaxNvlRanks][positions_detail::kMaxWarps];
  positions_detail::scan_r<kThreads>(R, in_rank, num_tokens, positions, totals, warp_sums, keep);
  __syncthreads();
}

__device__ inline void token_positions(const bool* in_rank, int num_tokens, int R,
                                       int32_t* positions, int32_t* totals) {
  token_positions(in_rank, num_tokens, R, positions, totals, [](int64_t) { return true; });
}

}  // namespace ep_ops::cuda
