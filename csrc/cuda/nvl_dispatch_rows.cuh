// Dispatch's per-row work, shared by the two kernel shapes (nvl_dispatch.cu: separate send and
// receive kernels; nvl_dispatch_overlap.cu: one kernel with send and receive blocks), so both
// write the same bytes: a warp sends one token's row to each of its destinations, a warp turns
// one row of the local buffer into the outputs. Both copies issue a row's loads before its
// stores (BENCHMARKS.md, session 8: a load may not pass an earlier store, so a copy that
// alternates them pays one memory latency per round). All forceinline: the kernels pass members of their argument
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
  // [T, R]: the token's index among our tokens for each destination, written by notify, or by
  // the send blocks of a launch that opens its epoch (nvl_dispatch_overlap.cu)
  int32_t* positions;
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
  // our own buffer; null: every stream goes through the buffer. A cached dispatch's one launch,
  // which has no notify to invert our column, passes the handle's recv_src_idx instead: the
  // token of each output row (nvl_dispatch_overlap.cu).
  const int32_t* own_tokens;
};

// Where token t's rows go, lane d < R describing destination d: the row's address in d's region,
// null when t's row does not go there (not routed to d, a row to ourselves that skips the buffer,
// or past the region, which the host's checks rule out); `pos` is t's index among our tokens for d.
struct TokenDest {
  uint8_t* row;
  int32_t pos;
};

// What lane d < R needs for every token: where our rows start in d's region.
struct SendLane {
  uint8_t* region;    // d's dispatch region
  int64_t first_row;  // rows of lower sources there
};

__device__ __forceinline__ SendLane send_lane(const PeerView& v, const DispatchSendArgs& a, int lane) {
  if (lane >= v.num_ranks) return {nullptr, 0};
  return {peer_base(v, lane) + kControlBytes, rows_before(a.prefix, v.num_ranks, v.rank, lane)};
}

// Rows past `end_row` are not sent (token_dest's default).
struct NoRowPastEnd {
  __device__ uint8_t* operator()(int32_t) const { return nullptr; }
};

// Token t's destinations, one lane each, with its in_rank byte and position loaded together.
// skip_self: our row to ourselves does not go through the buffer. A row whose index in the region
// reaches `end_row` (the region's end, which the host's checks rule out; the end of a sliced
// stream's slice) goes where past_end(pos) says.
template <typename PastEnd = NoRowPastEnd>
__device__ __forceinline__ TokenDest token_dest(const PeerView& v, const DispatchSendArgs& a, const SendLane& s,
                                                int t, int64_t end_row, bool skip_self, int lane,
                                                PastEnd&& past_end = {}) {
  const int R = v.num_ranks;
  if (lane >= R || t >= a.num_tokens) return {nullptr, 0};
  const int64_t at = static_cast<int64_t>(t) * R + lane;
  const bool in = a.in_rank[at];
  const int32_t pos = a.positions[at];  // loaded with in_rank; only meaningful when in
  if (!in || (skip_self && lane == v.rank)) return {nullptr, pos};
  const int64_t index = s.first_row + pos;
  return {index < end_row ? s.region + index * a.row.bytes() : past_end(pos), pos};
}

// The warp writes token t's row to every destination whose bit is set in `dests` (lane d's
// `row`: its address there). `after_first_loads()` runs once the first stage's loads are issued
// (the overlapped sender flags its previous token's rows there, so that the release's wait and
// these loads overlap).
template <typename AfterFirstLoads>
__device__ __forceinline__ void dispatch_send_token(const DispatchSendArgs& a, int t, uint32_t dests,
                                                    uint8_t* row, int lane, AfterFirstLoads&& after_first_loads) {
  const uint8_t* scales = a.scales ? a.scales + t * a.scale_bytes : nullptr;
  const uint8_t* topk = a.topk ? a.topk + t * a.topk_bytes : nullptr;
  const uint8_t* weights = a.weights ? a.weights + t * a.weight_bytes : nullptr;
  FieldWords scale_words, topk_words, weight_words;
  if (scales) scale_words.load(scales, a.scale_bytes, lane);
  if (topk) topk_words.load(topk, a.topk_bytes, lane);
  if (weights) weight_words.load(weights, a.weight_bytes, lane);
  const auto* src = reinterpret_cast<const int4*>(a.x + t * a.row.payload);
  const int64_t n = a.row.payload / 16;
  for (int64_t first = 0; first < n; first += 32 * kSendStage) {
    int4 v[kSendStage];
    load_stage(v, src, first, n, lane);
    if (first == 0) after_first_loads();
    for (uint32_t left = dests; left != 0; left &= left - 1) {
      auto* dst = reinterpret_cast<int4*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(row),
                                                      __ffs(left) - 1));
      store_stage(dst, v, first, n, lane);
    }
  }
  if (n == 0) after_first_loads();
  for (uint32_t left = dests; left != 0; left &= left - 1) {
    auto* dst = reinterpret_cast<uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(row),
                                                       __ffs(left) - 1));
    if (scales) scale_words.store(dst + a.row.scales_at(), scales, a.scale_bytes, lane);
    if (topk) topk_words.store(dst + a.row.topk_at(), topk, a.topk_bytes, lane);
    if (weights) weight_words.store(dst + a.row.weights_at(), weights, a.weight_bytes, lane);
    if (lane == 0) *reinterpret_cast<int32_t*>(dst + a.row.src_at()) = t;
  }
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

