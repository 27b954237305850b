// Host entry points of the NVLink dispatch and combine kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "nvl_buffer.h"

namespace ep_ops::cuda {

struct NvlDispatchResult {
  at::Tensor recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
      rank_prefix_matrix, recv_src_idx;
};

// Whether the NVLink kernels take these inputs (16-byte rows, at most kMaxNvlRanks ranks);
// otherwise the collective backend serves the call.
bool nvl_dispatch_supported(const at::Tensor& x, const std::optional<at::Tensor>& topk_idx,
                            const PeerView& v);

// Dispatch (given_prefix empty, given_rows < 0) or cached dispatch (the handle's prefix matrix
// and its row count). Inputs are checked by the caller.
NvlDispatchResult nvl_dispatch(const PeerView& v, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_scales,
                               const std::optional<at::Tensor>& topk_idx,
                               const std::optional<at::Tensor>& topk_weights,
                               const at::Tensor& is_token_in_rank, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens,
                               const std::optional<at::Tensor>& given_prefix, int64_t given_rows);

// Combine: rows back to their source ranks, summed per token in ascending rank order (float32),
// then bias_0 and bias_1. x is bfloat16, float16 or float32.
std::tuple<at::Tensor, at::Tensor> nvl_combine(const PeerView& v, const at::Tensor& x,
                                               const std::optional<at::Tensor>& topk_weights,
                                               const std::optional<at::Tensor>& bias_0,
                                               const std::optional<at::Tensor>& bias_1,
                                               const at::Tensor& is_token_in_rank,
                                               const at::Tensor& rank_prefix_matrix);

}  // namespace ep_ops::cuda
