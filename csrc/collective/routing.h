// Which ranks each token goes to, derived from top-k expert ids (expert e lives on rank
// e / experts_per_rank). Shared by layout and the low-latency ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ep_ops::collective {

// [T, R] bool: token t has at least one of its top-k experts on rank r (-1 ids ignored).
at::Tensor token_in_rank(const at::Tensor& topk_idx, int64_t experts_per_rank, int64_t num_ranks);

// For each rank r, the indices (int64, ascending) of the tokens with mask[t, r] set. The normal
// ops place a token at its position in its rank's list.
std::vector<at::Tensor> tokens_per_rank(const at::Tensor& mask);

// tokens_per_rank of the ranks holding each token's top-k experts (the low-latency ops).
std::vector<at::Tensor> tokens_per_rank(const at::Tensor& topk_idx, int64_t experts_per_rank,
                                        int64_t num_ranks);

// The low-latency placement, a token's slot being its own index: out[r, t] = rows[t] for every
// token t in tokens[r]. out is [R, M, rows.size(1)]; its other slots keep what they hold.
void place_at_token_slots(at::Tensor& out, const at::Tensor& rows,
                          const std::vector<at::Tensor>& tokens);

}  // namespace ep_ops::collective
