// Low-latency dispatch over one equal-split all-to-all. Each token crosses once per destination
// rank (not once per expert) as a wire row (wire_format.h); the receiving rank expands the rows
// into its experts' blocks locally.
#include <c10/util/Exception.h>

#include "checks.h"
#include "fp8.h"
#include "low_latency_checks.h"
#include "ops.h"
#include "process_group.h"
#include "routing.h"
#include "wire_format.h"

namespace ep_ops::collective {
namespace {

// This rank's tokens as wire rows, [T, row bytes].
Tensor token_rows(const Tensor& x, const Tensor& topk_idx, const wire::DispatchRow& row,
                  bool round_scale) {
  const int64_t tokens = x.size(0);
  std::vector<Tensor> fields;
  if (row.use_fp8) {
    auto [q, scale_inv] = cast_to_fp8(x, round_scale);
    fields.push_back(byte_rows(q));
    fields.push_back(byte_rows(scale_inv));
  } else {
    fields.push_back(byte_rows(x));
  }
  fields.push_back(byte_rows(at::arange(tokens, x.options().dtype(at::kInt))));
  fields.push_back(byte_rows(topk_idx.to(at::kInt)));
  const int64_t used = row.topk_offset() + 4 * row.num_topk;
  fields.push_back(at::zeros({tokens, row.bytes() - used}, x.options().dtype(at::kByte)));
  return at::cat(fields, 1);
}

// `op` names the op the user called (the whole op or its send half) in errors.
Tensor send_tokens(const Tensor& x, const Tensor& topk_idx, int64_t num_max, int64_t num_experts,
                   bool use_fp8, bool round_scale, bool use_ue8m0, const std::string& group_name,
                   const char* op) {
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize();
  auto checked = run_checks([&] {
    check_low_latency_tokens(x, topk_idx, num_max, op);
    check_num_experts(num_experts, num_ranks, op);
    check_expert_ids(topk_idx, num_experts, op);
    check_fp8_options(x.size(1), use_fp8, round_scale, use_ue8m0, op);
  });
  const bool ok = checked.ok();
  exchange_headers(group, op, x.device(), checked,
                   {{"hidden", ok ? x.size(1) : 0},
                    {"num_topk", ok ? topk_idx.size(1) : 0},
                    {"num_experts", num_experts},
                    {"num_max_dispatch_tokens_per_rank", num_max},
                    {"use_fp8", use_fp8},
                    {"use_ue8m0", use_ue8m0}},
                   {});

  const wire::DispatchRow row{x.size(1), topk_idx.size(1), use_fp8};
  auto rows = token_rows(x, topk_idx, row, round_scale);
  // Token t's row goes to slot t of each rank it has an expert on (a slot is the token's own
  // index); every other slot carries source index -1 (all bytes 0xFF), every other byte zero.
  auto send = at::zeros({num_ranks, num_max, row.bytes()}, x.options().dtype(at::kByte));
  send.narrow(2, row.src_offset(), 4).fill_(0xFF);
  place_at_token_slots(send, rows, tokens_per_rank(topk_idx, num_experts / num_ranks, num_ranks));
  return all_to_all_equal(group, send);
}

}  // namespace

Tensor low_latency_dispatch_send(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                                 int64_t num_experts, bool use_fp8, bool round_scale,
                                 bool use_ue8m0, const std::string& group_name) {
  return send_tokens(x, topk_idx, num_max, num_experts, use_fp8, round_scale, use_ue8m0,
                     group_name, "low_latency_dispatch_send");
}

LowLatencyRecv low_latency_dispatch_recv(const Tensor& recv_packed, int64_t num_max,
                                         int64_t hidden, int64_t num_topk, int64_t num_experts,
                                         bool use_fp8, bool use_ue8m0,
                                         const std::string& group_name) {
  const char* op = "low_latency_dispatch_recv";
  auto group = resolve_group(group_name);
  const int64_t num_ranks = group->getSize(), rank = group->getRank();
  const int64_t per_rank = check_num_experts(num_experts, num_ranks, op);
  check_fp8_options(hidden, use_fp8, use_ue8m0, use_ue8m0, op);
  const wire::DispatchRow row{hidden, num_topk, use_fp8};
  TORCH_CHECK_TYPE(recv_packed.scalar_type() == at::kByte, "ep_ops.", op,
                   ": recv_packed must be uint8, got ", recv_packed.scalar_type());
  TORCH_CHECK_VALUE(recv_packed.sizes() == at::IntArrayRef({num_ranks, num_max, row.bytes()}),
                    "ep_ops.", op, ": recv_packed must have shape [", num_ranks, ", ", num_max,
                    ", ", row.bytes(), "], got ", recv_packed.sizes());

  const int64_t slots = num_ranks * num_max;  // rows per expert block
  auto wire_rows = recv_packed.reshape({slots, row.bytes()});
  auto src = field_from_bytes(wire_rows, row.src_offset(), 1, at::kInt).view(-1);
  auto global = field_from_bytes(wire_rows, row.topk_offset(), num_topk, at::kInt).to(at::kLong);
  const int64_t first = rank * per_rank;
  auto is_local = (src >= 0).unsqueeze(1) & (global >= first) & (global < first + per_rank);
  auto local = at::where(is_local, global - first, at::full_like(global, per_rank));

  // hits[s, e]: wire row s (source rank major, slot minor) goes to local expert e; its position
  // in e's block is the count of earlier hits, which orders rows by source rank, then token.
  auto options = recv_packed.options();
  auto hits = at::zeros({slots, per_rank + 1}, options.dtype(at::kBool));
  hits.scatter_(1, local, true);
  hits = hits.narrow(1, 0, per_rank).contiguous();
  auto hits_long = hits.to(at::kLong);
  auto position = hits_long.cumsum(0) - 1;
  auto pairs = at::nonzero(hits);  // (wire row, expert), sorted by wire row
  auto pair_row = pairs.select(1, 0), pair_expert = pairs.select(1, 1);
  auto flat_dest = pair_expert * slots + position.index({pair_row, pair_expert});

  auto payload_type = use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16;
  auto payload = field_from_bytes(wire_rows, 0, row.payload_bytes(), at::kByte);
  auto recv_x = at::zeros({per_rank * slots, row.payload_bytes()}, options.dtype(at::kByte));
  recv_x.index_copy_(0, flat_dest, payload.index_select(0, pair_row));
  recv_x = recv_x.view(payload_type).view({per_rank, slots, hidden});

  Tensor recv_x_scales = at::empty({0}, options.dtype(at::kFloat));
  if (use_fp8) {
    const int64_t groups = row.num_scales();
    auto scales = field_from_bytes(wire_rows, row.scale_offset(), groups, at::kFloat);
    auto placed = at::zeros({per_rank * slots, groups}, options.dtype(at::kFloat));
    placed.index_copy_(0, flat_dest, scales.index_select(0, pair_row));
    placed = placed.view({per_rank, slots, groups});
    if (use_ue8m0) placed = pack_ue8m0(placed);
    // Column-major in the last two dims, like DeepEP (what FP8 GEMMs read).
    recv_x_scales = placed.transpose(1, 2).contiguous().transpose(1, 2);
  }

  auto src_info = at::full({per_rank * slots}, -1, options.dtype(at::kInt));
  src_info.index_copy_(0, flat_dest, src.index_select(0, pair_row));
  auto recv_count = hits_long.sum(0).to(at::kInt);

  // layout_range[e, r] = (first row of source rank r in e's block) << 32 | its row count.
  auto per_source = hits_long.view({num_ranks, num_max, per_rank}).sum(1).t();  // [E_local, R]
  auto begin = per_source.cumsum(1) - per_source;
  auto layout_range = (at::bitwise_left_shift(begin, 32) + per_source).contiguous();

  // recv_token_slots[r, m, k]: flat row of (source rank r, slot m)'s k-th expert, or -1.
  auto local_valid = at::where(is_local, local, at::zeros_like(local));
  auto slot_position = position.gather(1, local_valid);
  auto flat = local_valid * slots + slot_position;
  auto recv_token_slots =
      at::where(is_local, flat, at::full_like(flat, -1)).to(at::kInt).view({num_ranks, num_max, num_topk});

  return {recv_x,
          recv_x_scales,
          recv_count,
          src_info.view({per_rank, slots}),
          layout_range,
          recv_token_slots};
}

LowLatencyRecv low_latency_dispatch(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                                    int64_t num_experts, bool use_fp8, bool round_scale,
                                    bool use_ue8m0, const std::string& group_name) {
  auto packed = send_tokens(x, topk_idx, num_max, num_experts, use_fp8, round_scale, use_ue8m0,
                            group_name, "low_latency_dispatch");
  return low_latency_dispatch_recv(packed, num_max, x.size(1), topk_idx.size(1), num_experts,
                                   use_fp8, use_ue8m0, group_name);
}

}  // namespace ep_ops::collective
