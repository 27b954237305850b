#include "low_latency_checks.h"

#include <c10/util/Exception.h>

#include "checks.h"
#include "wire_format.h"

namespace ep_ops::collective {

void check_low_latency_tokens(const at::Tensor& x, const at::Tensor& topk_idx, int64_t num_max,
                              const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, "ep_ops.", op, ": x must be 2-D [num_tokens, hidden], got ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "ep_ops.", op,
                   ": x must be bfloat16, got ", x.scalar_type());
  check_matrix(topk_idx, op, "topk_idx", at::kLong, x.size(0), -1, x.device());
  TORCH_CHECK_VALUE(num_max > 0, "ep_ops.", op,
                    ": num_max_dispatch_tokens_per_rank must be positive, got ", num_max);
  TORCH_CHECK_VALUE(x.size(0) <= num_max, "ep_ops.", op, ": x has ", x.size(0),
                    " tokens, more than num_max_dispatch_tokens_per_rank (", num_max, ")");
}

void check_fp8_options(int64_t hidden, bool use_fp8, bool round_scale, bool use_ue8m0,
                       const char* op) {
  TORCH_CHECK_VALUE(!use_fp8 || hidden % wire::kFp8Block == 0, "ep_ops.", op,
                    ": FP8 hidden size must be a multiple of 128, got ", hidden);
  TORCH_CHECK_VALUE(!use_ue8m0 || use_fp8, "ep_ops.", op, ": use_ue8m0 needs use_fp8");
  TORCH_CHECK_VALUE(!use_ue8m0 || round_scale, "ep_ops.", op, ": use_ue8m0 needs round_scale");
  TORCH_CHECK_VALUE(!use_ue8m0 || hidden % (wire::kFp8Block * wire::kUe8m0Pack) == 0, "ep_ops.",
                    op, ": UE8M0 hidden size must be a multiple of 512, got ", hidden);
}

void check_low_latency_combine(const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weights,
                               const at::Tensor& recv_token_slots, int64_t num_max,
                               int64_t num_ranks, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, "ep_ops.", op, ": x must be 3-D [E_local, R*M, H], got ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "ep_ops.", op,
                   ": x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == num_ranks * num_max, "ep_ops.", op, ": x must have ",
                    num_ranks * num_max, " rows per expert (R*M), got ", x.size(1));
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "ep_ops.", op, ": topk_idx must be 2-D, got ",
                    topk_idx.sizes());
  check_matrix(topk_idx, op, "topk_idx", at::kLong, topk_idx.size(0), -1, x.device());
  TORCH_CHECK_VALUE(topk_idx.size(0) <= num_max, "ep_ops.", op, ": topk_idx has ",
                    topk_idx.size(0), " tokens, more than num_max_dispatch_tokens_per_rank (",
                    num_max, ")");
  check_matrix(topk_weights, op, "topk_weights", at::kFloat, topk_idx.size(0), topk_idx.size(1),
               x.device());
  TORCH_CHECK_TYPE(recv_token_slots.scalar_type() == at::kInt, "ep_ops.", op,
                   ": recv_token_slots must be int32, got ", recv_token_slots.scalar_type());
  TORCH_CHECK_VALUE(
      recv_token_slots.sizes() == at::IntArrayRef({num_ranks, num_max, topk_idx.size(1)}),
      "ep_ops.", op, ": recv_token_slots must have shape [", num_ranks, ", ", num_max, ", ",
      topk_idx.size(1), "] (from the dispatch handle), got ", recv_token_slots.sizes());
  TORCH_CHECK_VALUE(recv_token_slots.device() == x.device(), "ep_ops.", op,
                    ": recv_token_slots must be on ", x.device(), ", got ",
                    recv_token_slots.device());
}

}  // namespace ep_ops::collective
