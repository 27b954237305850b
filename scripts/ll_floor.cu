// What the low-latency decode step costs with none of the ops' logic: floors for issue 4's
// targets, on 2 GPUs of one process (peer access). Each variant is a kernel that does only the
// data movement and flag exchanges any design of the op must do (the routing is drawn once on the
// host and every row list is precomputed there, except where a variant says it scans: no
// tickets or freed handshake unless named, no watchdog), timed as scripts/profile_ll.py times
// the ops: a CUDA graph of 20 launches per GPU, both GPUs released together, µs per launch
// (median of the replays). The gap between a floor and the op is what the op's logic costs.
// Workload (HARDWARE.md's decode shape): 128 tokens a rank, hidden 7168, top-8 of 256 experts
// (128 local experts a rank), FP8 dispatch rows as the op's wire format (payload, 56 scales,
// source, ids: 7440 B), BF16 combine.
//   empty     : 128 blocks of 512 threads that return (the graph's cost per launch)
//   ticket    : + one atomic per block on a local counter (what ep_ops' start tickets add)
//   exchange  : each block adds to a counter on both ranks (red.release.sys), then waits for the
//               peer's and our 128 blocks (one flag exchange, no data)
//   exchange_relaxed: the same with relaxed adds and loads (the link's latency without ordering)
//   exchange_flags: each block stores the launch number into a flag of its own at every rank
//               (st.release.sys; no atomics on one word) and the receiver's threads poll one flag
//               each (ld.acquire.sys); _relaxed: the same unordered
//   send      : a block per token: the FP8 cast, its row written to each rank it goes to, the
//               block's release on both ranks' counters; no wait (the send half's floor)
//   send_relaxed: send with a relaxed add in place of the release (what the release's wait for
//               the block's NVLink writes costs; the receiver could then see the flag before
//               the rows, so no op may do this)
//   send_flags: send, then the block's own flag at every rank (exchange_flags' signal)
//   send_ticket, send_ticket_freed, send_op_start, send_op_ids: send with the op's start added one
//               step at a time (op_start): its start ticket (value used), then the freed wait,
//               then the drain check, then the rank mask from the int64 ids
//   send_wait : send, then wait for both ranks' blocks (data across, the receiver told)
//   expand    : a block per local expert copies its rows (payload + column-major scales) from a
//               settled slab into [E_local, R*M, H]: the receive's HBM writes alone
//   dispatch  : send_wait, then expand: the dispatch op's floor
//   send_ll, dispatch_ll: dispatch with no counter and no fence: every 8-byte word of a row
//               carries 4 bytes and the launch number (NCCL's LL protocol: twice the bytes across
//               the link), and each receive block polls only its own rows' words
//   weights   : combine's weights (32 B a token) to each rank the token goes to, release, wait
//   combine   : weights, then a block per (source, token) row sums its local experts' outputs
//               (known slots) in float32 into the source's partials slab, release, wait, then a
//               block per token sums its two partials into [T, H]: the combine op's floor
//   combine_protocol: combine plus the op's slab protocol (dispatch_protocol's, for both slabs)
//   dispatch_rows ... combine_rows_protocol: pipelined designs, a flag per row (rows_variant)
//   dispatch_scan_protocol: the op's design in full: one counter, then each expert's positions
//               found on the device from the rows' sources and ids, with the slab protocol
// The counters and flags are zeroed before each replay; launch i of a graph waits for unit (or
// flag value) i + 1.
// Checks after each variant that writes them (zeroed before it): each expanded row and its scales
// against its sender's own copy where the token went to its sender too (else against the
// receiver's slab), and the combine's output against a host sum (integer-valued expert outputs,
// weights of 1/8 and 1/4, so the float sums are exact).
// Not part of the build: nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o /tmp/ll_floor
// scripts/ll_floor.cu && /tmp/ll_floor (needs 2 GPUs with peer access; results in BENCHMARKS.md,
// sessions 23 and 24).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define CK(x)                                                                    \
  do {                                                                           \
    cudaError_t e = (x);                                                         \
    if (e != cudaSuccess) {                                                      \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));           \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

constexpr int R = 2, T = 128, H = 7168, K = 8, E = 256, EL = E / R, RM = R * T;
constexpr int kThreads = 512, kWarps = kThreads / 32, kGroups = H / 128;
constexpr int64_t kRowBytes = 7440;  // FP8 payload 7168 + 56 scales + source + 8 ids, to 16 B
constexpr int64_t kScaleOff = H, kSrcOff = H + 4 * kGroups, kIdsOff = kSrcOff + 4;
constexpr int kCalls = 20, kReplays = 30;
constexpr int64_t kLLWords = kRowBytes / 4;  // dispatch_ll: a row as 8-byte words {4 bytes, flag}

// Counters, per rank: [0, R) dispatch arrivals by source, [R, 2R) weights, [2R, 3R) partials,
// 3R: ticket / exchange.
// 3R: ticket; [3R + 1, 4R + 1): freed; then [kFlags, kFlags + R*T): one flag per (source rank,
// block) for the *_flags variants and the rows' flags of the *_rows variants, which have three more
// such arrays: the routing's (kRouteFlags), the weights' (kWeightFlags) and the partials'
// (kPartialFlags), each indexed by (source rank, token).
constexpr int kArr = 0, kWts = R, kPart = 2 * R, kMisc = 3 * R, kFreed = 3 * R + 1, kFlags = 4 * R + 1;
constexpr int kRouteFlags = kFlags + R * T, kWeightFlags = kRouteFlags + R * T, kPartialFlags = kWeightFlags + R * T;
constexpr int kCounters = kPartialFlags + R * T;

struct Rank {  // one GPU's buffers; peer pointers are the other rank's
  uint64_t* ctr[R];       // counters of each rank (ours at [me])
  uint8_t* slab[R];       // dispatch slab [R, T, kRowBytes] of each rank
  uint64_t* llslab[R];    // dispatch_ll's slab [R, T, kLLWords]: each word 4 bytes of a row + a flag
  float* wslab[R];        // weights slab [R, T, K] of each rank
  int32_t* route[R];      // dispatch_rows_scan's routing area [R, T, K] of each rank
  __nv_bfloat16* pslab[R];  // partials slab [R, T, H] of each rank
  int me;
  const __nv_bfloat16* x;     // [T, H]
  const int32_t* mask;        // [T] ranks each token goes to
  const int32_t* ids;         // [T, K]
  const int64_t* ids64;       // [T, K] as the op takes them (send_op_*)
  const float* weights;       // [T, K]
  const int32_t* row_begin;   // [EL + 1] expand: expert e's positions
  const int32_t* row_src;     // slab row j = s * T + t of each position
  uint8_t* out;               // [EL, RM, H] FP8
  float* scales;              // [EL, kGroups, RM]
  const __nv_bfloat16* eout;  // [EL, RM, H] expert outputs (combine)
  const int32_t* slot;        // [RM, K] combine: expert position e * RM + pos, or -1
  __nv_bfloat16* cout;        // [T, H]
};

