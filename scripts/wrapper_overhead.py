"""Host time of Buffer's Python wrapper over the raw ops: each normal-mode call through
``ep_ops.Buffer`` and through ``torch.ops.ep_ops`` on one CPU rank (gloo) with tiny inputs, so the
difference is the wrapper's argument checks and bookkeeping. python3 scripts/wrapper_overhead.py
prints the best of 7 rounds of 300 calls, in us per call."""

import os
import time

import torch
import torch.distributed as dist


def best_us(call, rounds=7, calls=300) -> float:
    for _ in range(100):
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29551")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from ep_ops import Buffer

    ops, group = torch.ops.ep_ops, dist.group.WORLD
    name, experts = group.group_name, 4
    buffer = Buffer(group, num_nvl_bytes=1 << 24)
    x, topk_idx, weights = torch.randn(4, 64).bfloat16(), torch.randint(0, experts, (4, 2)), torch.rand(4, 2)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    out = ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, name)
    pairs = {
        "get_dispatch_layout": (
            lambda: ops.get_dispatch_layout(topk_idx, experts, 1),
            lambda: buffer.get_dispatch_layout(topk_idx, experts),
        ),
        "dispatch": (
            lambda: ops.dispatch(x, None, topk_idx, weights, in_rank, experts, 1, 0, name),
            lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout),
        ),
        "cached dispatch": (
            lambda: ops.cached_dispatch(x, None, in_rank, out[5], out[6], name),
            lambda: buffer.dispatch(x, handle=handle),
        ),
        "combine": (
            lambda: ops.combine(out[0], None, None, None, in_rank, out[5], out[6], name),
            lambda: buffer.combine(recv_x, handle),
        ),
    }
    print("| call | op us | Buffer us | wrapper us |\n|---|---:|---:|---:|")
    for call, (op, wrapped) in pairs.items():
        op_us, wrapped_us = best_us(op), best_us(wrapped)
        print(f"| {call} | {op_us:.1f} | {wrapped_us:.1f} | {wrapped_us - op_us:.1f} |")
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
