// Low-latency dispatch over NVLink, as two kernels (the op's send and recv halves):
//
//   send: one block per token writes the token's wire row (cast to FP8 on the fly if asked)
//         once into every destination *rank*'s dispatch slab, at (our rank, the token's index
//         among our tokens for that rank); the last block marks the unused slots and raises our
//         arrival flag at every peer. It never waits for data, only (rarely) for a receiver to
//         have read the slab's previous contents.
//   recv: one block per local expert waits for every source's flag, finds the slab rows that
//         name its expert (in slab order: source rank, then token, so the layout is fixed by the
//         data, not by atomics), and copies them into the static [E_local, R*M, H] output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Float8_e4m3fn.h>
#include <cuda_bf16.h>

#include "ll_common.cuh"
#include "ll_ops.h"
#include "nvl_rows.cuh"

namespace ep_ops::cuda {
namespace {

struct SendArgs {
  PeerView v;
  const __nv_bfloat16* x;  // [T, H]
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, hidden, num_max, slab;
  int64_t num_experts, per_rank, slab_offset;
  bool use_fp8, round_scale;
  int64_t layout_key;
  wire::DispatchRow row;
};

__device__ __forceinline__ uint8_t* slab_row(const SendArgs& a, int dest, int64_t slot) {
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

__device__ void send_fp8_row(const SendArgs& a, int64_t t, const int* slots, uint32_t mask) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = a.hidden / static_cast<int>(wire::kFp8Block);
  for (int g = warp; g < groups; g += kLLWarps) {
    const int64_t channel = g * wire::kFp8Block + lane * 4;
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(a.x + t * a.hidden + channel));
    const auto* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float f[4] = {__low2float(pair[0]), __high2float(pair[0]), __low2float(pair[1]),
                  __high2float(pair[1])};
    float amax = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
#pragma unroll
    for (int step = 16; step > 0; step /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, step));
    }
    const float scale_inv = fp8_scale_inv(amax, a.round_scale);
    const float inv = __frcp_rn(scale_inv);
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      packed |= static_cast<uint32_t>(c10::Float8_e4m3fn(__fmul_rn(f[i], inv)).x) << (8 * i);
    }
    for (int d = 0; d < a.v.num_ranks; ++d) {
      if (!((mask >> d) & 1u)) continue;
      uint8_t* row = slab_row(a, d, slots[d]);
      *reinterpret_cast<uint32_t*>(row + channel) = packed;
      if (lane == 0) reinterpret_cast<float*>(row + a.row.scale_offset())[g] = scale_inv;
    }
  }
}

__device__ void send_bf16_row(const SendArgs& a, int64_t t, const int* slots, uint32_t mask) {
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
      auto* dst = reinterpret_cast<int4*>(slab_row(a, d, slots[d]));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * stride < vectors) dst[i0 + u * stride] = value[u];
      }
    }
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_dispatch_send_kernel(SendArgs a) {
  __shared__ int slots[kMaxNvlRanks];
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk;
  LowLatencyControl* mine = ll_control(a.v.base[me]);
  const uint64_t sends_before = mine->sends[kLLDispatch][a.slab];
  if (!wait_all_freed_if_moved(a.v, a.layout_key)) return;
  if (!wait_freed(a.v, kLLDispatch, a.slab, sends_before, kWaitLowLatencyDispatchFreed)) return;

  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    slots_before(a.topk_idx, t, K, a.num_experts, a.per_rank, R, slots);
    const uint32_t mask = token_rank_mask(a.topk_idx, t, K, a.num_experts, a.per_rank);
    if (a.use_fp8) {
      send_fp8_row(a, t, slots, mask);
    } else {
      send_bf16_row(a, t, slots, mask);
    }
    for (int d = 0; d < R; ++d) {
      if (!((mask >> d) & 1u)) continue;
      uint8_t* row = slab_row(a, d, slots[d]);
      if (threadIdx.x == 0) *reinterpret_cast<int32_t*>(row + a.row.src_offset()) = t;
      if (threadIdx.x < K) {
        reinterpret_cast<int32_t*>(row + a.row.topk_offset())[threadIdx.x] =
            static_cast<int32_t>(a.topk_idx[static_cast<int64_t>(t) * K + threadIdx.x]);
      }
    }
    __syncthreads();  // `slots` is rewritten for the next token
  }

  if (!last_block_done(&mine->send_tickets[kLLDispatch])) return;
  // Slots past each destination's token count carry source index -1: "empty".
  slots_before(a.topk_idx, a.num_tokens, K, a.num_experts, a.per_rank, R, slots);
  for (int i = threadIdx.x; i < R * a.num_max; i += blockDim.x) {
    const int d = i / a.num_max, m = i % a.num_max;
    if (m >= slots[d]) *reinterpret_cast<int32_t*>(slab_row(a, d, m) + a.row.src_offset()) = -1;
  }
  remember_layout(mine, a.layout_key);
  post_arrivals(a.v, kLLDispatch, a.slab);
}