__device__ __forceinline__ void add_release(uint64_t* c, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(c), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t load_acquire(const uint64_t* c) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(c) : "memory");
  return v;
}
// Threads d < R: wait until counter base + d of ours reaches target; then the block goes on.
template <bool kAcquire = true>
__device__ __forceinline__ void wait_all(const Rank& a, int base, uint64_t target) {
  if (threadIdx.x < R) {
    const uint64_t* c = &a.ctr[a.me][base + threadIdx.x];
    uint64_t v = 0;
    do {
      if (kAcquire) {
        v = load_acquire(c);
      } else {
        asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(c) : "memory");
      }
    } while (v < target);
  }
  __syncthreads();
}
// After a block barrier: this block's add on counter base + me of every rank.
template <bool kRelease = true>
__device__ __forceinline__ void post_all(const Rank& a, int base) {
  __syncthreads();
  if (threadIdx.x >= R) return;
  uint64_t* c = &a.ctr[threadIdx.x][base + a.me];
  if (kRelease) {
    add_release(c, 1);
  } else {
    asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(c), "l"(1ull) : "memory");
  }
}

// A flag of its own per block (the *_flags variants) or per row (the *_rows variants): one
// thread's release store of the launch's number, and one thread's wait for it (in the *_rows
// variants every thread that then reads the row waits itself: no barrier needed).
__device__ __forceinline__ void store_flag(uint64_t* f, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(f), "l"(value) : "memory");
}
__device__ __forceinline__ void wait_flag(const uint64_t* f, uint64_t value) {
  while (load_acquire(f) < value) {
  }
}

// The *_flags variants: each block stores the launch's number into its own flag at every rank
// (no two blocks write one word), and a receiver's threads poll one flag each.
template <bool kOrdered>
__device__ __forceinline__ void post_flags(const Rank& a, uint64_t value) {
  __syncthreads();
  if (threadIdx.x >= R) return;
  uint64_t* f = &a.ctr[threadIdx.x][kFlags + a.me * T + blockIdx.x];
  if (kOrdered) {
    store_flag(f, value);
  } else {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(f), "l"(value) : "memory");
  }
}
template <bool kOrdered>
__device__ __forceinline__ void wait_flags(const Rank& a, uint64_t value) {
  if (threadIdx.x < R * T) {
    const uint64_t* f = &a.ctr[a.me][kFlags + threadIdx.x];
    uint64_t v = 0;
    do {
      if (kOrdered) {
        v = load_acquire(f);
      } else {
        asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(f) : "memory");
      }
    } while (v < value);
  }
  __syncthreads();
}

__device__ __forceinline__ uint32_t e4m3x4(const float (&v)[4]) {
  uint16_t lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(v[1]), "f"(v[0]));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(v[3]), "f"(v[2]));
  return lo | (static_cast<uint32_t>(hi) << 16);
}

// Token t's FP8 row into the slab of every rank in its mask.
// Token t's FP8 cast, a warp per 128-channel group: all of a warp's groups loaded before any is
// cast (the op's kGroupsInFlight), then store(group, 4 packed values of this lane, the group's
// scale) for each.
// kCastWarps: the warps that cast (the rest skip it; 15 of the 16 take as many rounds).
template <int kCastWarps = kWarps, typename Store>
__device__ __forceinline__ void cast_token(const Rank& a, int t, Store store) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kMine = (kGroups + kCastWarps - 1) / kCastWarps;
  if (warp >= kCastWarps) return;
  uint2 raw[kMine];
#pragma unroll
  for (int u = 0; u < kMine; ++u) {
    const int g = warp + u * kCastWarps;
    if (g < kGroups) raw[u] = __ldg(reinterpret_cast<const uint2*>(a.x + int64_t(t) * H + g * 128 + lane * 4));
  }
#pragma unroll
  for (int u = 0; u < kMine; ++u) {
    const int g = warp + u * kCastWarps;
    if (g >= kGroups) break;
    const auto* p = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
    float f[4] = {__low2float(p[0]), __high2float(p[0]), __low2float(p[1]), __high2float(p[1])};
    float amax = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
    for (int s = 16; s > 0; s /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, s));
    const float scale_inv = fmaxf(amax, 1e-4f) / 448.0f, inv = 1.0f / scale_inv;
    float v[4] = {f[0] * inv, f[1] * inv, f[2] * inv, f[3] * inv};
    store(g, e4m3x4(v), scale_inv);
  }
}

template <bool kMaskFromIds = false, int kCastWarps = kWarps>
__device__ void send_token(const Rank& a, int t) {
  const int lane = threadIdx.x & 31;
  uint32_t mask = 0;
  if (kMaskFromIds) {  // the op's token_rank_mask: the K ids loaded together (after the payload's loads below)
    int64_t id[K];
#pragma unroll
    for (int k = 0; k < K; ++k) id[k] = __ldg(a.ids64 + t * K + k);
#pragma unroll
    for (int k = 0; k < K; ++k) mask |= 1u << static_cast<int>(id[k] / EL);
  } else {
    mask = a.mask[t];
  }
  cast_token<kCastWarps>(a, t, [&](int g, uint32_t packed, float scale_inv) {
    for (int d = 0; d < R; ++d) {
      if (!((mask >> d) & 1u)) continue;
      uint8_t* row = a.slab[d] + (int64_t(a.me) * T + t) * kRowBytes;
      *reinterpret_cast<uint32_t*>(row + g * 128 + lane * 4) = packed;
      if (lane == 0) reinterpret_cast<float*>(row + kScaleOff)[g] = scale_inv;
    }
  });
  for (int d = 0; d < R; ++d) {
    uint8_t* row = a.slab[d] + (int64_t(a.me) * T + t) * kRowBytes;
    const bool sent = (mask >> d) & 1u;
    if (threadIdx.x == 0) *reinterpret_cast<int32_t*>(row + kSrcOff) = sent ? t : -1;
    if (sent && threadIdx.x < K) reinterpret_cast<int32_t*>(row + kIdsOff)[threadIdx.x] = a.ids[t * K + threadIdx.x];
  }
}

