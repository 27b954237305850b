// CUDA kernels of the fused-permute ops, with the backend choice of register.cpp: the NVLink
// kernels when the group has a registered NVLink buffer and the inputs suit them, the
// collective backend (NCCL all-to-all) otherwise.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../collective/checks.h"
#include "../collective/ops.h"
#include "nvl_buffer.h"
#include "nvl_dispatch.h"

namespace ep_ops::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch_permuted(
    const Tensor& x, const OptTensor& x_scales, const Tensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t num_worst_tokens, int64_t pad_multiple, int64_t num_out,
    const std::string& group_name) {
  auto view = find_nvl_buffer(group_name);
  if (!view || !nvl_dispatch_supported(x, topk_idx, *view)) {
    return collective::dispatch_permuted(x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                                         num_experts, num_worst_tokens, pad_multiple, num_out,
                                         group_name);
  }
  const char* op = "dispatch_permuted";
  check_watchdog(*view, op);
  collective::check_payload(x, x_scales, op);
  collective::check_routing(x, topk_idx, topk_weights, is_token_in_rank, view->num_ranks, op);
  collective::check_num_experts(num_experts, view->num_ranks, op);
  // The expert ids are not read here (no host sync); the collective backend checks them.
  TORCH_CHECK_VALUE(topk_idx.size(1) >= 1, "ep_ops.", op,
                    ": topk_idx needs at least one column (an expert slot), got shape ",
                    topk_idx.sizes());
  TORCH_CHECK_VALUE(num_worst_tokens >= 0, "ep_ops.", op, ": num_worst_tokens must be >= 0, got ",
                    num_worst_tokens);
  TORCH_CHECK_VALUE(pad_multiple >= 1, "ep_ops.", op, ": pad_multiple must be >= 1 (1 = no ",
                    "padding), got ", pad_multiple);
  TORCH_CHECK_VALUE(num_out >= 0, "ep_ops.", op, ": num_out must be >= 0 (0 = exact), got ",
                    num_out);
  return nvl_dispatch_permuted(*view, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                               num_experts, num_worst_tokens, pad_multiple, num_out);
}

std::tuple<Tensor, Tensor> combine_permuted(const Tensor& h, const OptTensor& probs,
                                            const Tensor& pair_slot,
                                            const Tensor& is_token_in_rank,
                                            const Tensor& rank_prefix_matrix,
                                            const Tensor& recv_src_idx,
                                            const std::string& group_name) {
  auto view = find_nvl_buffer(group_name);
  const auto dtype = h.scalar_type();
  const bool nvl_dtype = dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat;
  if (!view || !nvl_dtype || !nvl_dispatch_supported(h, std::nullopt, *view)) {
    return collective::combine_permuted(h, probs, pair_slot, is_token_in_rank, rank_prefix_matrix,
                                        recv_src_idx, group_name);
  }
  const char* op = "combine_permuted";
  check_watchdog(*view, op);
  const int64_t R = view->num_ranks;
  collective::check_combine_permuted_inputs(h, probs, pair_slot, recv_src_idx, op);
  collective::check_matrix(is_token_in_rank, op, "is_token_in_rank", at::kBool,
                           is_token_in_rank.size(0), R, h.device());
  collective::check_matrix(rank_prefix_matrix, op, "rank_prefix_matrix", at::kInt, R, R, h.device());
  // pair_slot's values are not read here (no host sync): they must come from the dispatch.
  return nvl_combine(*view, h, probs, std::nullopt, std::nullopt, is_token_in_rank,
                     rank_prefix_matrix, pair_slot);
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) {
  m.impl("dispatch_permuted", &dispatch_permuted);
  m.impl("combine_permuted", &combine_permuted);
}

}  // namespace ep_ops::cuda
