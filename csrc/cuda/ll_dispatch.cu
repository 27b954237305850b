// Low-latency dispatch over NVLink: one kernel body with two phases. The op runs both in one
// launch (ll_dispatch_kernel); its send and recv halves (the hook ops) launch one phase each
// (ll_dispatch_half_kernel).
//
//   send: each block takes tokens (t = block, block + grid, ...) and writes each token's wire row
//         (cast to FP8 on the fly if asked) once into every destination *rank*'s dispatch slab, at
//         (our rank, t); at a rank the token does not go to it writes only a -1 source there,
//         and the blocks write a -1 source into every slot past our token count too, so that a
//         receiver needs no count. The slot is the token's own index, so no block scans the
//         tokens before its own (a dependent load and two barriers: ~2.5 us of the probe's 6.8 us
//         send, session 10). Then the block alone adds its share to our arrival counter at every
//         destination (red.release.sys). It never waits for data, only (rarely) for a receiver
//         to have read the slab's previous contents.
//   recv: each block waits until every source's arrivals reach a whole unit (all its send blocks
//         are in, whatever their number), and for each of its local experts (e = block,
//         block + grid, ...) finds the slab rows whose source is not -1 that name the expert (in
//         slab order: source rank, then token, so the layout is fixed by the data, not by
//         atomics) and copies them into the static [E_local, R*M, H] output. Then it adds its
//         share to every source's freed counter.
//
// Why this costs less than the two kernels it replaces (send + recv, ~27 us FP8 under CUDA
// graphs, of which ~20 us did not depend on the data):
//   - No grid-wide "last block" ticket on either side. Each one cost a system fence per block
//     (which waits for the block's NVLink writes to be acknowledged), an atomic, then the last
//     block's own work: ~2-4 us each, serialized behind the slowest block. Now every block posts
//     its own share (the normal-mode dispatch's per-block arrivals, with a unit that makes the
//     grid size free), so the flags rise as soon as the last block's rows are out.
//   - No separate "-1" marking pass: the last send block used to re-scan every token's ids and
//     write a -1 source into every unused slab slot (remote stores, then a second system fence:
//     one more NVLink round trip, ~1-2 us). Now each token's block writes its own -1 sources
//     before its one release, and the posted count bounds the rows the receiver reads.
//   - One launch instead of two for the op (~1-3 us of launch and drain under graphs), and each
//     block's receive wait starts while the flags are in flight instead of after a kernel
//     boundary.
//   - Each block reads its epoch from the counters as it starts and adds its share without
//     waiting (begin_launch), so no block ever waits for another one of its own launch except
//     through the peers' counters.
// What it costs: the op's grid must be co-resident (its receive blocks wait for the send blocks of
// the same launch on this rank), so the op launches at most one block per SM (every GPU fits one
// 512-thread block per SM); the halves have no such limit. Each receive block posts its own freed
// share (R reds per block instead of R per call), and a send writes a -1 source into each of its
// M - T unused slots at every rank.
// EP_OPS_LL_DISPATCH_SPLIT=1 runs the op as its two halves (two launches of the same kernel), for
// A/B timings of the fusion alone.
//
// Not done (ideas measured against nothing yet): receive blocks that start on a source as soon as
// its arrivals are complete (with 2 ranks the two sources arrive together), and a compact
// per-source routing area instead of reading ids out of the wide rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>

#include "ll_common.cuh"
#include "ll_ops.h"
#include "nvl_rows.cuh"

