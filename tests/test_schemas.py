"""Locks the public op contract: any change to a schema shows up in review as a diff here.
Update deliberately with EXPECTTEST_ACCEPT=1 python -m pytest tests/test_schemas.py."""

import torch
from expecttest import TestCase

import ep_ops  # noqa: F401  (loads the ops)
from ep_ops._side_effects import COMMUNICATION_OPS


def op_names() -> list[str]:
    """Every op the library registered (dir() of torch.ops.ep_ops lists only those touched)."""
    prefix = "ep_ops::"
    return sorted(n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def schemas() -> str:
    return "\n".join(str(getattr(torch.ops.ep_ops, name).default._schema) for name in op_names())


class TestSchemas(TestCase):
    def test_op_schemas(self):
        self.assertExpectedInline(
            schemas(),
            """\
ep_ops::cached_dispatch(Tensor x, Tensor? x_scales, Tensor is_token_in_rank, Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) -> (Tensor recv_x, Tensor recv_x_scales)
ep_ops::check_nvl_buffers(Tensor device_hint, str group_name) -> ()
ep_ops::combine(Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, Tensor is_token_in_rank, Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) -> (Tensor combined_x, Tensor combined_topk_weights)
ep_ops::combine_permuted(Tensor h, Tensor? probs, Tensor pair_slot, Tensor is_token_in_rank, Tensor rank_prefix_matrix, Tensor recv_src_idx, str group_name) -> (Tensor combined_x, Tensor combined_probs)
ep_ops::dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int num_experts, int expert_alignment, int num_worst_tokens, str group_name) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, Tensor recv_src_idx)
ep_ops::dispatch_permuted(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int num_experts, int num_worst_tokens, int pad_multiple, int num_out, str group_name) -> (Tensor permuted_x, Tensor permuted_x_scales, Tensor permuted_probs, Tensor tokens_per_expert, Tensor pair_slot, Tensor rank_prefix_matrix, Tensor recv_src_idx)
ep_ops::get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)
ep_ops::init_nvl_buffer(Tensor device_hint, str group_name, int num_bytes, bool low_latency=False, float timeout_s=100.) -> Tensor
ep_ops::low_latency_combine(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, bool use_logfmt, str group_name) -> Tensor combined_x
ep_ops::low_latency_combine_backward(Tensor grad_combined_x, Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, str group_name) -> (Tensor grad_x, Tensor grad_topk_weights)
ep_ops::low_latency_combine_recv(Tensor recv_partials, Tensor topk_idx, int hidden, int num_experts, int num_max_dispatch_tokens_per_rank, bool use_logfmt, str group_name) -> Tensor combined_x
ep_ops::low_latency_combine_send(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor recv_token_slots, int num_max_dispatch_tokens_per_rank, bool use_logfmt, str group_name) -> Tensor recv_partials
ep_ops::low_latency_dispatch(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, bool use_fp8, bool round_scale, bool use_ue8m0, str group_name) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, Tensor layout_range, Tensor recv_token_slots)
ep_ops::low_latency_dispatch_recv(Tensor recv_packed, int num_max_dispatch_tokens_per_rank, int hidden, int num_topk, int num_experts, bool use_fp8, bool use_ue8m0, str group_name) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_count, Tensor src_info, Tensor layout_range, Tensor recv_token_slots)
ep_ops::low_latency_dispatch_send(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, bool use_fp8, bool round_scale, bool use_ue8m0, str group_name) -> Tensor recv_packed
ep_ops::release_nvl_buffer(Tensor device_hint, str group_name, bool low_latency=False) -> ()""",
        )

    def test_every_communication_op_is_side_effectful(self):
        from torch.fx.node import _side_effectful_functions

        missing = [
            name
            for name in COMMUNICATION_OPS
            if getattr(torch.ops.ep_ops, name).default not in _side_effectful_functions
        ]
        self.assertEqual(missing, [])
        # Every op but the local layout op talks to other ranks.
        self.assertEqual(set(op_names()) - {"get_dispatch_layout"}, set(COMMUNICATION_OPS))
