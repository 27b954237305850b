// dispatch_permuted and combine_permuted over all-to-all: dispatch's exchange, then every
// received row is copied once, straight from the receive buffer into its pairs' permuted rows;
// combine sums each row's pairs (permute.unpermute) and sends the sums back as combine does.
#include <c10/util/Exception.h>

#include "checks.h"
#include "combine_rows.h"
#include "dispatch_exchange.h"
#include "handle.h"
#include "ops.h"
#include "permute_map.h"
#include "process_group.h"

namespace ep_ops::collective {
namespace {

void check_permute_args(const Tensor& topk_idx, int64_t pad_multiple, int64_t num_out,
                        const char* op) {
  TORCH_CHECK_VALUE(topk_idx.size(1) >= 1, "ep_ops.", op,
                    ": topk_idx needs at least one column (an expert slot), got shape ",
                    topk_idx.sizes());
  TORCH_CHECK_VALUE(pad_multiple >= 1, "ep_ops.", op, ": pad_multiple must be >= 1 (1 = no ",
                    "padding), got ", pad_multiple);
  TORCH_CHECK_VALUE(num_out >= 0, "ep_ops.", op, ": num_out must be >= 0 (0 = exact), got ",
                    num_out);
  if (topk_idx.size(0) == 0 || topk_idx.size(1) < 2) return;
  // A pair is (row, expert): an expert named twice in a row would need two slots for one pair.
  auto sorted = std::get<0>(topk_idx.sort(1));
  auto repeated = (sorted.narrow(1, 1, sorted.size(1) - 1) ==
                   sorted.narrow(1, 0, sorted.size(1) - 1)) &
                  (sorted.narrow(1, 1, sorted.size(1) - 1) >= 0);
  TORCH_CHECK_VALUE(!repeated.any().item<bool>(), "ep_ops.", op,
                    ": topk_idx names an expert twice in one token's row; each expert at most "
                    "once per token");
}

// Columns [offset, offset + bytes) of the received rows, gathered into the permuted rows:
// row p takes received row row_of[p], or zeros where row_of[p] < 0 (padding).
Tensor gather_field(const Tensor& received, int64_t offset, int64_t bytes, const Tensor& row_of) {
  if (received.size(0) == 0) {
    return at::zeros({row_of.size(0), bytes}, received.options());
  }
  auto rows = received.narrow(1, offset, bytes).index_select(0, row_of.clamp_min(0));
  return rows.masked_fill_((row_of < 0).unsqueeze(1), 0);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch_permuted(
    const Tensor& x, const OptTensor& x_scales, const Tensor& topk_idx,
    const OptTensor& topk_weights, const Tensor& is_token_in_rank, int64_t num_experts,
    int64_t num_worst_tokens, int64_t pad_multiple, int64_t num_out,
    const std::string& group_name) {
  const char* op = "dispatch_permuted";
  auto ex = exchange_dispatch_rows(
      op, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_worst_tokens,
      group_name, [&] { check_permute_args(topk_idx, pad_multiple, num_out, op); },
      {{"pad_multiple", pad_multiple}, {"num_out", num_out}});
  const auto& layout = ex.layout;
  const int64_t K = ex.num_topk, per_rank = num_experts / ex.num_ranks;

  auto global = field_from_bytes(ex.received, layout.topk_at(), K, at::kLong);
  auto local = pad_rows(local_expert_ids(global, ex.rank, per_rank), ex.rows, -1);
  auto map = make_permute_map(local, per_rank, pad_multiple, num_out);
  auto row_of = at::where(map.slot_pair >= 0, at::floor_divide(map.slot_pair, K),
                          at::full_like(map.slot_pair, -1));

  auto f32 = x.options().dtype(at::kFloat);
  auto permuted_x = gather_field(ex.received, 0, layout.payload, row_of).view(x.scalar_type());
  auto permuted_scales =
      x_scales.has_value()
          ? gather_field(ex.received, layout.scale_at(), layout.scales, row_of).view(at::kFloat)
          : at::empty({0}, f32);
  Tensor permuted_probs = at::empty({0}, f32);
  if (topk_weights.has_value()) {
    auto w = field_from_bytes(ex.received, layout.weights_at(), K, at::kFloat);
    permuted_probs = at::cat({w.new_zeros({1}), w.reshape(-1)}).index_select(0, map.slot_pair + 1);
  }
  auto recv_src_idx = pad_rows(
      field_from_bytes(ex.received, layout.src_at(), 1, at::kInt).view(-1), ex.rows, -1);
  return {permuted_x,    permuted_scales, permuted_probs, map.tokens_per_expert,
          map.pair_slot, prefix_matrix(ex.counts, x.device()), recv_src_idx};
}

std::tuple<Tensor, Tensor> combine_permuted(const Tensor& h, const OptTensor& probs,
                                            const Tensor& pair_slot,
                                            const Tensor& is_token_in_rank,
                                            const Tensor& rank_prefix_matrix,
                                            const Tensor& recv_src_idx,
                                            const std::string& group_name) {
  const char* op = "combine_permuted";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize(), rank = group->getRank();

  std::vector<int64_t> send_counts(num_ranks, 0), recv_counts(num_ranks, 0);
  auto checked = run_checks([&] {
    check_combine_permuted_inputs(h, probs, pair_slot, recv_src_idx, op);
    check_handle_tensors(h, is_token_in_rank, rank_prefix_matrix, recv_src_idx, num_ranks, op);
    if (pair_slot.numel() > 0) {  // reads the values: a host sync, as the handle checks are
      const int64_t most = pair_slot.max().item<int64_t>();
      TORCH_CHECK_VALUE(most < h.size(0), "ep_ops.", op, ": pair_slot names permuted row ", most,
                        " but h has ", h.size(0), " rows (is pair_slot from this dispatch?)");
    }
    send_counts = handle_recv_counts(rank_prefix_matrix, recv_src_idx, rank, op);
    recv_counts = column_counts(is_token_in_rank);
  });
  exchange_headers(group, op, h.device(), checked,
                   {{"hidden", checked.ok() ? h.size(1) : 0},
                    {"h dtype", static_cast<int64_t>(h.scalar_type())},
                    {"num_topk", checked.ok() ? pair_slot.size(1) : 0},
                    {"probs given", probs.has_value()}},
                   {});
  // Only the rows that go back are summed (worst-token padding rows have no pairs anyway).
  int64_t num_valid = 0;
  for (auto c : send_counts) num_valid += c;
  auto pairs = pair_slot.narrow(0, 0, num_valid);
  auto rows = unpermute_rows(h, pairs);
  OptTensor weights;
  if (probs.has_value()) weights = gather_pairs(*probs, pairs);
  return combine_rows(group, rows, weights, std::nullopt, std::nullopt, is_token_in_rank,
                      send_counts, recv_counts);
}

void check_combine_permuted_inputs(const Tensor& h, const OptTensor& probs,
                                   const Tensor& pair_slot, const Tensor& recv_src_idx,
                                   const char* op) {
  TORCH_CHECK_VALUE(h.dim() == 2, "ep_ops.", op,
                    ": h must be 2-D [num_permuted_tokens, hidden], got shape ", h.sizes());
  const auto dtype = h.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   "ep_ops.", op, ": h must be a floating dtype (not FP8), got ", dtype);
  check_matrix(pair_slot, op, "pair_slot", at::kLong, recv_src_idx.size(0), -1, h.device());
  TORCH_CHECK_VALUE(pair_slot.size(1) >= 1, "ep_ops.", op,
                    ": pair_slot needs at least one column, got shape ", pair_slot.sizes());
  if (probs.has_value()) {
    TORCH_CHECK_VALUE(probs->dim() == 1 && probs->size(0) == h.size(0), "ep_ops.", op,
                      ": probs must be 1-D [", h.size(0), "] like h's rows, got shape ",
                      probs->sizes());
    TORCH_CHECK_TYPE(probs->scalar_type() == at::kFloat, "ep_ops.", op,
                     ": probs must be float32, got ", probs->scalar_type());
    TORCH_CHECK_VALUE(probs->device() == h.device(), "ep_ops.", op, ": probs must be on ",
                      h.device(), " like h, got ", probs->device());
  }
}

}  // namespace ep_ops::collective
