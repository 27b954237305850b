"""Benchmark of the ep_ops primitives on a multi-process run: ``python -m ep_ops.bench``.

Without GPUs it spawns CPU ranks over gloo (the collective backend) with a CPU-sized workload;
with CUDA and a GPU per rank (at least two) it uses NCCL and the reference workload of
HARDWARE.md (DeepEP's own test config), on any number of ranks of one host (``--ranks 2``, 4,
8). Every op is first run once and checked against ``ep_ops.reference`` on rank 0 (PASS/FAIL
per op; dispatch outputs bitwise, combine outputs with a tolerance), then timed: median over
``--iters`` calls, each after a barrier. On GPUs each timed call follows a 256 MB memset, as in
DeepEP's own benchmark: it evicts the inputs from L2, and the host enqueues the call while the GPU
is still busy, so the time is the GPU's and not the launch's (a model's host runs ahead of its GPU
the same way). ``--idle-start`` leaves it out: each call then starts on an idle GPU and its time
includes the host's launch (the method of the figures before 2026-11-22, session 15).

Figures, as DeepEP reports them: "recv MB" counts the payload bytes (rows, plus FP8 scales) that
rank 0 receives, its own rows included; "GB/s NVL" is that over the time per call, "GB/s
remote" counts only rows from other ranks. Normal-mode rows are one per (token, destination
rank); low-latency rows are one per (token, expert) selection, as in DeepEP's low-latency test.
Send/recv halves are timed as a pair (send, then recv on its output) and reported by time only.
DeepEP's intranode test times its dispatch, BF16 and FP8, with a handle from an earlier dispatch:
the "cached dispatch" rows are that call, and ``--nvl-bytes 1e9`` gives the buffer its tests use.
"""

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ep_ops import reference
from ep_ops.launch import parallel_launch
from ep_ops.nvl import init_nvl_buffer, ll_bytes_needed, nvl_bytes_needed, nvl_usable, release_nvl_buffer

FP8_BLOCK = reference.FP8_BLOCK

# The CPU workload keeps a 2-core machine under a minute; the GPU one is HARDWARE.md's. A default
# expert count that the ranks do not divide is rounded up to a multiple of them (--ranks 3: 33).
CPU_DEFAULTS = {"tokens": 512, "hidden": 1024, "topk": 8, "experts": 32, "ll_tokens": 64}
GPU_DEFAULTS = {"tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256, "ll_tokens": 128}
ITERS = {"cpu": (20, 3), "cuda": (50, 10)}  # (iters, warmup)


@dataclasses.dataclass(frozen=True)
class Config:
    ranks: int
    tokens: int
    hidden: int
    topk: int
    experts: int
    ll_tokens: int
    iters: int
    warmup: int
    fp8: bool
    nvl: bool
    backend: str
    device: str
    seed: int
    idle_start: bool = False
    nvl_bytes: int = 0  # the normal NVLink buffer's bytes; 0: sized to the workload


@dataclasses.dataclass
class Row:
    """One line of the table. recv_bytes / remote_bytes are None for ops timed only."""

    op: str
    time_us: float
    recv_bytes: int | None = None
    remote_bytes: int | None = None


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(rank: int, cfg: Config, device: torch.device) -> dict:
    """This rank's random routing and activations (seeded per rank, drawn on the CPU)."""
    gen = torch.Generator().manual_seed(cfg.seed + rank)

    def routing(num_tokens):
        scores = torch.rand(num_tokens, cfg.experts, generator=gen) + 1e-3
        topk_idx = scores.topk(cfg.topk, dim=1).indices
        topk_weights = torch.rand(num_tokens, cfg.topk, generator=gen)
        return topk_idx, topk_weights

    topk_idx, topk_weights = routing(cfg.tokens)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16)
    ll_topk_idx, ll_topk_weights = routing(cfg.ll_tokens)
    # Like DeepEP's low-latency test: a few selections masked out (-1).
    for _ in range(min(10, cfg.ll_tokens)):
        t = int(torch.randint(cfg.ll_tokens, (1,), generator=gen))
        k = int(torch.randint(cfg.topk, (1,), generator=gen))
        ll_topk_idx[t, k] = -1
    ll_x = torch.randn(cfg.ll_tokens, cfg.hidden, generator=gen).to(torch.bfloat16)
    inputs = {
        "x": x,
        "topk_idx": topk_idx,
        "topk_weights": topk_weights,
        "ll_x": ll_x,
        "ll_topk_idx": ll_topk_idx,
        "ll_topk_weights": ll_topk_weights,
    }
    if cfg.fp8:
        inputs["x_fp8"], inputs["x_scales"] = reference.per_token_cast_to_fp8(x)
    return {name: t.to(device) for name, t in inputs.items()}