namespace ep_ops::cuda {
namespace {

struct DispatchArgs {
  PeerView v;
  int slab, num_max, num_topk, hidden;
  bool use_fp8;
  wire::DispatchRow row;
  int64_t slab_offset;  // of the slab in every rank's buffer (send)
  uint8_t* rows;        // our slab, which the peers write into (receive)
  // send phase
  const __nv_bfloat16* x;   // [T, H]
  const int64_t* topk_idx;  // [T, K]
  int num_tokens;
  int64_t num_experts, per_rank, layout_key;
  bool round_scale;
  // receive phase
  int cols;  // scale columns of the output
  int64_t first_expert, num_local;
  bool use_ue8m0;
  uint8_t* recv_x;
  void* scales;  // float [E, cols, R*M] (column-major) or packed UE8M0 int32
  int32_t* recv_count;
  int32_t* src_info;
  int64_t* layout_range;
  int32_t* token_slots;
};

__device__ __forceinline__ uint8_t* slab_row(const DispatchArgs& a, int dest, int64_t slot) {
  return a.v.base[dest] + a.slab_offset + (a.v.rank * static_cast<int64_t>(a.num_max) + slot) *
                                              a.row.bytes();
}

// Exactly the collective backend's cast (csrc/collective/fp8.cpp): IEEE division and
// reciprocal, no fused multiply-add, c10's float -> e4m3fn rounding.
__device__ __forceinline__ float fp8_scale_inv(float amax, bool round_scale) {
  float scale_inv = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  if (round_scale) {
    const int bits = __float_as_int(scale_inv);
    scale_inv = __int_as_float((bits & 0x7F800000) + ((bits & 0x007FFFFF) != 0 ? (1 << 23) : 0));
  }
  return scale_inv;
}

// Four values to e4m3fn bytes (value i in byte i), as c10::Float8_e4m3fn(float) rounds them.
// Hopper's cvt.rn.satfinite takes two instructions. c10's software conversion (branchy, ~20
// instructions a value) made the cast the send phase's largest cost (probe on H200, session 17:
// 3.3 us of a block's time with no row sent, against 1.3 for BF16). The two agree on every value
// the scaled cast produces: round to nearest even, subnormals included, and |v| <= 448 *
// (1 + 2^-22) (amax / (amax / 448) in IEEE arithmetic), far from where c10 and satfinite part
// (464). A NaN (an infinite amax makes one) takes c10's encoding, 0x7f with the sign, which the
// hardware does not promise.
__device__ __forceinline__ uint32_t e4m3x4(const float (&v)[4]) {
  uint16_t low, high;  // cvt puts its first operand in the upper byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(low) : "f"(v[1]), "f"(v[0]));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(high) : "f"(v[3]), "f"(v[2]));
  uint32_t packed = low | (static_cast<uint32_t>(high) << 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (isnan(v[i])) {
      const uint32_t nan = 0x7Fu | ((__float_as_uint(v[i]) >> 24) & 0x80u);
      packed = (packed & ~(0xFFu << (8 * i))) | (nan << (8 * i));
    }
  }
  return packed;
}

// A warp casts 128-channel groups g = warp, warp + kLLWarps, ...: the loads of up to
// kGroupsInFlight of its groups are issued together before any is cast, so the row costs about
// one memory latency instead of one per group (probed on H200, 2026-11-22: 7.2 us per token
// with one group in flight at hidden 7168, 3.5 groups per warp).
constexpr int kGroupsInFlight = 4;

// A warp's loads of one round of its groups (from group g0 on): 4 BF16 channels per lane each.
struct Fp8Round {
  uint2 raw[kGroupsInFlight];
};

__device__ __forceinline__ void load_fp8_round(const DispatchArgs& a, int64_t t, int g0, Fp8Round& r) {
  const int lane = threadIdx.x & 31, groups = a.hidden / static_cast<int>(wire::kFp8Block);
#pragma unroll
  for (int u = 0; u < kGroupsInFlight; ++u) {
    const int64_t channel = (g0 + u * kLLWarps) * wire::kFp8Block + lane * 4;
    if (g0 + u * kLLWarps < groups) r.raw[u] = __ldg(reinterpret_cast<const uint2*>(a.x + t * a.hidden + channel));
  }
}

__device__ __forceinline__ void cast_fp8_round(const DispatchArgs& a, int64_t t, int g0, const Fp8Round& r,
                                               uint32_t mask) {
  const int lane = threadIdx.x & 31, groups = a.hidden / static_cast<int>(wire::kFp8Block);
#pragma unroll
  for (int u = 0; u < kGroupsInFlight; ++u) {
    const int g = g0 + u * kLLWarps;
    if (g >= groups) break;  // warp-uniform
    const int64_t channel = g * wire::kFp8Block + lane * 4;
    const auto* pair = reinterpret_cast<const __nv_bfloat162*>(&r.raw[u]);
    float f[4] = {__low2float(pair[0]), __high2float(pair[0]), __low2float(pair[1]), __high2float(pair[1])};
    float amax = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
#pragma unroll
    for (int step = 16; step > 0; step /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, step));
    }
    const float scale_inv = fp8_scale_inv(amax, a.round_scale);
    const float inv = __frcp_rn(scale_inv);
    float scaled[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) scaled[i] = __fmul_rn(f[i], inv);
    const uint32_t packed = e4m3x4(scaled);
    for (int d = 0; d < a.v.num_ranks; ++d) {
      if (!((mask >> d) & 1u)) continue;
      uint8_t* row = slab_row(a, d, t);
      *reinterpret_cast<uint32_t*>(row + channel) = packed;
      if (lane == 0) reinterpret_cast<float*>(row + a.row.scale_offset())[g] = scale_inv;
    }
  }
}

