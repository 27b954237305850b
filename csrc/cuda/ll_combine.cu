// Low-latency combine over NVLink. Each expert rank sums its own experts' outputs of a token
// (weighted) and sends that one partial back, instead of one row per (token, expert). One kernel
// body with three phases; the op runs all three in one launch, its send half (the hook op
// low_latency_combine_send) the first two in one launch, its recv half the third:
//
//   weights:  each block takes tokens (t = block, block + grid, ...) and writes each token's top-k
//             weights into the weights slab of every rank holding one of its experts, at (our
//             rank, t): a token's slot is its own index, as in the dispatch; then adds its share
//             to our weights arrivals at every rank.
//   partials: each block waits until every source's weights arrivals reach a whole unit, then for
//             each (source rank, slot) row j = block, block + grid, ... sums w_k * x[slot_k] over
//             its local k in float32, k ascending (__fmul_rn / __fadd_rn, no FMA), rounds to BF16
//             once and writes the row into the source rank's partials slab. Then it adds its share
//             to the source's weights-freed counter and to our partials arrivals there.
//   recv:     each block takes tokens, waits until every rank's partials arrivals reach a whole
//             unit, adds the token's partials in float32 in ascending rank order and rounds to
//             BF16 once (the collective backend's exact order), then adds its share to every
//             source's partials-freed counter.
// use_logfmt: the partials phase encodes each BF16-rounded row as LogFMT-10 (ll_logfmt.cuh; 0.66
// of the bytes over NVLink) and the recv phase decodes each to float32 before the same sums.
//
// Why this costs less than the three kernels it replaces (~35 us per call under CUDA graphs at
// 128 tokens, ~24 us of it fixed: 1 token per rank still cost ~24 us):
//   - No grid-wide "last block" ticket. There were three, one per kernel, each a system fence per
//     block (waiting for the block's NVLink writes to be acknowledged), an atomic, then the last
//     block's own fence and flag store: ~2-4 us each, serialized behind the slowest block. Now
//     every block posts its own share of a kLLUnit (the dispatch's scheme, ll_common.cuh), so a
//     flag is complete as soon as the last block's rows are out: estimate -6 to -9 us.
//   - One launch instead of three for the op (two for the send half): ~1-3 us of launch and drain
//     per kernel boundary under graphs, and each phase's wait starts while the flags are in flight
//     instead of after a kernel boundary: estimate -3 to -5 us. The recv phase computes its first
//     token's ranks before it waits, so that work hides behind the wait.
//   - Each block reads its epochs from the counters as it starts and adds its shares without
//     waiting (begin_launch), so no block waits for another one of its own launch except through
//     the counters.
// Estimate (not measured): ~10-12 us of fixed cost left (a launch, three NVLink flag round trips,
// the per-token slot scans), so ~20 us per call at 128 tokens and ~12 us at 1 token.
// What it costs: a launch with more than one phase must be co-resident (partials blocks wait for
// this launch's weights blocks on this rank, recv blocks for its partials blocks), so it runs at
// most one block per SM (ll_num_sms). The partials phase then has one 512-thread block per SM
// instead of up to two (fewer loads in flight at large batches). Each block posts its own shares
// (R reds per block and counter instead of R per kernel), and reads up to four epochs.
// EP_OPS_LL_COMBINE_SPLIT=1 runs every phase as its own launch (weights, partials, recv: the op in
// three launches, the send half in two), with no co-residency needed: the fallback, and the A/B
// for the fusion. Every counter is per (phase, slab), so a rank may run either way.
//
// The partials phase keeps a row's slots and weights one row ahead (the first row's slots load
// before the weights wait), and a thread sums two vectors of a row at once (kRowVectors).
// Not done: it does not start on a source as soon as that source's weights are in, and it does
// not load the first row's expert outputs before the weights wait.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>

#include "ll_common.cuh"
#include "ll_logfmt.cuh"
#include "ll_ops.h"