// Local expert e's rows from our slab into out / scales: a warp per row, the row's 14 int4s per
// lane in flight (the op's kExpandUnroll), then the scales a column at a time.
__device__ void expand_expert(const Rank& a, int e) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int begin = a.row_begin[e], total = a.row_begin[e + 1] - begin;
  const uint8_t* slab = a.slab[a.me];
  for (int pos = warp; pos < total; pos += kWarps) {
    const int4* src = reinterpret_cast<const int4*>(slab + int64_t(a.row_src[begin + pos]) * kRowBytes);
    int4* dst = reinterpret_cast<int4*>(a.out + (int64_t(e) * RM + pos) * H);
    constexpr int kPer = H / 16 / 32;
    int4 v[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) v[u] = src[lane + 32 * u];
#pragma unroll
    for (int u = 0; u < kPer; ++u) dst[lane + 32 * u] = v[u];
  }
  for (int i = threadIdx.x; i < total * kGroups; i += blockDim.x) {
    const int c = i / total, pos = i % total;
    const float* s = reinterpret_cast<const float*>(slab + int64_t(a.row_src[begin + pos]) * kRowBytes + kScaleOff);
    a.scales[(int64_t(e) * kGroups + c) * RM + pos] = s[c];
  }
}

// dispatch_rows' receive: expert e's rows as expand_expert copies them, but each warp waits only for
// its own row's flag (set by the row's sender block after its release), so the copies of the rows
// that are in (our own source's first) overlap the ones still crossing the link; the warp copies
// its row's scales too. `row_of(pos)`: the slab row of position pos.
template <bool kRowFlags = true, typename RowOf>
__device__ void expand_rows(const Rank& a, int e, int total, RowOf row_of, uint64_t flag) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint8_t* slab = a.slab[a.me];
  for (int pos = warp; pos < total; pos += kWarps) {
    const int j = row_of(pos);
    if (kRowFlags) wait_flag(&a.ctr[a.me][kFlags + j], flag);
    const int4* src = reinterpret_cast<const int4*>(slab + int64_t(j) * kRowBytes);
    int4* dst = reinterpret_cast<int4*>(a.out + (int64_t(e) * RM + pos) * H);
    constexpr int kPer = H / 16 / 32;
    int4 v[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) v[u] = src[lane + 32 * u];
    const float* s = reinterpret_cast<const float*>(slab + int64_t(j) * kRowBytes + kScaleOff);
    float sc[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) sc[u] = lane + 32 * u < kGroups ? s[lane + 32 * u] : 0.f;
#pragma unroll
    for (int u = 0; u < kPer; ++u) dst[lane + 32 * u] = v[u];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (lane + 32 * u < kGroups) a.scales[(int64_t(e) * kGroups + lane + 32 * u) * RM + pos] = sc[u];
    }
  }
}

// dispatch_rows_scan's receive: expert e's positions found on the device, as the op finds them
// (a thread per slab row tests the row's ids, a block count gives each match its position), from
// the routing that each sender posted ahead of its payload; then expand_rows.
// kRowFlags false (dispatch_scan_protocol, after the counters' wait): the op's way, the source
// and ids read from the slab rows themselves, every row already in.
template <bool kRowFlags = true>
__device__ void expand_expert_scan(const Rank& a, int e, uint64_t flag) {
  __shared__ int row_of[RM];
  __shared__ int warp_sums[kWarps];
  const int j = threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int expert = a.me * EL + e;
  bool hit = false;
  if (j < RM) {
    if (kRowFlags) wait_flag(&a.ctr[a.me][kRouteFlags + j], flag);
    const uint8_t* row = a.slab[a.me] + int64_t(j) * kRowBytes;
    // The ids in the row sit 4-byte aligned: loaded one by one, all in flight together.
    const int32_t* ids = kRowFlags ? a.route[a.me] + j * K : reinterpret_cast<const int32_t*>(row + kIdsOff);
    const int src = kRowFlags ? 0 : *reinterpret_cast<const int32_t*>(row + kSrcOff);
    int32_t id[K];
#pragma unroll
    for (int k = 0; k < K; ++k) id[k] = ids[k];
#pragma unroll
    for (int k = 0; k < K; ++k) hit |= id[k] == expert;
    hit &= src >= 0;
  }
  const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
  if (lane == 0) warp_sums[warp] = __popc(ballot);
  __syncthreads();
  int before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  if (hit) row_of[before] = j;
  __syncthreads();
  expand_rows<kRowFlags>(a, e, total, [&](int pos) { return row_of[pos]; }, flag);
}

// dispatch_rows_scan's routing: token t's ids at every rank (the receivers scan every slab row),
// then its flag, by lane d of the block's last warp for rank d. That warp does not cast
// (send_token<.., kRoutingCastWarps>: the other 15 take as many rounds), so the releases, which
// wait for the ids' writes, delay no payload.
constexpr int kRoutingCastWarps = kWarps - 1;
__device__ void post_routing(const Rank& a, int t, uint64_t flag) {
  const int d = threadIdx.x - kRoutingCastWarps * 32;
  if (d < 0 || d >= R) return;
  const int4* ids = reinterpret_cast<const int4*>(a.ids + t * K);
  const int4 i0 = ids[0], i1 = ids[1];
  int4* at = reinterpret_cast<int4*>(a.route[d] + (a.me * T + t) * K);
  at[0] = i0;
  at[1] = i1;
  store_flag(&a.ctr[d][kRouteFlags + a.me * T + t], flag);
}

