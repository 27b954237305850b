// The half of combine that combine and combine_permuted share: once the headers are exchanged,
// the rows go back to their source ranks and are summed there per token.
#pragma once

#include <vector>

#include "ops.h"
#include "process_group.h"

namespace ep_ops::collective {

// x [N, H]: the rows in dispatch order (the first sum(send_counts) count); topk_weights
// [N, K] float32 or none; biases [T, H]. send_counts / recv_counts: rows per rank each way.
std::tuple<Tensor, Tensor> combine_rows(const Group& group, const Tensor& x,
                                        const OptTensor& topk_weights, const OptTensor& bias_0,
                                        const OptTensor& bias_1, const Tensor& is_token_in_rank,
                                        const std::vector<int64_t>& send_counts,
                                        const std::vector<int64_t>& recv_counts);

}  // namespace ep_ops::collective
