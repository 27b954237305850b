// dispatch_permuted between the GPUs of one host: dispatch's notify and send kernels unchanged,
// then on the receiver
//   1. dispatch's recv kernel in its routing-only form: waits for the rows and copies out their
//      local expert ids, weights and source indices (the payload stays in the buffer);
//   2. the permute map of those ids, built with ATen on the device (permute_map.h, the same code
//      as the collective backend, so the layouts agree by construction);
//   3. permuted_copy_kernel: every permuted row reads its pair's payload (and FP8 scales)
//      straight from the buffer, or is zero (padding); only then are the freed flags posted.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../collective/permute_map.h"
#include "nvl_buffer.h"
#include "nvl_dispatch.h"
#include "nvl_recv_done.cuh"
#include "nvl_rows.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct PermutedCopyArgs {
  uint8_t* out;              // [P, payload]
  float* out_scales;         // [P, num_scales] or null
  float* out_probs;          // [P] or null
  const int64_t* slot_pair;  // [P]: pair r * K + k, or -1
  const float* recv_weights; // [N, K] (local weights, from the routing pass) or null
  int64_t num_permuted;
  int num_topk, num_scales;
  RowLayout row;
};

__global__ void __launch_bounds__(kThreads) permuted_copy_kernel(PeerView v, PermutedCopyArgs a) {
  // The routing pass gave up (a peer timed out): its rows may never have arrived.
  if (watchdog_tripped(v.watchdog)) return;
  const int me = v.rank, lane = threadIdx.x % 32;
  const uint64_t cur = v.control(me)->dispatch_epoch;
  const int64_t row_bytes = a.row.bytes();
  for (int64_t p = blockIdx.x * kWarps + threadIdx.x / 32; p < a.num_permuted; p += gridDim.x * kWarps) {
    const int64_t pair = a.slot_pair[p];
    uint8_t* out = a.out + p * a.row.payload;
    if (pair < 0) {  // group padding, or past the pairs under a static P
      for (int64_t i = lane; i < a.row.payload / 16; i += 32) reinterpret_cast<int4*>(out)[i] = int4{0, 0, 0, 0};
      for (int i = lane; i < a.num_scales; i += 32) a.out_scales[p * a.num_scales + i] = 0.f;
      if (lane == 0 && a.out_probs) a.out_probs[p] = 0.f;
      continue;
    }
    // The rows arrived before the routing pass (an earlier kernel) saw the arrival flags.
    const uint8_t* src = v.dispatch_region(me) + (pair / a.num_topk) * row_bytes;
    warp_copy(out, src, a.row.payload, lane);
    const auto* scales = reinterpret_cast<const float*>(src + a.row.scales_at());
    for (int i = lane; i < a.num_scales; i += 32) a.out_scales[p * a.num_scales + i] = scales[i];
    if (lane == 0 && a.out_probs) a.out_probs[p] = a.recv_weights[pair];
  }
  dispatch_recv_block_done(v, cur);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
nvl_dispatch_permuted(const PeerView& v, const at::Tensor& x_in, const std::optional<at::Tensor>& x_scales,
                      const at::Tensor& topk_idx, const std::optional<at::Tensor>& topk_weights,
                      const at::Tensor& is_token_in_rank, int64_t num_experts, int64_t num_worst_tokens,
                      int64_t pad_multiple, int64_t num_out) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  const int num_scales = x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0;
  const int num_topk = static_cast<int>(topk_idx.size(1));
  const bool has_weights = topk_weights.has_value();
  auto routed = nvl_dispatch(v, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts,
                             1, num_worst_tokens, std::nullopt, std::nullopt, /*routing_only=*/true);

  // From here to the copy kernel nothing may throw: the buffer stays held until it runs.
  const int64_t per_rank = num_experts / v.num_ranks;
  // Ids in range whatever happened: after a watchdog trip the routing pass wrote nothing, and the
  // map's scatters must not index out of bounds (the host raises at the next op).
  auto& local = routed.recv_topk_idx;
  auto sane = at::where((local >= 0) & (local < per_rank), local, at::full_like(local, -1));
  auto map = collective::make_permute_map(sane, per_rank, pad_multiple, num_out);
  const int64_t num_permuted = map.slot_pair.size(0);
  auto permuted_x = at::empty({num_permuted, x.size(1)}, x.options());
  auto f32 = x.options().dtype(at::kFloat);
  auto permuted_scales = at::empty(x_scales.has_value() ? at::IntArrayRef{num_permuted, num_scales} : at::IntArrayRef{0}, f32);
  auto permuted_probs = at::empty(has_weights ? at::IntArrayRef{num_permuted} : at::IntArrayRef{0}, f32);
  PermutedCopyArgs args{static_cast<uint8_t*>(permuted_x.data_ptr()),
                        x_scales.has_value() ? permuted_scales.data_ptr<float>() : nullptr,
                        has_weights ? permuted_probs.data_ptr<float>() : nullptr,
                        map.slot_pair.data_ptr<int64_t>(),
                        has_weights ? routed.recv_topk_weights.data_ptr<float>() : nullptr,
                        num_permuted, num_topk, num_scales,
                        dispatch_row_layout(x.size(1) * x.element_size(), num_scales, num_topk, has_weights)};
  permuted_copy_kernel<<<kDispatchRecvBlocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(v, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {permuted_x,    permuted_scales, permuted_probs, map.tokens_per_expert,
          map.pair_slot, routed.rank_prefix_matrix, routed.recv_src_idx};
}

}  // namespace ep_ops::cuda