// Row j = (source, token) of the combine: its local experts' outputs weighted and summed in
// float32 (k ascending), rounded to BF16 once, written into the source's partials slab.
// `weight_flag` (combine_rows): first wait for the row's weights flag to reach it.
__device__ void partial_row(const Rank& a, int j, uint64_t weight_flag = 0) {
  const int source = j / T, t = j % T;
  __shared__ int32_t slot[K];
  __shared__ float w[K];
  if (threadIdx.x < K) {
    slot[threadIdx.x] = a.slot[j * K + threadIdx.x];
    if (weight_flag != 0) wait_flag(&a.ctr[a.me][kWeightFlags + j], weight_flag);
    w[threadIdx.x] = a.wslab[a.me][j * K + threadIdx.x];
  }
  __syncthreads();
  __nv_bfloat16* dst = a.pslab[source] + (int64_t(a.me) * T + t) * H;
  constexpr int kVec = H / 8;
  for (int i0 = threadIdx.x; i0 < kVec; i0 += 2 * kThreads) {
    float acc[2][8] = {};
    int4 raw[2][K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (slot[k] < 0) continue;
      const int4* x = reinterpret_cast<const int4*>(a.eout + int64_t(slot[k]) * H);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (i0 + r * kThreads < kVec) raw[r][k] = __ldg(x + i0 + r * kThreads);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (slot[k] < 0) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const auto* p = reinterpret_cast<const __nv_bfloat162*>(&raw[r][k]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[r][2 * q] += w[k] * __low2float(p[q]);
          acc[r][2 * q + 1] += w[k] * __high2float(p[q]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (i0 + r * kThreads >= kVec) continue;
      int4 o;
      auto* op = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
      for (int q = 0; q < 4; ++q) op[q] = __floats2bfloat162_rn(acc[r][2 * q], acc[r][2 * q + 1]);
      reinterpret_cast<int4*>(dst)[i0 + r * kThreads] = o;
    }
  }
  __syncthreads();  // slot and w are rewritten for the block's next row
}

// Token t's top-k weights into the weights slab of every rank it goes to (threads k < K).
__device__ __forceinline__ void write_weights(const Rank& a, int t) {
  const uint32_t mask = a.mask[t];
  for (int d = 0; d < R; ++d) {
    if (((mask >> d) & 1u) && threadIdx.x < K) {
      a.wslab[d][(a.me * T + t) * K + threadIdx.x] = a.weights[t * K + threadIdx.x];
    }
  }
}

// Whether row j = (source, token) of the combine names one of our experts (has a partial to send).
__device__ __forceinline__ bool has_local_expert(const Rank& a, int j) {
  bool any = false;
  for (int k = 0; k < K; ++k) any |= a.slot[j * K + k] >= 0;
  return any;
}

// Token t's partials from every rank it went to, summed in rank order into cout.
// `partial_flag` (combine_rows): first wait for each of those rows' flags to reach it.
__device__ void sum_partials(const Rank& a, int t, uint64_t partial_flag = 0) {
  const uint32_t mask = a.mask[t];
  for (int s = 0; s < R && partial_flag != 0; ++s) {
    if ((mask >> s) & 1u) wait_flag(&a.ctr[a.me][kPartialFlags + s * T + t], partial_flag);
  }
  constexpr int kVec = H / 8;
  for (int i = threadIdx.x; i < kVec; i += kThreads) {
    float acc[8] = {};
    int4 raw[R];
#pragma unroll
    for (int s = 0; s < R; ++s) {
      if ((mask >> s) & 1u) raw[s] = reinterpret_cast<const int4*>(a.pslab[a.me] + (int64_t(s) * T + t) * H)[i];
    }
#pragma unroll
    for (int s = 0; s < R; ++s) {
      if (!((mask >> s) & 1u)) continue;
      const auto* p = reinterpret_cast<const __nv_bfloat162*>(&raw[s]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc[2 * q] += __low2float(p[q]);
        acc[2 * q + 1] += __high2float(p[q]);
      }
    }
    int4 o;
    auto* op = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int q = 0; q < 4; ++q) op[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
    reinterpret_cast<int4*>(a.cout + int64_t(t) * H)[i] = o;
  }
}

// dispatch_ll's send: token t's row (the same cast) as 8-byte words {4 bytes of the row, the
// launch number} at every rank it goes to, plain stores and no fence: an 8-byte store is seen whole
// or not at all, so each word says itself whether it has arrived (NCCL's LL protocol; twice the
// bytes across the link). A rank the token does not go to gets only its source word (-1).
__device__ void send_token_ll(const Rank& a, int t, uint32_t flag) {
  const int lane = threadIdx.x & 31;
  const uint32_t mask = a.mask[t];
  const auto word = [&](uint32_t bits) { return (uint64_t(flag) << 32) | bits; };
  cast_token(a, t, [&](int g, uint32_t packed, float scale_inv) {
    for (int d = 0; d < R; ++d) {
      if (!((mask >> d) & 1u)) continue;
      volatile uint64_t* row = a.llslab[d] + (int64_t(a.me) * T + t) * kLLWords;
      row[g * 32 + lane] = word(packed);
      if (lane == 0) row[kScaleOff / 4 + g] = word(__float_as_uint(scale_inv));
    }
  });
  for (int d = 0; d < R; ++d) {
    volatile uint64_t* row = a.llslab[d] + (int64_t(a.me) * T + t) * kLLWords;
    const bool sent = (mask >> d) & 1u;
    if (threadIdx.x == 0) row[kSrcOff / 4] = word(sent ? t : -1);
    if (sent && threadIdx.x < K) row[kIdsOff / 4 + threadIdx.x] = word(a.ids[t * K + threadIdx.x]);
  }
}

// dispatch_ll's receive: local expert e's rows, each word polled until it carries the launch
// number (a warp per row, 14 two-word loads per lane in flight, a round reloaded while any of its
// words is stale), its 4 data bytes written out. No counter, no fence: a block waits only for its
// own rows. A later launch's number counts as arrived too: with no freed handshake here a fast
// sender may overwrite a row with the next launch's (identical) bytes before it is read.
__device__ void expand_expert_ll(const Rank& a, int e, uint32_t flag) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int begin = a.row_begin[e], total = a.row_begin[e + 1] - begin;
  constexpr int kPairs = H / 4 / 2 / 32, kRound = 14;  // 28 word pairs per lane: two rounds
  for (int pos = warp; pos < total; pos += kWarps) {
    const uint64_t* row = a.llslab[a.me] + int64_t(a.row_src[begin + pos]) * kLLWords;
    uint2* dst = reinterpret_cast<uint2*>(a.out + (int64_t(e) * RM + pos) * H);
    for (int r0 = 0; r0 < kPairs; r0 += kRound) {
      ulonglong2 w[kRound];
      bool stale;
      do {
        stale = false;
#pragma unroll
        for (int u = 0; u < kRound; ++u) {
          const auto* at = reinterpret_cast<const ulonglong2*>(row) + lane + 32 * (r0 + u);
          asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(w[u].x), "=l"(w[u].y) : "l"(at));
        }
#pragma unroll
        for (int u = 0; u < kRound; ++u) stale |= (w[u].x >> 32) < flag || (w[u].y >> 32) < flag;
      } while (stale);
#pragma unroll
      for (int u = 0; u < kRound; ++u) {
        dst[lane + 32 * (r0 + u)] = make_uint2(static_cast<uint32_t>(w[u].x), static_cast<uint32_t>(w[u].y));
      }
    }
  }
  for (int i = threadIdx.x; i < total * kGroups; i += blockDim.x) {
    const int c = i / total, pos = i % total;
    const volatile uint64_t* w = a.llslab[a.me] + int64_t(a.row_src[begin + pos]) * kLLWords + kScaleOff / 4 + c;
    uint64_t v;
    do {
      v = *w;
    } while ((v >> 32) < flag);
    a.scales[(int64_t(e) * kGroups + c) * RM + pos] = __uint_as_float(static_cast<uint32_t>(v));
  }
}

