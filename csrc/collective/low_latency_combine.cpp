// Low-latency combine. The weights travel to the expert ranks, each expert rank reduces its own
// experts of a token into one partial sum (float32 in k order, rounded to BF16 once), and only
// that partial crosses back: one row per (token, rank), not one per (token, expert).
#include <c10/util/Exception.h>

#include "checks.h"
#include "logfmt.h"
#include "low_latency_checks.h"
#include "ops.h"
#include "process_group.h"
#include "routing.h"
#include "wire_format.h"

namespace ep_ops::collective {
namespace {

// Rows of this rank's tokens placed by (destination rank, slot): [R, M, row width], zero where a
// token does not go.
Tensor to_slots(const Tensor& rows, const std::vector<Tensor>& tokens, int64_t num_max) {
  auto out = at::zeros({static_cast<int64_t>(tokens.size()), num_max, rows.size(1)}, rows.options());
  place_at_token_slots(out, rows, tokens);
  return out;
}

// For each received (source rank, slot): sum over k of weight * expert row, float32 [R*M, H].
Tensor expert_partials(const Tensor& x, const Tensor& weights, const Tensor& slots) {
  const int64_t hidden = x.size(2);
  auto x_flat = x.reshape({-1, hidden});
  auto flat_slots = slots.reshape({-1, slots.size(2)}).to(at::kLong);
  auto w = weights.reshape({-1, weights.size(2)});
  auto acc = at::zeros({flat_slots.size(0), hidden}, x.options().dtype(at::kFloat));
  for (int64_t k = 0; k < flat_slots.size(1); ++k) {
    auto slot = flat_slots.select(1, k);
    auto term = w.narrow(1, k, 1) * x_flat.index_select(0, slot.clamp_min(0)).to(at::kFloat);
    acc = at::where((slot >= 0).unsqueeze(1), acc + term, acc);
  }
  return acc;
}

Tensor encode_partials(const Tensor& partials, bool use_logfmt) {
  auto rounded = partials.to(at::kBFloat16);
  if (use_logfmt) return logfmt_encode(rounded.to(at::kFloat));
  auto bytes = byte_rows(rounded);
  const int64_t pad = wire::combine_row_bytes(partials.size(1), false) - bytes.size(1);
  return at::cat({bytes, at::zeros({bytes.size(0), pad}, bytes.options())}, 1);
}

Tensor decode_partials(const Tensor& rows, int64_t hidden, bool use_logfmt) {
  if (use_logfmt) return logfmt_decode(rows, hidden);
  return field_from_bytes(rows, 0, hidden, at::kBFloat16).to(at::kFloat);
}

void exchange_combine_header(const Group& group, const char* op, const Tensor& x,
                             const Tensor& topk_idx, int64_t num_max, bool use_logfmt,
                             const CheckResult& checked) {
  const bool ok = checked.ok();
  exchange_headers(group, op, x.device(), checked,
                   {{"hidden", ok ? x.size(2) : 0},
                    {"num_topk", ok ? topk_idx.size(1) : 0},
                    {"experts per rank", ok ? x.size(0) : 0},
                    {"num_max_dispatch_tokens_per_rank", num_max},
                    {"use_logfmt", use_logfmt}},
                   {});
}

// `op` names the op the user called (the whole op or its send half) in errors.
Tensor send_partials(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                     const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                     const std::string& group_name, const char* op) {
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize();
  auto checked = run_checks([&] {
    check_low_latency_combine(x, topk_idx, topk_weights, recv_token_slots, num_max, num_ranks, op);
    check_expert_ids(topk_idx, x.size(0) * num_ranks, op);
    TORCH_CHECK_VALUE(!use_logfmt || x.size(2) % wire::kFp8Block == 0, "ep_ops.", op,
                      ": LogFMT hidden size must be a multiple of 128, got ", x.size(2));
  });
  exchange_combine_header(group, op, x, topk_idx, num_max, use_logfmt, checked);

  auto tokens = tokens_per_rank(topk_idx, x.size(0), num_ranks);
  auto weights = all_to_all_equal(group, to_slots(topk_weights, tokens, num_max));
  auto partials = expert_partials(x, weights, recv_token_slots);
  auto rows = encode_partials(partials, use_logfmt);
  return all_to_all_equal(group, rows.view({num_ranks, num_max, rows.size(1)}));
}

}  // namespace

Tensor low_latency_combine_send(const Tensor& x, const Tensor& topk_idx,
                                const Tensor& topk_weights, const Tensor& recv_token_slots,
                                int64_t num_max, bool use_logfmt, const std::string& group_name) {
  return send_partials(x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt,
                       group_name, "low_latency_combine_send");
}

Tensor low_latency_combine_recv(const Tensor& recv_partials, const Tensor& topk_idx,
                                int64_t hidden, int64_t num_experts, int64_t num_max,
                                bool use_logfmt, const std::string& group_name) {
  const char* op = "low_latency_combine_recv";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize();
  const int64_t per_rank = check_num_experts(num_experts, num_ranks, op);
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "ep_ops.", op, ": topk_idx must be 2-D, got ",
                    topk_idx.sizes());
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, "ep_ops.", op,
                   ": topk_idx must be int64, got ", topk_idx.scalar_type());
  check_expert_ids(topk_idx, num_experts, op);
  const int64_t row_bytes = wire::combine_row_bytes(hidden, use_logfmt);
  TORCH_CHECK_TYPE(recv_partials.scalar_type() == at::kByte, "ep_ops.", op,
                   ": recv_partials must be uint8, got ", recv_partials.scalar_type());
  TORCH_CHECK_VALUE(recv_partials.sizes() == at::IntArrayRef({num_ranks, num_max, row_bytes}),
                    "ep_ops.", op, ": recv_partials must have shape [", num_ranks, ", ", num_max,
                    ", ", row_bytes, "], got ", recv_partials.sizes());

  auto tokens = tokens_per_rank(topk_idx, per_rank, num_ranks);
  auto acc = at::zeros({topk_idx.size(0), hidden}, recv_partials.options().dtype(at::kFloat));
  for (int64_t r = 0; r < num_ranks; ++r) {
    auto rows = recv_partials[r].index_select(0, tokens[r]);
    acc.index_add_(0, tokens[r], decode_partials(rows, hidden, use_logfmt));
  }
  return acc.to(at::kBFloat16);
}

