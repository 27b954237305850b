// The byte row a token travels in between NVLink peers, and warp-wide copies of it. Every field
// starts on a 16-byte boundary so the payload moves in int4 (16-byte) loads and stores.
#pragma once

#include <cstdint>

namespace ep_ops::cuda {

__host__ __device__ inline int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ inline int64_t round_up_line(int64_t bytes) { return (bytes + 127) / 128 * 128; }

struct RowLayout {
  int64_t payload;  // hidden * element size (a multiple of 16)
  int64_t scales;   // num_scales float32, rounded up
  int64_t topk;     // num_topk int64, rounded up
  int64_t weights;  // num_topk float32, rounded up (0 without weights)
  __host__ __device__ int64_t scales_at() const { return payload; }
  __host__ __device__ int64_t topk_at() const { return payload + scales; }
  __host__ __device__ int64_t weights_at() const { return topk_at() + topk; }
  __host__ __device__ int64_t src_at() const { return weights_at() + weights; }
  // Rows start on a 128-byte line (the regions do: nvl_buffer.cpp), so that a warp's 512-byte
  // store of a row never straddles a fifth line over NVLink.
  __host__ __device__ int64_t bytes() const { return round_up_line(src_at() + 16); }
};

// Of a stream of `rows` rows that starts at row `start` of a region holding `capacity_rows`, the
// rows that fit (the host's capacity checks make that all of them).
__device__ __forceinline__ int64_t rows_that_fit(int64_t start, int64_t rows, int64_t capacity_rows) {
  return max(int64_t{0}, min(rows, capacity_rows - start));
}

// Where source s's rows start in destination d's dispatch region (and in d's dispatch output):
// the rows that lower sources sent to d, from the rank prefix matrix [R, R] (row s: cumulative
// over sources 0..s of what each sent to each destination).
__host__ __device__ inline int64_t rows_before(const int32_t* prefix, int R, int s, int d) {
  return s > 0 ? prefix[(s - 1) * R + d] : 0;
}

// Rows source `s` sent to rank `d` in the dispatch, from the prefix matrix.
__host__ __device__ inline int32_t rows_sent(const int32_t* prefix, int R, int s, int d) {
  return prefix[s * R + d] - rows_before(prefix, R, s, d);
}

// The sliced layout of a dispatch region (exact mode's split, nvl_dispatch_overlap.cu): each
// source's stream starts at a fixed slice of `slice_rows` rows (slice s for source s), so a
// sender places its rows knowing only its own counts. Row j of source s's stream to d, for j >=
// slice_rows (uneven streams only), goes into the room the streams to d leave free: counted in
// source order over every stream's rows past its slice, then placed in order over the slices'
// free tails and the rows past R * slice_rows. d's stream to itself skips the buffer (self
// direct), leaving its slice free. From the prefix matrix: a sender needs it only for rows past
// its slice.
// Out of line, scalar arguments: rare, and its registers stay out of the callers' loops.
static __device__ __noinline__ int64_t sliced_row_past(const int32_t* prefix, int R, int s, int d, int64_t j,
                                                      int64_t slice_rows) {
  const auto in_buffer = [&](int q) -> int64_t { return q == d ? 0 : rows_sent(prefix, R, q, d); };
  int64_t x = j - slice_rows;  // among all rows past their slices
  for (int q = 0; q < s; ++q) x += max(int64_t{0}, in_buffer(q) - slice_rows);
  for (int q = 0; q < R; ++q) {
    const int64_t used = min(in_buffer(q), slice_rows), room = slice_rows - used;
    if (x < room) return q * slice_rows + used + x;
    x -= room;
  }
  return R * slice_rows + x;
}
__device__ __forceinline__ int64_t sliced_row(const int32_t* prefix, int R, int s, int d, int64_t j,
                                              int64_t slice_rows) {
  return j < slice_rows ? s * slice_rows + j : sliced_row_past(prefix, R, s, d, j, slice_rows);
}

// Rows per chunk of an overlapped kernel's stream of `stream_rows` rows (rows_sent: the same
// number on its sender and its receiver, whatever the buffer's size): `min_rows` (a block's
// warps, a row each), more only when the stream would need over `max_chunks` chunk counters.
__device__ __forceinline__ int64_t stream_chunk_rows(int64_t stream_rows, int min_rows, int max_chunks) {
  return max(int64_t{min_rows}, (stream_rows + max_chunks - 1) / max_chunks);
}

// The row dispatch sends: payload bytes, then num_scales float32, num_topk int64 ids and (with
// weights) num_topk float32, each field rounded up to 16 bytes.
__host__ __device__ inline RowLayout dispatch_row_layout(int64_t payload, int num_scales, int num_topk,
                                                         bool has_weights) {
  return {payload, round16(4 * num_scales), round16(8 * num_topk), has_weights ? round16(4 * num_topk) : 0};
}

// The warp copies `bytes` (a multiple of 16) from src to dst, lanes striding by 16 bytes. Each
// lane issues kUnroll loads before its stores: a copy is bound by load latency, not bandwidth,
// unless several loads are in flight. kReadOnly: the source is an input no one writes during the
// kernel (read through the non-coherent cache); false for rows a peer wrote this kernel.
// kSkipL1 (with kReadOnly false): loads through L2 only (ld.global.cg), for rows a peer may still
// be writing nearby while this SM reads (a 128-byte line can hold the ends of two rows).
// kUnroll: loads in flight per lane (4 registers each).
template <bool kReadOnly = true, bool kSkipL1 = false, int kUnroll = 4>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                          int lane) {
  auto* d = reinterpret_cast<int4*>(dst);
  const auto* s = reinterpret_cast<const int4*>(src);
  const auto load = [](const int4* p) { return kReadOnly ? __ldg(p) : kSkipL1 ? __ldcg(p) : *p; };
  const int64_t n = bytes / 16;
  int64_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load(s + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) d[i] = load(s + i);
}

