// The dispatch handle (is_token_in_rank, rank_prefix_matrix, recv_src_idx) and the row
// bookkeeping dispatch, cached dispatch and combine share.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ep_ops::collective {

// Types, shapes and devices of the handle tensors (row counts are the caller's to check).
void check_handle_tensors(const at::Tensor& x, const at::Tensor& is_token_in_rank,
                          const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_src_idx,
                          int64_t num_ranks, const char* op);

// Rows this rank received from each rank, read off rank_prefix_matrix's column `rank`; checks
// they fit in recv_src_idx's rows.
std::vector<int64_t> handle_recv_counts(const at::Tensor& rank_prefix_matrix,
                                        const at::Tensor& recv_src_idx, int64_t rank,
                                        const char* op);

// Tokens in the order their rows leave this rank: by destination rank, then token index.
at::Tensor send_order(const at::Tensor& is_token_in_rank);

// Tokens this rank sends to each rank.
std::vector<int64_t> column_counts(const at::Tensor& is_token_in_rank);

// [src][dst] token counts -> int32 prefix sums over sources, DeepEP's rank_prefix_matrix.
at::Tensor prefix_matrix(const std::vector<std::vector<int64_t>>& counts, const at::Device& device);

// `t` padded with rows of `pad` up to `total` rows (worst-token mode).
at::Tensor pad_rows(const at::Tensor& t, int64_t total, double pad);

}  // namespace ep_ops::collective
