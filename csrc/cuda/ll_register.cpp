// CUDA kernels of the low-latency ops, with the backend choice: the NVLink kernels when the
// group has a registered low-latency buffer (ep_ops.Buffer(low_latency_mode=True) or
// ep_ops.nvl.init_nvl_buffer(..., low_latency=True) made one) and the call suits them; the
// collective backend (NCCL) otherwise. The recv halves tell the two apart by where their input
// lives: the NVLink send halves return views of the group's buffer.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "../collective/checks.h"
#include "../collective/low_latency_checks.h"
#include "../collective/ops.h"
#include "ll_ops.h"

namespace ep_ops::cuda {
namespace {

using at::Tensor;

constexpr int64_t kMaxLLRows = 8 * 1024;  // R*M: the recv kernel keeps an int per row in shared memory
constexpr int64_t kMaxLLTopk = 32;

// The group's low-latency buffer if the NVLink kernels take this call; nullopt for the
// collective backend. A buffer too small for the call is an error, not a silent fallback.
std::optional<LowLatencyBuffer> nvl_buffer_for(const std::string& group_name, int64_t num_max,
                                               int64_t hidden, int64_t num_topk, const char* op) {
  auto b = find_ll_buffer(group_name);
  if (!b || hidden % 8 != 0 || num_topk > kMaxLLTopk || num_max <= 0 ||
      b->view.num_ranks * num_max > kMaxLLRows) {
    return std::nullopt;
  }
  check_watchdog(b->view, op);
  const LowLatencyGeometry geometry(b->view.num_ranks, num_max, hidden, num_topk);
  TORCH_CHECK_VALUE(geometry.total_bytes() <= b->view.num_bytes, "ep_ops.", op,
                    ": the group's low-latency NVLink buffer holds ", b->view.num_bytes,
                    " bytes; num_max_dispatch_tokens_per_rank=", num_max, ", hidden=", hidden,
                    ", num_topk=", num_topk, " need ", geometry.total_bytes(),
                    " (ep_ops.nvl.ll_bytes_needed / Buffer.get_low_latency_rdma_size_hint)");
  return b;
}

// Which slab of `phase` `t` is, if it is one of the group's buffer; -1 otherwise.
int slab_of(const LowLatencyBuffer& b, const Tensor& t, int phase, int64_t num_max,
            int64_t hidden, int64_t num_topk) {
  const LowLatencyGeometry geometry(b.view.num_ranks, num_max, hidden, num_topk);
  const auto* base = static_cast<const uint8_t*>(b.local.data_ptr());
  for (int which = 0; which < 2; ++which) {
    if (t.data_ptr() == base + geometry.offset(phase, which)) return which;
  }
  return -1;
}

void check_dispatch_call(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                         int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
                         int64_t num_ranks, const char* op) {
  collective::check_low_latency_tokens(x, topk_idx, num_max, op);
  collective::check_num_experts(num_experts, num_ranks, op);
  collective::check_fp8_options(x.size(1), use_fp8, round_scale, use_ue8m0, op);
}

// LogFMT encodes 128-channel groups (the collective backend's check, with its words).
void check_logfmt_hidden(int64_t hidden, bool use_logfmt, const char* op) {
  TORCH_CHECK_VALUE(!use_logfmt || hidden % wire::kFp8Block == 0, "ep_ops.", op,
                    ": LogFMT hidden size must be a multiple of 128, got ", hidden);
}

void check_combine_call(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                        const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                        int64_t num_ranks, const char* op) {
  collective::check_low_latency_combine(x, topk_idx, topk_weights, recv_token_slots, num_max,
                                        num_ranks, op);
  check_logfmt_hidden(x.size(2), use_logfmt, op);
}

void check_packed(const Tensor& packed, const char* name, int64_t num_ranks, int64_t num_max,
                  int64_t row_bytes, const char* op) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "ep_ops.", op, ": ", name,
                   " must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef({num_ranks, num_max, row_bytes}), "ep_ops.",
                    op, ": ", name, " must have shape [", num_ranks, ", ", num_max, ", ",
                    row_bytes, "], got ", packed.sizes());
}

