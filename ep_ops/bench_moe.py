"""Benchmark of the example MoE layer, eager against compiled: ``python -m ep_ops.bench_moe``.

Two steps of ``ep_ops.MoELayer``, each timed eagerly and compiled:

- **train**: forward and backward (gradients of the input and of every weight) in "exact" mode
  (dropless, grouped per-expert matmuls) or "static" mode (capacity padded, one bmm), compiled
  with ``torch.compile(fullgraph=True)``.
- **decode**: an inference forward in "low_latency" mode (send/recv halves, bfloat16 on the
  wire), compiled with ``torch.compile(mode="reduce-overhead", fullgraph=True)`` on GPUs, i.e.
  replayed as a CUDA graph (on CPU ranks, plain ``fullgraph=True``).

With 2 or more GPUs the ranks use NCCL and the NVLink kernels (an NVLink buffer is registered for
the normal ops and one for the low-latency ops); without GPUs they are CPU processes over gloo
with a small workload. Both versions of a step are first run once and compared (outputs and input
gradients, bfloat16 tolerance), then timed: the median over ``--iters`` iterations after
``--warmup`` (and after the compiling call), a barrier before each, CUDA events on GPUs. Times
are rank 0's.
"""

import argparse
import dataclasses
import datetime
import sys

import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters

from ep_ops import nvl
from ep_ops.bench import Timer, add_run_options, describe_machine, median_times, resolve_backend, write_record
from ep_ops.launch import parallel_launch
from ep_ops.moe_layer import MoELayer

# CPU sizes keep a 2-core machine at a few seconds a step; GPU sizes are a mid-sized MoE layer.
CPU_DEFAULTS = {
    "tokens": 128,
    "hidden": 256,
    "ffn": 256,
    "experts": 8,
    "topk": 2,
    "decode_tokens": 16,
    "decode_hidden": 256,
    "decode_ffn": 128,
    "decode_experts": 8,
    "decode_topk": 2,
    "iters": 10,
    "warmup": 3,
}
GPU_DEFAULTS = {
    "tokens": 4096,
    "hidden": 2048,
    "ffn": 1024,
    "experts": 32,
    "topk": 4,
    "decode_tokens": 128,
    "decode_hidden": 2048,
    "decode_ffn": 256,
    "decode_experts": 64,
    "decode_topk": 8,
    "iters": 20,
    "warmup": 5,  # CUDA graph trees warm up on the first call and record on the second
}
STEPS = ("train", "decode")
TOLERANCE = {"rtol": 3e-2, "atol": 3e-2}  # bfloat16 compute, compiled and eager kernels differ


@dataclasses.dataclass(frozen=True)
class Config:
    ranks: int
    backend: str
    device: str
    steps: tuple
    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int
    train_mode: str
    capacity_factor: float | None
    decode_tokens: int
    decode_hidden: int
    decode_ffn: int
    decode_experts: int
    decode_topk: int
    shared_ffn: int
    iters: int
    warmup: int
    compile_backend: str
    nvl: bool
    seed: int


@dataclasses.dataclass
class Result:
    """One line of the table: milliseconds per step (rank 0) and whether compiled matched eager
    on every rank."""

    step: str
    eager_ms: float
    compiled_ms: float
    compiled_with: str
    matches_eager: bool


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def compile_options(cfg: Config, cuda_graphs: bool) -> tuple[dict, str]:
    """``torch.compile`` keyword arguments and how they read in the table."""
    if cfg.compile_backend != "inductor":
        return {"backend": cfg.compile_backend}, f"fullgraph, {cfg.compile_backend}"
    if cuda_graphs:
        return {"mode": "reduce-overhead"}, "fullgraph, reduce-overhead (CUDA graphs)"
    return {}, "fullgraph"


def all_ranks_agree(ok: bool) -> bool:
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(ok))
    return all(flags)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), **TOLERANCE)


