// Combine: every received row goes back to its source rank, which sums the rows of each token
// in ascending rank order (float32, float64 for float64 input), then adds the biases. The part
// after the header exchange (combine_rows) is shared with combine_permuted.
#include <c10/util/Exception.h>

#include "checks.h"
#include "combine_rows.h"
#include "handle.h"
#include "ops.h"
#include "process_group.h"
#include "routing.h"

namespace ep_ops::collective {

std::tuple<Tensor, Tensor> combine(const Tensor& x, const OptTensor& topk_weights,
                                   const OptTensor& bias_0, const OptTensor& bias_1,
                                   const Tensor& is_token_in_rank,
                                   const Tensor& rank_prefix_matrix, const Tensor& recv_src_idx,
                                   const std::string& group_name) {
  const char* op = "combine";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize(), rank = group->getRank();

  std::vector<int64_t> send_counts(num_ranks, 0), recv_counts(num_ranks, 0);
  auto checked = run_checks([&] {
    TORCH_CHECK_VALUE(x.dim() == 2, "ep_ops.", op,
                      ": x must be 2-D [num_recv_tokens, hidden], got shape ", x.sizes());
    const auto dtype = x.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat ||
                         dtype == at::kDouble,
                     "ep_ops.", op, ": x must be a floating dtype (not FP8), got ", dtype);
    check_handle_tensors(x, is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op);
    TORCH_CHECK_VALUE(x.size(0) == recv_src_idx.size(0), "ep_ops.", op, ": x has ", x.size(0),
                      " rows but the handle received ", recv_src_idx.size(0));
    if (topk_weights.has_value()) {
      check_matrix(*topk_weights, op, "topk_weights", at::kFloat, x.size(0), -1, x.device());
    }
    const int64_t num_tokens = is_token_in_rank.size(0);
    if (bias_0.has_value()) check_matrix(*bias_0, op, "bias_0", dtype, num_tokens, x.size(1), x.device());
    if (bias_1.has_value()) check_matrix(*bias_1, op, "bias_1", dtype, num_tokens, x.size(1), x.device());
    // Rows go back the way they came: received counts become send counts.
    send_counts = handle_recv_counts(rank_prefix_matrix, recv_src_idx, rank, op);
    recv_counts = column_counts(is_token_in_rank);
  });
  const bool has_weights = topk_weights.has_value();
  exchange_headers(group, op, x.device(), checked,
                   {{"hidden", checked.ok() ? x.size(1) : 0},
                    {"x dtype", static_cast<int64_t>(x.scalar_type())},
                    {"num_topk (-1: no topk_weights)", has_weights ? topk_weights->size(1) : -1}},
                   {});
  return combine_rows(group, x, topk_weights, bias_0, bias_1, is_token_in_rank, send_counts,
                      recv_counts);
}

std::tuple<Tensor, Tensor> combine_rows(const Group& group, const Tensor& x,
                                        const OptTensor& topk_weights, const OptTensor& bias_0,
                                        const OptTensor& bias_1, const Tensor& is_token_in_rank,
                                        const std::vector<int64_t>& send_counts,
                                        const std::vector<int64_t>& recv_counts) {
  const int64_t num_ranks = group->getSize();
  const bool has_weights = topk_weights.has_value();
  int64_t num_valid = 0;
  for (auto c : send_counts) num_valid += c;
  const int64_t payload = x.size(1) * x.element_size();
  const int64_t num_topk = has_weights ? topk_weights->size(1) : 0;
  std::vector<Tensor> fields{byte_rows(x.narrow(0, 0, num_valid))};
  if (has_weights) fields.push_back(byte_rows(topk_weights->narrow(0, 0, num_valid)));
  auto received = all_to_all_rows(group, at::cat(fields, 1), send_counts, recv_counts);

  // Received rows come grouped by rank, each group in token order.
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_tokens = is_token_in_rank.size(0);
  auto rows = field_from_bytes(received, 0, payload, at::kByte).view(x.scalar_type());
  auto acc = at::zeros({num_tokens, x.size(1)}, x.options().dtype(acc_type));
  auto weights_acc = at::zeros({num_tokens, num_topk}, x.options().dtype(at::kFloat));
  auto weights = has_weights ? field_from_bytes(received, payload, num_topk, at::kFloat) : Tensor();
  auto tokens = tokens_per_rank(is_token_in_rank);
  int64_t start = 0;
  for (int64_t r = 0; r < num_ranks; ++r) {
    const int64_t n = recv_counts[r];
    acc.index_add_(0, tokens[r], rows.narrow(0, start, n).to(acc_type));
    if (has_weights) weights_acc.index_add_(0, tokens[r], weights.narrow(0, start, n));
    start += n;
  }
  if (bias_0.has_value()) acc.add_(bias_0->to(acc_type));
  if (bias_1.has_value()) acc.add_(bias_1->to(acc_type));
  auto combined_topk_weights =
      has_weights ? weights_acc : at::empty({0}, x.options().dtype(at::kFloat));
  return {acc.to(x.scalar_type()), combined_topk_weights};
}

}  // namespace ep_ops::collective