Tensor low_latency_combine(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                           const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                           const std::string& group_name) {
  auto partials = send_partials(x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt,
                                group_name, "low_latency_combine");
  const int64_t num_experts = x.size(0) * partials.size(0);
  return low_latency_combine_recv(partials, topk_idx, x.size(2), num_experts, num_max, use_logfmt,
                                  group_name);
}

std::tuple<Tensor, Tensor> low_latency_combine_backward(
    const Tensor& grad_combined_x, const Tensor& x, const Tensor& topk_idx,
    const Tensor& topk_weights, const Tensor& recv_token_slots, int64_t num_max,
    const std::string& group_name) {
  const char* op = "low_latency_combine_backward";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize();
  auto checked = run_checks([&] {
    check_low_latency_combine(x, topk_idx, topk_weights, recv_token_slots, num_max, num_ranks, op);
    check_expert_ids(topk_idx, x.size(0) * num_ranks, op);
    check_matrix(grad_combined_x, op, "grad_combined_x", at::kBFloat16, topk_idx.size(0),
                 x.size(2), x.device());
  });
  exchange_combine_header(group, op, x, topk_idx, num_max, false, checked);

  // Out: each token's gradient row and weights to the ranks holding its experts.
  const int64_t per_rank = x.size(0), hidden = x.size(2), num_topk = topk_idx.size(1);
  auto tokens = tokens_per_rank(topk_idx, per_rank, num_ranks);
  auto rows = at::cat({byte_rows(grad_combined_x.contiguous()), byte_rows(topk_weights)}, 1);
  auto received = all_to_all_equal(group, to_slots(rows, tokens, num_max));
  auto flat_rows = received.view({num_ranks * num_max, -1});
  auto grad = field_from_bytes(flat_rows, 0, hidden, at::kBFloat16).to(at::kFloat);
  auto weights = field_from_bytes(flat_rows, 2 * hidden, num_topk, at::kFloat);

  // On the expert side: d x[e, p] = w * g, and d w = <g, x[e, p]> for each local (token, k).
  auto x_flat = x.reshape({-1, hidden});
  auto slots = recv_token_slots.reshape({-1, num_topk}).to(at::kLong);
  auto grad_x = at::zeros({x_flat.size(0), hidden}, x.options().dtype(at::kFloat));
  auto dots = at::zeros({slots.size(0), num_topk}, x.options().dtype(at::kFloat));
  for (int64_t k = 0; k < num_topk; ++k) {
    auto which = at::nonzero(slots.select(1, k) >= 0).view(-1);
    auto dest = slots.select(1, k).index_select(0, which);
    auto g = grad.index_select(0, which);
    grad_x.index_add_(0, dest, weights.select(1, k).index_select(0, which).unsqueeze(1) * g);
    auto dot = (g * x_flat.index_select(0, dest).to(at::kFloat)).sum(-1);
    dots.select(1, k).index_copy_(0, which, dot);
  }

  // Back: the weight gradients to the tokens' ranks; each k is owned by exactly one rank.
  auto recv_dots = all_to_all_equal(group, dots.view({num_ranks, num_max, num_topk}));
  auto grad_weights = at::zeros_like(topk_weights);
  for (int64_t r = 0; r < num_ranks; ++r) {
    auto ids = topk_idx.index_select(0, tokens[r]);
    auto owned = (ids >= 0) & (at::floor_divide(ids, per_rank) == r);
    auto d = recv_dots[r].index_select(0, tokens[r]);
    grad_weights.index_add_(0, tokens[r], at::where(owned, d, at::zeros_like(d)));
  }
  return {grad_x.to(at::kBFloat16).view(x.sizes()), grad_weights};
}

}  // namespace ep_ops::collective