// The token's row, cast; `first`: the warp's first round, loaded by the caller (before the
// token's ids, so that both share one memory latency).
__device__ __forceinline__ void send_fp8_row(const DispatchArgs& a, int64_t t, uint32_t mask,
                                             const Fp8Round& first) {
  const int warp = threadIdx.x >> 5, groups = a.hidden / static_cast<int>(wire::kFp8Block);
  cast_fp8_round(a, t, warp, first, mask);
  for (int g0 = warp + kLLWarps * kGroupsInFlight; g0 < groups; g0 += kLLWarps * kGroupsInFlight) {
    Fp8Round r;
    load_fp8_round(a, t, g0, r);
    cast_fp8_round(a, t, g0, r, mask);
  }
}

__device__ __forceinline__ void send_bf16_row(const DispatchArgs& a, int64_t t, uint32_t mask) {
  constexpr int kUnroll = 2;
  const auto* src = reinterpret_cast<const int4*>(a.x + t * a.hidden);
  const int vectors = a.hidden / 8, stride = blockDim.x;
  for (int i0 = threadIdx.x; i0 < vectors; i0 += kUnroll * stride) {
    int4 value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * stride < vectors) value[u] = __ldg(src + i0 + u * stride);
    }
    for (int d = 0; d < a.v.num_ranks; ++d) {
      if (!((mask >> d) & 1u)) continue;
      auto* dst = reinterpret_cast<int4*>(slab_row(a, d, t));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * stride < vectors) dst[i0 + u * stride] = value[u];
      }
    }
  }
}

// The send phase. false: a wait gave up (the watchdog tripped): stop without touching data.
// `start`: what the block read as it started (begin_launch); epoch[0] is on our send counter of
// the slab.
__device__ __forceinline__ bool send_rows(const DispatchArgs& a, const LaunchStart& start) {
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk;
  if (!wait_freed_since_start(a.v, start, kLLDispatch, a.slab, units_before(start.epoch[0]),
                              kWaitLowLatencyDispatchFreed)) {
    return false;
  }

  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    Fp8Round first;  // the token's first loads go out before its ids'
    if (a.use_fp8) load_fp8_round(a, t, threadIdx.x >> 5, first);
    const uint32_t mask = token_rank_mask(a.topk_idx, t, K, a.num_experts, a.per_rank);
    if (a.use_fp8) {
      send_fp8_row(a, t, mask, first);
    } else {
      send_bf16_row(a, t, mask);
    }
    for (int d = 0; d < R; ++d) {
      uint8_t* row = slab_row(a, d, t);
      const bool sent = (mask >> d) & 1u;
      if (threadIdx.x == 0) *reinterpret_cast<int32_t*>(row + a.row.src_offset()) = sent ? t : -1;
      if (sent && threadIdx.x < K) {
        reinterpret_cast<int32_t*>(row + a.row.topk_offset())[threadIdx.x] =
            static_cast<int32_t>(a.topk_idx[static_cast<int64_t>(t) * K + threadIdx.x]);
      }
    }
  }
  // The slots past our token count: a -1 source at every destination (the receiver reads every
  // slot; a count posted beside the arrivals cost it one more dependent load after its wait).
  const int empty = (a.num_max - a.num_tokens) * R;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < empty; i += gridDim.x * blockDim.x) {
    *reinterpret_cast<int32_t*>(slab_row(a, i % R, a.num_tokens + i / R) + a.row.src_offset()) = -1;
  }

  // Our rows are out: this block's share of the arrivals at every destination.
  __syncthreads();
  if (threadIdx.x < R) {
    add_share_release(&ll_control(a.v.base[threadIdx.x])->arrivals[kLLDispatch][a.slab][me]);
  }
  return true;
}

