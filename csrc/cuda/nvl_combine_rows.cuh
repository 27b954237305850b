// Combine's per-row work, shared by its two kernel shapes (nvl_combine.cu: separate send and
// receive kernels; nvl_combine_overlap.cu: one kernel of send and receive blocks), so both write
// the same bytes: a warp sends one received row back to its source rank, a warp sums one of our
// tokens' rows. All forceinline: the kernels pass members of their argument structs, which a call
// out of line would copy to local memory.
#pragma once

#include <cstdint>

#include "nvl_buffer.h"
#include "nvl_convert.cuh"
#include "nvl_permute.cuh"
#include "nvl_rows.cuh"

namespace ep_ops::cuda {

// The separate send kernel's blocks: combine_arrivals counts them (the overlapped send blocks add
// their share), so either shape may follow the other on one buffer.
constexpr int kCombineSendBlocks = 256;
// Receive tickets per combine on combine_recv_tickets: the last one posts the freed flags.
constexpr int kCombineRecvBlocks = 256;

struct CombineSendArgs {
  const uint8_t* x;
  const uint8_t* weights;
  const int32_t* prefix;
  int64_t payload, weight_bytes, row_bytes;
  const int64_t* pair_slot;  // combine_permuted: [N, num_pairs]; x is h, weights are probs [P]
  int num_pairs;
  bool self_direct;  // our own rows stay in x: recv reads them there (combine, not _permuted)
};

struct CombineRecvArgs {
  uint8_t* out;
  float* out_weights;
  const uint8_t* bias_0;
  const uint8_t* bias_1;
  const bool* in_rank;
  int32_t* positions;  // [num_tokens, R]: begin (separate kernels) or each receive block writes them
  const int32_t* prefix;
  int num_tokens, num_topk;
  int64_t payload, row_bytes;
  // self_direct: our own rows are read from x (payload) and weights (weight_bytes per row).
  const uint8_t* x;
  const uint8_t* weights;
  int64_t weight_bytes;
};

// Where the rows rank d sends back start in source s's combine region: s's rows to lower ranks
// come first.
__device__ __forceinline__ int64_t combine_stream_start(const int32_t* prefix, int R, int s,
                                                        int d) {
  int64_t start = 0;
  for (int r = 0; r < d; ++r) start += rows_sent(prefix, R, s, r);
  return start;
}

// Sends received row n (from source rank s) to `dst`, its row in s's combine region: the payload
// and the weights (combine), or the sum of its pairs' rows of h and their probs
// (combine_permuted). kStage: payload int4s a lane loads before it stores (a load may not pass an
// earlier store, so each stage costs one memory latency). after_first_loads() runs, on every
// lane, once the first stage's loads are issued.
template <typename T, int kStage, typename AfterFirstLoads>
__device__ __forceinline__ void combine_send_row(const CombineSendArgs& a, int64_t n, uint8_t* dst,
                                                 int lane, AfterFirstLoads&& after_first_loads) {
  if (a.pair_slot) {
    after_first_loads();
    const int64_t* slots = a.pair_slot + n * a.num_pairs;
    warp_sum_pairs<T>(dst, a.x, slots, a.num_pairs, a.payload, lane);
    if (a.weights) {
      warp_gather_pairs(reinterpret_cast<float*>(dst + a.payload),
                        reinterpret_cast<const float*>(a.weights), slots, a.num_pairs, lane);
    }
    return;
  }
  const uint8_t* weights = a.weights ? a.weights + n * a.weight_bytes : nullptr;
  FieldWords weight_words;
  if (weights) weight_words.load(weights, a.weight_bytes, lane);
  const auto* src = reinterpret_cast<const int4*>(a.x + n * a.payload);
  auto* out = reinterpret_cast<int4*>(dst);
  const int64_t count = a.payload / 16;
  for (int64_t first = 0; first < count; first += 32 * kStage) {
    int4 v[kStage];
    load_stage(v, src, first, count, lane);
    if (first == 0) after_first_loads();
    store_stage(out, v, first, count, lane);
  }
  if (count == 0) after_first_loads();
  if (weights) weight_words.store(dst + a.payload, weights, a.weight_bytes, lane);
}

// Where each of our tokens' rows is, for the receive: the start of each destination's rows in our
// region and of our own rows in x (self_direct).
struct CombinePlaces {
  const uint8_t* region;
  int64_t block[kMaxNvlRanks];
  int64_t own_begin;
};

__device__ __forceinline__ CombinePlaces combine_places(const PeerView& v,
                                                        const CombineRecvArgs& a) {
  const int me = v.rank, R = v.num_ranks;
  CombinePlaces p{v.combine_region(me), {}, rows_before(a.prefix, R, me, me)};
  int64_t running = 0;
  for (int d = 0; d < R; ++d) {
    p.block[d] = running;
    running += rows_sent(a.prefix, R, me, d);
  }
  return p;
}

// Token `token`'s row from destination d: its payload, then its weights.
__device__ __forceinline__ const uint8_t* combine_row(const CombineRecvArgs& a,
                                                      const CombinePlaces& p, int me, int R,
                                                      int64_t token, int d, const float** weights) {
  const int64_t position = a.positions[token * R + d];
  if (a.x != nullptr && d == me) {
    const int64_t n = p.own_begin + position;
    *weights = reinterpret_cast<const float*>(a.weights + n * a.weight_bytes);
    return a.x + n * a.payload;
  }
  const uint8_t* row = p.region + (p.block[d] + position) * a.row_bytes;
  *weights = reinterpret_cast<const float*>(row + a.payload);
  return row;
}

// out[token] = its rows summed over destination ranks in ascending order (float32), then bias_0,
// then bias_1, rounded once; out_weights[token] likewise without biases.
// kMaxRanks: R <= kMaxRanks (an instance for 2 ranks keeps every row of a round in registers).
// A lane sums kUnroll 16-byte chunks of the token per round, with the loads of all of them (from
// every destination and both biases) issued before any sum: one memory latency per round instead
// of one per chunk (a load may not pass the previous chunk's store, which the compiler cannot
// tell apart from it). More ranks: one chunk per round (its R + 2 loads together).
// kConcurrent: peers may still be writing other rows of our region (the overlapped combine): the
// rows are read through L2 only, as an L1 line may hold the unwritten end of a neighbouring row.
template <typename T, int kMaxRanks, bool kConcurrent>
__device__ __forceinline__ void combine_recv_token(const CombineRecvArgs& a, const CombinePlaces& p,
                                                   int me, int R, int64_t token, int lane) {
  constexpr int kElems = 16 / sizeof(T);
  constexpr int kUnroll = kMaxRanks <= 2 ? 4 : 1;
  const auto load = [](const int4* at) { return kConcurrent ? __ldcg(at) : *at; };
  const uint8_t* rows[kMaxRanks];  // the token's row from each destination, null if none
  const float* weights[kMaxRanks];
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    rows[d] = d < R && a.in_rank[token * R + d] ? combine_row(a, p, me, R, token, d, &weights[d])
                                                : nullptr;
  }
  const uint8_t* biases[2] = {a.bias_0 ? a.bias_0 + token * a.payload : nullptr,
                              a.bias_1 ? a.bias_1 + token * a.payload : nullptr};
  const int64_t n = a.payload / 16;
  for (int64_t first = lane; first < n; first += 32 * kUnroll) {
    // Every load of the round first (rows, then biases), then the sums in the fixed order.
    int4 raw[kMaxRanks + 2][kUnroll];
#pragma unroll
    for (int d = 0; d < kMaxRanks + 2; ++d) {
      const uint8_t* src = d < kMaxRanks ? rows[d] : biases[d - kMaxRanks];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t chunk = first + 32 * u;
        if (src && chunk < n)
          raw[d][u] = d < kMaxRanks ? load(reinterpret_cast<const int4*>(src) + chunk)
                                    : reinterpret_cast<const int4*>(src)[chunk];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = first + 32 * u;
      if (chunk >= n) break;
      float acc[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
#pragma unroll
      for (int d = 0; d < kMaxRanks + 2; ++d) {
        const uint8_t* src = d < kMaxRanks ? rows[d] : biases[d - kMaxRanks];
        if (!src) continue;
        const T* vals = reinterpret_cast<const T*>(&raw[d][u]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] += Convert<T>::to_float(vals[e]);
      }
      int4 packed;
      T* outs = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int e = 0; e < kElems; ++e) outs[e] = Convert<T>::from_float(acc[e]);
      reinterpret_cast<int4*>(a.out + token * a.payload)[chunk] = packed;
    }
  }
  for (int k = lane; k < a.num_topk && a.out_weights; k += 32) {
    float acc = 0.f;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (rows[d]) acc += kConcurrent ? __ldcg(weights[d] + k) : weights[d][k];
    }
    a.out_weights[token * a.num_topk + k] = acc;
  }
}

}  // namespace ep_ops::cuda
