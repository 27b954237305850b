// Host entry points of the NVLink dispatch and combine kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "nvl_buffer.h"

namespace ep_ops::cuda {

// Blocks of the dispatch's receiving kernels: the last of them (a ticket in the buffer) posts
// the freed flags, so every kernel that does must run exactly this many (nvl_recv_done.cuh).
constexpr int kDispatchRecvBlocks = 256;

struct NvlDispatchResult {
  at::Tensor recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
      rank_prefix_matrix, recv_src_idx;
  // Exact mode with top-k (and at most kMaxNotifyExperts local experts): the same values as
  // num_recv_tokens_per_expert, read on the host with the totals; empty otherwise.
  std::vector<int64_t> host_expert_counts;
};

// Whether the NVLink kernels take these inputs (16-byte rows, at most kMaxNvlRanks ranks);
// otherwise the collective backend serves the call.
bool nvl_dispatch_supported(const at::Tensor& x, const std::optional<at::Tensor>& topk_idx,
                            const PeerView& v);

// Dispatch (given_prefix and given_src empty) or cached dispatch (the handle's prefix matrix and
// recv_src_idx, whose length is the row count). Inputs are checked by the caller.
// routing_only (dispatch_permuted): no recv_x / recv_x_scales; the rows stay in the buffer,
// which stays held until the caller's permuted copy posts the freed flags
// (nvl_dispatch_permuted). host_counts (exact mode with top-k, at most kMaxNotifyExperts experts
// per rank): notify also counts the received tokens per local expert, into host_expert_counts
// (dispatch_counts.h says why).
NvlDispatchResult nvl_dispatch(const PeerView& v, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_scales,
                               const std::optional<at::Tensor>& topk_idx,
                               const std::optional<at::Tensor>& topk_weights,
                               const at::Tensor& is_token_in_rank, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens,
                               const std::optional<at::Tensor>& given_prefix,
                               const std::optional<at::Tensor>& given_src,
                               bool routing_only = false, bool host_counts = false);

// dispatch_permuted: dispatch's notify and send kernels, the routing columns of the received
// rows, the permute map built on the device (ATen; no host sync when num_out > 0 or
// num_worst_tokens > 0), then each payload row copied from the buffer straight to its permuted
// rows. Returns the op's 7 outputs. Inputs are checked by the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
nvl_dispatch_permuted(const PeerView& v, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                      const at::Tensor& topk_idx, const std::optional<at::Tensor>& topk_weights,
                      const at::Tensor& is_token_in_rank, int64_t num_experts, int64_t num_worst_tokens,
                      int64_t pad_multiple, int64_t num_out);

// Combine: rows back to their source ranks, summed per token in ascending rank order (float32),
// then bias_0 and bias_1. x is bfloat16, float16 or float32. With pair_slot ([N, K] int64,
// combine_permuted) x is h in the permuted layout: the row sent for received row n is the sum
// of h's rows pair_slot[n, :] (float32 in k order, rounded once), and topk_weights is probs
// [P] in the permuted layout, sent as probs[pair_slot[n, k]] (0 where -1).
std::tuple<at::Tensor, at::Tensor> nvl_combine(const PeerView& v, const at::Tensor& x,
                                               const std::optional<at::Tensor>& topk_weights,
                                               const std::optional<at::Tensor>& bias_0,
                                               const std::optional<at::Tensor>& bias_1,
                                               const at::Tensor& is_token_in_rank,
                                               const at::Tensor& rank_prefix_matrix,
                                               const std::optional<at::Tensor>& pair_slot = std::nullopt);

}  // namespace ep_ops::cuda