# ---------------------------------------------------------------------------------------------
# the ops under test, run once
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ops:
    """What the bench calls. ``single[name]()`` is one op call; ``halves[name]`` a (send, recv)
    pair, recv taking send's output. ``out[name]`` holds each one's output from the first run,
    whose tensors (handles, expert outputs) the later calls reuse."""

    single: dict = dataclasses.field(default_factory=dict)
    halves: dict = dataclasses.field(default_factory=dict)
    out: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, call: Callable):
        self.single[name] = call
        self.out[name] = call()
        return self.out[name]

    def add_halves(self, name: str, send: Callable, recv: Callable):
        self.halves[name] = (send, recv)
        self.out[f"{name} send+recv"] = recv(send())


def run_once(inp: dict, cfg: Config, group_name: str) -> Ops:
    """Runs every op once (this order is the timing order) and keeps the calls for timing."""
    ops, run = torch.ops.ep_ops, Ops()
    E, M, H = cfg.experts, cfg.ll_tokens, cfg.hidden
    x, topk_idx, topk_weights = inp["x"], inp["topk_idx"], inp["topk_weights"]

    is_token_in_rank = run.add("layout", lambda: ops.get_dispatch_layout(topk_idx, E, cfg.ranks))[2]
    recv_x, _, _, recv_topk_weights, _, prefix, src_idx = run.add(
        "dispatch BF16",
        lambda: ops.dispatch(x, None, topk_idx, topk_weights, is_token_in_rank, E, 1, 0, group_name),
    )
    if cfg.fp8:
        x_fp8, x_scales = inp["x_fp8"], inp["x_scales"]
        run.add(
            "dispatch FP8",
            lambda: ops.dispatch(
                x_fp8, x_scales, topk_idx, topk_weights, is_token_in_rank, E, 1, 0, group_name
            ),
        )
    handle = (is_token_in_rank, prefix, src_idx)
    run.add("cached dispatch BF16", lambda: ops.cached_dispatch(x, None, *handle, group_name))
    if cfg.fp8:  # DeepEP's bench times its FP8 dispatch this way too: with a handle
        run.add(
            "cached dispatch FP8",
            lambda: ops.cached_dispatch(inp["x_fp8"], inp["x_scales"], *handle, group_name),
        )
    run.add("combine BF16", lambda: ops.combine(recv_x, recv_topk_weights, None, None, *handle, group_name))
    run.add("all_to_all_single BF16", all_to_all_like_dispatch(is_token_in_rank, H))

    ll_x, ll_idx, ll_w = inp["ll_x"], inp["ll_topk_idx"], inp["ll_topk_weights"]
    for fp8 in (False, True) if cfg.fp8 else (False,):
        run.add(
            f"LL dispatch {'FP8' if fp8 else 'BF16'}",
            lambda fp8=fp8: ops.low_latency_dispatch(ll_x, ll_idx, M, E, fp8, False, False, group_name),
        )
    # The identity expert: the BF16 dispatch's rows go straight back.
    expert_out, slots = run.out["LL dispatch BF16"][0], run.out["LL dispatch BF16"][5]
    run.add(
        "LL combine BF16",
        lambda: ops.low_latency_combine(expert_out, ll_idx, ll_w, slots, M, False, group_name),
    )
    run.add_halves(
        f"LL dispatch {'FP8' if cfg.fp8 else 'BF16'}",
        lambda: ops.low_latency_dispatch_send(ll_x, ll_idx, M, E, cfg.fp8, False, False, group_name),
        lambda packed: ops.low_latency_dispatch_recv(packed, M, H, cfg.topk, E, cfg.fp8, False, group_name),
    )
    run.add_halves(
        "LL combine BF16",
        lambda: ops.low_latency_combine_send(expert_out, ll_idx, ll_w, slots, M, False, group_name),
        lambda partials: ops.low_latency_combine_recv(partials, ll_idx, H, E, M, False, group_name),
    )
    return run


