// Low-latency combine over NVLink. Each expert rank sums its own experts' outputs of a token
// (weighted) and sends that one partial back, instead of one row per (token, expert):
//
//   weights:  one block per token writes the token's top-k weights into the weights slab of
//             every rank holding one of its experts (the expert side needs them to reduce).
//   partials: the expert side waits for the weights, then for each (source rank, slot) sums
//             w_k * x[slot_k] over its local k in float32, k ascending, rounds to BF16 once, and
//             writes the row into the source rank's partials slab.
//   recv:     one block per token waits for every rank's partials, adds them in float32 in
//             ascending rank order and rounds to BF16: the collective backend's exact order.
// The first two kernels form the send half; the third is the recv half.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include "ll_common.cuh"
#include "ll_ops.h"

namespace ep_ops::cuda {
namespace {

constexpr int kMaxLLTopk = 32;
constexpr int kBatch = 8;  // expert rows loaded together in the partial sums

struct Routing {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_max;
  int64_t num_experts, per_rank;
};

struct WeightsArgs {
  PeerView v;
  Routing r;
  const float* topk_weights;  // [T, K]
  int64_t slab_offset, row_bytes;
  int slab;
  int64_t layout_key;
};

__global__ void __launch_bounds__(kLLThreads) ll_weights_send_kernel(WeightsArgs a) {
  __shared__ int slots[kMaxNvlRanks];
  const int me = a.v.rank, R = a.v.num_ranks, K = a.r.num_topk;
  LowLatencyControl* mine = ll_control(a.v.base[me]);
  const uint64_t sends_before = mine->sends[kLLWeights][a.slab];
  if (!wait_all_freed_if_moved(a.v, a.layout_key)) return;
  if (!wait_freed(a.v, kLLWeights, a.slab, sends_before, kWaitLowLatencyWeightsFreed)) return;
  for (int t = blockIdx.x; t < a.r.num_tokens; t += gridDim.x) {
    slots_before(a.r.topk_idx, t, K, a.r.num_experts, a.r.per_rank, R, slots);
    const uint32_t mask = token_rank_mask(a.r.topk_idx, t, K, a.r.num_experts, a.r.per_rank);
    if (threadIdx.x < K) {
      const float w = a.topk_weights[static_cast<int64_t>(t) * K + threadIdx.x];
      for (int d = 0; d < R; ++d) {
        if (!((mask >> d) & 1u)) continue;
        uint8_t* row = a.v.base[d] + a.slab_offset +
                       (me * static_cast<int64_t>(a.r.num_max) + slots[d]) * a.row_bytes;
        reinterpret_cast<float*>(row)[threadIdx.x] = w;
      }
    }
    __syncthreads();
  }
  if (last_block_done(&mine->send_tickets[kLLWeights])) {
    remember_layout(mine, a.layout_key);
    post_arrivals(a.v, kLLWeights, a.slab);
  }
}

struct PartialsArgs {
  PeerView v;
  const __nv_bfloat16* x;     // [E_local * R*M, H] expert outputs
  const int32_t* token_slots;  // [R, M, K] from the dispatch
  int num_max, num_topk, hidden;
  const uint8_t* weights;  // our weights slab
  int64_t weights_row;
  int weights_slab;
  int64_t partials_offset, partial_row;
  int partials_slab;
};

__global__ void __launch_bounds__(kLLThreads) ll_partials_send_kernel(PartialsArgs a) {
  __shared__ int32_t slot[kMaxLLTopk];
  __shared__ float weight[kMaxLLTopk];
  __shared__ int any_local;
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk, M = a.num_max;
  LowLatencyControl* mine = ll_control(a.v.base[me]);
  const uint64_t reads_before = mine->recvs[kLLWeights][a.weights_slab];
  const uint64_t sends_before = mine->sends[kLLPartials][a.partials_slab];
  if (!wait_arrivals(a.v, kLLWeights, a.weights_slab, reads_before, kWaitLowLatencyWeights) ||
      !wait_freed(a.v, kLLPartials, a.partials_slab, sends_before, kWaitLowLatencyPartialsFreed)) {
    return;
  }

  const int vectors = a.hidden / 8;
  for (int j = blockIdx.x; j < R * M; j += gridDim.x) {
    if (threadIdx.x == 0) any_local = 0;
    __syncthreads();
    if (threadIdx.x < K) {
      slot[threadIdx.x] = a.token_slots[static_cast<int64_t>(j) * K + threadIdx.x];
      weight[threadIdx.x] =
          reinterpret_cast<const float*>(a.weights + j * a.weights_row)[threadIdx.x];
      if (slot[threadIdx.x] >= 0) any_local = 1;
    }
    __syncthreads();
    if (any_local) {
      const int source = j / M, m = j % M;
      auto* dst = reinterpret_cast<int4*>(a.v.base[source] + a.partials_offset +
                                          (me * static_cast<int64_t>(M) + m) * a.partial_row);
      for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
        float acc[8] = {};
        for (int k0 = 0; k0 < K; k0 += kBatch) {  // kBatch loads in flight, then the sums in k order
          int4 raw[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int k = k0 + u;
            if (k < K && slot[k] >= 0) {
              raw[u] = __ldg(reinterpret_cast<const int4*>(a.x + slot[k] * static_cast<int64_t>(a.hidden)) + i);
            }
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int k = k0 + u;
            if (k >= K || slot[k] < 0) continue;
            const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(weight[k], __low2float(pairs[q])));
              acc[2 * q + 1] =
                  __fadd_rn(acc[2 * q + 1], __fmul_rn(weight[k], __high2float(pairs[q])));
            }
          }
        }
        int4 out;
        auto* out_pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
        for (int q = 0; q < 4; ++q) out_pairs[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
        dst[i] = out;
      }
    }
    __syncthreads();
  }
  if (last_block_done(&mine->send_tickets[kLLPartials])) {
    post_freed(a.v, kLLWeights, a.weights_slab);
    post_arrivals(a.v, kLLPartials, a.partials_slab);
  }
}