def to_device(layer: MoELayer, device: torch.device) -> MoELayer:
    """The layer on ``device``; its shared expert (plain nn.Linear, applied to the activations as
    they come) in bfloat16, like the activations."""
    layer = layer.to(device)
    if layer.shared is not None:
        layer.shared.to(torch.bfloat16)
    return layer


def time_pair(timer: Timer, cfg: Config, eager, compiled) -> tuple[float, float]:
    """Median milliseconds of ``eager()`` and ``compiled()`` (each already run once)."""
    eager_us, *_ = median_times(timer, [lambda _: eager()], cfg)
    compiled_us, *_ = median_times(timer, [lambda _: compiled()], cfg)
    return eager_us / 1e3, compiled_us / 1e3


def bench_train(rank: int, cfg: Config, device: torch.device, timer: Timer) -> Result:
    """Forward + backward of the layer on ``cfg.tokens`` bfloat16 tokens, eager and compiled."""
    capacity_factor = cfg.capacity_factor
    if cfg.train_mode == "static" and capacity_factor is None:
        capacity_factor = 1.0
    layer = MoELayer(
        cfg.hidden, cfg.ffn, cfg.experts, cfg.topk, dist.group.WORLD,
        mode=cfg.train_mode, capacity_factor=capacity_factor, max_tokens_per_rank=cfg.tokens,
        shared_ffn_hidden_size=cfg.shared_ffn, seed=cfg.seed,
    )  # fmt: skip
    layer = to_device(layer, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16).requires_grad_()
    grad_y = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    options, described = compile_options(cfg, cuda_graphs=False)
    compiled = torch.compile(layer, fullgraph=True, **options)

    def step(fn):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        y.backward(grad_y)
        return y

    eager_y = step(layer).detach()
    eager_grad = x.grad.clone()
    timer.barrier()  # every rank starts compiling at once: the first peer kernel waits for the others
    compiled_y = step(compiled).detach()
    ok = all_ranks_agree(close(compiled_y, eager_y) and close(x.grad, eager_grad))
    eager_ms, compiled_ms = time_pair(timer, cfg, lambda: step(layer), lambda: step(compiled))
    return Result(f"train ({cfg.train_mode})", eager_ms, compiled_ms, described, ok)


@torch.no_grad()
def bench_decode(rank: int, cfg: Config, device: torch.device, timer: Timer) -> Result:
    """Inference forward of the low-latency layer on ``cfg.decode_tokens`` tokens."""
    layer = MoELayer(
        cfg.decode_hidden, cfg.decode_ffn, cfg.decode_experts, cfg.decode_topk, dist.group.WORLD,
        mode="low_latency", num_max_dispatch_tokens_per_rank=cfg.decode_tokens,
        shared_ffn_hidden_size=cfg.shared_ffn, seed=cfg.seed,
    )  # fmt: skip
    layer = to_device(layer, device)
    gen = torch.Generator().manual_seed(cfg.seed + 2 + rank)
    x = torch.randn(cfg.decode_tokens, cfg.decode_hidden, generator=gen).to(device, torch.bfloat16)
    cuda_graphs = device.type == "cuda"
    options, described = compile_options(cfg, cuda_graphs)
    compiled_layer = torch.compile(layer, fullgraph=True, **options)

    def compiled():
        if cuda_graphs and "mode" in options:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new decoding step
        return compiled_layer(x)

    counters["inductor"].clear()
    eager_y = layer(x)
    timer.barrier()
    compiled_y = compiled().clone()  # a CUDA graph's next replay overwrites its output
    eager_ms, compiled_ms = time_pair(timer, cfg, lambda: layer(x), compiled)
    # Compared once more after the timing: on GPUs that call replays the recorded graph.
    ok = all_ranks_agree(close(compiled_y, eager_y) and close(compiled(), eager_y))
    skips = counters["inductor"]["cudagraph_skips"]
    if skips:
        described += f", but Inductor skipped CUDA graphs {skips} time(s)"
    return Result("decode (low latency)", eager_ms, compiled_ms, described, ok)


