"""Host time of Buffer's Python wrapper over the raw ops: each normal-mode call through
``ep_ops.Buffer`` and through ``torch.ops.ep_ops`` on one CPU rank (gloo) with tiny inputs, so the
difference is the wrapper's argument checks and bookkeeping. python3 scripts/wrapper_overhead.py
prints the best of 7 rounds of 300 calls, in us per call. The CPU ops themselves vary by ~10 us
from round to round, so the difference is rough; --stub times Buffer's methods with the four ops
replaced by stubs that return outputs computed beforehand: the wrapper's own cost alone."""

import argparse
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


def stub_ops(ops, outputs: dict) -> None:
    """Replaces ops.NAME by a function returning outputs[NAME] (the namespace's attributes are
    what Buffer looks up at every call)."""
    for name, result in outputs.items():
        setattr(ops, name, lambda *args, result=result: result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stub", action="store_true", help="time Buffer's methods over stubbed ops")
    args = parser.parse_args()
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
    if args.stub:
        stub_ops(ops, {
            "get_dispatch_layout": ops.get_dispatch_layout(topk_idx, experts, 1),
            "dispatch": out,
            "cached_dispatch": ops.cached_dispatch(x, None, in_rank, out[5], out[6], name),
            "combine": ops.combine(out[0], None, None, None, in_rank, out[5], out[6], name),
        })  # fmt: skip
        print("| call | Buffer over stubbed ops, us |\n|---|---:|")
        for call, (_, wrapped) in pairs.items():
            print(f"| {call} | {best_us(wrapped):.1f} |")
        buffer.destroy()
        dist.destroy_process_group()
        return
    print("| call | op us | Buffer us | wrapper us |\n|---|---:|---:|---:|")
    for call, (op, wrapped) in pairs.items():
        op_us, wrapped_us = best_us(op), best_us(wrapped)
        print(f"| {call} | {op_us:.1f} | {wrapped_us:.1f} | {wrapped_us - op_us:.1f} |")
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