struct RecvArgs {
  PeerView v;
  Routing r;
  const uint8_t* partials;  // our partials slab
  int hidden, slab;
  int64_t partial_row;
  __nv_bfloat16* out;  // [T, H]
};

__global__ void __launch_bounds__(kLLThreads) ll_combine_recv_kernel(RecvArgs a) {
  __shared__ int slots[kMaxNvlRanks];
  const int me = a.v.rank, R = a.v.num_ranks, K = a.r.num_topk;
  LowLatencyControl* mine = ll_control(a.v.base[me]);
  const uint64_t reads_before = mine->recvs[kLLPartials][a.slab];
  if (!wait_arrivals(a.v, kLLPartials, a.slab, reads_before, kWaitLowLatencyPartials)) return;
  const int vectors = a.hidden / 8;
  for (int t = blockIdx.x; t < a.r.num_tokens; t += gridDim.x) {
    slots_before(a.r.topk_idx, t, K, a.r.num_experts, a.r.per_rank, R, slots);
    const uint32_t mask = token_rank_mask(a.r.topk_idx, t, K, a.r.num_experts, a.r.per_rank);
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
      float acc[8] = {};
      int4 raw[kMaxNvlRanks];  // every rank's partial in flight at once, summed in rank order
#pragma unroll
      for (int s = 0; s < kMaxNvlRanks; ++s) {
        if (s < R && ((mask >> s) & 1u)) {
          raw[s] = reinterpret_cast<const int4*>(
              a.partials + (s * static_cast<int64_t>(a.r.num_max) + slots[s]) * a.partial_row)[i];
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
      int4 out;
      auto* out_pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int q = 0; q < 4; ++q) out_pairs[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
      reinterpret_cast<int4*>(a.out + static_cast<int64_t>(t) * a.hidden)[i] = out;
    }
    __syncthreads();
  }
  if (last_block_done(&mine->recv_tickets[kLLPartials])) post_freed(a.v, kLLPartials, a.slab);
}

Routing routing_of(const at::Tensor& topk_idx, int64_t num_max, int64_t num_experts,
                   int64_t num_ranks) {
  return Routing{topk_idx.data_ptr<int64_t>(), static_cast<int>(topk_idx.size(0)),
                 static_cast<int>(topk_idx.size(1)), static_cast<int>(num_max), num_experts,
                 num_experts / num_ranks};
}

}  // namespace