struct RecvArgs {
  PeerView v;
  const uint8_t* slab;  // our dispatch slab
  int slab_index, num_max, num_topk, hidden, cols;  // cols: scale columns of the output
  int64_t first_expert, num_local;
  bool use_fp8, use_ue8m0;
  wire::DispatchRow row;
  uint8_t* recv_x;
  void* scales;  // float [E, cols, R*M] (column-major) or packed UE8M0 int32
  int32_t* recv_count;
  int32_t* src_info;
  int64_t* layout_range;
  int32_t* token_slots;
};

__device__ __forceinline__ int32_t row_src(const RecvArgs& a, int64_t j) {
  return *reinterpret_cast<const int32_t*>(a.slab + j * a.row.bytes() + a.row.src_offset());
}
__device__ __forceinline__ int32_t row_expert(const RecvArgs& a, int64_t j, int k) {
  return reinterpret_cast<const int32_t*>(a.slab + j * a.row.bytes() + a.row.topk_offset())[k];
}

__device__ void copy_scales(const RecvArgs& a, int e, const int* row_of, int total) {
  const int64_t RM = static_cast<int64_t>(a.v.num_ranks) * a.num_max;
  const int64_t n = static_cast<int64_t>(total) * a.cols;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int c = static_cast<int>(i / total), pos = static_cast<int>(i % total);
    const auto* src = reinterpret_cast<const float*>(a.slab + row_of[pos] * a.row.bytes() +
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

__global__ void __launch_bounds__(kLLThreads) ll_dispatch_recv_kernel(RecvArgs a) {
  extern __shared__ int row_of[];  // [R*M]: the slab row of each position in the expert's block
  __shared__ int warp_sums[kLLWarps];
  __shared__ int begins[kMaxNvlRanks + 1];
  const int me = a.v.rank, R = a.v.num_ranks, K = a.num_topk, e = blockIdx.x;
  const int RM = R * a.num_max;
  const int64_t expert = a.first_expert + e;
  LowLatencyControl* mine = ll_control(a.v.base[me]);
  const uint64_t reads_before = mine->recvs[kLLDispatch][a.slab_index];
  if (!wait_arrivals(a.v, kLLDispatch, a.slab_index, reads_before, kWaitLowLatencyDispatchRows)) {
    return;
  }

  int total = 0;
  for (int first = 0; first < RM; first += blockDim.x) {
    const int j = first + threadIdx.x;
    bool hit = false;
    if (j < RM) {  // the ids and the source index loaded together; empty slots have source -1
      for (int k = 0; k < K; ++k) hit |= row_expert(a, j, k) == expert;
      hit &= row_src(a, j) >= 0;
    }
    int chunk = 0;
    const int pos = total + block_exclusive_count(hit, warp_sums, &chunk);
    if (hit) row_of[pos] = j;
    if (j < RM && j % a.num_max == 0) begins[j / a.num_max] = pos;
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
  const int64_t block = static_cast<int64_t>(e) * RM;
  for (int pos = threadIdx.x; pos < RM; pos += blockDim.x) {
    a.src_info[block + pos] = pos < total ? row_src(a, row_of[pos]) : -1;
  }
  for (int i = threadIdx.x; i < total * K; i += blockDim.x) {
    const int pos = i / K, k = i % K, j = row_of[pos];
    if (row_expert(a, j, k) == expert) a.token_slots[j * K + k] = static_cast<int32_t>(block + pos);
  }
  if (e == 0) {  // entries no local expert claims
    for (int i = threadIdx.x; i < RM * K; i += blockDim.x) {
      const int j = i / K, k = i % K;
      const int64_t id = row_expert(a, j, k);
      if (row_src(a, j) < 0 || id < a.first_expert || id >= a.first_expert + a.num_local) {
        a.token_slots[i] = -1;
      }
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t payload = a.row.payload_bytes();
  for (int pos = warp; pos < total; pos += kLLWarps) {
    warp_copy<false>(a.recv_x + (block + pos) * payload, a.slab + row_of[pos] * a.row.bytes(),
                     payload, lane);
  }
  if (a.use_fp8) copy_scales(a, e, row_of, total);

  if (last_block_done(&mine->recv_tickets[kLLDispatch])) post_freed(a.v, kLLDispatch, a.slab_index);
}

}  // namespace

at::Tensor ll_dispatch_send(const LowLatencyBuffer& b, int slab, const at::Tensor& x,
                            const at::Tensor& topk_idx, int64_t num_max, int64_t num_experts,
                            bool use_fp8, bool round_scale) {
  const int64_t R = b.view.num_ranks, K = topk_idx.size(1), hidden = x.size(1);
  const LowLatencyGeometry geometry(R, num_max, hidden, K);
  const wire::DispatchRow row{hidden, K, use_fp8};
  c10::cuda::CUDAGuard guard(x.device());
  auto x_c = aligned16(x);
  auto topk_c = topk_idx.contiguous();
  SendArgs a{};
  a.v = b.view;
  a.x = reinterpret_cast<const __nv_bfloat16*>(x_c.data_ptr());
  a.topk_idx = topk_c.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(x.size(0));
  a.num_topk = static_cast<int>(K);
  a.hidden = static_cast<int>(hidden);
  a.num_max = static_cast<int>(num_max);
  a.slab = slab;
  a.layout_key = geometry.key();
  a.num_experts = num_experts;
  a.per_rank = num_experts / R;
  a.slab_offset = geometry.offset(kLLDispatch, slab);
  a.use_fp8 = use_fp8;
  a.round_scale = round_scale;
  a.row = row;
  const int blocks = std::max(1, a.num_tokens);
  ll_dispatch_send_kernel<<<blocks, kLLThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // What the peers write into our slab: the recv half reads it once their flags are up.
  return b.local.narrow(0, a.slab_offset, R * num_max * row.bytes()).view({R, num_max, row.bytes()});
}

collective::LowLatencyRecv ll_dispatch_recv(const LowLatencyBuffer& b, int slab,
                                            const at::Tensor& recv_packed, int64_t num_max,
                                            int64_t hidden, int64_t num_topk, int64_t num_experts,
                                            bool use_fp8, bool use_ue8m0) {
  const int64_t R = b.view.num_ranks, per_rank = num_experts / R, RM = R * num_max;
  const wire::DispatchRow row{hidden, num_topk, use_fp8};
  c10::cuda::CUDAGuard guard(recv_packed.device());
  auto options = recv_packed.options();
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
  auto token_slots = at::empty({R, num_max, num_topk}, options.dtype(at::kInt));

  RecvArgs a{};
  a.v = b.view;
  a.slab = recv_packed.data_ptr<uint8_t>();
  a.slab_index = slab;
  a.num_max = static_cast<int>(num_max);
  a.num_topk = static_cast<int>(num_topk);
  a.hidden = static_cast<int>(hidden);
  a.cols = static_cast<int>(cols);
  a.first_expert = b.view.rank * per_rank;
  a.num_local = per_rank;
  a.use_fp8 = use_fp8;
  a.use_ue8m0 = use_ue8m0;
  a.row = row;
  a.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
  a.scales = use_fp8 ? scales.data_ptr() : nullptr;
  a.recv_count = recv_count.data_ptr<int32_t>();
  a.src_info = src_info.data_ptr<int32_t>();
  a.layout_range = layout_range.data_ptr<int64_t>();
  a.token_slots = token_slots.data_ptr<int32_t>();
  const size_t shared = RM * sizeof(int);
  ll_dispatch_recv_kernel<<<per_rank, kLLThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {recv_x, scales, recv_count, src_info, layout_range, token_slots};
}

}  // namespace ep_ops::cuda