__device__ __forceinline__ int32_t row_src(const DispatchArgs& a, int64_t j) {
  return *reinterpret_cast<const int32_t*>(a.rows + j * a.row.bytes() + a.row.src_offset());
}
__device__ __forceinline__ int32_t row_expert(const DispatchArgs& a, int64_t j, int k) {
  return reinterpret_cast<const int32_t*>(a.rows + j * a.row.bytes() + a.row.topk_offset())[k];
}

__device__ __forceinline__ void copy_scales(const DispatchArgs& a, int e, const int* row_of,
                                            int total) {
  const int64_t RM = static_cast<int64_t>(a.v.num_ranks) * a.num_max;
  const int64_t n = static_cast<int64_t>(total) * a.cols;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int c = static_cast<int>(i / total), pos = static_cast<int>(i % total);
    const auto* src = reinterpret_cast<const float*>(a.rows + row_of[pos] * a.row.bytes() +
                                                     a.row.scale_offset());
    const int64_t at = (e * static_cast<int64_t>(a.cols) + c) * RM + pos;  // column-major
    if (a.use_ue8m0) {
      uint32_t packed = 0;
      for (int b = 0; b < 4; ++b) {
        packed |= ((static_cast<uint32_t>(__float_as_int(src[4 * c + b])) >> 23) & 0xFFu) << (8 * b);
      }
      static_cast<int32_t*>(a.scales)[at] = static_cast<int32_t>(packed);
    } else {
      static_cast<float*>(a.scales)[at] = src[c];
    }
  }
}

constexpr int kIdsInFlight = 8;  // a row's expert ids loaded together in the receive's scan

// Payload int4s per lane in flight when the receive copies a row out: an FP8 row of hidden 7168
// in one round of loads, a BF16 row in two (warp_copy's default of 4 took 4 and 7 rounds).
constexpr int kExpandUnroll = 14;

