// Which ranks each token goes to, derived from top-k expert ids (expert e lives on rank
// e / experts_per_rank). Shared by layout and the low-latency ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ep_ops::collective {

// [T, R] bool: token t has at least one of its top-k experts on rank r (-1 ids ignored).
at::Tensor token_in_rank(const at::Tensor& topk_idx, int64_t experts_per_rank, int64_t num_ranks);

// For each rank r, the indices (int64, ascending) of the tokens with mask[t, r] set. A token's
// position in its rank's list is its slot there.
std::vector<at::Tensor> tokens_per_rank(const at::Tensor& mask);

}  // namespace ep_ops::collective