namespace ep_ops::cuda {
namespace {

constexpr int kMaxLLTopk = 32;
constexpr int kBatch = 8;  // expert rows loaded together in the partial sums

struct CombineArgs {
  PeerView v;
  int num_tokens, num_topk, num_max, hidden;
  int weights_slab, partials_slab;
  bool logfmt;  // partials as LogFMT-10 (ll_logfmt.cuh) instead of BF16
  int64_t num_experts, per_rank, layout_key;
  int64_t weights_offset, weights_row;   // the weights slab, in every rank's buffer; its row bytes
  int64_t partials_offset, partial_row;  // the same for the partials slab
  const uint8_t* weights;   // our weights slab (partials phase)
  const uint8_t* partials;  // our partials slab (recv phase)
  const int64_t* topk_idx;     // [T, K] (weights, recv)
  const float* topk_weights;   // [T, K] (weights)
  const __nv_bfloat16* x;      // [E_local * R*M, H] expert outputs (partials)
  const int32_t* token_slots;  // [R, M, K] from the dispatch (partials)
  __nv_bfloat16* out;          // [T, H] (recv)
};

// The weights phase. false: a wait gave up (the watchdog tripped): stop without touching data.
// `start`: what the block read as it started (begin_launch); epoch[0] is on our weights send
// counter.
__device__ __forceinline__ bool send_weights(const CombineArgs& a, const LaunchStart& start) {
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk;
  if (!wait_freed_since_start(a.v, start, kLLWeights, a.weights_slab, units_before(start.epoch[0]),
                              kWaitLowLatencyWeightsFreed)) {
    return false;
  }
  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    if (threadIdx.x >= K) continue;  // the rest of the block only posts the arrivals below
    const float w = a.topk_weights[static_cast<int64_t>(t) * K + threadIdx.x];
    const uint32_t mask = token_rank_mask(a.topk_idx, t, K, a.num_experts, a.per_rank);
    for (int d = 0; d < R; ++d) {
      if (!((mask >> d) & 1u)) continue;
      uint8_t* row = a.v.base[d] + a.weights_offset +
                     (me * static_cast<int64_t>(a.num_max) + t) * a.weights_row;
      reinterpret_cast<float*>(row)[threadIdx.x] = w;
    }
  }
  __syncthreads();
  if (threadIdx.x < R) {
    add_share_release(&ll_control(a.v.base[threadIdx.x])->arrivals[kLLWeights][a.weights_slab][me]);
  }
  return true;
}

// Row j's weighted sum over our experts, into the source rank's partials slab, as BF16 or (kLogfmt)
// as LogFMT-10 of the BF16-rounded sums (the collective backend's encode_partials). Shared: the
// row's expert slots and weights (slot -1: not one of ours). A thread sums kRowVectors vectors
// of the row at once (vector i and i + blockDim.x), so that the loads of both are in flight
// together: hidden 7168 takes one round of loads instead of two.
constexpr int kRowVectors = 2;

template <bool kLogfmt>
__device__ __forceinline__ void partial_row(const CombineArgs& a, int j, const int32_t* slot,
                                            const float* weight) {
  const int M = a.num_max, K = a.num_topk, source = j / M, m = j % M;
  uint8_t* row = a.v.base[source] + a.partials_offset + (a.v.rank * static_cast<int64_t>(M) + m) * a.partial_row;
  const int vectors = a.hidden / 8;
  // LogFMT reduces each 128-channel group over 16 lanes: whole warps step through the row together.
  const int lane = threadIdx.x % 32;
  const int step = kRowVectors * blockDim.x;
  for (int i0 = kLogfmt ? threadIdx.x - lane : threadIdx.x; i0 < vectors; i0 += step) {
    int at[kRowVectors];
    bool active[kRowVectors];
#pragma unroll
    for (int r = 0; r < kRowVectors; ++r) {
      at[r] = (kLogfmt ? i0 + lane : i0) + r * static_cast<int>(blockDim.x);
      active[r] = at[r] < vectors;
    }
    float acc[kRowVectors][8] = {};
    for (int k0 = 0; k0 < K; k0 += kBatch) {  // kBatch slots' loads in flight, then sums in k order
      int4 raw[kRowVectors][kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = k0 + u;
        if (k >= K || slot[k] < 0) continue;
        const auto* x =
            reinterpret_cast<const int4*>(a.x + slot[k] * static_cast<int64_t>(a.hidden));
#pragma unroll
        for (int r = 0; r < kRowVectors; ++r) {
          if (active[r]) raw[r][u] = __ldg(x + at[r]);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = k0 + u;
        if (k >= K || slot[k] < 0) continue;
#pragma unroll
        for (int r = 0; r < kRowVectors; ++r) {
          const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[r][u]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            float* sum = &acc[r][2 * q];
            sum[0] = __fadd_rn(sum[0], __fmul_rn(weight[k], __low2float(pairs[q])));
            sum[1] = __fadd_rn(sum[1], __fmul_rn(weight[k], __high2float(pairs[q])));
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowVectors; ++r) {
      int4 out;
      auto* out_pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        out_pairs[q] = __floats2bfloat162_rn(acc[r][2 * q], acc[r][2 * q + 1]);
      }
      if constexpr (kLogfmt) {
        float rounded[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          rounded[2 * q] = __low2float(out_pairs[q]);
          rounded[2 * q + 1] = __high2float(out_pairs[q]);
        }
        logfmt_encode_vector(rounded, row, a.hidden, at[r], active[r]);
      } else if (active[r]) {
        reinterpret_cast<int4*>(row)[at[r]] = out;
      }
    }
  }
}

// The partials phase. `read_ticket`: this block's epoch on our weights read counter;
// `send_ticket`: on our partials send counter. false: a wait gave up.
template <bool kLogfmt>
__device__ __forceinline__ bool send_partials(const CombineArgs& a, uint64_t read_ticket,
                                              uint64_t send_ticket) {
  __shared__ int32_t slot[kMaxLLTopk];
  __shared__ float weight[kMaxLLTopk];
  __shared__ int any_local;
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk, rows = R * a.num_max;
  // Thread k < K carries slot k and weight k of the block's next row, loaded a row ahead: the
  // first row's slot (our own input) before the waits, its weight (in the slab) right after.
  const auto slot_of = [&](int j) {
    return a.token_slots[static_cast<int64_t>(j) * K + threadIdx.x];
  };
  const auto weight_of = [&](int j) {
    return reinterpret_cast<const float*>(a.weights + j * a.weights_row)[threadIdx.x];
  };
  const bool carries = threadIdx.x < K, has_rows = static_cast<int>(blockIdx.x) < rows;
  int32_t next_slot = carries && has_rows ? slot_of(blockIdx.x) : -1;
  // Every source's weights of this launch are in (warp 0), and every source has read our
  // previous partials in this slab (warp 1): both waits behind one barrier.
  bool ok = true;
  if (threadIdx.x < R) {
    ok = wait_unit_arrived(a.v, kLLWeights, a.weights_slab, threadIdx.x, read_ticket,
                           kWaitLowLatencyWeights);
  } else if (threadIdx.x >= 32 && threadIdx.x < 32 + R) {
    ok = wait_peer_freed(a.v, kLLPartials, a.partials_slab, threadIdx.x - 32, send_ticket,
                         kWaitLowLatencyPartialsFreed);
  }
  if (!block_waits_ok(ok)) return false;
  float next_weight = carries && has_rows ? weight_of(blockIdx.x) : 0.f;

  for (int j = blockIdx.x; j < rows; j += gridDim.x) {
    if (threadIdx.x == 0) any_local = 0;
    __syncthreads();  // the previous row's sums are done reading slot and weight
    if (carries) {
      slot[threadIdx.x] = next_slot;
      weight[threadIdx.x] = next_weight;
      if (next_slot >= 0) any_local = 1;
      const int next = j + static_cast<int>(gridDim.x);
      if (next < rows) {  // the next row's, in flight during this one
        next_slot = slot_of(next);
        next_weight = weight_of(next);
      }
    }
    __syncthreads();
    if (any_local) partial_row<kLogfmt>(a, j, slot, weight);
  }
  __syncthreads();  // every thread's partials are written before the shares below
  // Done reading the weights, our partials are out: both shares at every source.
  if (threadIdx.x < R) {
    LowLatencyControl* peer = ll_control(a.v.base[threadIdx.x]);
    add_share_release(&peer->freed[kLLWeights][a.weights_slab][me],
                      &peer->arrivals[kLLPartials][a.partials_slab][me]);
  }
  return true;
}

// Vector i of token t's output: the float32 sums rounded to BF16 once.
__device__ __forceinline__ void store_bf16_vector(const CombineArgs& a, int t, int i, const float (&acc)[8]) {
  int4 out;
  auto* out_pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int q = 0; q < 4; ++q) out_pairs[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
  reinterpret_cast<int4*>(a.out + static_cast<int64_t>(t) * a.hidden)[i] = out;
}

// The recv phase. `ticket`: this block's epoch on our partials read counter.
template <bool kLogfmt>
__device__ __forceinline__ void recv_sums(const CombineArgs& a, uint64_t ticket) {
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk;
  // The block's first token's ranks before the wait, which they then overlap.
  uint32_t mask = 0;
  if (blockIdx.x < a.num_tokens) mask = token_rank_mask(a.topk_idx, blockIdx.x, K, a.num_experts, a.per_rank);
  const bool ok = threadIdx.x >= R ||
                  wait_unit_arrived(a.v, kLLPartials, a.partials_slab, threadIdx.x, ticket,
                                    kWaitLowLatencyPartials);
  if (!block_waits_ok(ok)) return;

  const int vectors = a.hidden / 8;
  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    if (t != static_cast<int>(blockIdx.x)) mask = token_rank_mask(a.topk_idx, t, K, a.num_experts, a.per_rank);
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
      float acc[8] = {};
      if constexpr (kLogfmt) {  // decoded to float32 and summed in rank order, as the collective
        for (int s = 0; s < R; ++s) {
          if ((mask >> s) & 1u) {
            logfmt_decode_add(a.partials + (s * static_cast<int64_t>(a.num_max) + t) * a.partial_row,
                              a.hidden, i, acc);
          }
        }
      } else {
        int4 raw[kMaxNvlRanks];  // every rank's partial in flight at once, summed in rank order
#pragma unroll
        for (int s = 0; s < kMaxNvlRanks; ++s) {
          if (s < R && ((mask >> s) & 1u)) {
            raw[s] = reinterpret_cast<const int4*>(
                a.partials + (s * static_cast<int64_t>(a.num_max) + t) * a.partial_row)[i];
          }
        }
#pragma unroll
        for (int s = 0; s < kMaxNvlRanks; ++s) {
          if (s >= R || !((mask >> s) & 1u)) continue;
          const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[s]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __low2float(pairs[q]));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __high2float(pairs[q]));
          }
        }
      }
      store_bf16_vector(a, t, i, acc);
    }
  }
  __syncthreads();  // every thread's reads of the slab are done
  // Done reading our partials slab: this block's share of the freed counter at every source.
  if (threadIdx.x < R) {
    add_share_release(&ll_control(a.v.base[threadIdx.x])->freed[kLLPartials][a.partials_slab][me]);
  }
}

