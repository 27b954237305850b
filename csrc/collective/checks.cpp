#include "checks.h"

#include <c10/util/Exception.h>

namespace ep_ops::collective {

void check_matrix(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  int64_t rows, int64_t cols, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 2, "ep_ops.", op, ": ", name, " must be 2-D, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "ep_ops.", op, ": ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) == rows, "ep_ops.", op, ": ", name, " must have ", rows,
                    " rows, got shape ", t.sizes());
  TORCH_CHECK_VALUE(cols < 0 || t.size(1) == cols, "ep_ops.", op, ": ", name, " must have ",
                    cols, " columns, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, "ep_ops.", op, ": ", name, " must be on ", device,
                    " like x, got ", t.device());
}

int64_t check_payload(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                      const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, "ep_ops.", op,
                    ": x must be 2-D [num_tokens, hidden], got shape ", x.sizes());
  if (!x_scales.has_value()) {
    const auto dtype = x.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat ||
                         dtype == at::kDouble,
                     "ep_ops.", op,
                     ": x must be bfloat16, float16, float32 or float64 (or float8_e4m3fn with "
                     "x_scales), got ",
                     dtype);
    return 0;
  }
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat8_e4m3fn, "ep_ops.", op,
                   ": x must be float8_e4m3fn when x_scales is given, got ", x.scalar_type());
  const int64_t hidden = x.size(1);
  TORCH_CHECK_VALUE(hidden % 128 == 0, "ep_ops.", op,
                    ": FP8 hidden size must be a multiple of 128, got ", hidden);
  check_matrix(*x_scales, op, "x_scales", at::kFloat, x.size(0), hidden / 128, x.device());
  return hidden / 128;
}

int64_t check_num_experts(int64_t num_experts, int64_t num_ranks, const char* op) {
  TORCH_CHECK_VALUE(num_experts > 0, "ep_ops.", op, ": num_experts must be positive, got ",
                    num_experts);
  TORCH_CHECK_VALUE(num_experts % num_ranks == 0, "ep_ops.", op, ": num_experts (",
                    num_experts, ") must be a multiple of the number of ranks (", num_ranks,
                    ")");
  return num_experts / num_ranks;
}

void check_expert_ids(const at::Tensor& topk_idx, int64_t num_experts, const char* op) {
  if (topk_idx.numel() == 0) return;
  const int64_t lo = topk_idx.min().item<int64_t>();
  const int64_t hi = topk_idx.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= -1 && hi < num_experts, "ep_ops.", op,
                    ": topk_idx holds expert ids in [", lo, ", ", hi,
                    "]; they must lie in [0, num_experts=", num_experts, ") or be -1 (none)");
}

void check_routing(const at::Tensor& x, const std::optional<at::Tensor>& topk_idx,
                   const std::optional<at::Tensor>& topk_weights,
                   const at::Tensor& is_token_in_rank, int64_t num_ranks, const char* op) {
  check_matrix(is_token_in_rank, op, "is_token_in_rank", at::kBool, x.size(0), num_ranks,
               x.device());
  if (!topk_idx.has_value()) {
    TORCH_CHECK_VALUE(!topk_weights.has_value(), "ep_ops.", op, ": topk_weights needs topk_idx");
    return;
  }
  check_matrix(*topk_idx, op, "topk_idx", at::kLong, x.size(0), -1, x.device());
  if (topk_weights.has_value()) {
    check_matrix(*topk_weights, op, "topk_weights", at::kFloat, x.size(0), topk_idx->size(1),
                 x.device());
  }
}

}  // namespace ep_ops::collective
