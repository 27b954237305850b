"""The CUDA layout kernel: bitwise equal to the reference, opcheck on CUDA, and capturable in a
CUDA graph (no host sync, no allocation by the kernel itself). The kernel is local to one GPU, so
every rank count up to 8 (and beyond) is checked on one; the graph test uses GPU_RANKS
(EP_OPS_GPU_RANKS, default 2) like the rest of the suite. Needs a GPU."""

import pytest
import torch
from gpu_ranks import GPU_RANKS

import ep_ops  # noqa: F401
from ep_ops.reference import reference_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def random_topk(num_tokens, num_topk, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    topk = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=1).indices
    return topk.masked_fill(torch.rand(num_tokens, num_topk, generator=gen) < 0.1, -1)


@pytest.mark.parametrize(
    "num_tokens,num_topk,num_experts,num_ranks",
    [
        (0, 8, 256, 2),
        (1, 1, 8, 1),
        (4096, 8, 256, 2),
        (4096, 8, 256, 4),
        (4096, 8, 256, 8),
        (128, 8, 288, 8),
        (777, 6, 288, 3),
        (33, 4, 64, 64),
        # K not a power of two, T not a multiple of the row tile, several tiles per block
        (3001, 7, 96, 48),
        (4097, 5, 96, 12),
        (4096, 8, 256, 64),
        (100, 0, 16, 2),
        (3, 33, 64, 32),
        # 4 * (R + E) is the whole 48 KB the host check allows: the row tile needs more
        (1234, 6, 12240, 48),
    ],
)
def test_layout_matches_reference(num_tokens, num_topk, num_experts, num_ranks):
    topk = random_topk(num_tokens, num_topk, num_experts, seed=num_tokens)
    expected = reference_layout(topk, num_experts, num_ranks)
    got = torch.ops.ep_ops.get_dispatch_layout(topk.cuda(), num_experts, num_ranks)
    for g, e in zip(got, expected, strict=True):
        assert g.is_cuda and g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("num_tokens", [300, 3000])
def test_layout_ignores_out_of_range_ids_and_counts_duplicates(num_tokens):
    """Ids < 0 or >= num_experts count nowhere, like -1; an expert named twice by a token counts
    twice for itself and once for its rank; one expert for every id (all atomics on one bin)."""
    num_experts, num_ranks = 256, 4
    gen = torch.Generator().manual_seed(num_tokens)
    topk = torch.randint(-3, num_experts + 3, (num_tokens, 8), generator=gen)
    topk[::7, 1] = topk[::7, 0]
    topk[5, 2], topk[6, 3], topk[7, 4] = 1 << 40, -(1 << 40) + 3, (1 << 32) + 5
    valid = topk.masked_fill((topk < 0) | (topk >= num_experts), -1)
    # the ids start 8 bytes into their storage
    unaligned = torch.cat([torch.zeros(1, dtype=torch.long), topk.view(-1)]).cuda()[1:].view_as(topk)
    one_expert = torch.full_like(topk, 77)
    for ids, expected_from in ((unaligned, valid), (one_expert.cuda(), one_expert)):
        got = torch.ops.ep_ops.get_dispatch_layout(ids, num_experts, num_ranks)
        expected = reference_layout(expected_from, num_experts, num_ranks)
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g.cpu(), e)


def test_layout_opcheck_on_cuda():
    topk = random_topk(300, 8, 64, seed=1).cuda()
    torch.library.opcheck(torch.ops.ep_ops.get_dispatch_layout.default, (topk, 64, 4))


def test_layout_in_a_cuda_graph_follows_the_routing():
    num_experts = -(-256 // GPU_RANKS) * GPU_RANKS  # 256 on 2, 4 and 8 ranks
    static_topk = random_topk(512, 8, num_experts, seed=2).cuda()
    torch.ops.ep_ops.get_dispatch_layout(static_topk, num_experts, GPU_RANKS)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.ops.ep_ops.get_dispatch_layout(static_topk, num_experts, GPU_RANKS)
    for seed in (3, 4):
        topk = random_topk(512, 8, num_experts, seed=seed)
        static_topk.copy_(topk)
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(outputs, reference_layout(topk, num_experts, GPU_RANKS), strict=True):
            assert torch.equal(g.cpu(), e)