def all_to_all_like_dispatch(is_token_in_rank: torch.Tensor, hidden: int) -> Callable:
    """A ``dist.all_to_all_single`` moving the BF16 dispatch's rows (same split sizes), its
    input already packed by destination: the baseline a plain collective gives."""
    send_splits = is_token_in_rank.sum(dim=0).to(torch.int64)
    recv_splits = torch.empty_like(send_splits)
    dist.all_to_all_single(recv_splits, send_splits)
    device = is_token_in_rank.device
    send = torch.randn(int(send_splits.sum()), hidden, device=device).to(torch.bfloat16)
    recv = torch.empty(int(recv_splits.sum()), hidden, dtype=torch.bfloat16, device=device)
    splits = (recv_splits.tolist(), send_splits.tolist())

    def call():
        dist.all_to_all_single(recv, send, *splits)
        return recv

    return call


# ---------------------------------------------------------------------------------------------
# checks against the reference
# ---------------------------------------------------------------------------------------------


def gather_to_rank_0(obj, rank: int, world_size: int):
    """Every rank's ``obj`` (tensors moved to the CPU) on rank 0, None elsewhere.

    Goes through ``torch.save``: gather_object's own pickling cannot carry float8 tensors.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(buffer.getvalue(), gathered, dst=0)
    if rank != 0:
        return None
    return [torch.load(io.BytesIO(data), map_location="cpu", weights_only=False) for data in gathered]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(as_bytes(a), as_bytes(b))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes, flat. Copied into fresh strides: a tensor counted as contiguous may keep any
    stride on a dimension of size 1 (a one-row slice of column-major scales), which
    .view(torch.uint8) refuses."""
    return torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.reshape(-1)).view(torch.uint8)


def tuples_equal(outs, refs) -> bool:
    return len(outs) == len(refs) and all(map(bitwise_equal, outs, refs))


def ll_dispatch_equal(out, ref) -> bool:
    """Low-latency dispatch outputs agree; rows past recv_count are unspecified, so skipped."""
    recv_x, scales, count, src_info, layout_range, slots = out
    if not tuples_equal((count, layout_range, slots), (ref[2], ref[4], ref[5])):
        return False
    if recv_x.shape != ref[0].shape or scales.shape != ref[1].shape or src_info.shape != ref[3].shape:
        return False
    for e, n in enumerate(count.tolist()):
        pairs = [(recv_x[e, :n], ref[0][e, :n]), (src_info[e, :n], ref[3][e, :n])]
        if scales.numel():
            pairs.append((scales[e, :n], ref[1][e, :n]))
        if not all(bitwise_equal(a, b) for a, b in pairs):
            return False
    return True


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    )