// The group's buffer and the dispatch slab a whole op or send half takes, once the call is
// checked; nullopt for the collective backend.
std::optional<std::pair<LowLatencyBuffer, int>> nvl_dispatch_slab(
    const Tensor& x, const Tensor& topk_idx, int64_t num_max, int64_t num_experts, bool use_fp8,
    bool round_scale, bool use_ue8m0, const std::string& group_name, const char* op) {
  const int64_t num_topk = topk_idx.dim() == 2 ? topk_idx.size(1) : 0;
  const int64_t hidden = x.dim() == 2 ? x.size(1) : 0;
  auto b = nvl_buffer_for(group_name, num_max, hidden, num_topk, op);
  if (!b) return std::nullopt;
  check_dispatch_call(x, topk_idx, num_max, num_experts, use_fp8, round_scale, use_ue8m0,
                      b->view.num_ranks, op);
  return std::make_pair(*b, take_ll_slab(group_name, kLLDispatch));
}

collective::LowLatencyRecv dispatch_recv(const Tensor& recv_packed, int64_t num_max,
                                         int64_t hidden, int64_t num_topk, int64_t num_experts,
                                         bool use_fp8, bool use_ue8m0,
                                         const std::string& group_name) {
  const char* op = "low_latency_dispatch_recv";
  auto b = nvl_buffer_for(group_name, num_max, hidden, num_topk, op);
  const int slab = b ? slab_of(*b, recv_packed, kLLDispatch, num_max, hidden, num_topk) : -1;
  if (slab < 0) {
    return collective::low_latency_dispatch_recv(recv_packed, num_max, hidden, num_topk,
                                                 num_experts, use_fp8, use_ue8m0, group_name);
  }
  const int64_t R = b->view.num_ranks;
  collective::check_num_experts(num_experts, R, op);
  collective::check_fp8_options(hidden, use_fp8, use_ue8m0, use_ue8m0, op);
  check_packed(recv_packed, "recv_packed", R, num_max,
               wire::DispatchRow{hidden, num_topk, use_fp8}.bytes(), op);
  return ll_dispatch_recv(*b, slab, recv_packed, num_max, hidden, num_topk, num_experts, use_fp8,
                          use_ue8m0);
}

Tensor low_latency_dispatch_send(const Tensor& x, const Tensor& topk_idx, int64_t num_max,
                                 int64_t num_experts, bool use_fp8, bool round_scale,
                                 bool use_ue8m0, const std::string& group_name) {
  auto slab = nvl_dispatch_slab(x, topk_idx, num_max, num_experts, use_fp8, round_scale, use_ue8m0,
                                group_name, "low_latency_dispatch_send");
  if (!slab) {
    return collective::low_latency_dispatch_send(x, topk_idx, num_max, num_experts, use_fp8,
                                                 round_scale, use_ue8m0, group_name);
  }
  return ll_dispatch_send(slab->first, slab->second, x, topk_idx, num_max, num_experts, use_fp8,
                          round_scale);
}

collective::LowLatencyRecv low_latency_dispatch(const Tensor& x, const Tensor& topk_idx,
                                                int64_t num_max, int64_t num_experts,
                                                bool use_fp8, bool round_scale, bool use_ue8m0,
                                                const std::string& group_name) {
  auto slab = nvl_dispatch_slab(x, topk_idx, num_max, num_experts, use_fp8, round_scale, use_ue8m0,
                                group_name, "low_latency_dispatch");
  if (!slab) {
    return collective::low_latency_dispatch(x, topk_idx, num_max, num_experts, use_fp8,
                                            round_scale, use_ue8m0, group_name);
  }
  return ll_dispatch(slab->first, slab->second, x, topk_idx, num_max, num_experts, use_fp8,
                     round_scale, use_ue8m0);
}

