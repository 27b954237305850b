// The whole ep_ops op surface: every schema is declared here, once. Backends register their
// kernels with TORCH_LIBRARY_IMPL in their own files (csrc/collective/register.cpp, and the CUDA
// kernels under csrc/cuda/ once they exist); fakes and autograd formulas live in Python
// (meta/ and ep_ops/autograd.py).
//
// Conventions shared by every op:
//  - the communication context is `str group_name`, the c10d process group's registered name;
//  - optional outputs come back as empty tensors, never None;
//  - every communication op is marked side-effectful in Python (ep_ops/_side_effects.py) so the
//    compiler never drops it on one rank while the others wait for it.
#include <torch/library.h>

// set_python_module names the Python module holding the fakes of the ops defined after it, so a
// fake-tensor trace imports it even when only this library was loaded.
TORCH_LIBRARY(ep_ops, m) {
  // Local routing statistics; no communication.
  m.set_python_module("ep_ops.meta.layout");
  m.def(
      "get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks) -> "
      "(Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)");

  m.set_python_module("ep_ops.meta.dispatch");
  // Normal (high-throughput) dispatch. num_worst_tokens == 0: exact mode, the received row count
  // is data-dependent. num_worst_tokens > 0: every row-indexed output has that many rows.
  m.def(
      "dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, "
      "Tensor is_token_in_rank, int num_experts, int expert_alignment, int num_worst_tokens, "
      "str group_name) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, "
      "Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, "
      "Tensor recv_src_idx)");

  // Dispatch along the layout of an earlier dispatch (its handle): no layout work, static shape.
  m.def(
      "cached_dispatch(Tensor x, Tensor? x_scales, Tensor is_token_in_rank, "
      "Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) -> "
      "(Tensor recv_x, Tensor recv_x_scales)");

  m.set_python_module("ep_ops.meta.combine");
  // Inverse of dispatch: every original token gets the sum of the rows dispatched from it.
  m.def(
      "combine(Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, "
      "Tensor is_token_in_rank, Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) "
      "-> (Tensor combined_x, Tensor combined_topk_weights)");

  // Dispatch and combine with the expert grouping ("permute", ep_ops/permute.py's layout) fused in:
  // the received rows land straight in their expert groups, and combine sums a row's expert
  // outputs as it sends it back, so grouped expert kernels need no separate permute passes.
  // pad_multiple >= 1 pads every group with zero rows; num_out > 0 fixes the permuted row count
  // (pairs past it are dropped), 0 = exact (data-dependent). With num_worst_tokens > 0 and
  // num_out > 0 every shape is static and nothing syncs with the host (CUDA-graph safe).
  m.set_python_module("ep_ops.meta.permuted");
  m.def(
      "dispatch_permuted(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor? topk_weights, "
      "Tensor is_token_in_rank, int num_experts, int num_worst_tokens, int pad_multiple, "
      "int num_out, str group_name) -> (Tensor permuted_x, Tensor permuted_x_scales, "
      "Tensor permuted_probs, Tensor tokens_per_expert, Tensor pair_slot, "
      "Tensor rank_prefix_matrix, Tensor recv_src_idx)");
  // The inverse: each received row is the sum of its pairs' rows of h (float32, in slot order,
  // rounded once), then rows go back to their sources as in combine. probs (permuted layout)
  // ride along and come back per (token, slot): the gradient path of dispatch_permuted.
  m.def(
      "combine_permuted(Tensor h, Tensor? probs, Tensor pair_slot, Tensor is_token_in_rank, "
      "Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) -> "
      "(Tensor combined_x, Tensor combined_probs)");

  // The NVLink peer memory of a group (symmetric memory, CUDA only): allocated and exchanged by
  // all ranks of the group at once, outside any graph capture; ep_ops.Buffer calls these.
  m.set_python_module("ep_ops.meta.nvl_buffer");
  m.def(
      "init_nvl_buffer(Tensor device_hint, str group_name, int num_bytes, bool low_latency=False, "
      "float timeout_s=100.0) -> Tensor");
  m.def("release_nvl_buffer(Tensor device_hint, str group_name, bool low_latency=False) -> ()");
  // Raises if a wait on one of the group's NVLink buffers timed out (a peer stopped): the
  // check every NVLink op makes first, for callers that only replay graphs.
  m.def("check_nvl_buffers(Tensor device_hint, str group_name) -> ()");

  m.set_python_module("ep_ops.meta.low_latency");
  // Low-latency dispatch into the static [E_local, R*M, H] layout, whole and as send/recv halves.
  m.def(
      "low_latency_dispatch(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, "
      "int num_experts, bool use_fp8, bool round_scale, bool use_ue8m0, str group_name) -> "
      "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, "
      "Tensor layout_range, Tensor recv_token_slots)");
  m.def(
      "low_latency_dispatch_send(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, "
      "int num_experts, bool use_fp8, bool round_scale, bool use_ue8m0, str group_name) -> "
      "Tensor recv_packed");
  m.def(
      "low_latency_dispatch_recv(Tensor recv_packed, int num_max_dispatch_tokens_per_rank, "
      "int hidden, int num_topk, int num_experts, bool use_fp8, bool use_ue8m0, str group_name) "
      "-> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, "
      "Tensor layout_range, Tensor recv_token_slots)");

  // Low-latency combine: weighted sum over each token's top-k experts, whole and as halves.
  m.def(
      "low_latency_combine(Tensor x, Tensor topk_idx, Tensor topk_weights, "
      "Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, bool use_logfmt, "
      "str group_name) -> Tensor combined_x");
  m.def(
      "low_latency_combine_send(Tensor x, Tensor topk_idx, Tensor topk_weights, "
      "Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, bool use_logfmt, "
      "str group_name) -> Tensor recv_partials");
  m.def(
      "low_latency_combine_recv(Tensor recv_partials, Tensor topk_idx, int hidden, int num_experts, "
      "int num_max_dispatch_tokens_per_rank, bool use_logfmt, str group_name) -> "
      "Tensor combined_x");
  // The gradient of low_latency_combine. It exists as an op of its own because it needs one
  // exchange there and one back (rows to the experts, weight gradients to the token owners).
  m.def(
      "low_latency_combine_backward(Tensor grad_combined_x, Tensor x, Tensor topk_idx, "
      "Tensor topk_weights, Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, "
      "str group_name) -> (Tensor grad_x, Tensor grad_topk_weights)");
}
