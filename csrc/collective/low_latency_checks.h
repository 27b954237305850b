// Input checks of the low-latency ops (the fakes in meta/low_latency.py repeat them).
#pragma once

#include <ATen/ATen.h>

namespace ep_ops::collective {

// x [T, H] bfloat16 and topk_idx [T, K] int64 with T <= num_max.
void check_low_latency_tokens(const at::Tensor& x, const at::Tensor& topk_idx, int64_t num_max,
                              const char* op);

void check_fp8_options(int64_t hidden, bool use_fp8, bool round_scale, bool use_ue8m0,
                       const char* op);

// x [E_local, R*M, H] bfloat16, topk_idx/topk_weights [T, K], recv_token_slots [R, M, K].
// Shapes only: the expert ids' range needs a host sync (check_expert_ids), which the NVLink
// kernels avoid (they check on the device).
void check_low_latency_combine(const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weights,
                               const at::Tensor& recv_token_slots, int64_t num_max,
                               int64_t num_ranks, const char* op);

}  // namespace ep_ops::collective
