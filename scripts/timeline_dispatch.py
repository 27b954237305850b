"""Where an exact-mode dispatch's time goes, timed the bench's way (barrier, event, call,
event) on the reference workload: python3 scripts/timeline_dispatch.py [--fp8] [--buffer] [--cached]
[--flush] [--iters N] (--buffer: through Buffer.dispatch, which also asks notify for the per-expert
counts; --cached: the dispatch with a handle, DeepEP's timed call; --flush: zero 256 MB before each
call, as the bench does, so the call starts on a busy GPU).
For each rank, the median over N calls of each kernel's start and end (µs after the call began
on the host, from the profiler's trace: the host and device clocks are the same there) and of
the host's own steps, and the event-timed call as the bench reports it."""

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist
from profile_nvl import reference_inputs, reference_workload  # scripts/ is on sys.path when run

from ep_ops import Buffer
from ep_ops.launch import parallel_launch
from ep_ops.reference import per_token_cast_to_fp8


def worker(
    rank,
    world_size,
    group_name,
    fp8=False,
    iters=10,
    through_buffer=False,
    cached=False,
    flush=False,
    experts=256,
):
    ops = torch.ops.ep_ops
    if through_buffer:  # its own NVLink buffer, of 1 GB (DeepEP's default)
        buffer = Buffer(dist.group.WORLD, num_nvl_bytes=int(1e9))
        x, topk_idx, weights = reference_inputs(rank, experts=experts)
    else:
        buffer, x, topk_idx, weights = reference_workload(rank, world_size, experts=experts)
    x_scales = None
    if fp8:
        x, x_scales = per_token_cast_to_fp8(x)
    per_rank, per_expert, in_rank = ops.get_dispatch_layout(topk_idx, experts, world_size)
    layout = dict(num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
    buffer_dispatch = buffer.dispatch if through_buffer else None
    if cached:
        _, _, _, _, _, prefix, src_idx = ops.dispatch(
            x, x_scales, topk_idx, weights, in_rank, experts, 1, 0, group_name
        )
    flush_bytes = torch.empty(256 << 18, dtype=torch.int32, device=x.device) if flush else None

    def call():
        with torch.profiler.record_function("ep_ops_call"):
            if cached:
                return ops.cached_dispatch(x, x_scales, in_rank, prefix, src_idx, group_name)
            if through_buffer:
                payload = (x, x_scales) if fp8 else x
                return buffer_dispatch(payload, topk_idx=topk_idx, topk_weights=weights, **layout)
            return ops.dispatch(x, x_scales, topk_idx, weights, in_rank, experts, 1, 0, group_name)

    def timed():
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if flush_bytes is not None:
            flush_bytes.zero_()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1e3

    for _ in range(5):
        timed()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        event_us = [timed() for _ in range(iters)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"trace{rank}.json")
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    calls = sorted(
        (e for e in events if e.get("name") == "ep_ops_call" and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )
    kernels = [e for e in events if e.get("cat") == "kernel"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" not in e["name"]]
    spans = defaultdict(list)  # name -> [(start, end)] relative to the call's host start
    for i, c in enumerate(calls):
        t0 = c["ts"]
        t_next = calls[i + 1]["ts"] if i + 1 < len(calls) else float("inf")
        spans["host: the call returns"].append((0.0, c["dur"]))
        for k in kernels:
            if t0 <= k["ts"] < t_next:
                spans[f"gpu {k['name'][:60]} (stream {k['args'].get('stream')})"].append(
                    (k["ts"] - t0, k["ts"] + k["dur"] - t0)
                )
        for r in runtime:
            if t0 <= r["ts"] < t0 + c["dur"]:
                spans[f"host {r['name']}"].append((r["ts"] - t0, r["ts"] + r["dur"] - t0))
    lines = [
        f"rank {rank}: {'FP8' if fp8 else 'BF16'}{' via Buffer' if through_buffer else ''}"
        f"{' cached' if cached else ''}{' flushed' if flush else ''} event-timed call: median {statistics.median(event_us):.1f} us over {iters}"
    ]
    for name, s in sorted(spans.items(), key=lambda kv: statistics.median(a for a, _ in kv[1])):
        per_call = len(s) / len(calls)
        lines.append(
            f"  {statistics.median(a for a, _ in s):8.1f} .. {statistics.median(b for _, b in s):8.1f}  "
            f"x{per_call:.0f}  {name}"
        )
    if through_buffer:
        dist.barrier()
        buffer.destroy()
    del buffer
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--buffer", action="store_true", help="time Buffer.dispatch instead of the raw op")
    parser.add_argument("--cached", action="store_true", help="time the dispatch with a handle")
    parser.add_argument("--flush", action="store_true", help="zero 256 MB before each call (the bench's way)")
    args = parser.parse_args()
    results = parallel_launch(
        args.ranks,
        worker,
        args.fp8,
        args.iters,
        args.buffer,
        args.cached,
        args.flush,
        backend="nccl",
        device="cuda",
        timeout=300,
    )
    print("\n".join(results))