enum Variant {
  kEmpty, kTicket, kExchange, kExchangeRelaxed, kExchangeFlags, kExchangeFlagsRelaxed, kSend, kSendRelaxed,
  kSendFlags, kSendTicket, kSendTicketFreed, kSendOpStart, kSendOpIds, kSendWait, kExpand, kDispatch, kDispatchFlags,
  kDispatchProtocol, kSendLL, kDispatchLL, kWeights, kCombine, kCombineProtocol, kDispatchRows, kDispatchRowsScan,
  kDispatchRowsProtocol, kDispatchScanProtocol, kCombineRows, kCombineRowsProtocol, kVariants
};
const char* kNames[] = {"empty", "ticket", "exchange", "exchange_relaxed", "exchange_flags", "exchange_flags_relaxed",
                        "send", "send_relaxed", "send_flags", "send_ticket", "send_ticket_freed", "send_op_start",
                        "send_op_ids", "send_wait", "expand", "dispatch", "dispatch_flags", "dispatch_protocol",
                        "send_ll", "dispatch_ll", "weights", "combine", "combine_protocol", "dispatch_rows",
                        "dispatch_rows_scan", "dispatch_rows_protocol", "dispatch_scan_protocol", "combine_rows",
                        "combine_rows_protocol"};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == kVariants, "a name per variant");

// The op's start, one step at a time (send_ticket ... send_op_start): `drain`: every thread's
// barrier on one control word's load (drain_if_moved; the word never says "moved" here); the
// start ticket as the op takes it (acq_rel, its value used before anything is sent); `freed`:
// the wait for the receivers' freed counters (already satisfied here) and its barrier.
template <bool kDrain, bool kFreedWait>
__device__ __forceinline__ void op_start(const Rank& a) {
  __shared__ uint64_t ticket;
  if (kDrain) {
    const bool moved = __syncthreads_or(threadIdx.x == 0 && load_acquire(&a.ctr[a.me][kFlags - 1]) == ~0ull);
    if (moved) __trap();
  }
  if (threadIdx.x == 0) {
    uint64_t before;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;"
                 : "=l"(before)
                 : "l"(&a.ctr[a.me][kMisc]), "l"(1ull)
                 : "memory");
    ticket = before;
  }
  __syncthreads();
  if (kFreedWait) {
    bool ok = true;
    if (threadIdx.x < R) ok = load_acquire(&a.ctr[a.me][kFreed + threadIdx.x]) != ~0ull;
    if (!__syncthreads_and(ok)) __trap();
  } else if (ticket == ~0ull) {
    __trap();
  }
}

// Launch `call`'s start ticket and its wait for the freed posts of the launches before it that used
// the same slabs (`posts` freed posts a launch: one a slab), as dispatch_protocol and
// combine_protocol add them.
__device__ __forceinline__ void protocol_start(const Rank& a, int call, int posts) {
  if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&a.ctr[a.me][kMisc]), 1ull);
  wait_all(a, kFreed, call >= 1 ? uint64_t(posts) * (call - 1) * gridDim.x : 0);
}

// The pipelined variants: every row carries a flag of its own (set by its sender block with a
// release, after the block's rows), so a receiver copies or sums each row as soon as it is in
// instead of waiting for every block's post.
//   dispatch_rows: the rows' positions from the host (as dispatch);
//   dispatch_rows_scan: the positions found on the device from the routing, which each sender
//     posts ahead of its payload (a flag of its own): only the device knows the routing in an op;
//   dispatch_rows_protocol: dispatch_rows_scan with dispatch_protocol's slab protocol;
//   combine_rows: combine with a flag per weights row and per partials row;
//   combine_rows_protocol: combine_rows with combine_protocol's slab protocol.
template <int kV>
__device__ __forceinline__ void rows_variant(const Rank& a, int call) {
  const int b = blockIdx.x;
  const uint64_t flag = call + 1;
  if constexpr (kV == kDispatchRows || kV == kDispatchRowsScan || kV == kDispatchRowsProtocol) {
    if (kV == kDispatchRowsProtocol) protocol_start(a, call, 1);
    if (kV == kDispatchRows) {
      send_token(a, b);
    } else {
      post_routing(a, b, flag);
      send_token<false, kRoutingCastWarps>(a, b);
    }
    post_flags<true>(a, flag);
    if (kV == kDispatchRows) {
      const int begin = a.row_begin[b];
      expand_rows(a, b, a.row_begin[b + 1] - begin, [&](int pos) { return a.row_src[begin + pos]; }, flag);
    } else {
      expand_expert_scan(a, b, flag);
    }
    if (kV == kDispatchRowsProtocol) post_all(a, kFreed);
  }
  if constexpr (kV == kDispatchScanProtocol) {  // the op's design: one counter, then the scan
    protocol_start(a, call, 1);
    send_token(a, b);
    post_all(a, kArr);
    wait_all(a, kArr, uint64_t(call + 1) * gridDim.x);
    expand_expert_scan<false>(a, b, flag);
    post_all(a, kFreed);
  }
  if constexpr (kV == kCombineRows || kV == kCombineRowsProtocol) {
    if (kV == kCombineRowsProtocol) protocol_start(a, call, 2);
    const uint32_t mask = a.mask[b];
    if (threadIdx.x == 0) {
      const float4* w = reinterpret_cast<const float4*>(a.weights + b * K);
      const float4 w0 = w[0], w1 = w[1];
      for (int d = 0; d < R; ++d) {
        if (!((mask >> d) & 1u)) continue;
        float4* at = reinterpret_cast<float4*>(a.wslab[d] + (a.me * T + b) * K);
        at[0] = w0;
        at[1] = w1;
        store_flag(&a.ctr[d][kWeightFlags + a.me * T + b], flag);
      }
    }
    for (int j = b; j < RM; j += gridDim.x) {
      if (!has_local_expert(a, j)) continue;
      partial_row(a, j, flag);  // ends with a barrier: every thread's partials are written
      if (threadIdx.x == 0) store_flag(&a.ctr[j / T][kPartialFlags + a.me * T + j % T], flag);
    }
    if (kV == kCombineRowsProtocol) post_all(a, kFreed);  // the weights slab is read
    sum_partials(a, b, flag);
    if (kV == kCombineRowsProtocol) post_all(a, kFreed);  // the partials slab is read
  }
}

