// The grouping of received rows by local expert (ep_ops/permute.py's layout, ported to ATen so
// that the fused ops build it where the rows are: CPU, or the GPU with no host sync when the
// permuted row count is static). Both backends share it, so their layouts agree by construction.
#pragma once

#include <ATen/ATen.h>

namespace ep_ops::collective {

// Where every (row, slot) pair goes in the grouped layout (make_permute_map's PermuteMap).
struct PermuteMap {
  at::Tensor pair_slot;          // [N, K] int64: permuted row of each pair, -1 = none/dropped
  at::Tensor slot_pair;          // [P] int64: flat pair r * K + k of each permuted row, -1 = padding
  at::Tensor tokens_per_expert;  // [E_local] int64: rows of each group, padding included
};

// local_idx [N, K] int64 local expert ids (-1 = none), each row naming an expert at most once.
// Groups follow each other in expert order, pairs within a group in row order, each group
// padded to pad_multiple (>= 1). num_out > 0: P = num_out, pairs at or past it are dropped;
// num_out == 0: P = the padded total (read back from the device once).
PermuteMap make_permute_map(const at::Tensor& local_idx, int64_t num_local_experts,
                            int64_t pad_multiple, int64_t num_out);

// permute.unpermute: row r of the result is the sum over k of h[pair_slot[r, k]] (a zero row
// where pair_slot is -1), in float32 (float64 for float64 h) in k order, rounded once to h's
// dtype. h [P, H]; returns [N, H].
at::Tensor unpermute_rows(const at::Tensor& h, const at::Tensor& pair_slot);

// values [P] gathered per pair: [N, K], 0 where pair_slot is -1 (permute.unpermute_probs).
at::Tensor gather_pairs(const at::Tensor& values, const at::Tensor& pair_slot);

}  // namespace ep_ops::collective
