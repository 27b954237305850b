// CUDA kernels of the normal-mode ops, with the backend choice: the NVLink kernels when the
// group has a registered NVLink buffer (ep_ops.Buffer or ep_ops.init_nvl_buffer made one) and
// the inputs suit them; the collective backend (NCCL all-to-all) otherwise.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <utility>

#include "../collective/checks.h"
#include "../collective/handle.h"
#include "../collective/ops.h"
#include "../dispatch_counts.h"
#include "nvl_buffer.h"
#include "nvl_dispatch.h"

namespace ep_ops::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_dispatch_inputs(const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
                           const OptTensor& topk_weights, const Tensor& is_token_in_rank,
                           int64_t num_experts, int64_t num_ranks, const char* op) {
  collective::check_payload(x, x_scales, op);
  collective::check_routing(x, topk_idx, topk_weights, is_token_in_rank, num_ranks, op);
  if (topk_idx.has_value()) collective::check_num_experts(num_experts, num_ranks, op);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch(
    const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t expert_alignment, int64_t num_worst_tokens, const std::string& group_name) {
  auto view = find_nvl_buffer(group_name);
  if (!view || !nvl_dispatch_supported(x, topk_idx, *view)) {
    return collective::dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts,
                                expert_alignment, num_worst_tokens, group_name);
  }
  check_watchdog(*view, "dispatch");
  check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts,
                        view->num_ranks, "dispatch");
  TORCH_CHECK_VALUE(expert_alignment >= 1, "ep_ops.dispatch: expert_alignment must be >= 1, got ",
                    expert_alignment);
  TORCH_CHECK_VALUE(num_worst_tokens >= 0, "ep_ops.dispatch: num_worst_tokens must be >= 0, got ",
                    num_worst_tokens);
  auto r = nvl_dispatch(*view, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts,
                        expert_alignment, num_worst_tokens, std::nullopt, std::nullopt, /*routing_only=*/false,
                        /*host_counts=*/take_dispatch_counts_request(group_name));
  if (!r.host_expert_counts.empty()) leave_dispatch_counts(group_name, std::move(r.host_expert_counts));
  return {r.recv_x,      r.recv_x_scales, r.recv_topk_idx, r.recv_topk_weights,
          r.num_recv_tokens_per_expert, r.rank_prefix_matrix, r.recv_src_idx};
}

std::tuple<Tensor, Tensor> cached_dispatch(const Tensor& x, const OptTensor& x_scales,
                                           const Tensor& is_token_in_rank,
                                           const Tensor& rank_prefix_matrix,
                                           const Tensor& recv_src_idx,
                                           const std::string& group_name) {
  auto view = find_nvl_buffer(group_name);
  if (!view || !nvl_dispatch_supported(x, std::nullopt, *view)) {
    return collective::cached_dispatch(x, x_scales, is_token_in_rank, rank_prefix_matrix,
                                       recv_src_idx, group_name);
  }
  check_watchdog(*view, "cached_dispatch");
  check_dispatch_inputs(x, x_scales, std::nullopt, std::nullopt, is_token_in_rank, 0,
                        view->num_ranks, "cached_dispatch");
  // The kernels read recv_src_idx too: our own rows' tokens (nvl_dispatch_overlap.cu).
  collective::check_handle_tensors(x, is_token_in_rank, rank_prefix_matrix, recv_src_idx, view->num_ranks,
                                   "cached_dispatch");
  auto r = nvl_dispatch(*view, x, x_scales, std::nullopt, std::nullopt, is_token_in_rank, 0, 1, 0,
                        rank_prefix_matrix, recv_src_idx);
  return {r.recv_x, r.recv_x_scales};
}

std::tuple<Tensor, Tensor> combine(const Tensor& x, const OptTensor& topk_weights,
                                   const OptTensor& bias_0, const OptTensor& bias_1,
                                   const Tensor& is_token_in_rank,
                                   const Tensor& rank_prefix_matrix, const Tensor& recv_src_idx,
                                   const std::string& group_name) {
  auto view = find_nvl_buffer(group_name);
  const auto dtype = x.scalar_type();
  const bool nvl_dtype = dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat;
  if (!view || !nvl_dtype || !nvl_dispatch_supported(x, std::nullopt, *view)) {
    return collective::combine(x, topk_weights, bias_0, bias_1, is_token_in_rank,
                               rank_prefix_matrix, recv_src_idx, group_name);
  }
  const char* op = "combine";
  check_watchdog(*view, op);
  const int64_t R = view->num_ranks, num_tokens = is_token_in_rank.size(0);
  collective::check_matrix(is_token_in_rank, op, "is_token_in_rank", at::kBool, num_tokens, R,
                           x.device());
  collective::check_matrix(rank_prefix_matrix, op, "rank_prefix_matrix", at::kInt, R, R, x.device());
  TORCH_CHECK_VALUE(x.size(0) == recv_src_idx.size(0), "ep_ops.", op, ": x has ", x.size(0),
                    " rows but the handle received ", recv_src_idx.size(0));
  if (topk_weights.has_value()) {
    collective::check_matrix(*topk_weights, op, "topk_weights", at::kFloat, x.size(0), -1, x.device());
  }
  if (bias_0.has_value()) collective::check_matrix(*bias_0, op, "bias_0", dtype, num_tokens, x.size(1), x.device());
  if (bias_1.has_value()) collective::check_matrix(*bias_1, op, "bias_1", dtype, num_tokens, x.size(1), x.device());
  return nvl_combine(*view, x, topk_weights, bias_0, bias_1, is_token_in_rank, rank_prefix_matrix);
}

void check_nvl_buffers(const Tensor&, const std::string& group_name) {
  if (auto view = find_nvl_buffer(group_name)) check_watchdog(*view, "check_nvl_buffers");
  if (auto ll = find_ll_buffer(group_name)) check_watchdog(ll->view, "check_nvl_buffers");
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) {
  m.impl("dispatch", &dispatch);
  m.impl("cached_dispatch", &cached_dispatch);
  m.impl("combine", &combine);
  m.impl("init_nvl_buffer", &init_nvl_buffer);
  m.impl("release_nvl_buffer", &release_nvl_buffer);
  m.impl("check_nvl_buffers", &check_nvl_buffers);
}

}  // namespace ep_ops::cuda
