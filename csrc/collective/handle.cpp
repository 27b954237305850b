#include "handle.h"

#include <c10/util/Exception.h>

#include "checks.h"

namespace ep_ops::collective {

void check_handle_tensors(const at::Tensor& x, const at::Tensor& is_token_in_rank,
                          const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_src_idx,
                          int64_t num_ranks, const char* op) {
  check_matrix(is_token_in_rank, op, "is_token_in_rank", at::kBool, is_token_in_rank.size(0),
               num_ranks, x.device());
  check_matrix(rank_prefix_matrix, op, "rank_prefix_matrix", at::kInt, num_ranks, num_ranks,
               x.device());
  TORCH_CHECK_VALUE(recv_src_idx.dim() == 1, "ep_ops.", op, ": recv_src_idx must be 1-D, got ",
                    recv_src_idx.sizes());
  TORCH_CHECK_TYPE(recv_src_idx.scalar_type() == at::kInt, "ep_ops.", op,
                   ": recv_src_idx must be int32, got ", recv_src_idx.scalar_type());
  TORCH_CHECK_VALUE(recv_src_idx.device() == x.device(), "ep_ops.", op,
                    ": recv_src_idx must be on ", x.device(), " like x, got ",
                    recv_src_idx.device());
}

std::vector<int64_t> handle_recv_counts(const at::Tensor& rank_prefix_matrix,
                                        const at::Tensor& recv_src_idx, int64_t rank,
                                        const char* op) {
  auto column = rank_prefix_matrix.select(1, rank).to(at::kLong).cpu();
  const int64_t num_ranks = column.numel();
  std::vector<int64_t> counts(num_ranks);
  int64_t previous = 0;
  for (int64_t i = 0; i < num_ranks; ++i) {
    const int64_t upto = column.data_ptr<int64_t>()[i];
    TORCH_CHECK_VALUE(upto >= previous, "ep_ops.", op,
                      ": rank_prefix_matrix is not a prefix sum down column ", rank,
                      " (is the handle from this group?)");
    counts[i] = upto - previous;
    previous = upto;
  }
  TORCH_CHECK_VALUE(previous <= recv_src_idx.size(0), "ep_ops.", op, ": the handle says rank ",
                    rank, " received ", previous, " rows but recv_src_idx has only ",
                    recv_src_idx.size(0));
  return counts;
}

at::Tensor send_order(const at::Tensor& is_token_in_rank) {
  // nonzero of the transpose lists (rank, token) pairs sorted by rank, then token.
  return at::nonzero(is_token_in_rank.t()).select(1, 1);
}

std::vector<int64_t> column_counts(const at::Tensor& is_token_in_rank) {
  auto counts = is_token_in_rank.sum(0).to(at::kLong).cpu();
  return std::vector<int64_t>(counts.data_ptr<int64_t>(),
                              counts.data_ptr<int64_t>() + counts.numel());
}

at::Tensor prefix_matrix(const std::vector<std::vector<int64_t>>& counts,
                         const at::Device& device) {
  const int64_t num_ranks = static_cast<int64_t>(counts.size());
  auto m = at::empty({num_ranks, num_ranks}, at::TensorOptions().dtype(at::kInt));
  auto acc = m.accessor<int32_t, 2>();
  for (int64_t j = 0; j < num_ranks; ++j) {
    int64_t running = 0;
    for (int64_t i = 0; i < num_ranks; ++i) {
      running += counts[i][j];
      acc[i][j] = static_cast<int32_t>(running);
    }
  }
  return m.to(device);
}

at::Tensor pad_rows(const at::Tensor& t, int64_t total, double pad) {
  if (t.size(0) == total) return t;
  auto sizes = t.sizes().vec();
  sizes[0] = total - t.size(0);
  return at::cat({t, at::full(sizes, pad, t.options())}, 0);
}

}  // namespace ep_ops::collective
