#include "routing.h"

namespace ep_ops::collective {

at::Tensor token_in_rank(const at::Tensor& topk_idx, int64_t experts_per_rank, int64_t num_ranks) {
  const int64_t num_tokens = topk_idx.size(0);
  // Ids of -1 scatter into an extra column that is dropped.
  auto rank_of = at::where(topk_idx >= 0, at::floor_divide(topk_idx, experts_per_rank),
                           at::full_like(topk_idx, num_ranks));
  auto mask = at::zeros({num_tokens, num_ranks + 1}, topk_idx.options().dtype(at::kBool));
  mask.scatter_(1, rank_of, true);
  return mask.narrow(1, 0, num_ranks).contiguous();
}

std::vector<at::Tensor> tokens_per_rank(const at::Tensor& mask) {
  std::vector<at::Tensor> lists;
  for (int64_t r = 0; r < mask.size(1); ++r) {
    lists.push_back(at::nonzero(mask.select(1, r)).view(-1));
  }
  return lists;
}

std::vector<at::Tensor> tokens_per_rank(const at::Tensor& topk_idx, int64_t experts_per_rank,
                                        int64_t num_ranks) {
  return tokens_per_rank(token_in_rank(topk_idx, experts_per_rank, num_ranks));
}

void place_at_token_slots(at::Tensor& out, const at::Tensor& rows,
                          const std::vector<at::Tensor>& tokens) {
  for (size_t r = 0; r < tokens.size(); ++r) {
    out[static_cast<int64_t>(r)].index_copy_(0, tokens[r], rows.index_select(0, tokens[r]));
  }
}

}  // namespace ep_ops::collective