// Local expert e's block of the outputs, from the slab rows whose source is not -1.
// Shared scratch: row_of [R*M], warp_sums [kLLWarps], begins [kMaxNvlRanks + 1].
// The thread that finds a row of the expert writes the row's src_info and recv_token_slots entries
// itself, from the source and ids it loaded for the scan (reading them again for each output cost
// two more dependent loads before the copy).
__device__ __forceinline__ void expand_expert(const DispatchArgs& a, int e, int* row_of, int* warp_sums,
                                              int* begins) {
  const int R = a.v.num_ranks, K = a.num_topk, M = a.num_max, RM = R * M;
  const int64_t expert = a.first_expert + e;
  const int64_t block = static_cast<int64_t>(e) * RM;
  int total = 0;
  for (int first = 0; first < RM; first += blockDim.x) {
    const int j = first + threadIdx.x;
    int32_t src = -1;
    uint32_t matches = 0;  // bit k: id k names the expert
    if (j < RM) {
      // The source and the ids loaded together: one memory latency, not two (a row whose
      // source is -1 carries stale ids, which the source's test discards).
      src = row_src(a, j);
      for (int k0 = 0; k0 < K; k0 += kIdsInFlight) {
        int32_t ids[kIdsInFlight];
#pragma unroll
        for (int u = 0; u < kIdsInFlight; ++u) ids[u] = k0 + u < K ? row_expert(a, j, k0 + u) : -1;
#pragma unroll
        for (int u = 0; u < kIdsInFlight; ++u) matches |= static_cast<uint32_t>(ids[u] == expert) << (k0 + u);
      }
      if (src < 0) matches = 0;
    }
    const bool hit = matches != 0;
    int chunk = 0;
    const int pos = total + block_exclusive_count(hit, warp_sums, &chunk);
    if (hit) {
      row_of[pos] = j;
      a.src_info[block + pos] = src;
      for (uint32_t m = matches; m != 0; m &= m - 1) {
        a.token_slots[j * K + __ffs(m) - 1] = static_cast<int32_t>(block + pos);
      }
    }
    if (j < RM && j % M == 0) begins[j / M] = pos;
    total += chunk;
  }
  if (threadIdx.x == 0) {
    begins[R] = total;
    a.recv_count[e] = total;
  }
  __syncthreads();

  if (threadIdx.x < R) {
    const int64_t begin = begins[threadIdx.x], count = begins[threadIdx.x + 1] - begin;
    a.layout_range[e * R + threadIdx.x] = (begin << 32) | count;
  }
  for (int pos = total + threadIdx.x; pos < RM; pos += blockDim.x) a.src_info[block + pos] = -1;
  if (e == 0) {  // entries no local expert claims, and every entry of a slot no row came into
    for (int i = threadIdx.x; i < RM * K; i += blockDim.x) {
      const int j = i / K, k = i % K;
      if (row_src(a, j) < 0) {
        a.token_slots[i] = -1;
        continue;
      }
      const int64_t id = row_expert(a, j, k);
      if (id < a.first_expert || id >= a.first_expert + a.num_local) a.token_slots[i] = -1;
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t payload = a.row.payload_bytes();
  for (int pos = warp; pos < total; pos += kLLWarps) {
    warp_copy<false, false, kExpandUnroll>(a.recv_x + (block + pos) * payload,
                                           a.rows + row_of[pos] * a.row.bytes(), payload, lane);
  }
  if (a.use_fp8) copy_scales(a, e, row_of, total);
  __syncthreads();  // row_of and begins are rewritten for the block's next expert
}

// The receive phase. `ticket`: this block's epoch on our read counter of the slab.
__device__ __forceinline__ void recv_rows(const DispatchArgs& a, uint64_t ticket, int* row_of) {
  __shared__ int warp_sums[kLLWarps];
  __shared__ int begins[kMaxNvlRanks + 1];
  const int me = a.v.rank, R = a.v.num_ranks;
  // Every send block of every source is in once its arrivals reach the next whole unit.
  const bool ok = threadIdx.x >= R || wait_unit_arrived(a.v, kLLDispatch, a.slab, threadIdx.x, ticket,
                                                        kWaitLowLatencyDispatchRows);
  if (!block_waits_ok(ok)) return;

  for (int e = blockIdx.x; e < a.num_local; e += gridDim.x) {
    expand_expert(a, e, row_of, warp_sums, begins);
  }
  // Done reading the slab (the barrier ends expand_expert): this block's share of the freed
  // counter at every source.
  __syncthreads();
  if (threadIdx.x < R) add_share_release(&ll_control(a.v.base[threadIdx.x])->freed[kLLDispatch][a.slab][me]);
}

// Both phases (the op), or one (its halves). In the op, a block's receive waits for the send
// phase of every block of the launch on this rank: the grid must be co-resident (host side).
template <bool kSend, bool kRecv>
__device__ __forceinline__ void dispatch(const DispatchArgs& a) {
  extern __shared__ int row_of[];  // [R*M]: the slab row of each position in an expert's block
  __shared__ LaunchStart start;
  LowLatencyControl* mine = ll_control(a.v.base[a.v.rank]);
  const StartCounters counters{{kSend ? &mine->sends[kLLDispatch][a.slab] : nullptr,
                                kRecv ? &mine->recvs[kLLDispatch][a.slab] : nullptr},
                               kSend ? mine->freed[kLLDispatch][a.slab] : nullptr,
                               a.layout_key};
  if (!begin_launch(a.v, counters, start)) return;
  if (kSend && !send_rows(a, start)) return;
  if (kRecv) recv_rows(a, start.epoch[1], row_of);
}

// The op: one block per SM at most, so ptxas may use up to 128 registers (with the default
// bound it keeps 64 and spills in the send phase).
__global__ void __launch_bounds__(kLLThreads, 1) ll_dispatch_kernel(DispatchArgs a) {
  dispatch<true, true>(a);
}

// A half: a block per token (send) or per local expert (receive), two per SM where they fit.
template <bool kSend>
__global__ void __launch_bounds__(kLLThreads) ll_dispatch_half_kernel(DispatchArgs a) {
  dispatch<kSend, !kSend>(a);
}

// What both phases need; the per-phase parts are filled by send_args / with_recv.
DispatchArgs common_args(const LowLatencyBuffer& b, int slab, int64_t num_max, int64_t hidden,
                         int64_t num_topk, int64_t num_experts, bool use_fp8) {
  const int64_t R = b.view.num_ranks;
  const LowLatencyGeometry geometry(R, num_max, hidden, num_topk);
  DispatchArgs a{};
  a.v = b.view;
  a.slab = slab;
  a.num_max = static_cast<int>(num_max);
  a.num_topk = static_cast<int>(num_topk);
  a.hidden = static_cast<int>(hidden);
  a.use_fp8 = use_fp8;
  a.row = wire::DispatchRow{hidden, num_topk, use_fp8};
  a.slab_offset = geometry.offset(kLLDispatch, slab);
  a.rows = b.local.data_ptr<uint8_t>() + a.slab_offset;
  a.num_experts = num_experts;
  a.per_rank = num_experts / R;
  a.layout_key = geometry.key();
  return a;
}

// The send phase's inputs in the layout the kernels read; the caller holds them until the launch
// is queued.
struct SendInputs {
  at::Tensor x, topk_idx;
};

// What the send phase (and the whole op) needs: common_args plus the inputs, kept in `held`.
DispatchArgs send_args(const LowLatencyBuffer& b, int slab, const at::Tensor& x, const at::Tensor& topk_idx,
                       int64_t num_max, int64_t num_experts, bool use_fp8, bool round_scale,
                       SendInputs& held) {
  held = {aligned16(x), topk_idx.contiguous()};
  DispatchArgs a = common_args(b, slab, num_max, x.size(1), topk_idx.size(1), num_experts, use_fp8);
  a.x = reinterpret_cast<const __nv_bfloat16*>(held.x.data_ptr());
  a.topk_idx = held.topk_idx.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(held.x.size(0));
  a.round_scale = round_scale;
  return a;
}

// Allocates the outputs of the receive phase on `like`'s device and points `a` at them.
collective::LowLatencyRecv with_recv(DispatchArgs& a, const at::Tensor& like, bool use_ue8m0) {
  const int64_t R = a.v.num_ranks, per_rank = a.per_rank, RM = R * a.num_max;
  const int64_t hidden = a.hidden, num_topk = a.num_topk;
  const bool use_fp8 = a.use_fp8;
  auto options = like.options();
  auto recv_x = at::empty({per_rank, RM, hidden},
                          options.dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  const int64_t cols = use_fp8 ? hidden / (use_ue8m0 ? wire::kFp8Block * wire::kUe8m0Pack
                                                     : wire::kFp8Block)
                               : 0;
  auto scales = use_fp8 ? at::empty_strided({per_rank, RM, cols}, {cols * RM, 1, RM},
                                            options.dtype(use_ue8m0 ? at::kInt : at::kFloat))
                        : at::empty({0}, options.dtype(at::kFloat));
  auto recv_count = at::empty({per_rank}, options.dtype(at::kInt));
  auto src_info = at::empty({per_rank, RM}, options.dtype(at::kInt));
  auto layout_range = at::empty({per_rank, R}, options.dtype(at::kLong));
  auto token_slots = at::empty({R, a.num_max, num_topk}, options.dtype(at::kInt));
  a.cols = static_cast<int>(cols);
  a.first_expert = a.v.rank * per_rank;
  a.num_local = per_rank;
  a.use_ue8m0 = use_ue8m0;
  a.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
  a.scales = use_fp8 ? scales.data_ptr() : nullptr;
  a.recv_count = recv_count.data_ptr<int32_t>();
  a.src_info = src_info.data_ptr<int32_t>();
  a.layout_range = layout_range.data_ptr<int64_t>();
  a.token_slots = token_slots.data_ptr<int32_t>();
  return {recv_x, scales, recv_count, src_info, layout_range, token_slots};
}

// kSend, kRecv: which phases; both: the op, which must stay within one block per SM.
template <bool kSend, bool kRecv>
void launch(const DispatchArgs& a, int64_t blocks) {
  const size_t shared = kRecv ? static_cast<size_t>(a.v.num_ranks) * a.num_max * sizeof(int) : 0;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, blocks)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (kSend && kRecv) {
    ll_dispatch_kernel<<<grid, kLLThreads, shared, stream>>>(a);
  } else {
    ll_dispatch_half_kernel<kSend><<<grid, kLLThreads, shared, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// EP_OPS_LL_DISPATCH_SPLIT=1: the op as its two halves, for A/B timings of the fusion.
bool split_dispatch() {
  static const bool split = ll_env_flag("EP_OPS_LL_DISPATCH_SPLIT");
  return split;
}

}  // namespace

at::Tensor ll_dispatch_send(const LowLatencyBuffer& b, int slab, const at::Tensor& x,
                            const at::Tensor& topk_idx, int64_t num_max, int64_t num_experts,
                            bool use_fp8, bool round_scale) {
  c10::cuda::CUDAGuard guard(x.device());
  SendInputs held;
  const DispatchArgs a = send_args(b, slab, x, topk_idx, num_max, num_experts, use_fp8, round_scale, held);
  launch<true, false>(a, a.num_tokens);  // a block per token
  // What the peers write into our slab: the recv half reads it once their flags are up.
  return b.local.narrow(0, a.slab_offset, b.view.num_ranks * num_max * a.row.bytes())
      .view({b.view.num_ranks, num_max, a.row.bytes()});
}

collective::LowLatencyRecv ll_dispatch_recv(const LowLatencyBuffer& b, int slab,
                                            const at::Tensor& recv_packed, int64_t num_max,
                                            int64_t hidden, int64_t num_topk, int64_t num_experts,
                                            bool use_fp8, bool use_ue8m0) {
  c10::cuda::CUDAGuard guard(recv_packed.device());
  DispatchArgs a = common_args(b, slab, num_max, hidden, num_topk, num_experts, use_fp8);
  auto out = with_recv(a, recv_packed, use_ue8m0);
  launch<false, true>(a, a.num_local);  // a block per local expert
  return out;
}

collective::LowLatencyRecv ll_dispatch(const LowLatencyBuffer& b, int slab, const at::Tensor& x,
                                       const at::Tensor& topk_idx, int64_t num_max,
                                       int64_t num_experts, bool use_fp8, bool round_scale,
                                       bool use_ue8m0) {
  c10::cuda::CUDAGuard guard(x.device());
  SendInputs held;
  DispatchArgs a = send_args(b, slab, x, topk_idx, num_max, num_experts, use_fp8, round_scale, held);
  auto out = with_recv(a, x, use_ue8m0);
  if (split_dispatch()) {
    launch<true, false>(a, a.num_tokens);
    launch<false, true>(a, a.num_local);
  } else {
    // One block per token or local expert, but never more than one per SM: every block must be
    // resident at once (receive blocks wait for this launch's send blocks).
    const int64_t blocks = std::max<int64_t>(a.num_tokens, a.num_local);
    launch<true, true>(a, std::min<int64_t>(blocks, ll_num_sms(x.get_device())));
  }
  return out;
}

}  // namespace ep_ops::cuda