# ---------------------------------------------------------------------------------------------
# the per-rank worker and the command line
# ---------------------------------------------------------------------------------------------


def register_nvl_buffers(cfg: Config, world_size: int) -> list:
    """On GPUs of one host: the NVLink buffers of the steps that run (before any compiling or
    capture). Returns them, to be kept alive."""
    group = dist.group.WORLD
    if cfg.device != "cuda" or not cfg.nvl or not nvl.nvl_usable(group):
        return []
    buffers = []
    if "train" in cfg.steps:
        # Room for every token of every rank arriving at one rank (any routing).
        rows = cfg.tokens * world_size
        buffers.append(nvl.init_nvl_buffer(group, nvl.nvl_bytes_needed(rows, 2 * cfg.hidden, cfg.topk)))
    if "decode" in cfg.steps:
        nbytes = nvl.ll_bytes_needed(cfg.decode_tokens, cfg.decode_hidden, world_size, cfg.decode_topk)
        buffers.append(nvl.init_nvl_buffer(group, nbytes, low_latency=True))
    return buffers


def worker(rank: int, world_size: int, group_name: str, cfg: Config):
    """One rank: every step of ``cfg.steps``, eager and compiled. Rank 0 returns the results."""
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    buffers = register_nvl_buffers(cfg, world_size)
    # Idle start: host time is part of what compile saves, so each timed step starts on an idle GPU.
    timer = Timer(device, idle_start=True)
    benches = {"train": bench_train, "decode": bench_decode}
    results = []
    for name in cfg.steps:
        torch._dynamo.reset()
        results.append(benches[name](rank, cfg, device, timer))
    timer.barrier()
    del buffers
    return results if rank == 0 else None


def format_table(results: list[Result]) -> str:
    header = ("step", "eager ms", "compiled ms", "speedup", "compiled with")
    lines = [
        (
            r.step,
            f"{r.eager_ms:.3f}",
            f"{r.compiled_ms:.3f}",
            f"{r.eager_ms / r.compiled_ms:.2f}x" if r.compiled_ms > 0 else "-",
            r.compiled_with,
        )
        for r in results
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(line):
        numbers = [cell.rjust(w) for cell, w in zip(line[1:4], widths[1:4], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *numbers, line[4]]).rstrip()

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ep_ops.bench_moe", description=__doc__.split("\n\n")[0])
    cpu, gpu = CPU_DEFAULTS, GPU_DEFAULTS

    def sized(flag, name, kind, help_text):
        p.add_argument(flag, dest=name, type=kind, help=f"{help_text} (CPU {cpu[name]}, GPU {gpu[name]})")

    p.add_argument("--ranks", type=int, default=2, help="number of processes (default 2)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated steps to run, of {','.join(STEPS)}"
    )
    sized("--tokens", "tokens", int, "train: tokens per rank")
    sized("--hidden", "hidden", int, "train: hidden size")
    sized("--ffn", "ffn", int, "train: expert FFN size")
    sized("--experts", "experts", int, "train: experts in total")
    sized("--topk", "topk", int, "train: experts per token")
    p.add_argument("--train-mode", choices=("exact", "static"), default="exact", help="MoELayer mode (exact)")
    p.add_argument("--capacity-factor", type=float, help="expert capacity factor (static mode: default 1.0)")
    sized("--decode-tokens", "decode_tokens", int, "decode: tokens per rank, also the low-latency M")
    sized("--decode-hidden", "decode_hidden", int, "decode: hidden size")
    sized("--decode-ffn", "decode_ffn", int, "decode: expert FFN size")
    sized("--decode-experts", "decode_experts", int, "decode: experts in total")
    sized("--decode-topk", "decode_topk", int, "decode: experts per token")
    p.add_argument("--shared-ffn", type=int, default=0, help="FFN size of a shared expert (0 = none)")
    sized("--iters", "iters", int, "timed iterations per step")
    sized("--warmup", "warmup", int, "untimed iterations first (after the compiling call)")
    p.add_argument(
        "--compile-backend",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="torch.compile backend (inductor; the others trace without code generation, for tests)",
    )
    add_run_options(p)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    backend, device = resolve_backend(args)
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    sizes = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in defaults.items()
    }
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"--steps must name some of {', '.join(STEPS)}, got {args.steps!r}")
    cfg = Config(
        ranks=args.ranks,
        backend=backend,
        device=device,
        steps=steps,
        train_mode=args.train_mode,
        capacity_factor=args.capacity_factor,
        shared_ffn=args.shared_ffn,
        compile_backend=args.compile_backend,
        nvl=args.nvl,
        seed=args.seed,
        **sizes,
    )
    if cfg.ranks < 1 or cfg.iters < 1 or cfg.warmup < 0:
        raise ValueError("--ranks and --iters must be >= 1 and --warmup >= 0")
    for experts, topk, what in (
        (cfg.experts, cfg.topk, ""),
        (cfg.decode_experts, cfg.decode_topk, "decode-"),
    ):
        if experts % cfg.ranks != 0:
            raise ValueError(f"--{what}experts ({experts}) must be a multiple of --ranks ({cfg.ranks})")
        if not 0 < topk <= experts:
            raise ValueError(f"--{what}topk ({topk}) must be in 1..--{what}experts ({experts})")
    if cfg.capacity_factor is not None and not cfg.capacity_factor > 0:
        raise ValueError(f"--capacity-factor must be > 0, got {cfg.capacity_factor}")
    if cfg.device == "cuda" and cfg.compile_backend == "inductor" and cfg.warmup < 2:
        raise ValueError("--warmup must be >= 2 on GPUs: CUDA graphs are recorded on the second call")
    return cfg


