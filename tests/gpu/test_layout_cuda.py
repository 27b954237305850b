"""The CUDA layout kernel: bitwise equal to the reference, opcheck on CUDA, and capturable in a
CUDA graph (no host sync, no allocation by the kernel itself). Needs a GPU."""

import pytest
import torch

import ep_ops  # noqa: F401
from ep_ops.reference import reference_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def random_topk(num_tokens, num_topk, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    topk = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=1).indices
    return topk.masked_fill(torch.rand(num_tokens, num_topk, generator=gen) < 0.1, -1)


@pytest.mark.parametrize(
    "num_tokens,num_topk,num_experts,num_ranks",
    [(0, 8, 256, 2), (1, 1, 8, 1), (4096, 8, 256, 2), (4096, 8, 256, 8), (777, 6, 288, 3), (33, 4, 64, 64)],
)
def test_layout_matches_reference(num_tokens, num_topk, num_experts, num_ranks):
    topk = random_topk(num_tokens, num_topk, num_experts, seed=num_tokens)
    expected = reference_layout(topk, num_experts, num_ranks)
    got = torch.ops.ep_ops.get_dispatch_layout(topk.cuda(), num_experts, num_ranks)
    for g, e in zip(got, expected, strict=True):
        assert g.is_cuda and g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g.cpu(), e)


def test_layout_opcheck_on_cuda():
    topk = random_topk(300, 8, 64, seed=1).cuda()
    torch.library.opcheck(torch.ops.ep_ops.get_dispatch_layout.default, (topk, 64, 4))


def test_layout_in_a_cuda_graph_follows_the_routing():
    static_topk = random_topk(512, 8, 256, seed=2).cuda()
    torch.ops.ep_ops.get_dispatch_layout(static_topk, 256, 2)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.ops.ep_ops.get_dispatch_layout(static_topk, 256, 2)
    for seed in (3, 4):
        topk = random_topk(512, 8, 256, seed=seed)
        static_topk.copy_(topk)
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(outputs, reference_layout(topk, 256, 2), strict=True):
            assert torch.equal(g.cpu(), e)