at::Tensor ll_combine_send(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                           const at::Tensor& x, const at::Tensor& topk_idx,
                           const at::Tensor& topk_weights, const at::Tensor& recv_token_slots,
                           int64_t num_max) {
  const int64_t R = b.view.num_ranks, K = topk_idx.size(1), hidden = x.size(2);
  const int64_t num_experts = x.size(0) * R;
  TORCH_CHECK_VALUE(K <= kMaxLLTopk, "ep_ops.low_latency_combine: the NVLink kernels take up to ",
                    kMaxLLTopk, " experts per token, got ", K);
  const LowLatencyGeometry geometry(R, num_max, hidden, K);
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto topk_c = topk_idx.contiguous();
  auto weights_c = topk_weights.contiguous();
  auto x_c = aligned16(x);
  auto slots_c = recv_token_slots.contiguous();

  WeightsArgs w{};
  w.v = b.view;
  w.r = routing_of(topk_c, num_max, num_experts, R);
  w.topk_weights = weights_c.data_ptr<float>();
  w.slab_offset = geometry.offset(kLLWeights, weights_slab);
  w.row_bytes = geometry.slab[kLLWeights] / geometry.rows;
  w.slab = weights_slab;
  w.layout_key = geometry.key();
  ll_weights_send_kernel<<<std::max(1, w.r.num_tokens), kLLThreads, 0, stream>>>(w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  PartialsArgs p{};
  p.v = b.view;
  p.x = reinterpret_cast<const __nv_bfloat16*>(x_c.data_ptr());
  p.token_slots = slots_c.data_ptr<int32_t>();
  p.num_max = static_cast<int>(num_max);
  p.num_topk = static_cast<int>(K);
  p.hidden = static_cast<int>(hidden);
  p.weights = b.local.data_ptr<uint8_t>() + w.slab_offset;
  p.weights_row = w.row_bytes;
  p.weights_slab = weights_slab;
  p.partials_offset = geometry.offset(kLLPartials, partials_slab);
  p.partial_row = wire::combine_row_bytes(hidden, false);
  p.partials_slab = partials_slab;
  const int blocks = static_cast<int>(std::min<int64_t>(geometry.rows, 2 * ll_num_sms(x.get_device())));
  ll_partials_send_kernel<<<blocks, kLLThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return b.local.narrow(0, p.partials_offset, geometry.rows * p.partial_row)
      .view({R, num_max, p.partial_row});
}

at::Tensor ll_combine_recv(const LowLatencyBuffer& b, int slab, const at::Tensor& recv_partials,
                           const at::Tensor& topk_idx, int64_t hidden, int64_t num_experts,
                           int64_t num_max) {
  const int64_t R = b.view.num_ranks;
  c10::cuda::CUDAGuard guard(recv_partials.device());
  auto topk_c = topk_idx.contiguous();
  auto out = at::empty({topk_idx.size(0), hidden}, recv_partials.options().dtype(at::kBFloat16));
  RecvArgs a{};
  a.v = b.view;
  a.r = routing_of(topk_c, num_max, num_experts, R);
  a.partials = recv_partials.data_ptr<uint8_t>();
  a.hidden = static_cast<int>(hidden);
  a.slab = slab;
  a.partial_row = wire::combine_row_bytes(hidden, false);
  a.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  ll_combine_recv_kernel<<<std::max(1, a.r.num_tokens), kLLThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ep_ops::cuda
