// Input checks of the collective backend. Each names the argument, what was expected and what
// came; the fakes in meta/ repeat them with torch._check.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ep_ops::collective {

// `t` must be 2-D [rows, cols] (cols < 0: any) of `dtype`, on `device`.
void check_matrix(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  int64_t rows, int64_t cols, const at::Device& device);

// A floating payload x, or an FP8 pair (x, x_scales). Returns the number of scale columns.
int64_t check_payload(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                      const char* op);

// is_token_in_rank [T, R] bool, and the optional pair topk_idx [T, K] int64 / topk_weights
// [T, K] float32 (weights need topk_idx), all on x's device.
void check_routing(const at::Tensor& x, const std::optional<at::Tensor>& topk_idx,
                   const std::optional<at::Tensor>& topk_weights,
                   const at::Tensor& is_token_in_rank, int64_t num_ranks, const char* op);

// num_experts > 0 and a multiple of num_ranks; returns experts per rank.
int64_t check_num_experts(int64_t num_experts, int64_t num_ranks, const char* op);

// Every id in [-1, num_experts). Reads the values (a host sync on device tensors).
void check_expert_ids(const at::Tensor& topk_idx, int64_t num_experts, const char* op);

}  // namespace ep_ops::collective