// Payload loads in flight per lane when a received row is copied out: a BF16 row of hidden 7168
// in 2 rounds of loads, an FP8 row in 1 (session 13: level with 7 within the runs' spread, and
// the copy of the send's last wave is what an exact dispatch waits for at its end).
constexpr int kRecvUnroll = 14;

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
    warp_copy</*kReadOnly=*/!kConcurrent, /*kSkipL1=*/kConcurrent, kRecvUnroll>(dst, row, layout.payload, lane);
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
    warp_copy<true, false, kRecvUnroll>(dst, in.x + t * in.row.payload, in.row.payload, lane);
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

// Output row n from the received row `src`; local expert ids counted into the block's hist. The
// small fields are loaded before the payload is copied, so that their loads overlap its.
template <typename Source>
__device__ __forceinline__ void dispatch_recv_row(const DispatchRecvArgs& a, int64_t n, const Source& src,
                                                  int64_t first_expert, int32_t* hist, int lane) {
  const int ns = a.num_scales, K = a.num_topk;
  const float s0 = lane < ns ? src.scale(lane) : 0.f, s1 = lane + 32 < ns ? src.scale(lane + 32) : 0.f;
  const bool lane_ids = a.recv_topk && K <= 32;  // one id per lane (else the loop below)
  long long id = -1;
  float weight = 0.f;
  if (lane_ids && lane < K) {
    id = src.expert(lane);
    if (a.recv_weights) weight = src.weight(lane);
  }
  const int32_t source_token = lane == 0 ? src.src() : 0;
  if (a.recv_x) src.copy_payload(a.recv_x + n * a.row.payload, lane);
  if (lane < ns) a.recv_scales[n * ns + lane] = s0;
  if (lane + 32 < ns) a.recv_scales[n * ns + lane + 32] = s1;
  for (int i = lane + 64; i < ns; i += 32) a.recv_scales[n * ns + i] = src.scale(i);
  if (lane_ids) {
    const int64_t local = id - first_expert;
    const bool here = lane < K && id >= 0 && local >= 0 && local < a.experts_per_rank;
    if (lane < K) {
      a.recv_topk[n * K + lane] = here ? local : -1;
      if (a.recv_weights) a.recv_weights[n * K + lane] = here ? weight : 0.f;
    }
    bool seen = false;  // a row counts once per distinct local expert
    for (int j = 0; j < K; ++j) {
      const long long earlier = __shfl_sync(0xffffffffu, id, j);  // by every lane: not under the &&
      seen |= j < lane && earlier == id;
    }
    if (here && !seen) atomicAdd(&hist[local], 1);
  } else if (a.recv_topk) {
    for (int k = lane; k < K; k += 32) {
      const int64_t e = src.expert(k);
      const int64_t local = e - first_expert;
      const bool here = e >= 0 && local >= 0 && local < a.experts_per_rank;
      a.recv_topk[n * K + k] = here ? local : -1;
      if (a.recv_weights) a.recv_weights[n * K + k] = here ? src.weight(k) : 0.f;
    }
    if (lane == 0) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = src.expert(k);
        const int64_t local = e - first_expert;
        if (e < 0 || local < 0 || local >= a.experts_per_rank) continue;
        bool seen = false;
        for (int j = 0; j < k; ++j) seen |= src.expert(j) == e;
        if (!seen) atomicAdd(&hist[local], 1);
      }
    }
  }
  if (lane == 0) a.recv_src[n] = source_token;
}

// The block's expert histogram into the per-expert counts (after a block barrier).
__device__ __forceinline__ void dispatch_flush_hist(const DispatchRecvArgs& a, const int32_t* hist) {
  for (int i = threadIdx.x; i < a.experts_per_rank && a.recv_topk; i += blockDim.x) {
    if (hist[i]) atomicAdd(&a.expert_counts[i], hist[i]);
  }
}

}  // namespace ep_ops::cuda