def check_all(inp: list, out: list, cfg: Config) -> dict:
    """``inp[r]`` / ``out[r]``: rank r's inputs and :func:`outputs_to_check` on the CPU. Returns
    name -> passed."""
    R, E, M = cfg.ranks, cfg.experts, cfg.ll_tokens

    def given(name):
        return [i[name] for i in inp]

    def got(name):
        return [o[name] for o in out]

    def all_pass(compare, outs, refs):
        return all(map(compare, outs, refs))

    checks = {}
    topk = (given("topk_idx"), given("topk_weights"))
    layouts = got("layout")
    checks["layout"] = all_pass(tuples_equal, layouts, [reference.reference_layout(t, E, R) for t in topk[0]])
    in_rank = [layout[2] for layout in layouts]
    ref = reference.reference_dispatch(given("x"), None, *topk, in_rank, E)
    checks["dispatch BF16"] = all_pass(tuples_equal, got("dispatch BF16"), ref)
    if cfg.fp8:
        ref = reference.reference_dispatch(given("x_fp8"), given("x_scales"), *topk, in_rank, E)
        checks["dispatch FP8"] = all_pass(tuples_equal, got("dispatch FP8"), ref)
    dispatched = got("dispatch BF16")
    handles = [(m, d[5], d[6]) for m, d in zip(in_rank, dispatched, strict=True)]
    ref = reference.reference_cached_dispatch(given("x"), None, handles)
    checks["cached dispatch BF16"] = all_pass(tuples_equal, got("cached dispatch BF16"), ref)
    if cfg.fp8:
        ref = reference.reference_cached_dispatch(given("x_fp8"), given("x_scales"), handles)
        checks["cached dispatch FP8"] = all_pass(tuples_equal, got("cached dispatch FP8"), ref)
    ref = reference.reference_combine(
        [d[0] for d in dispatched], [d[3] for d in dispatched], None, None, handles
    )
    checks["combine BF16"] = all(
        close(o[0], r[0]) and close(o[1], r[1]) for o, r in zip(got("combine BF16"), ref, strict=True)
    )

    ll_x, ll_idx = given("ll_x"), given("ll_topk_idx")
    for fp8 in (False, True) if cfg.fp8 else (False,):
        name = f"LL dispatch {'FP8' if fp8 else 'BF16'}"
        ref = reference.reference_low_latency_dispatch(ll_x, ll_idx, M, E, fp8)
        checks[name] = all_pass(ll_dispatch_equal, got(name), ref)
    expert_outs = [d[0] for d in got("LL dispatch BF16")]
    ref = reference.reference_low_latency_combine(expert_outs, ll_idx, given("ll_topk_weights"), M, E)
    checks["LL combine BF16"] = all_pass(close, got("LL combine BF16"), ref)
    for name in out[0]["pairs"]:
        checks[name] = all(o["pairs"][name] for o in out)
    return checks


# Outputs never compared with the reference, left out of what rank 0 gathers: on 8 ranks of the
# GPU workload every rank's outputs come to a few GB, and these are a quarter of it.
NOT_GATHERED = ("all_to_all_single BF16",)


def outputs_to_check(out: dict) -> dict:
    """``Ops.out`` as rank 0's checks need it: send/recv pairs already compared here with their
    whole op (they must give exactly what it gives), ``pairs`` holding name -> passed."""
    kept = {name: value for name, value in out.items() if name not in NOT_GATHERED}
    kept["pairs"] = {}
    for name in [n for n in out if n.endswith(" send+recv")]:
        same = ll_dispatch_equal if name.startswith("LL dispatch") else bitwise_equal
        kept["pairs"][name] = bool(same(kept.pop(name), out[name.removesuffix(" send+recv")]))
    return kept


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


# What the GPU does before each timed sequence: zeroes this many bytes (DeepEP's bench flushes L2
# with 256 MB). Its ~80 us also let the host enqueue the first call before the GPU reaches it.
FLUSH_BYTES = 256 << 20


class Timer:
    """Times a sequence of dependent calls after a barrier: CUDA events on GPU, perf_counter on
    CPU. Each step takes the previous step's output (None for the first). On GPU, unless
    ``idle_start``, the GPU first zeroes FLUSH_BYTES (module docstring: why)."""

    def __init__(self, device: torch.device, idle_start: bool = False):
        self.cuda = device.type == "cuda"
        self.flush = None
        if self.cuda and not idle_start:
            self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def barrier(self):
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, steps: list[Callable]) -> list[float]:
        """Runs ``steps`` once, in order; returns each one's time in µs."""
        self.barrier()
        state = None
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(steps) + 1)]
            if self.flush is not None:
                self.flush.zero_()
            events[0].record()
            for step, event in zip(steps, events[1:], strict=True):
                state = step(state)
                event.record()
            events[-1].synchronize()
            return [a.elapsed_time(b) * 1e3 for a, b in zip(events[:-1], events[1:], strict=True)]
        times = []
        for step in steps:
            start = time.perf_counter()
            state = step(state)
            times.append((time.perf_counter() - start) * 1e6)
        return times