// The warp copies `bytes` (a multiple of 4) in 4-byte words: for small fields whose source is
// only 4-byte aligned.
__device__ __forceinline__ void warp_copy_words(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                                int lane) {
  auto* d = reinterpret_cast<uint32_t*>(dst);
  const auto* s = reinterpret_cast<const uint32_t*>(src);
  for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = s[i];
}

// Payload int4s per lane that a send warp holds at once (dispatch's and the overlapped combine's):
// all loads of a stage are issued before its stores (a load may not pass an earlier store to memory the compiler cannot tell apart, so a
// copy that alternates them waits one memory latency per round). Hidden 7168: a BF16 row in two
// rounds, an FP8 row in one (the 4-deep warp_copy took 7 and 4).
constexpr int kSendStage = 14;

// One stage of a staged row copy: lane's int4s first + lane + 32 * u (u < kStage) of a row of
// `count` int4s, loaded from src into v, or stored from v to dst (those past the row skipped).
template <int kStage>
__device__ __forceinline__ void load_stage(int4 (&v)[kStage], const int4* src, int64_t first, int64_t count,
                                           int lane) {
#pragma unroll
  for (int u = 0; u < kStage; ++u) {
    const int64_t i = first + lane + 32 * u;
    if (i < count) v[u] = __ldg(src + i);
  }
}

template <int kStage>
__device__ __forceinline__ void store_stage(int4* dst, const int4 (&v)[kStage], int64_t first, int64_t count,
                                            int lane) {
#pragma unroll
  for (int u = 0; u < kStage; ++u) {
    const int64_t i = first + lane + 32 * u;
    if (i < count) dst[i] = v[u];
  }
}

// Up to two 4-byte words per lane of a small row field (scales, top-k ids, weights), loaded with
// the payload's first stage and stored after it; words past 64 go one by one.
struct FieldWords {
  uint32_t w0 = 0, w1 = 0;
  __device__ __forceinline__ void load(const uint8_t* src, int64_t bytes, int lane) {
    const auto* s = reinterpret_cast<const uint32_t*>(src);
    const int64_t n = bytes / 4;
    if (lane < n) w0 = __ldg(s + lane);
    if (lane + 32 < n) w1 = __ldg(s + lane + 32);
  }
  __device__ __forceinline__ void store(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) const {
    auto* d = reinterpret_cast<uint32_t*>(dst);
    const int64_t n = bytes / 4;
    if (lane < n) d[lane] = w0;
    if (lane + 32 < n) d[lane + 32] = w1;
    for (int64_t i = lane + 64; i < n; i += 32) d[i] = __ldg(reinterpret_cast<const uint32_t*>(src) + i);
  }
};

}  // namespace ep_ops::cuda