// The phases the launch runs, in order. In a launch of more than one, a block's later phase waits
// for the earlier phase of every block of the launch on this rank: the grid must be co-resident.
template <bool kWeights, bool kPartials, bool kRecv, bool kLogfmt>
__device__ __forceinline__ void combine(const CombineArgs& a) {
  __shared__ LaunchStart start;
  LowLatencyControl* mine = ll_control(a.v.base[a.v.rank]);
  const StartCounters counters{{kWeights ? &mine->sends[kLLWeights][a.weights_slab] : nullptr,
                                kPartials ? &mine->recvs[kLLWeights][a.weights_slab] : nullptr,
                                kPartials ? &mine->sends[kLLPartials][a.partials_slab] : nullptr,
                                kRecv ? &mine->recvs[kLLPartials][a.partials_slab] : nullptr},
                               kWeights ? mine->freed[kLLWeights][a.weights_slab] : nullptr,
                               a.layout_key};
  if (!begin_launch(a.v, counters, start)) return;
  if (kWeights && !send_weights(a, start)) return;
  if (kPartials && !send_partials<kLogfmt>(a, start.epoch[1], start.epoch[2])) return;
  if (kRecv) recv_sums<kLogfmt>(a, start.epoch[3]);
}

// More than one phase: one block per SM at most (co-resident), so ptxas may use up to 128
// registers.
template <bool kWeights, bool kPartials, bool kRecv, bool kLogfmt>
__global__ void __launch_bounds__(kLLThreads, 1) ll_combine_kernel(CombineArgs a) {
  combine<kWeights, kPartials, kRecv, kLogfmt>(a);
}

