// Dispatch's per-row work, shared by the two kernel shapes (nvl_dispatch.cu: separate send and
// receive kernels; nvl_dispatch_overlap.cu: one kernel with send and receive blocks), so both
// write the same bytes: a warp sends one token's row to one destination, a warp turns one row of
// the local buffer into the outputs. All forceinline: the kernels pass members of their argument
// structs, which a call out of line would copy to local memory.
#pragma once

#include <cstdint>

#include "nvl_buffer.h"
#include "nvl_rows.cuh"

namespace ep_ops::cuda {

constexpr int kMaxLocalExperts = 1024;

struct DispatchSendArgs {
  const uint8_t* x;
  const uint8_t* scales;
  const uint8_t* topk;
  const uint8_t* weights;
  const bool* in_rank;
  const int32_t* positions;  // [T, R]: the token's index among our tokens for each destination
  const int32_t* prefix;     // rank_prefix_matrix [R, R]
  int num_tokens;
  RowLayout row;
  int64_t scale_bytes, topk_bytes, weight_bytes;  // unpadded source widths
};

struct DispatchRecvArgs {
  uint8_t* recv_x;
  float* recv_scales;
  int64_t* recv_topk;
  float* recv_weights;
  int32_t* recv_src;
  int32_t* expert_counts;  // [E_local], zeroed by the host
  const int32_t* prefix;
  int64_t num_rows;        // rows of the outputs (N, or num_worst_tokens)
  RowLayout row;
  int num_scales, num_topk, experts_per_rank;
  // false: the routing pass of dispatch_permuted (recv_x null): the rows stay in the buffer for
  // its permuted copy, which posts the freed flags instead.
  bool post_freed;
  // The overlapped dispatch's rows to ourselves: own_tokens[j] is the token at position j of our
  // stream to ourselves, whose row is copied from the send inputs (TokenRow) instead of through
  // our own buffer; null: every stream goes through the buffer.
  const int32_t* own_tokens;
};

// Token t's row index in destination d's dispatch region: rows of lower sources first.
__device__ __forceinline__ int64_t dispatch_row_index(const DispatchSendArgs& a, int me, int R, int t,
                                                      int d) {
  return rows_before(a.prefix, R, me, d) + a.positions[static_cast<int64_t>(t) * R + d];
}

// The warp writes token t's row at dst (a peer's or our own dispatch region).
__device__ __forceinline__ void dispatch_send_row(const DispatchSendArgs& a, int t, uint8_t* dst,
                                                  int lane) {
  warp_copy(dst, a.x + t * a.row.payload, a.row.payload, lane);
  if (a.scales) warp_copy_words(dst + a.row.scales_at(), a.scales + t * a.scale_bytes, a.scale_bytes, lane);
  if (a.topk) warp_copy_words(dst + a.row.topk_at(), a.topk + t * a.topk_bytes, a.topk_bytes, lane);
  if (a.weights) {
    warp_copy_words(dst + a.row.weights_at(), a.weights + t * a.weight_bytes, a.weight_bytes, lane);
  }
  if (lane == 0) *reinterpret_cast<int32_t*>(dst + a.row.src_at()) = t;
}

// Output row n past the received rows (worst-token padding).
__device__ __forceinline__ void dispatch_recv_padding(const DispatchRecvArgs& a, int64_t n, int lane) {
  uint8_t* out = a.recv_x + n * a.row.payload;
  for (int64_t i = lane; i < a.row.payload / 16 && a.recv_x; i += 32) reinterpret_cast<int4*>(out)[i] = int4{0, 0, 0, 0};
  for (int i = lane; i < a.num_scales; i += 32) a.recv_scales[n * a.num_scales + i] = 0.f;
  for (int k = lane; k < a.num_topk && a.recv_topk; k += 32) a.recv_topk[n * a.num_topk + k] = -1;
  for (int k = lane; k < a.num_topk && a.recv_weights; k += 32) a.recv_weights[n * a.num_topk + k] = 0.f;
  if (lane == 0) a.recv_src[n] = -1;
}

// A field of a buffer row: through L2 only when a peer may be writing nearby during the kernel.
template <bool kConcurrent, typename T>
__device__ __forceinline__ T row_field(const T* p) {
  if constexpr (kConcurrent) {
    return __ldcg(p);
  } else {
    return *p;
  }
}

// Where a received row is read from: a row of the dispatch region (BufferRow), or, for the rows
// a rank sends itself in the overlapped dispatch, the token's row of the send inputs (TokenRow).
// Both give the same bytes: the sender copies exactly these fields into the buffer row.
// kConcurrent: peers are still writing other rows of the region during this kernel (the
// overlapped dispatch): every read skips L1, whose lines may hold the unwritten end of a
// neighbouring row fetched earlier; false: the rows were complete before this kernel's waits.
template <bool kConcurrent>
struct BufferRow {
  const uint8_t* row;
  const RowLayout& layout;
  __device__ __forceinline__ void copy_payload(uint8_t* dst, int lane) const {
    warp_copy</*kReadOnly=*/!kConcurrent, /*kSkipL1=*/kConcurrent>(dst, row, layout.payload, lane);
  }
  __device__ __forceinline__ float scale(int i) const {
    return row_field<kConcurrent>(reinterpret_cast<const float*>(row + layout.scales_at()) + i);
  }
  __device__ __forceinline__ int64_t expert(int k) const {
    return row_field<kConcurrent>(reinterpret_cast<const long long*>(row + layout.topk_at()) + k);
  }
  __device__ __forceinline__ float weight(int k) const {
    return row_field<kConcurrent>(reinterpret_cast<const float*>(row + layout.weights_at()) + k);
  }
  __device__ __forceinline__ int32_t src() const {
    return row_field<kConcurrent>(reinterpret_cast<const int32_t*>(row + layout.src_at()));
  }
};

struct TokenRow {
  const DispatchSendArgs& in;
  int t;
  __device__ __forceinline__ void copy_payload(uint8_t* dst, int lane) const {
    warp_copy(dst, in.x + t * in.row.payload, in.row.payload, lane);
  }
  __device__ __forceinline__ float scale(int i) const {
    return reinterpret_cast<const float*>(in.scales + t * in.scale_bytes)[i];
  }
  __device__ __forceinline__ int64_t expert(int k) const {
    return reinterpret_cast<const int64_t*>(in.topk + t * in.topk_bytes)[k];
  }
  __device__ __forceinline__ float weight(int k) const {
    return reinterpret_cast<const float*>(in.weights + t * in.weight_bytes)[k];
  }
  __device__ __forceinline__ int32_t src() const { return t; }
};

// Output row n from the received row `src`; local expert ids counted into the block's hist.
template <typename Source>
__device__ __forceinline__ void dispatch_recv_row(const DispatchRecvArgs& a, int64_t n, const Source& src,
                                                  int64_t first_expert, int32_t* hist, int lane) {
  if (a.recv_x) src.copy_payload(a.recv_x + n * a.row.payload, lane);
  for (int i = lane; i < a.num_scales; i += 32) a.recv_scales[n * a.num_scales + i] = src.scale(i);
  if (a.recv_topk) {
    for (int k = lane; k < a.num_topk; k += 32) {
      const int64_t id = src.expert(k);
      const int64_t local = id - first_expert;
      const bool here = id >= 0 && local >= 0 && local < a.experts_per_rank;
      a.recv_topk[n * a.num_topk + k] = here ? local : -1;
      if (a.recv_weights) a.recv_weights[n * a.num_topk + k] = here ? src.weight(k) : 0.f;
    }
    if (lane == 0) {  // a row counts once per distinct local expert
      for (int k = 0; k < a.num_topk; ++k) {
        const int64_t id = src.expert(k);
        const int64_t local = id - first_expert;
        if (id < 0 || local < 0 || local >= a.experts_per_rank) continue;
        bool seen = false;
        for (int j = 0; j < k; ++j) seen |= src.expert(j) == id;
        if (!seen) atomicAdd(&hist[local], 1);
      }
    }
  }
  if (lane == 0) a.recv_src[n] = src.src();
}

// The block's expert histogram into the per-expert counts (after a block barrier).
__device__ __forceinline__ void dispatch_flush_hist(const DispatchRecvArgs& a, const int32_t* hist) {
  for (int i = threadIdx.x; i < a.experts_per_rank && a.recv_topk; i += blockDim.x) {
    if (hist[i]) atomicAdd(&a.expert_counts[i], hist[i]);
  }
}

}  // namespace ep_ops::cuda
