// The half of dispatch that dispatch and dispatch_permuted share: input checks, the header
// exchange, packing and the all-to-all. They differ only in where the received rows go.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "ops.h"
#include "process_group.h"

namespace ep_ops::collective {

// A token row on the wire: payload | FP8 scales | global expert ids (int64) | weights (float32)
// | source index (int32). Byte widths of the fields:
struct DispatchRowLayout {
  int64_t payload, scales, topk, weights;
  int64_t scale_at() const { return payload; }
  int64_t topk_at() const { return payload + scales; }
  int64_t weights_at() const { return topk_at() + topk; }
  int64_t src_at() const { return weights_at() + weights; }
};

struct DispatchExchange {
  at::Tensor received;                      // [num_recv, row bytes] uint8, by source rank
  DispatchRowLayout layout;
  std::vector<std::vector<int64_t>> counts;  // [src][dst] tokens
  int64_t num_recv = 0, rows = 0;           // rows: num_recv, or num_worst_tokens if > 0
  int64_t rank = 0, num_ranks = 0, num_scales = 0, num_topk = 0;
};

// Checks (plus `extra_checks`, and `extra_signature` fields every rank must agree on), exchanges
// headers, checks num_worst_tokens against every rank's receive count, then moves the rows.
DispatchExchange exchange_dispatch_rows(const char* op, const Tensor& x,
                                        const OptTensor& x_scales, const OptTensor& topk_idx,
                                        const OptTensor& topk_weights,
                                        const Tensor& is_token_in_rank, int64_t num_experts,
                                        int64_t num_worst_tokens, const std::string& group_name,
                                        const std::function<void()>& extra_checks,
                                        const std::vector<SignatureField>& extra_signature);

// Received global expert ids [N, K] -> local ids of `rank` (-1 where the expert is elsewhere).
Tensor local_expert_ids(const Tensor& global, int64_t rank, int64_t experts_per_rank);

}  // namespace ep_ops::collective