// One phase (EP_OPS_LL_COMBINE_SPLIT=1, and the recv half): any grid, two blocks per SM where
// they fit.
template <bool kWeights, bool kPartials, bool kRecv, bool kLogfmt>
__global__ void __launch_bounds__(kLLThreads) ll_combine_phase_kernel(CombineArgs a) {
  combine<kWeights, kPartials, kRecv, kLogfmt>(a);
}

template <bool kWeights, bool kPartials, bool kRecv, bool kLogfmt>
void launch_as(const CombineArgs& a, int64_t blocks) {
  constexpr bool kFused = int{kWeights} + int{kPartials} + int{kRecv} > 1;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, blocks)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (kFused) {
    ll_combine_kernel<kWeights, kPartials, kRecv, kLogfmt><<<grid, kLLThreads, 0, stream>>>(a);
  } else {
    ll_combine_phase_kernel<kWeights, kPartials, kRecv, kLogfmt><<<grid, kLLThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The phases' launch, with the partials' format (a.logfmt) picked at compile time. The weights
// phase alone does not touch partials: one form.
template <bool kWeights, bool kPartials, bool kRecv>
void launch(const CombineArgs& a, int64_t blocks) {
  if constexpr (kPartials || kRecv) {
    if (a.logfmt) return launch_as<kWeights, kPartials, kRecv, true>(a, blocks);
  }
  launch_as<kWeights, kPartials, kRecv, false>(a, blocks);
}

// What every phase needs; the per-phase parts are filled by send_args / with_recv.
CombineArgs common_args(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                        int64_t num_max, int64_t hidden, int64_t num_topk, int64_t num_experts,
                        bool use_logfmt) {
  const int64_t R = b.view.num_ranks;
  TORCH_CHECK_VALUE(num_topk <= kMaxLLTopk, "ep_ops.low_latency_combine: the NVLink kernels take up to ",
                    kMaxLLTopk, " experts per token, got ", num_topk);
  const LowLatencyGeometry geometry(R, num_max, hidden, num_topk);
  CombineArgs a{};
  a.v = b.view;
  a.num_topk = static_cast<int>(num_topk);
  a.num_max = static_cast<int>(num_max);
  a.hidden = static_cast<int>(hidden);
  a.weights_slab = weights_slab;
  a.partials_slab = partials_slab;
  a.num_experts = num_experts;
  a.per_rank = num_experts / R;
  a.layout_key = geometry.key();
  a.weights_offset = geometry.offset(kLLWeights, weights_slab);
  a.weights_row = geometry.slab[kLLWeights] / geometry.rows;
  a.partials_offset = geometry.offset(kLLPartials, partials_slab);
  a.logfmt = use_logfmt;
  // A LogFMT row is shorter than a BF16 one: the slab (sized for BF16) holds it.
  a.partial_row = wire::combine_row_bytes(hidden, use_logfmt);
  a.weights = b.local.data_ptr<uint8_t>() + a.weights_offset;
  a.partials = b.local.data_ptr<uint8_t>() + a.partials_offset;
  return a;
}

// The send phases' inputs in the layout the kernels read; the caller holds them until the
// launch is queued.
struct SendInputs {
  at::Tensor x, topk_idx, topk_weights, token_slots;
};

// What the send phases (and the whole op) need: common_args plus the inputs, kept in `held`.
CombineArgs send_args(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                      const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                      const at::Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                      SendInputs& held) {
  held = {aligned16(x), topk_idx.contiguous(), topk_weights.contiguous(), recv_token_slots.contiguous()};
  CombineArgs a = common_args(b, weights_slab, partials_slab, num_max, x.size(2), topk_idx.size(1),
                              x.size(0) * b.view.num_ranks, use_logfmt);
  a.topk_idx = held.topk_idx.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(held.topk_idx.size(0));
  a.topk_weights = held.topk_weights.data_ptr<float>();
  a.x = reinterpret_cast<const __nv_bfloat16*>(held.x.data_ptr());
  a.token_slots = held.token_slots.data_ptr<int32_t>();
  return a;
}

at::Tensor with_recv(CombineArgs& a, const at::Tensor& topk_c) {
  auto out = at::empty({topk_c.size(0), a.hidden}, topk_c.options().dtype(at::kBFloat16));
  a.topk_idx = topk_c.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(topk_c.size(0));
  a.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  return out;
}

// EP_OPS_LL_COMBINE_SPLIT=1: every phase in a launch of its own (fallback, and A/B of the fusion).
bool split_combine() {
  static const bool split = ll_env_flag("EP_OPS_LL_COMBINE_SPLIT");
  return split;
}

// The send half: weights then partials, in one co-resident launch or (split) two launches.
void launch_send(const CombineArgs& a, int device) {
  const int64_t rows = static_cast<int64_t>(a.v.num_ranks) * a.num_max;
  if (split_combine()) {
    launch<true, false, false>(a, a.num_tokens);                         // a block per token
    launch<false, true, false>(a, std::min<int64_t>(rows, 2 * ll_num_sms(device)));
  } else {
    launch<true, true, false>(a, std::min<int64_t>(rows, ll_num_sms(device)));
  }
}

}  // namespace

