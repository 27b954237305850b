"""Times of the low-latency NVLink ops on the decode workload of HARDWARE.md (128 tokens per rank,
hidden 7168, top-8 of 256 experts), launched eagerly and as CUDA-graph replays, plus rank 0's
kernel table (torch.profiler: the ops, and each send and recv half as its own kernel). For tuning:
python3 scripts/profile_ll.py [--ranks N].

Each time is the median over 200 calls (eager) or replays of a graph holding 20 calls, with
every rank entering each timed call together (a barrier on the stream before it)."""

import argparse

import torch
import torch.distributed as dist

from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, ll_bytes_needed, release_nvl_buffer


def median_us(fn, iters, group, after=None):
    """Median time of fn() on the stream; after(fn's result), if given, runs untimed."""
    times = []
    for _ in range(iters):
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        if after is not None:
            after(result)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def decode_setup(rank, world_size, tokens, hidden, topk, experts):
    """The group's low-latency buffer, this rank's decode inputs (x [tokens, hidden] BF16 and
    random top-k ids, seeded by rank; ll_settled_halves.py uses the same) and the generator,
    which goes on to draw the combine's weights."""
    group = dist.group.WORLD
    buffer = init_nvl_buffer(group, ll_bytes_needed(tokens, hidden, world_size, topk), low_latency=True)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    idx = torch.rand(tokens, experts, device="cuda", generator=gen).topk(topk, dim=1).indices
    return buffer, x, idx, gen


def worker(
    rank, world_size, group_name, tokens=128, hidden=7168, topk=8, experts=256, nowhere=False, profile=True
):
    ops = torch.ops.ep_ops
    group = dist.group.WORLD
    buffer, x, idx, gen = decode_setup(rank, world_size, tokens, hidden, topk, experts)
    if nowhere:  # no rows move: what the kernels cost beyond the data
        idx.fill_(-1)
    weights = torch.rand(tokens, topk, device="cuda", generator=gen)
    M, E = tokens, experts
    out = ops.low_latency_dispatch(x, idx, M, E, False, False, False, group_name)
    expert_out, slots = out[0], out[5]

    calls = {
        "dispatch FP8": lambda: ops.low_latency_dispatch(x, idx, M, E, True, False, False, group_name),
        "dispatch BF16": lambda: ops.low_latency_dispatch(x, idx, M, E, False, False, False, group_name),
        "combine BF16": lambda: ops.low_latency_combine(
            expert_out, idx, weights, slots, M, False, group_name
        ),
        "dispatch FP8 send half": lambda: ops.low_latency_dispatch_send(
            x, idx, M, E, True, False, False, group_name
        ),
        "combine send half": lambda: ops.low_latency_combine_send(
            expert_out, idx, weights, slots, M, False, group_name
        ),
    }
    # A send half alone would leave its recv pending: pair it, timing only the send.
    recv_of = {
        "dispatch FP8 send half": lambda p: ops.low_latency_dispatch_recv(
            p, M, hidden, topk, E, True, False, group_name
        ),
        "combine send half": lambda p: ops.low_latency_combine_recv(p, idx, hidden, E, M, False, group_name),
    }
    rows = []
    for name, call in calls.items():
        for _ in range(10):
            result = call()
            if name in recv_of:
                recv_of[name](result)
        torch.cuda.synchronize()
        if name in recv_of:
            rows.append((name, median_us(call, 200, group, after=recv_of[name]), float("nan")))
            continue
        eager = median_us(call, 200, group)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                call()
        graph.replay()
        torch.cuda.synchronize()
        replay = median_us(graph.replay, 30, group) / 20
        rows.append((name, eager, replay))

    table = ""
    if profile:
        # The whole ops, then the hook pairs: each half is its own kernel (the send halves
        # ll_dispatch_half_kernel<true> and the fused ll_combine_kernel<true, true, false, ...>,
        # the recv halves the other two), so the table gives each half's kernel time, as
        # DeepEP's hook-mode figures are measured (kernel durations from the profiler).
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                calls["dispatch FP8"]()
                calls["combine BF16"]()
            for _ in range(20):
                for name, recv in recv_of.items():
                    recv(calls[name]())
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=110)
    torch.cuda.synchronize()
    release_nvl_buffer(group_name, low_latency=True)
    del buffer
    if rank != 0:
        return None
    lines = [f"{'op':<26}{'eager us':>10}{'graph us':>10}"]
    lines += [f"{n:<26}{e:>10.1f}{g:>10.1f}" for n, e, g in rows]
    return "\n".join(lines) + "\n\n" + table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--nowhere", action="store_true", help="every top-k id -1: no rows move")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    print(f"ranks {args.ranks}, tokens {args.tokens}, hidden {args.hidden}, nowhere {args.nowhere}")
    worker_args = (args.tokens, args.hidden, 8, 256, args.nowhere, args.profile)
    print(parallel_launch(args.ranks, worker, *worker_args, backend="nccl", device="cuda", timeout=300)[0])