def describe_config(cfg: Config) -> str:
    lines = []
    if "train" in cfg.steps:
        capacity = f", capacity factor {cfg.capacity_factor or 1.0}" if cfg.train_mode == "static" else ""
        lines.append(
            f"train:  {cfg.tokens} tokens/rank x hidden {cfg.hidden}, top-{cfg.topk} of {cfg.experts} "
            f"experts, ffn {cfg.ffn}, {cfg.train_mode} mode{capacity}, bfloat16 activations, "
            "float32 weights, forward + backward"
        )
    if "decode" in cfg.steps:
        lines.append(
            f"decode: {cfg.decode_tokens} tokens/rank x hidden {cfg.decode_hidden}, top-{cfg.decode_topk} "
            f"of {cfg.decode_experts} experts, ffn {cfg.decode_ffn}, low-latency mode, inference"
        )
    if cfg.shared_ffn:
        lines.append(f"shared expert: ffn {cfg.shared_ffn}")
    lines.append(f"median of {cfg.iters} iterations after {cfg.warmup} warm-up, barrier before each")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as error:
        raise SystemExit(f"python -m ep_ops.bench_moe: error: {error}") from None
    machine = describe_machine(cfg)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"ep_ops.bench_moe: MoELayer eager vs torch.compile on {machine}", flush=True)
    print(f"torch {torch.__version__}, {date}", flush=True)
    print(describe_config(cfg), flush=True)
    results = parallel_launch(
        cfg.ranks, worker, cfg, timeout=args.timeout, backend=cfg.backend, device=cfg.device
    )[0]
    print()
    print(format_table(results))
    failed = [r.step for r in results if not r.matches_eager]
    for r in results:
        print(
            f"check {r.step}: compiled matches eager on every rank: {'PASS' if r.matches_eager else 'FAIL'}"
        )
    if args.json:
        write_record(
            args.json, "ep_ops.bench_moe", argv, machine, date, cfg,
            results=[dataclasses.asdict(r) for r in results],
        )  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
