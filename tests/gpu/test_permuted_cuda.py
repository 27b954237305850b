"""The fused-permute ops on GPU_RANKS GPUs of one host (EP_OPS_GPU_RANKS, default 2): the NVLink
kernels and the collective backend over NCCL, each bitwise equal to the CPU reference and to the
unfused ops (tests/test_permuted.py's cases and workers, made valid on GPU_RANKS ranks), opcheck
on the NVLink path, and a captured CUDA graph of dispatch_permuted -> expert -> combine_permuted
with a static num_out that replays correctly while the routing changes. Skipped without
GPU_RANKS GPUs."""

import pytest
import torch
import torch.distributed as dist
from cases import Case, all_inputs, for_world
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from test_nvl_cuda import NVL_BYTES
from test_permuted import PERMUTED_CASES, opcheck_worker, permuted_worker

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer
from ep_ops.reference import reference_combine_permuted, reference_dispatch_permuted

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]


def nvl_worker(rank, world_size, group_name):
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    permuted_worker(rank, world_size, group_name, PERMUTED_CASES, "cuda")
    opcheck_worker(rank, world_size, group_name, "cuda")
    del buffer


def test_nvl_permuted_ops_match_reference():
    parallel_launch(GPU_RANKS, nvl_worker, backend="nccl", device="cuda", timeout=400)


def collective_worker(rank, world_size, group_name):
    # No NVLink buffer registered: the collective backend over NCCL serves the ops.
    permuted_worker(rank, world_size, group_name, PERMUTED_CASES, "cuda")


def test_collective_permuted_ops_on_cuda_match_reference():
    parallel_launch(GPU_RANKS, collective_worker, backend="nccl", device="cuda", timeout=300)


def graph_worker(rank, world_size, group_name):
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(dist.group.WORLD, NVL_BYTES)
    case = for_world(
        Case(dtype=torch.bfloat16, hidden=256, num_experts=8, num_tokens=64, num_worst_tokens=256), world_size
    )
    pad_multiple, num_out = 4, 128  # ~150 pairs a rank: every replay drops pairs past num_out
    flags = (case.num_experts, case.num_worst_tokens, pad_multiple, num_out, group_name)
    static = {k: v.cuda() for k, v in all_inputs(case, world_size)[rank].items() if v is not None}

    def step():
        _, _, in_rank = ops.get_dispatch_layout(static["topk_idx"], case.num_experts, world_size)
        px, _, pp, tokens_per_expert, pair_slot, prefix, src = ops.dispatch_permuted(
            static["x"], None, static["topk_idx"], static["topk_weights"], in_rank, *flags
        )
        combined = ops.combine_permuted(px * 2, pp, pair_slot, in_rank, prefix, src, group_name)
        return px, pp, tokens_per_expert, combined

    step()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        px, pp, tokens_per_expert, (combined_x, combined_probs) = step()
    for seed in (11, 12, 13):
        inputs = all_inputs(Case(**{**case.__dict__, "seed": seed}), world_size)
        for key in static:
            static[key].copy_(inputs[rank][key])
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_dispatch_permuted(
            [i["x"] for i in inputs],
            None,
            [i["topk_idx"] for i in inputs],
            [i["topk_weights"] for i in inputs],
            [i["is_token_in_rank"] for i in inputs],
            case.num_experts,
            case.num_worst_tokens,
            pad_multiple,
            num_out,
        )
        mine = expected[rank]
        assert torch.equal(px.cpu(), mine[0]), f"replay {seed}: permuted_x"
        assert torch.equal(pp.cpu(), mine[2]), f"replay {seed}: permuted_probs"
        assert torch.equal(tokens_per_expert.cpu(), mine[3]), f"replay {seed}: tokens_per_expert"
        handles = [(inputs[r]["is_token_in_rank"], expected[r][5], expected[r][6]) for r in range(world_size)]
        combined = reference_combine_permuted(
            [e[0] * 2 for e in expected], [e[2] for e in expected], [e[4] for e in expected], handles
        )
        assert torch.equal(combined_x.cpu(), combined[rank][0]), f"replay {seed}: combined_x"
        assert torch.equal(combined_probs.cpu(), combined[rank][1]), f"replay {seed}: combined_probs"
    del buffer


def test_permuted_graph_replays_with_changing_routing():
    parallel_launch(GPU_RANKS, graph_worker, backend="nccl", device="cuda", timeout=300)