// Launch `call` of a graph (grid T = EL = 128 blocks): block b is token b and local expert b.
template <int kV>
__global__ void __launch_bounds__(kThreads, 1) floor_kernel(Rank a, int call) {
  const uint64_t unit = uint64_t(call + 1) * gridDim.x;
  const int b = blockIdx.x;
  if constexpr (kV == kTicket) {
    if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&a.ctr[a.me][kMisc]), 1ull);
  }
  if constexpr (kV == kExchange) {
    post_all(a, kArr);
    wait_all(a, kArr, unit);
  }
  if constexpr (kV == kExchangeRelaxed) {
    post_all<false>(a, kArr);
    wait_all<false>(a, kArr, unit);
  }
  if constexpr (kV == kExchangeFlags || kV == kExchangeFlagsRelaxed) {
    post_flags<kV == kExchangeFlags>(a, call + 1);
    wait_flags<kV == kExchangeFlags>(a, call + 1);
  }
  if constexpr (kV == kSendFlags || kV == kDispatchFlags) {
    send_token(a, b);
    post_flags<true>(a, call + 1);
  }
  if constexpr (kV == kDispatchFlags) {
    wait_flags<true>(a, call + 1);
    expand_expert(a, b);
  }
  if constexpr (kV == kSend || kV == kSendWait || kV == kDispatch) {
    send_token(a, b);
    post_all(a, kArr);
  }
  if constexpr (kV == kSendRelaxed) {
    send_token(a, b);
    post_all<false>(a, kArr);
  }
  if constexpr (kV == kSendWait || kV == kDispatch) wait_all(a, kArr, unit);
  if constexpr (kV == kExpand || kV == kDispatch) expand_expert(a, b);
  if constexpr (kV == kSendTicket || kV == kSendTicketFreed || kV == kSendOpStart || kV == kSendOpIds) {
    op_start<kV == kSendOpStart || kV == kSendOpIds, kV != kSendTicket>(a);
    send_token<kV == kSendOpIds>(a, b);
    post_all(a, kArr);
  }
  if constexpr (kV == kSendLL || kV == kDispatchLL) send_token_ll(a, b, call + 1);
  if constexpr (kV == kDispatchLL) expand_expert_ll(a, b, call + 1);
  if constexpr (kV == kDispatchProtocol) {
    // What the op adds to keep its slabs safe with no host: a start ticket, the wait for the
    // receivers to have read what we sent into this slab two launches ago, the freed post.
    protocol_start(a, call, 1);
    send_token(a, b);
    post_all(a, kArr);
    wait_all(a, kArr, unit);
    expand_expert(a, b);
    post_all(a, kFreed);
  }
  if constexpr (kV == kWeights || kV == kCombine) {
    write_weights(a, b);
    post_all(a, kWts);
    wait_all(a, kWts, unit);
  }
  if constexpr (kV == kCombine) {
    for (int j = b; j < RM; j += gridDim.x) {
      if (has_local_expert(a, j)) partial_row(a, j);
    }
    post_all(a, kPart);
    wait_all(a, kPart, unit);
    sum_partials(a, b);
  }
  rows_variant<kV>(a, call);
  if constexpr (kV == kCombineProtocol) {
    // combine plus the op's slab protocol: a start ticket, the wait for the freed posts of two
    // launches before (one for the weights slab, one for the partials slab), and both posts.
    protocol_start(a, call, 2);
    write_weights(a, b);
    post_all(a, kWts);
    wait_all(a, kWts, unit);
    for (int j = b; j < RM; j += gridDim.x) {
      if (has_local_expert(a, j)) partial_row(a, j);
    }
    post_all(a, kFreed);  // the weights slab is read
    post_all(a, kPart);
    wait_all(a, kPart, unit);
    sum_partials(a, b);
    post_all(a, kFreed);  // the partials slab is read
  }
}

__global__ void gate_kernel(const volatile int* go) {
  while (*go == 0) {
  }
}

template <int kV>
void launch(const Rank& a, int call, cudaStream_t s) {
  floor_kernel<kV><<<T, kThreads, 0, s>>>(a, call);
}
void launch_variant(int v, const Rank& a, int call, cudaStream_t s) {
  switch (v) {
    case kEmpty: return launch<kEmpty>(a, call, s);
    case kTicket: return launch<kTicket>(a, call, s);
    case kExchange: return launch<kExchange>(a, call, s);
    case kExchangeRelaxed: return launch<kExchangeRelaxed>(a, call, s);
    case kExchangeFlags: return launch<kExchangeFlags>(a, call, s);
    case kExchangeFlagsRelaxed: return launch<kExchangeFlagsRelaxed>(a, call, s);
    case kSendFlags: return launch<kSendFlags>(a, call, s);
    case kDispatchFlags: return launch<kDispatchFlags>(a, call, s);
    case kDispatchProtocol: return launch<kDispatchProtocol>(a, call, s);
    case kSendLL: return launch<kSendLL>(a, call, s);
    case kDispatchLL: return launch<kDispatchLL>(a, call, s);
    case kSendTicket: return launch<kSendTicket>(a, call, s);
    case kSendTicketFreed: return launch<kSendTicketFreed>(a, call, s);
    case kSendOpStart: return launch<kSendOpStart>(a, call, s);
    case kSendOpIds: return launch<kSendOpIds>(a, call, s);
    case kCombine: return launch<kCombine>(a, call, s);
    case kSend: return launch<kSend>(a, call, s);
    case kSendRelaxed: return launch<kSendRelaxed>(a, call, s);
    case kSendWait: return launch<kSendWait>(a, call, s);
    case kExpand: return launch<kExpand>(a, call, s);
    case kDispatch: return launch<kDispatch>(a, call, s);
    case kWeights: return launch<kWeights>(a, call, s);
    case kDispatchRows: return launch<kDispatchRows>(a, call, s);
    case kDispatchRowsScan: return launch<kDispatchRowsScan>(a, call, s);
    case kDispatchRowsProtocol: return launch<kDispatchRowsProtocol>(a, call, s);
    case kDispatchScanProtocol: return launch<kDispatchScanProtocol>(a, call, s);
    case kCombineRows: return launch<kCombineRows>(a, call, s);
    case kCombineProtocol: return launch<kCombineProtocol>(a, call, s);
    default: return launch<kCombineRowsProtocol>(a, call, s);
  }
}

