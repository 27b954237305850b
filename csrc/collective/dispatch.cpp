// Normal and cached dispatch over all-to-all. A token row travels as one byte row
// (DispatchRowLayout in dispatch_exchange.h).
#include <c10/util/Exception.h>

#include "checks.h"
#include "dispatch_exchange.h"
#include "handle.h"
#include "ops.h"
#include "process_group.h"

namespace ep_ops::collective {

DispatchExchange exchange_dispatch_rows(const char* op, const Tensor& x,
                                        const OptTensor& x_scales, const OptTensor& topk_idx,
                                        const OptTensor& topk_weights,
                                        const Tensor& is_token_in_rank, int64_t num_experts,
                                        int64_t num_worst_tokens, const std::string& group_name,
                                        const std::function<void()>& extra_checks,
                                        const std::vector<SignatureField>& extra_signature) {
  auto group = resolve_group(group_name);
  DispatchExchange out;
  const int64_t num_ranks = out.num_ranks = group->getSize();
  const int64_t rank = out.rank = group->getRank();

  std::vector<int64_t> send_counts(num_ranks, 0);
  auto checked = run_checks([&] {
    out.num_scales = check_payload(x, x_scales, op);
    check_routing(x, topk_idx, topk_weights, is_token_in_rank, num_ranks, op);
    if (topk_idx.has_value()) {
      out.num_topk = topk_idx->size(1);
      check_num_experts(num_experts, num_ranks, op);
      check_expert_ids(*topk_idx, num_experts, op);
    }
    TORCH_CHECK_VALUE(num_worst_tokens >= 0, "ep_ops.", op,
                      ": num_worst_tokens must be >= 0, got ", num_worst_tokens);
    extra_checks();
    send_counts = column_counts(is_token_in_rank);
  });
  const bool has_topk = topk_idx.has_value(), has_weights = topk_weights.has_value();
  std::vector<SignatureField> signature{
      {"hidden", checked.ok() ? x.size(1) : 0},
      {"x dtype", static_cast<int64_t>(x.scalar_type())},
      {"FP8 scales given", x_scales.has_value()},
      {"num_topk (-1: no topk_idx)", has_topk ? out.num_topk : -1},
      {"topk_weights given", has_weights},
      {"num_experts", has_topk ? num_experts : 0},
      {"num_worst_tokens", num_worst_tokens}};
  signature.insert(signature.end(), extra_signature.begin(), extra_signature.end());
  out.counts = exchange_headers(group, op, x.device(), checked, signature, send_counts);
  const auto& counts = out.counts;

  std::vector<int64_t> recv_counts(num_ranks);
  for (int64_t i = 0; i < num_ranks; ++i) out.num_recv += recv_counts[i] = counts[i][rank];
  if (num_worst_tokens > 0) {
    // Every rank sees the whole count matrix, so every rank raises the same error.
    for (int64_t j = 0; j < num_ranks; ++j) {
      int64_t total = 0;
      for (int64_t i = 0; i < num_ranks; ++i) total += counts[i][j];
      TORCH_CHECK_VALUE(total <= num_worst_tokens, "ep_ops.", op, ": num_worst_tokens (",
                        num_worst_tokens, ") is smaller than the ", total,
                        " tokens rank ", j, " receives");
    }
  }
  out.rows = num_worst_tokens > 0 ? num_worst_tokens : out.num_recv;

  // Pack this rank's outgoing rows.
  out.layout = {x.size(1) * x.element_size(), out.num_scales * 4, out.num_topk * 8,
                has_weights ? out.num_topk * 4 : 0};
  auto order = send_order(is_token_in_rank);
  std::vector<Tensor> fields{byte_rows(x.index_select(0, order))};
  if (x_scales.has_value()) fields.push_back(byte_rows(x_scales->index_select(0, order)));
  if (has_topk) fields.push_back(byte_rows(topk_idx->index_select(0, order)));
  if (has_weights) fields.push_back(byte_rows(topk_weights->index_select(0, order)));
  fields.push_back(byte_rows(order.to(at::kInt)));
  out.received = all_to_all_rows(group, at::cat(fields, 1), send_counts, recv_counts);
  return out;
}

Tensor local_expert_ids(const Tensor& global, int64_t rank, int64_t experts_per_rank) {
  const int64_t first = rank * experts_per_rank;
  auto is_local = (global >= first) & (global < first + experts_per_rank);
  return at::where(is_local, global - first, at::full_like(global, -1));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch(
    const Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t expert_alignment, int64_t num_worst_tokens, const std::string& group_name) {
  const char* op = "dispatch";
  auto ex = exchange_dispatch_rows(
      op, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_worst_tokens,
      group_name,
      [&] {
        TORCH_CHECK_VALUE(expert_alignment >= 1, "ep_ops.", op,
                          ": expert_alignment must be >= 1, got ", expert_alignment);
      },
      {});
  const auto& received = ex.received;
  const auto& layout = ex.layout;
  const int64_t rows = ex.rows, num_recv = ex.num_recv, num_topk = ex.num_topk;

  // Unpack; worst-token mode pads every row-indexed output to num_worst_tokens rows.
  auto x_bytes = field_from_bytes(received, 0, layout.payload, at::kByte);
  auto recv_x = pad_rows(x_bytes, rows, 0).view(x.scalar_type());
  auto f32 = x.options().dtype(at::kFloat);
  auto recv_x_scales =
      x_scales.has_value()
          ? pad_rows(field_from_bytes(received, layout.scale_at(), ex.num_scales, at::kFloat),
                     rows, 0)
          : at::empty({0}, f32);
  auto recv_src_idx =
      pad_rows(field_from_bytes(received, layout.src_at(), 1, at::kInt).view(-1), rows, -1);

  Tensor recv_topk_idx = at::empty({0}, x.options().dtype(at::kLong));
  Tensor recv_topk_weights = at::empty({0}, f32);
  Tensor per_expert = at::empty({0}, x.options().dtype(at::kInt));
  if (topk_idx.has_value()) {
    const int64_t per_rank = num_experts / ex.num_ranks;
    auto global = field_from_bytes(received, layout.topk_at(), num_topk, at::kLong);
    auto local = local_expert_ids(global, ex.rank, per_rank);
    auto is_local = local >= 0;
    if (topk_weights.has_value()) {
      auto w = field_from_bytes(received, layout.weights_at(), num_topk, at::kFloat);
      recv_topk_weights = pad_rows(at::where(is_local, w, at::zeros_like(w)), rows, 0);
    }
    // A row counts once for each distinct local expert it holds (extra column for -1).
    auto hits = at::zeros({num_recv, per_rank + 1}, x.options().dtype(at::kBool));
    hits.scatter_(1, at::where(is_local, local, at::full_like(local, per_rank)), true);
    auto raw = hits.narrow(1, 0, per_rank).sum(0).to(at::kLong);
    per_expert = (at::floor_divide(raw + (expert_alignment - 1), expert_alignment) *
                  expert_alignment)
                     .to(at::kInt);
    recv_topk_idx = pad_rows(local, rows, -1);
  }
  return {recv_x,     recv_x_scales, recv_topk_idx, recv_topk_weights,
          per_expert, prefix_matrix(ex.counts, x.device()), recv_src_idx};
}

std::tuple<Tensor, Tensor> cached_dispatch(const Tensor& x, const OptTensor& x_scales,
                                           const Tensor& is_token_in_rank,
                                           const Tensor& rank_prefix_matrix,
                                           const Tensor& recv_src_idx,
                                           const std::string& group_name) {
  const char* op = "cached_dispatch";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize(), rank = group->getRank();

  int64_t num_scales = 0;
  std::vector<int64_t> send_counts(num_ranks, 0), recv_counts(num_ranks, 0);
  auto checked = run_checks([&] {
    num_scales = check_payload(x, x_scales, op);
    check_handle_tensors(x, is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op);
    TORCH_CHECK_VALUE(is_token_in_rank.size(0) == x.size(0), "ep_ops.", op, ": x has ",
                      x.size(0), " tokens but the handle's is_token_in_rank has ",
                      is_token_in_rank.size(0));
    send_counts = column_counts(is_token_in_rank);
    recv_counts = handle_recv_counts(rank_prefix_matrix, recv_src_idx, rank, op);
  });
  exchange_headers(group, op, x.device(), checked,
                   {{"hidden", checked.ok() ? x.size(1) : 0},
                    {"x dtype", static_cast<int64_t>(x.scalar_type())},
                    {"FP8 scales given", x_scales.has_value()}},
                   {});

  auto order = send_order(is_token_in_rank);
  std::vector<Tensor> fields{byte_rows(x.index_select(0, order))};
  if (x_scales.has_value()) fields.push_back(byte_rows(x_scales->index_select(0, order)));
  auto received = all_to_all_rows(group, at::cat(fields, 1), send_counts, recv_counts);

  const int64_t rows = recv_src_idx.size(0);
  const int64_t payload = x.size(1) * x.element_size();
  auto recv_x = pad_rows(field_from_bytes(received, 0, payload, at::kByte), rows, 0)
                    .view(x.scalar_type());
  auto recv_x_scales =
      x_scales.has_value()
          ? pad_rows(field_from_bytes(received, payload, num_scales, at::kFloat), rows, 0)
          : at::empty({0}, x.options().dtype(at::kFloat));
  return {recv_x, recv_x_scales};
}

}  // namespace ep_ops::collective
