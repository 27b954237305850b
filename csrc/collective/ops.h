// The collective backend: every ep_ops op implemented over a c10d process group's all-to-all.
// Device-generic: CPU tensors over gloo (CI), CUDA tensors over NCCL (multi-node).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ep_ops::collective {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> get_dispatch_layout(const Tensor& topk_idx, int64_t num_experts,
                                                       int64_t num_ranks);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch(
    const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t expert_alignment, int64_t num_worst_tokens, const std::string& group_name);

std::tuple<Tensor, Tensor> cached_dispatch(const Tensor& x, const OptTensor& x_scales,
                                           const Tensor& is_token_in_rank,
                                           const Tensor& rank_prefix_matrix,
                                           const Tensor& recv_src_idx,
                                           const std::string& group_name);

std::tuple<Tensor, Tensor> combine(const Tensor& x, const OptTensor& topk_weights,
                                   const OptTensor& bias_0, const OptTensor& bias_1,
                                   const Tensor& is_token_in_rank,
                                   const Tensor& rank_prefix_matrix, const Tensor& recv_src_idx,
                                   const std::string& group_name);

// dispatch with the received rows grouped by local expert (permute_map.h's layout).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch_permuted(
    const Tensor& x, const OptTensor& x_scales, const Tensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t num_worst_tokens, int64_t pad_multiple, int64_t num_out,
    const std::string& group_name);

// Its inverse: each row sums its pairs' rows of h, then combine.
std::tuple<Tensor, Tensor> combine_permuted(const Tensor& h, const OptTensor& probs,
                                            const Tensor& pair_slot,
                                            const Tensor& is_token_in_rank,
                                            const Tensor& rank_prefix_matrix,
                                            const Tensor& recv_src_idx,
                                            const std::string& group_name);

// combine_permuted's checks of h, probs and pair_slot (the NVLink entry point runs them too).
void check_combine_permuted_inputs(const Tensor& h, const OptTensor& probs,
                                   const Tensor& pair_slot, const Tensor& recv_src_idx,
                                   const char* op);

using LowLatencyRecv = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Tensor low_latency_dispatch_send(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                                 int64_t num_experts, bool use_fp8, bool round_scale,
                                 bool use_ue8m0, const std::string& group_name);

LowLatencyRecv low_latency_dispatch_recv(const Tensor& recv_packed, int64_t num_max,
                                         int64_t hidden, int64_t num_topk, int64_t num_experts,
                                         bool use_fp8, bool use_ue8m0,
                                         const std::string& group_name);

LowLatencyRecv low_latency_dispatch(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                                    int64_t num_experts, bool use_fp8, bool round_scale,
                                    bool use_ue8m0, const std::string& group_name);

Tensor low_latency_combine_send(const Tensor& x, const Tensor& topk_idx,
                                const Tensor& topk_weights, const Tensor& recv_token_slots,
                                int64_t num_max, bool use_logfmt, const std::string& group_name);

Tensor low_latency_combine_recv(const Tensor& recv_partials, const Tensor& topk_idx,
                                int64_t hidden, int64_t num_experts, int64_t num_max,
                                bool use_logfmt, const std::string& group_name);

Tensor low_latency_combine(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                           const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                           const std::string& group_name);

std::tuple<Tensor, Tensor> low_latency_combine_backward(
    const Tensor& grad_combined_x, const Tensor& x, const Tensor& topk_idx,
    const Tensor& topk_weights, const Tensor& recv_token_slots, int64_t num_max,
    const std::string& group_name);

}  // namespace ep_ops::collective
