// Host entry points of the low-latency NVLink kernels (ll_dispatch.cu, ll_combine.cu). Inputs
// are checked by the caller (ll_register.cpp); each function launches on the current stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "../collective/ops.h"
#include "ll_layout.h"
#include "nvl_buffer.h"

namespace ep_ops::cuda {

// Contiguous and 16-byte aligned (the kernels move rows in 16-byte vectors); copies if needed.
inline at::Tensor aligned16(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// Streaming multiprocessors of `device` (a grid that must be co-resident stays within it).
inline int ll_num_sms(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// An environment switch: set, non-empty and not starting with '0' (read it once and keep it).
inline bool ll_env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// Writes this rank's token rows into the peers' dispatch slab `slab`; returns the view of our
// own slab the peers write into (valid once low_latency_dispatch_recv has waited for them).
at::Tensor ll_dispatch_send(const LowLatencyBuffer& b, int slab, const at::Tensor& x,
                            const at::Tensor& topk_idx, int64_t num_max, int64_t num_experts,
                            bool use_fp8, bool round_scale);

// Waits for every source's rows in `recv_packed` (our slab `slab`) and lays them out per expert.
collective::LowLatencyRecv ll_dispatch_recv(const LowLatencyBuffer& b, int slab,
                                            const at::Tensor& recv_packed, int64_t num_max,
                                            int64_t hidden, int64_t num_topk, int64_t num_experts,
                                            bool use_fp8, bool use_ue8m0);

// The whole dispatch in one launch: ll_dispatch_send then ll_dispatch_recv, without handing the
// slab back to the caller in between (EP_OPS_LL_DISPATCH_SPLIT=1: as those two launches).
collective::LowLatencyRecv ll_dispatch(const LowLatencyBuffer& b, int slab, const at::Tensor& x,
                                       const at::Tensor& topk_idx, int64_t num_max,
                                       int64_t num_experts, bool use_fp8, bool round_scale,
                                       bool use_ue8m0);

// The send half (hook op): sends our tokens' weights to the expert ranks, then our experts'
// partial sums back to the tokens' ranks, in one launch (EP_OPS_LL_COMBINE_SPLIT=1: two); it
// never waits for the token side of this call. Returns the view of our partials slab the peers
// write into.
at::Tensor ll_combine_send(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                           const at::Tensor& x, const at::Tensor& topk_idx,
                           const at::Tensor& topk_weights, const at::Tensor& recv_token_slots,
                           int64_t num_max, bool use_logfmt);

// The recv half: waits for every rank's partials in `recv_partials` (our slab `slab`) and sums
// them per token.
at::Tensor ll_combine_recv(const LowLatencyBuffer& b, int slab, const at::Tensor& recv_partials,
                           const at::Tensor& topk_idx, int64_t hidden, int64_t num_experts,
                           int64_t num_max, bool use_logfmt);

// The whole combine in one launch: ll_combine_send then ll_combine_recv without handing the slab
// back in between (EP_OPS_LL_COMBINE_SPLIT=1: as three launches, one per phase).
at::Tensor ll_combine(const LowLatencyBuffer& b, int weights_slab, int partials_slab,
                      const at::Tensor& x, const at::Tensor& topk_idx,
                      const at::Tensor& topk_weights, const at::Tensor& recv_token_slots,
                      int64_t num_max, bool use_logfmt);

}  // namespace ep_ops::cuda