at::Tensor ll_combine_send(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                           const at::Tensor& x, const at::Tensor& topk_idx,
                           const at::Tensor& topk_weights, const at::Tensor& recv_token_slots,
                           int64_t num_max, bool use_logfmt) {
  const int64_t R = b.view.num_ranks;
  c10::cuda::CUDAGuard guard(x.device());
  SendInputs held;
  const CombineArgs a = send_args(b, weights_slab, partials_slab, x, topk_idx, topk_weights,
                                  recv_token_slots, num_max, use_logfmt, held);
  launch_send(a, x.get_device());
  // What the peers write into our slab: the recv half reads it once their flags are up.
  return b.local.narrow(0, a.partials_offset, R * num_max * a.partial_row)
      .view({R, num_max, a.partial_row});
}

at::Tensor ll_combine_recv(const LowLatencyBuffer& b, int slab, const at::Tensor& recv_partials,
                           const at::Tensor& topk_idx, int64_t hidden, int64_t num_experts,
                           int64_t num_max, bool use_logfmt) {
  c10::cuda::CUDAGuard guard(recv_partials.device());
  auto topk_c = topk_idx.contiguous();
  // The weights slab is not used by this phase: any index will do.
  CombineArgs a = common_args(b, 0, slab, num_max, hidden, topk_idx.size(1), num_experts, use_logfmt);
  auto out = with_recv(a, topk_c);
  launch<false, false, true>(a, a.num_tokens);  // a block per token
  return out;
}

at::Tensor ll_combine(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                      const at::Tensor& x, const at::Tensor& topk_idx,
                      const at::Tensor& topk_weights, const at::Tensor& recv_token_slots,
                      int64_t num_max, bool use_logfmt) {
  const int64_t R = b.view.num_ranks;
  c10::cuda::CUDAGuard guard(x.device());
  SendInputs held;
  CombineArgs a = send_args(b, weights_slab, partials_slab, x, topk_idx, topk_weights,
                            recv_token_slots, num_max, use_logfmt, held);
  auto out = with_recv(a, held.topk_idx);
  if (split_combine()) {
    launch_send(a, x.get_device());
    launch<false, false, true>(a, a.num_tokens);
  } else {
    // Every phase in one launch: one block per SM at most, all resident at once (a block's
    // partials wait for this launch's weights, its recv for this launch's partials).
    const int64_t rows = R * num_max;  // >= the tokens (the checks hold T <= M)
    launch<true, true, true>(a, std::min<int64_t>(rows, ll_num_sms(x.get_device())));
  }
  return out;
}

}  // namespace ep_ops::cuda
