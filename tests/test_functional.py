"""The typed functional API (ep_ops.functional): eager and torch.compile(fullgraph=True) agree
with the dense single-process MoE, on 2 gloo ranks."""

import torch
from cases import Case, all_inputs
from moe import apply_experts, dense_moe, expert_weights, local_experts

import ep_ops.functional as F
from ep_ops.launch import parallel_launch


def functional_moe(x, topk_idx, topk_weights, w_local, num_experts, num_ranks, group):
    _, _, is_token_in_rank = F.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    out = F.dispatch(
        x, is_token_in_rank, group, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts
    )
    h = apply_experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights, w_local)
    y, _ = F.combine(h, out.handle, group)
    return y


def functional_low_latency_moe(x, topk_idx, topk_weights, w_local, num_max, num_experts, group):
    packed = F.low_latency_dispatch_send(x, topk_idx, num_max, num_experts, group)
    out = F.low_latency_dispatch_recv(packed, x.size(1), topk_idx.size(1), num_max, num_experts, group)
    h = torch.bmm(out.recv_x.float(), w_local.float()).to(torch.bfloat16)
    partials = F.low_latency_combine_send(h, topk_idx, topk_weights, out.handle, group)
    return F.low_latency_combine_recv(partials, topk_idx, x.size(1), out.handle, group)


def functional_worker(rank, world_size, group_name):
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    case = Case(dtype=torch.float32, hidden=16, num_experts=4)
    inputs = all_inputs(case, world_size)
    weights = expert_weights(case.num_experts, case.hidden, torch.float32)
    w_local = local_experts(weights, rank, world_size)
    me = inputs[rank]
    args = (me["x"], me["topk_idx"], me["topk_weights"], w_local, case.num_experts, world_size, group_name)
    expected = dense_moe(
        [i["x"] for i in inputs],
        [i["topk_idx"] for i in inputs],
        [i["topk_weights"] for i in inputs],
        weights,
    )[rank]
    eager = functional_moe(*args)
    compiled = torch.compile(functional_moe, fullgraph=True)(*args)
    torch.testing.assert_close(eager, expected)
    torch.testing.assert_close(compiled, eager)

    x = me["x"].to(torch.bfloat16)
    num_max = max(case.tokens_of(r) for r in range(world_size))
    low_latency_args = (x, me["topk_idx"], me["topk_weights"], w_local, num_max, case.num_experts, group_name)
    eager = functional_low_latency_moe(*low_latency_args)
    compiled = torch.compile(functional_low_latency_moe, fullgraph=True)(*low_latency_args)
    torch.testing.assert_close(eager.float(), expected, rtol=3e-2, atol=3e-2)
    assert torch.equal(compiled, eager)


def test_functional_api_eager_and_compiled():
    parallel_launch(2, functional_worker, timeout=300)