Tensor combine_send(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                    const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                    const std::string& group_name, const char* op) {
  const int64_t num_topk = topk_idx.dim() == 2 ? topk_idx.size(1) : 0;
  const int64_t hidden = x.dim() == 3 ? x.size(2) : 0;
  auto b = nvl_buffer_for(group_name, num_max, hidden, num_topk, op);
  if (!b) {
    return collective::low_latency_combine_send(x, topk_idx, topk_weights, recv_token_slots,
                                                num_max, use_logfmt, group_name);
  }
  check_combine_call(x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt,
                     b->view.num_ranks, op);
  const int weights_slab = take_ll_slab(group_name, kLLWeights);
  const int partials_slab = take_ll_slab(group_name, kLLPartials);
  return ll_combine_send(*b, weights_slab, partials_slab, x, topk_idx, topk_weights,
                         recv_token_slots, num_max, use_logfmt);
}

Tensor low_latency_combine_send(const Tensor& x, const Tensor& topk_idx,
                                const Tensor& topk_weights, const Tensor& recv_token_slots,
                                int64_t num_max, bool use_logfmt, const std::string& group_name) {
  return combine_send(x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt,
                      group_name, "low_latency_combine_send");
}

Tensor low_latency_combine_recv(const Tensor& recv_partials, const Tensor& topk_idx,
                                int64_t hidden, int64_t num_experts, int64_t num_max,
                                bool use_logfmt, const std::string& group_name) {
  const char* op = "low_latency_combine_recv";
  const int64_t num_topk = topk_idx.dim() == 2 ? topk_idx.size(1) : 0;
  auto b = nvl_buffer_for(group_name, num_max, hidden, num_topk, op);
  const int slab = b ? slab_of(*b, recv_partials, kLLPartials, num_max, hidden, num_topk) : -1;
  if (slab < 0) {
    return collective::low_latency_combine_recv(recv_partials, topk_idx, hidden, num_experts,
                                                num_max, use_logfmt, group_name);
  }
  const int64_t R = b->view.num_ranks;
  collective::check_num_experts(num_experts, R, op);
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "ep_ops.", op, ": topk_idx must be 2-D, got ",
                    topk_idx.sizes());
  collective::check_matrix(topk_idx, op, "topk_idx", at::kLong, topk_idx.size(0), -1,
                           recv_partials.device());
  TORCH_CHECK_VALUE(topk_idx.size(0) <= num_max, "ep_ops.", op, ": topk_idx has ",
                    topk_idx.size(0), " tokens, more than num_max_dispatch_tokens_per_rank (",
                    num_max, ")");
  check_logfmt_hidden(hidden, use_logfmt, op);
  check_packed(recv_partials, "recv_partials", R, num_max, wire::combine_row_bytes(hidden, use_logfmt),
               op);
  return ll_combine_recv(*b, slab, recv_partials, topk_idx, hidden, num_experts, num_max, use_logfmt);
}

Tensor low_latency_combine(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                           const Tensor& recv_token_slots, int64_t num_max, bool use_logfmt,
                           const std::string& group_name) {
  const char* op = "low_latency_combine";
  const int64_t num_topk = topk_idx.dim() == 2 ? topk_idx.size(1) : 0;
  const int64_t hidden = x.dim() == 3 ? x.size(2) : 0;
  auto b = nvl_buffer_for(group_name, num_max, hidden, num_topk, op);
  if (!b) {
    return collective::low_latency_combine(x, topk_idx, topk_weights, recv_token_slots, num_max,
                                           use_logfmt, group_name);
  }
  // Also every check of the recv half: topk_idx 2-D int64 on x's device, at most num_max tokens.
  check_combine_call(x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt,
                     b->view.num_ranks, op);
  const int weights_slab = take_ll_slab(group_name, kLLWeights);
  const int partials_slab = take_ll_slab(group_name, kLLPartials);
  return ll_combine(*b, weights_slab, partials_slab, x, topk_idx, topk_weights, recv_token_slots,
                    num_max, use_logfmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) {
  m.impl("low_latency_dispatch", &low_latency_dispatch);
  m.impl("low_latency_dispatch_send", &low_latency_dispatch_send);
  m.impl("low_latency_dispatch_recv", &dispatch_recv);
  m.impl("low_latency_combine", &low_latency_combine);
  m.impl("low_latency_combine_send", &low_latency_combine_send);
  m.impl("low_latency_combine_recv", &low_latency_combine_recv);
  m.impl("low_latency_combine_backward", &collective::low_latency_combine_backward);
}

}  // namespace ep_ops::cuda