def median_times(timer: Timer, steps: list[Callable], cfg: Config) -> list[float]:
    """Median over cfg.iters runs of each step of ``steps`` (after cfg.warmup runs)."""
    for _ in range(cfg.warmup):
        timer(steps)
    samples = [timer(steps) for _ in range(cfg.iters)]
    return [statistics.median(column) for column in zip(*samples, strict=True)]


def volumes(rank: int, inp: dict, out: dict, cfg: Config) -> dict:
    """Op name -> (rows this rank receives, of which its own, bytes per row)."""
    H, num_local = cfg.hidden, cfg.experts // cfg.ranks
    bf16_row, fp8_row = 2 * H, H + 4 * (H // FP8_BLOCK)
    is_token_in_rank = out["layout"][2]
    own = int(is_token_in_rank[:, rank].sum())  # tokens this rank sends to itself
    received = out["dispatch BF16"][0].size(0)
    returned = int(is_token_in_rank.sum())  # combine: one row per (token, destination rank)
    result = {
        "dispatch BF16": (received, own, bf16_row),
        "dispatch FP8": (received, own, fp8_row),
        "cached dispatch BF16": (received, own, bf16_row),
        "cached dispatch FP8": (received, own, fp8_row),
        "combine BF16": (returned, own, bf16_row),
        "all_to_all_single BF16": (received, own, bf16_row),
    }
    for kind, row_bytes in (("BF16", bf16_row), ("FP8", fp8_row)):
        if f"LL dispatch {kind}" in out:
            count, layout_range = out[f"LL dispatch {kind}"][2], out[f"LL dispatch {kind}"][4]
            own_ll = int((layout_range[:, rank] & 0xFFFFFFFF).sum())  # low 32 bits: row count
            result[f"LL dispatch {kind}"] = (int(count.sum()), own_ll, row_bytes)
    selections = inp["ll_topk_idx"][inp["ll_topk_idx"] >= 0]
    own_ll = int((selections // num_local == rank).sum())
    result["LL combine BF16"] = (selections.numel(), own_ll, bf16_row)
    return result


# Calls of an op captured in one CUDA graph for the "(graph)" rows: a replay's time / GRAPH_CALLS.
GRAPH_CALLS = 20


def graph_of(call: Callable) -> Callable:
    """The replay of a CUDA graph holding GRAPH_CALLS calls of ``call`` (how decoding runs the
    low-latency ops: no host work per call)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            call()
    return graph.replay


def time_all(rank: int, inp: dict, run: Ops, cfg: Config, device: torch.device, graphs: bool) -> list[Row]:
    """Times every op (whole ops, then send/recv pairs); bytes from this rank's outputs. With
    ``graphs`` (CUDA, low-latency ops on NVLink: capturable) also each low-latency op replayed
    from a CUDA graph, per call."""
    timer = Timer(device, cfg.idle_start)
    sizes = volumes(rank, inp, run.out, cfg)
    rows = []

    def add_row(name, us, sized_as):
        row = Row(name, us)
        if sized_as in sizes:
            total, own, row_bytes = sizes[sized_as]
            row.recv_bytes, row.remote_bytes = total * row_bytes, (total - own) * row_bytes
        rows.append(row)

    for name, call in run.single.items():
        (us,) = median_times(timer, [lambda _, call=call: call()], cfg)
        add_row(name, us, name)
    for name, (send, recv) in run.halves.items():
        send_us, recv_us = median_times(timer, [lambda _, send=send: send(), recv], cfg)
        rows += [Row(f"{name} send", send_us), Row(f"{name} recv", recv_us)]
    for name, call in run.single.items():
        if graphs and name.startswith("LL "):
            replay = graph_of(call)
            (us,) = median_times(timer, [lambda _, replay=replay: replay()], cfg)
            add_row(f"{name} (graph)", us / GRAPH_CALLS, name)
    return rows


# ---------------------------------------------------------------------------------------------
# the per-rank worker and the command line
# ---------------------------------------------------------------------------------------------


def worker(rank: int, world_size: int, group_name: str, cfg: Config):
    """One rank: inputs, one checked run, timings. Rank 0 returns (checks, rows)."""
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    nvl_buffers = ()  # kept alive for the whole run: the NVLink kernels use them
    if cfg.device == "cuda" and cfg.nvl and nvl_usable(dist.group.WORLD):
        # Normal mode: room for every token of every rank arriving here (the worst case of any
        # routing), or --nvl-bytes. Low latency: cfg.ll_tokens token slots per source rank.
        sized = nvl_bytes_needed(cfg.tokens * world_size, 2 * cfg.hidden, cfg.topk)
        nvl_buffers = (
            init_nvl_buffer(dist.group.WORLD, cfg.nvl_bytes or sized),
            init_nvl_buffer(
                dist.group.WORLD,
                ll_bytes_needed(cfg.ll_tokens, cfg.hidden, world_size, cfg.topk),
                low_latency=True,
            ),
        )
    inp = make_inputs(rank, cfg, device)
    run = run_once(inp, cfg, group_name)

    gathered = gather_to_rank_0((inp, outputs_to_check(run.out)), rank, world_size)
    checks = None
    if rank == 0:
        inputs, outputs = zip(*gathered, strict=True)
        del gathered
        checks = check_all(list(inputs), list(outputs), cfg)
        for name, ok in checks.items():
            print(f"check {name:<28} {'PASS' if ok else 'FAIL'}", flush=True)

    rows = time_all(rank, inp, run, cfg, device, graphs=bool(nvl_buffers))
    if nvl_buffers:
        torch.cuda.synchronize()  # no kernel of ours may still use them
        del nvl_buffers
        release_nvl_buffer(group_name, low_latency=True)
        release_nvl_buffer(group_name)
    return (checks, rows) if rank == 0 else None


def format_table(rows: list[Row]) -> str:
    """The results as an aligned text table (one line per op)."""
    header = ("op", "µs/call", "recv MB", "GB/s NVL", "GB/s remote")
    lines = []
    for row in rows:
        if row.recv_bytes is None:
            lines.append((row.op, f"{row.time_us:.1f}", "", "", ""))
        else:
            lines.append(
                (
                    row.op,
                    f"{row.time_us:.1f}",
                    f"{row.recv_bytes / 1e6:.2f}",
                    f"{row.recv_bytes / row.time_us / 1e3:.1f}",
                    f"{row.remote_bytes / row.time_us / 1e3:.1f}",
                )
            )
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(line):
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ep_ops.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="number of processes (default 2)")
    p.add_argument("--tokens", type=int, help="tokens per rank (CPU 512, GPU 4096)")
    p.add_argument("--hidden", type=int, help="hidden size (CPU 1024, GPU 7168)")
    p.add_argument("--topk", type=int, help="experts per token (default 8)")
    p.add_argument(
        "--experts",
        type=int,
        help="total experts, a multiple of --ranks (CPU 32, GPU 256, rounded up to a multiple of --ranks)",
    )
    p.add_argument(
        "--low-latency-tokens", dest="ll_tokens", type=int, help="LL tokens per rank (CPU 64, GPU 128)"
    )
    p.add_argument("--iters", type=int, help="timed calls per op (CPU 20, GPU 50)")
    p.add_argument("--warmup", type=int, help="untimed calls per op first (CPU 3, GPU 10)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True, help="include FP8 variants")
    p.add_argument(
        "--idle-start",
        action="store_true",
        help="GPU: start each timed call on an idle GPU (its time then includes the launch) instead of "
        "after a 256 MB L2 flush",
    )
    p.add_argument(
        "--nvl-bytes",
        type=lambda text: int(float(text)),  # 1e9 as DeepEP's tests write it
        default=0,
        help="GPU: bytes of the normal-mode NVLink buffer (DeepEP's tests use 1e9); default: sized to "
        "the workload",
    )
    add_run_options(p)
    return p.parse_args(argv)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark of the package shares (this one and bench_moe)."""
    p.add_argument(
        "--nvl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on GPUs of one host, register the NVLink buffers so that the ops use the NVLink kernels",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is killed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def write_record(path: str, module: str, argv, machine: str, date: str, cfg, **results) -> None:
    """The run as JSON (``--json``): command, machine, date, torch, config, then ``results``."""
    record = {
        "command": " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "date": date,
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
        **results,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def resolve_backend(args: argparse.Namespace) -> tuple[str, str]:
    """(process-group backend, device): NCCL on CUDA with a GPU per rank, else gloo on CPU."""
    backend = args.backend
    if backend == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if gpus >= max(2, args.ranks) else "gloo"
    return backend, "cuda" if backend == "nccl" else "cpu"


def resolve_config(args: argparse.Namespace) -> Config:
    backend, device = resolve_backend(args)
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    iters, warmup = ITERS[device]

    def pick(name, default):
        value = getattr(args, name)
        return default if value is None else value

    ranks = max(args.ranks, 1)
    cfg = Config(
        ranks=args.ranks,
        tokens=pick("tokens", defaults["tokens"]),
        hidden=pick("hidden", defaults["hidden"]),
        topk=pick("topk", defaults["topk"]),
        experts=pick("experts", -(-defaults["experts"] // ranks) * ranks),
        ll_tokens=pick("ll_tokens", defaults["ll_tokens"]),
        iters=pick("iters", iters),
        warmup=pick("warmup", warmup),
        fp8=args.fp8,
        nvl=args.nvl,
        backend=backend,
        device=device,
        seed=args.seed,
        idle_start=args.idle_start,
        nvl_bytes=args.nvl_bytes,
    )
    if cfg.nvl_bytes < 0:
        raise ValueError(f"--nvl-bytes must be >= 0, got {cfg.nvl_bytes}")
    if cfg.ranks < 1 or cfg.iters < 1 or cfg.warmup < 0:
        raise ValueError(f"--ranks and --iters must be >= 1 and --warmup >= 0, got {cfg}")
    if cfg.experts % cfg.ranks != 0:
        raise ValueError(f"--experts ({cfg.experts}) must be a multiple of --ranks ({cfg.ranks})")
    if cfg.topk > cfg.experts:
        raise ValueError(f"--topk ({cfg.topk}) must be <= --experts ({cfg.experts})")
    if cfg.hidden % FP8_BLOCK != 0:
        raise ValueError(f"--hidden ({cfg.hidden}) must be a multiple of {FP8_BLOCK}")
    return cfg


def describe_machine(cfg) -> str:
    """The run's machine in one line; ``cfg`` has device, ranks, backend and nvl (this bench's
    Config and bench_moe's)."""
    if cfg.device == "cuda":
        kernels = "NVLink kernels where usable" if cfg.nvl else "collective backend only"
        return f"{cfg.ranks} x {torch.cuda.get_device_name(0)}, {cfg.backend}, {kernels}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {cfg.ranks} ranks over {cfg.backend}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as error:
        raise SystemExit(f"python -m ep_ops.bench: error: {error}") from None
    machine = describe_machine(cfg)
    print(
        f"ep_ops.bench: {machine}; {cfg.tokens} tokens x {cfg.hidden} hidden, "
        f"top-{cfg.topk} of {cfg.experts} experts; low-latency {cfg.ll_tokens} tokens; "
        f"median of {cfg.iters} calls after {cfg.warmup} warm-up"
        + (", each on an idle GPU" if cfg.idle_start and cfg.device == "cuda" else ""),
        flush=True,
    )
    results = parallel_launch(
        cfg.ranks, worker, cfg, timeout=args.timeout, backend=cfg.backend, device=cfg.device
    )
    checks, rows = results[0]
    print()
    print(format_table(rows))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"\nFAILED checks: {', '.join(failed)}")
    if args.json:
        write_record(
            args.json, "ep_ops.bench", argv, machine, datetime.date.today().isoformat(), cfg,
            checks=checks, rows=[dataclasses.asdict(row) for row in rows],
        )  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
