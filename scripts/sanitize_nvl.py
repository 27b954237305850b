"""A small NVLink dispatch -> combine run for compute-sanitizer (memcheck, racecheck):
compute-sanitizer --target-processes all --tool memcheck python3 scripts/sanitize_nvl.py"""

import torch
import torch.distributed as dist

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, nvl_bytes_needed


def worker(rank, world_size, group_name, tokens=64, hidden=256, topk=4, experts=8):
    ops = torch.ops.ep_ops
    buffer = init_nvl_buffer(dist.group.WORLD, nvl_bytes_needed(tokens * world_size, 2 * hidden, topk))
    gen = torch.Generator(device="cuda").manual_seed(rank)
    for worst in (0, tokens * world_size):
        x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
        topk_idx = torch.rand(tokens, experts, device="cuda", generator=gen).topk(topk, dim=1).indices
        weights = torch.rand(tokens, topk, device="cuda", generator=gen)
        _, _, in_rank = ops.get_dispatch_layout(topk_idx, experts, world_size)
        out = ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, worst, group_name)
        ops.cached_dispatch(x, None, in_rank, out[5], out[6], group_name)
        ops.combine(out[0], out[3], None, None, in_rank, out[5], out[6], group_name)
    torch.cuda.synchronize()
    del buffer
    return "ok"


if __name__ == "__main__":
    print(parallel_launch(2, worker, backend="nccl", device="cuda", timeout=500))