template <typename V>
V* upload(int dev, const std::vector<V>& host) {
  V* p;
  CK(cudaSetDevice(dev));
  CK(cudaMalloc(&p, std::max<size_t>(1, host.size()) * sizeof(V)));
  CK(cudaMemcpy(p, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice));
  return p;
}
template <typename V>
V* zeros(int dev, size_t n) {
  V* p;
  CK(cudaSetDevice(dev));
  CK(cudaMalloc(&p, n * sizeof(V)));
  CK(cudaMemset(p, 0, n * sizeof(V)));
  return p;
}

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // each line out at once, also into a file
  int count = 0;
  CK(cudaGetDeviceCount(&count));
  if (count < R) {
    printf("needs %d GPUs\n", R);
    return 1;
  }
  for (int d = 0; d < R; ++d) {
    CK(cudaSetDevice(d));
    CK(cudaDeviceEnablePeerAccess(1 - d, 0));
  }
  // Routing: each rank's tokens pick 8 distinct experts uniformly (the bench's torch.rand().topk).
  std::mt19937 gen(7);
  std::vector<std::vector<int32_t>> ids(R, std::vector<int32_t>(T * K));
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      std::vector<int32_t> all(E);
      for (int e = 0; e < E; ++e) all[e] = e;
      std::shuffle(all.begin(), all.end(), gen);
      std::copy(all.begin(), all.begin() + K, ids[r].begin() + t * K);
    }
  }
  Rank rank[R];
  std::vector<std::vector<int32_t>> row_src(R), row_begin(R);
  std::vector<std::vector<int32_t>> slot(R, std::vector<int32_t>(RM * K, -1));
  std::vector<std::vector<float>> weights(R, std::vector<float>(T * K));
  size_t copies = 0, partial_rows = 0;
  for (int r = 0; r < R; ++r) {
    // Expert e's positions, in slab order (source, token); slot[(s, t), k]: the position of the
    // token's k-th expert when it is ours.
    row_begin[r].push_back(0);
    for (int e = 0; e < EL; ++e) {
      const int expert = r * EL + e;
      int pos = 0;
      for (int s = 0; s < R; ++s) {
        for (int t = 0; t < T; ++t) {
          for (int k = 0; k < K; ++k) {
            if (ids[s][t * K + k] != expert) continue;
            row_src[r].push_back(s * T + t);
            slot[r][(s * T + t) * K + k] = e * RM + pos++;
          }
        }
      }
      row_begin[r].push_back(static_cast<int32_t>(row_src[r].size()));
    }
    copies += row_src[r].size();
    for (int j = 0; j < RM; ++j) {
      partial_rows += std::any_of(&slot[r][j * K], &slot[r][j * K] + K, [](int v) { return v >= 0; });
    }
    for (int i = 0; i < T * K; ++i) weights[r][i] = (i % 2) ? 0.25f : 0.125f;
  }
  printf("decode shape: %d tokens a rank, hidden %d, top-%d of %d; expanded rows %zu (%.2f MB FP8 written per rank), "
         "partial rows %zu\n",
         T, H, K, E, copies, copies / 2.0 * H / 1e6, partial_rows);

  std::vector<std::vector<__nv_bfloat16>> eout_host(R);
  for (int r = 0; r < R; ++r) {
    CK(cudaSetDevice(r));
    Rank& a = rank[r];
    a.me = r;
    a.ctr[r] = zeros<uint64_t>(r, kCounters);
    a.slab[r] = zeros<uint8_t>(r, size_t(R) * T * kRowBytes);
    a.llslab[r] = zeros<uint64_t>(r, size_t(R) * T * kLLWords);
    a.wslab[r] = zeros<float>(r, size_t(R) * T * K);
    a.route[r] = zeros<int32_t>(r, size_t(R) * T * K);
    a.pslab[r] = zeros<__nv_bfloat16>(r, size_t(R) * T * H);
    std::vector<__nv_bfloat16> x(size_t(T) * H);
    std::mt19937 xg(100 + r);
    std::normal_distribution<float> nd;
    for (auto& v : x) v = __float2bfloat16(nd(xg));
    a.x = upload(r, x);
    std::vector<int32_t> mask(T, 0);
    for (int t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) mask[t] |= 1 << (ids[r][t * K + k] / EL);
    }
    a.mask = upload(r, mask);
    a.ids = upload(r, ids[r]);
    a.ids64 = upload(r, std::vector<int64_t>(ids[r].begin(), ids[r].end()));
    a.weights = upload(r, weights[r]);
    a.row_begin = upload(r, row_begin[r]);
    a.row_src = upload(r, row_src[r]);
    a.out = zeros<uint8_t>(r, size_t(EL) * RM * H);
    a.scales = zeros<float>(r, size_t(EL) * kGroups * RM);
    auto& eo = eout_host[r];
    eo.resize(size_t(EL) * RM * H);
    for (size_t i = 0; i < eo.size(); ++i) eo[i] = __float2bfloat16(float(int((i * 7 + r * 3) % 17) - 8));
    a.eout = upload(r, eo);
    a.slot = upload(r, slot[r]);
    a.cout = zeros<__nv_bfloat16>(r, size_t(T) * H);
  }
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < R; ++p) {
      rank[r].ctr[p] = rank[p].ctr[p];
      rank[r].slab[p] = rank[p].slab[p];
      rank[r].llslab[p] = rank[p].llslab[p];
      rank[r].wslab[p] = rank[p].wslab[p];
      rank[r].route[p] = rank[p].route[p];
      rank[r].pslab[p] = rank[p].pslab[p];
    }
  }

  volatile int* go;
  CK(cudaHostAlloc(const_cast<int**>(&go), sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  int* go_dev;
  CK(cudaHostGetDevicePointer(&go_dev, const_cast<int*>(go), 0));
  cudaStream_t stream[R];
  cudaEvent_t start[R], end[R];
  for (int r = 0; r < R; ++r) {
    CK(cudaSetDevice(r));
    CK(cudaStreamCreateWithFlags(&stream[r], cudaStreamNonBlocking));
    CK(cudaEventCreate(&start[r]));
    CK(cudaEventCreate(&end[r]));
  }

  // Checks, after every variant that writes the expanded rows or the combine's output (both zeroed
  // before each variant): every expanded row equals its sender's own copy of it where there is
  // one (rows to ourselves and across the link alike), and the combine's output equals the
  // host's sum.
  std::vector<std::vector<uint8_t>> slab_host(R, std::vector<uint8_t>(size_t(R) * T * kRowBytes));
  const auto check_dispatch = [&](const char* name) {
    bool ok = true;
    for (int r = 0; r < R; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaMemcpy(slab_host[r].data(), rank[r].slab[r], slab_host[r].size(), cudaMemcpyDeviceToHost));
    }
    std::vector<uint8_t> out(size_t(EL) * RM * H);
    std::vector<float> scales(size_t(EL) * kGroups * RM);
    for (int r = 0; r < R && ok; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaMemcpy(out.data(), rank[r].out, out.size(), cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(scales.data(), rank[r].scales, scales.size() * 4, cudaMemcpyDeviceToHost));
      for (int e = 0; e < EL && ok; ++e) {
        for (int pos = 0; pos < row_begin[r][e + 1] - row_begin[r][e]; ++pos) {
          // The row's copy in its sender's own slab when the token also went there, else our
          // slab's (a row from ourselves, or one that only came across the link).
          const int j = row_src[r][row_begin[r][e] + pos], s = j / T, t = j % T;
          const bool sender_has = std::any_of(&ids[s][t * K], &ids[s][t * K] + K, [&](int x) { return x / EL == s; });
          const uint8_t* copy = slab_host[sender_has ? s : r].data() + size_t(j) * kRowBytes;
          bool same = memcmp(out.data() + (size_t(e) * RM + pos) * H, copy, H) == 0;
          for (int c = 0; c < kGroups; ++c) {
            same &= memcmp(&scales[(size_t(e) * kGroups + c) * RM + pos], copy + kScaleOff + 4 * c, 4) == 0;
          }
          if (!same) {
            printf("CHECK FAILED: %s: rank %d expert %d position %d\n", name, r, e, pos);
            ok = false;
            break;
          }
        }
      }
    }
    return ok;
  };
  const auto check_combine = [&](const char* name) {
    bool ok = true;
    for (int r = 0; r < R && ok; ++r) {
      std::vector<__nv_bfloat16> got(size_t(T) * H);
      CK(cudaSetDevice(r));
      CK(cudaMemcpy(got.data(), rank[r].cout, got.size() * 2, cudaMemcpyDeviceToHost));
      for (int t = 0; t < T && ok; ++t) {
        for (int c = 0; c < H; ++c) {
          float want = 0;
          for (int k = 0; k < K; ++k) {
            const int expert = ids[r][t * K + k], d = expert / EL;
            const int at = slot[d][(r * T + t) * K + k];
            want += weights[r][t * K + k] * __bfloat162float(eout_host[d][size_t(at) * H + c]);
          }
          if (__bfloat162float(got[size_t(t) * H + c]) != want) {
            printf("CHECK FAILED: %s: combine rank %d token %d channel %d: %f against %f\n", name, r, t, c,
                   __bfloat162float(got[size_t(t) * H + c]), want);
            ok = false;
            break;
          }
        }
      }
    }
    return ok;
  };
  const auto expands = [](int v) {
    return v == kExpand || v == kDispatch || v == kDispatchFlags || v == kDispatchProtocol || v == kDispatchLL ||
           v == kDispatchRows || v == kDispatchRowsScan || v == kDispatchRowsProtocol || v == kDispatchScanProtocol;
  };
  const auto combines = [](int v) {
    return v == kCombine || v == kCombineProtocol || v == kCombineRows || v == kCombineRowsProtocol;
  };
  bool ok = true;

  printf("%-22s %12s %12s   (us per launch, graph of %d, median of %d replays; min over replays)\n", "variant",
         "rank 0", "rank 1", kCalls, kReplays);
  for (int v = 0; v < kVariants; ++v) {
    for (int r = 0; r < R; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaMemset(rank[r].out, 0, size_t(EL) * RM * H));
      CK(cudaMemset(rank[r].scales, 0, size_t(EL) * kGroups * RM * 4));
      CK(cudaMemset(rank[r].cout, 0, size_t(T) * H * 2));
    }
    cudaGraphExec_t exec[R];
    for (int r = 0; r < R; ++r) {
      CK(cudaSetDevice(r));
      cudaGraph_t graph;
      CK(cudaStreamBeginCapture(stream[r], cudaStreamCaptureModeThreadLocal));
      for (int c = 0; c < kCalls; ++c) launch_variant(v, rank[r], c, stream[r]);
      CK(cudaStreamEndCapture(stream[r], &graph));
      CK(cudaGraphInstantiate(&exec[r], graph, 0));
      CK(cudaGraphDestroy(graph));
    }
    std::vector<float> times[R];
    for (int rep = 0; rep < kReplays + 3; ++rep) {
      *go = 0;
      for (int r = 0; r < R; ++r) {
        CK(cudaSetDevice(r));
        CK(cudaMemsetAsync(rank[r].ctr[r], 0, kCounters * sizeof(uint64_t), stream[r]));
        CK(cudaMemsetAsync(rank[r].llslab[r], 0, size_t(R) * T * kLLWords * sizeof(uint64_t), stream[r]));
        CK(cudaStreamSynchronize(stream[r]));
      }
      for (int r = 0; r < R; ++r) {
        CK(cudaSetDevice(r));
        gate_kernel<<<1, 1, 0, stream[r]>>>(go_dev);
        CK(cudaEventRecord(start[r], stream[r]));
        CK(cudaGraphLaunch(exec[r], stream[r]));
        CK(cudaEventRecord(end[r], stream[r]));
      }
      *go = 1;
      for (int r = 0; r < R; ++r) {
        CK(cudaSetDevice(r));
        CK(cudaStreamSynchronize(stream[r]));
        float ms;
        CK(cudaEventElapsedTime(&ms, start[r], end[r]));
        if (rep >= 3) times[r].push_back(ms * 1000.0f / kCalls);
      }
    }
    printf("%-22s", kNames[v]);
    for (int r = 0; r < R; ++r) {
      std::sort(times[r].begin(), times[r].end());
      printf(" %6.2f (%5.2f)", times[r][times[r].size() / 2], times[r][0]);
    }
    printf("\n");
    for (int r = 0; r < R; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaGraphExecDestroy(exec[r]));
    }
    if (expands(v)) ok &= check_dispatch(kNames[v]);
    if (combines(v)) ok &= check_combine(kNames[v]);
  }

  printf(ok ? "checks PASS\n" : "checks FAIL\n");
  return ok ? 0 : 1;
}
