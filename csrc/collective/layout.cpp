#include <c10/util/Exception.h>

#include "checks.h"
#include "ops.h"
#include "routing.h"

namespace ep_ops::collective {

std::tuple<Tensor, Tensor, Tensor> get_dispatch_layout(const Tensor& topk_idx, int64_t num_experts,
                                                       int64_t num_ranks) {
  const char* op = "get_dispatch_layout";
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "ep_ops.", op, ": topk_idx must be 2-D, got shape ",
                    topk_idx.sizes());
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, "ep_ops.", op,
                   ": topk_idx must be int64, got ", topk_idx.scalar_type());
  TORCH_CHECK_VALUE(num_ranks > 0, "ep_ops.", op, ": num_ranks must be positive, got ",
                    num_ranks);
  const int64_t per_rank = check_num_experts(num_experts, num_ranks, op);
  check_expert_ids(topk_idx, num_experts, op);

  auto is_token_in_rank = token_in_rank(topk_idx, per_rank, num_ranks);
  auto num_tokens_per_rank = is_token_in_rank.sum(0).to(at::kInt);
  // Ids of -1 count into an extra bin that is dropped.
  auto ids = at::where(topk_idx >= 0, topk_idx, at::full_like(topk_idx, num_experts)).view(-1);
  auto bins = at::zeros({num_experts + 1}, topk_idx.options());
  bins.index_add_(0, ids, at::ones_like(ids));
  auto num_tokens_per_expert = bins.narrow(0, 0, num_experts).to(at::kInt);
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

}  // namespace ep_ops::collective
