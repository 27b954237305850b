"""Stress on GPU_RANKS GPUs of one host (EP_OPS_GPU_RANKS, default 2), through ``ep_ops.Buffer``.

- ``test_one_buffer_many_random_shapes``: one Buffer per rank (sized once, as DeepEP users size
  it) through STRESS_STEPS steps of random shapes: normal dispatch / cached dispatch / combine
  (BF16 and FP8 with per-128 scales, exact and worst-token, 0 to 256 tokens a rank, hidden sizes
  from 8 to 7168, top-k with -1 holes, routing that sends everything to rank 0) interleaved with
  low-latency dispatch / combine (BF16, FP8, power-of-2 and UE8M0 scales, LogFMT, receive hooks,
  zero-copy, ``out=``, and a combine whose receive hook runs only after the next step's dispatch,
  DeepEP's two-micro-batch overlap). ``clean_low_latency_buffer`` is called where DeepEP users
  call it: before low-latency calls that follow normal-mode calls, and when the low-latency sizes
  (M, hidden, experts, top-k) change.
- ``test_two_low_latency_graphs_on_one_buffer``: two CUDA graphs captured on one Buffer, each a
  low-latency dispatch -> expert (x * 2) -> low-latency combine over static inputs (one BF16, one
  FP8 with receive hooks inside the graph and a rank without tokens), replayed interleaved with
  new routing copied in before each replay, with eager normal and low-latency calls in between.

Every output is compared with the pure-PyTorch reference (``ep_ops.reference``), bitwise (LogFMT
with a tolerance, as its docstring allows; low-latency recv_x rows past recv_count are unspecified
on the NVLink kernels, as in DeepEP, so they are masked). Every rank draws the same shapes from the same seeds
and rebuilds every rank's inputs to run the reference, so all ranks make the same calls.

The workers take their device from the Buffer: over gloo they run on CPU (the graphs then re-run
their function at each replay), which is how this file's own logic is checked without GPUs.
"""

import dataclasses
import random
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from cases import assert_same
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from test_buffer import decode, nvl_bytes

from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

TIMEOUT = 180  # seconds per launch; each takes well under a minute
BF16 = torch.bfloat16

# Normal mode. Hidden sizes for BF16 and FP8 (multiples of 128), and small BF16-only ones; 12
# channels (24 bytes a row, not a multiple of 16) take the collective fallback, on the same group.
FP8_HIDDENS = (128, 256, 1024, 2048, 7168)
SMALL_HIDDENS = (8, 12, 24, 40)
NORMAL_LOCAL_EXPERTS = (1, 3, 4, 8, 32)
# Low-latency mode.
LL_HIDDENS = (128, 512, 2048, 7168)
LL_NUM_MAX = (1, 8, 32, 128)  # num_max_dispatch_tokens_per_rank
LL_LOCAL_EXPERTS = (1, 3, 4, 8)
LL_MAX_ELEMENTS = 1 << 24  # cap on E_local * R * M * hidden (the reference builds it per rank)
LL_VARIANTS = ("plain", "hook", "zero_copy", "out", "deferred")
MAX_TOPK = 8
ZERO_TOKENS = 0.15  # chance that a rank has no tokens in a step


# ---------------------------------------------------------------------------------------------
# steps: one call sequence through a Buffer, checked against the reference
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormalSpec:
    """A normal-mode step: layout, dispatch, cached dispatch, combine (expert: x * 2).

    tokens[r]: rank r's token count. worst: "exact" (num_worst_tokens=0), "tight" (the most rows
    any rank receives) or "loose" (every token of every rank). hot: every token's experts are on
    rank 0."""

    seed: int
    tokens: tuple
    hidden: int
    num_experts: int
    num_topk: int
    fp8: bool = False
    worst: str = "exact"
    expert_alignment: int = 1
    bias: bool = False
    async_finish: bool = False
    hot: bool = False


@dataclasses.dataclass(frozen=True)
class LowLatencySpec:
    """A low-latency step: dispatch, expert (x * 2), combine. variant: plain, hook (both halves
    with return_recv_hook), zero_copy (combine reads get_next_low_latency_combine_buffer), out
    (combine into out=), deferred (hooks; the combine's receive runs after the next step's
    dispatch)."""

    seed: int
    tokens: tuple
    hidden: int
    num_experts: int
    num_topk: int
    num_max: int
    fp8: bool = False
    round_scale: bool = False
    ue8m0: bool = False
    logfmt: bool = False
    variant: str = "plain"
    hot: bool = False

    @property
    def sizes(self) -> tuple:
        """What clean_low_latency_buffer is called again for, when it changes."""
        return (self.num_max, self.hidden, self.num_experts, self.num_topk)


def _tokens(rng: random.Random, num_ranks: int, most: int) -> tuple:
    return tuple(0 if rng.random() < ZERO_TOKENS else rng.randint(1, most) for _ in range(num_ranks))


def normal_spec(
    seed: int, num_ranks: int, fp8: bool = False, worst: str = "exact", hiddens=None
) -> NormalSpec:
    rng = random.Random(seed)
    num_experts = rng.choice(NORMAL_LOCAL_EXPERTS) * num_ranks
    return NormalSpec(
        seed=seed,
        tokens=_tokens(rng, num_ranks, max(32, 512 // num_ranks)),
        hidden=rng.choice(hiddens or (FP8_HIDDENS if fp8 else FP8_HIDDENS + SMALL_HIDDENS)),
        num_experts=num_experts,
        num_topk=rng.randint(1, min(MAX_TOPK, num_experts)),
        fp8=fp8,
        worst=worst,
        expert_alignment=rng.choice((1, 1, 4, 128)),
        bias=rng.random() < 0.3,
        async_finish=rng.random() < 0.3,
        hot=rng.random() < 0.15,
    )


def ll_spec(
    seed: int, num_ranks: int, fp8: bool = False, variant: str = "plain", sizes=None, hiddens=LL_HIDDENS
) -> LowLatencySpec:
    """Random sizes, or ``sizes`` = (M, hidden, num_experts, num_topk) kept from an earlier step."""
    rng = random.Random(seed)
    if sizes is None:
        hidden = rng.choice(hiddens)
        num_experts = rng.choice(LL_LOCAL_EXPERTS) * num_ranks
        num_max = rng.choice(LL_NUM_MAX)
        while num_max > 1 and num_experts * num_max * hidden > LL_MAX_ELEMENTS:
            num_max //= 2
        sizes = (num_max, hidden, num_experts, rng.randint(1, min(MAX_TOPK, num_experts)))
    num_max, hidden, num_experts, num_topk = sizes
    round_scale = fp8 and rng.random() < 0.5
    return LowLatencySpec(
        seed=seed,
        tokens=_tokens(rng, num_ranks, num_max),
        hidden=hidden,
        num_experts=num_experts,
        num_topk=num_topk,
        num_max=num_max,
        fp8=fp8,
        round_scale=round_scale,
        ue8m0=round_scale and hidden % 512 == 0 and rng.random() < 0.5,
        logfmt=rng.random() < 0.2,
        variant=variant,
        hot=rng.random() < 0.15,
    )


def make_buffer(group):
    """A Buffer sized the way DeepEP users size it, for the largest shapes of this file: the
    dispatch/combine configs' NVLink size hint at hidden 7168 (BF16), and
    get_low_latency_rdma_size_hint(128, 7168, R, 8 * R)."""
    from ep_ops import Buffer

    num_ranks = group.size()
    num_nvl_bytes = nvl_bytes(max(FP8_HIDDENS), num_ranks, 2)
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        max(LL_NUM_MAX), max(LL_HIDDENS), num_ranks, max(LL_LOCAL_EXPERTS) * num_ranks
    )
    return Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)


def _routing(gen, num_tokens: int, num_topk: int, num_experts: int, hot_experts: int = 0) -> torch.Tensor:
    """[T, K] int64 distinct expert ids in random order, ~20% of them -1; with hot_experts, only
    experts below it (those of rank 0), the rest -1."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if hot_experts:
        scores[:, hot_experts:] -= 2
    ids = scores.topk(num_topk, dim=1).indices
    if hot_experts:
        ids = ids.masked_fill(ids >= hot_experts, -1)
    holes = torch.rand(ids.shape, generator=gen) < 0.2
    return ids.masked_fill(holes, -1).contiguous()


def _expert(received) -> torch.Tensor:
    """The expert of every test here: x * 2 (exact in BF16), on FP8 rows decoded first. Not the
    identity, so a combine that read the dispatched rows instead of its input would show."""
    return decode(received) * 2


def _mismatch(actual, expected) -> str:
    """Where two same-shaped tensors differ (a stale or misplaced row shows as a large difference)."""
    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return ""
    if actual.shape != expected.shape or actual.numel() == 0:
        return ""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    wrong = (a != e) & ~(a.isnan() & e.isnan())
    if not bool(wrong.any()):
        return ""
    first = tuple(int(i) for i in wrong.nonzero()[0])
    return (
        f"; {int(wrong.sum())} of {a.numel()} values differ, first at {first}: got {a[first].item()}, "
        f"expected {e[first].item()}; largest difference {(a - e)[wrong].abs().max().item()}"
    )


def check(actual, expected, what: str) -> None:
    """``assert_same`` (bitwise, with dtype, shape and strides), saying where values differ."""
    try:
        assert_same(actual, expected, what)
    except AssertionError as error:
        pairs = (
            zip(actual, expected, strict=False)
            if isinstance(expected, (tuple, list))
            else [(actual, expected)]
        )
        detail = "".join(_mismatch(a, e) for a, e in pairs)
        raise AssertionError(f"{error}{detail}") from None


def check_ll_rows(actual, expected, recv_count, what: str, scales: bool = False) -> None:
    """A low-latency recv_x or recv_x_scales ``[E_local, R*M, ...]``: bitwise, with dtype, shape
    and strides, on the rows below each local expert's count. Rows past it are unspecified on the
    NVLink kernels (as in DeepEP; zero in the reference), so they are zeroed first."""
    masked = actual.detach().cpu().clone()  # keeps the (column-major) strides
    for e, count in enumerate(recv_count.tolist()):
        masked[e, count:] = 0
    if scales:  # a last dim of 1 (UE8M0 at hidden 512) may have any stride: compare through a unit dim
        masked, expected = masked.unsqueeze(-1), expected.unsqueeze(-1)
    check(masked, expected, what)


def normal_inputs(spec: NormalSpec, num_ranks: int) -> dict:
    """Every rank's inputs on CPU: lists by rank of x, x_scales, topk_idx, topk_weights,
    is_token_in_rank, bias (None where absent)."""
    from ep_ops.reference import per_token_cast_to_fp8, reference_layout

    out = {k: [] for k in ("x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "bias")}
    hot_experts = spec.num_experts // num_ranks if spec.hot else 0
    for r in range(num_ranks):
        gen = torch.Generator().manual_seed(spec.seed * 1009 + r)
        num_tokens = spec.tokens[r]
        topk_idx = _routing(gen, num_tokens, spec.num_topk, spec.num_experts, hot_experts)
        x = torch.randn(num_tokens, spec.hidden, generator=gen).to(BF16)
        x_scales = None
        if spec.fp8:
            x, x_scales = per_token_cast_to_fp8(x)
        out["x"].append(x)
        out["x_scales"].append(x_scales)
        out["topk_idx"].append(topk_idx)
        out["topk_weights"].append(torch.rand(topk_idx.shape, generator=gen).masked_fill(topk_idx < 0, 0))
        out["is_token_in_rank"].append(reference_layout(topk_idx, spec.num_experts, num_ranks)[2])
        out["bias"].append(
            torch.randn(num_tokens, spec.hidden, generator=gen).to(BF16) if spec.bias else None
        )
    return out


def normal_step(buffer, spec: NormalSpec) -> None:
    from ep_ops.reference import reference_combine, reference_dispatch, reference_layout

    R, rank, device = buffer.group_size, buffer.rank, buffer.device  # noqa: N806
    E = spec.num_experts  # noqa: N806
    inp = normal_inputs(spec, R)
    mine = {k: None if v[rank] is None else v[rank].to(device) for k, v in inp.items()}
    topk_idx = mine["topk_idx"]

    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, event = buffer.get_dispatch_layout(
        topk_idx, E, async_finish=spec.async_finish
    )
    event.current_stream_wait()
    check(
        (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank),
        reference_layout(inp["topk_idx"][rank], E, R),
        "layout",
    )
    scales = inp["x_scales"] if spec.fp8 else None
    args = (inp["x"], scales, inp["topk_idx"], inp["topk_weights"], inp["is_token_in_rank"], E)
    expected = reference_dispatch(*args, spec.expert_alignment)
    most = max(int(expected[0][5][R - 1, j]) for j in range(R))  # rows the busiest rank receives
    num_worst = {"exact": 0, "tight": max(most, 1), "loose": max(sum(spec.tokens), 1)}[spec.worst]
    if num_worst:
        expected = reference_dispatch(*args, spec.expert_alignment, num_worst)
    e = expected[rank]

    x = (mine["x"], mine["x_scales"]) if spec.fp8 else mine["x"]
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=mine["topk_weights"],
        expert_alignment=spec.expert_alignment,
        num_worst_tokens=num_worst,
        async_finish=spec.async_finish,
    )
    event.current_stream_wait()
    expected_x = (e[0], e[1]) if spec.fp8 else e[0]
    check(recv_x, expected_x, f"dispatch recv_x (num_worst_tokens={num_worst})")
    check(
        (recv_topk_idx, recv_topk_weights, handle[0], handle[1]),
        (e[2], e[3], e[5], e[6]),
        "dispatch (recv_topk_idx, recv_topk_weights, rank_prefix_matrix, recv_src_idx)",
    )
    expected_counts = e[4].tolist() if num_worst == 0 else []
    assert counts == expected_counts, f"num_recv_tokens_per_expert_list {counts} != {expected_counts}"

    cached, *_ = buffer.dispatch(x, handle=handle)
    check(cached, expected_x, "cached dispatch recv_x")

    handles = [(inp["is_token_in_rank"][j], expected[j][5], expected[j][6]) for j in range(R)]
    combined, combined_weights, event = buffer.combine(
        _expert(recv_x),
        handle,
        topk_weights=recv_topk_weights,
        bias=mine["bias"],
        async_finish=spec.async_finish,
    )
    event.current_stream_wait()
    reference = reference_combine(
        [_expert((r[0], r[1]) if spec.fp8 else r[0]) for r in expected],
        [r[3] for r in expected],
        inp["bias"] if spec.bias else None,
        None,
        handles,
    )[rank]
    check((combined, combined_weights), reference, "combine (combined_x, combined_topk_weights)")


def ll_inputs(spec: LowLatencySpec, num_ranks: int) -> tuple:
    """Every rank's (x, topk_idx, topk_weights) on CPU, as lists by rank. Weights are random at the
    -1 entries too (DeepEP's test does the same): combine must ignore them."""
    xs, topks, weights = [], [], []
    hot_experts = spec.num_experts // num_ranks if spec.hot else 0
    for r in range(num_ranks):
        gen = torch.Generator().manual_seed(spec.seed * 1013 + r)
        topk_idx = _routing(gen, spec.tokens[r], spec.num_topk, spec.num_experts, hot_experts)
        xs.append(torch.randn(spec.tokens[r], spec.hidden, generator=gen).to(BF16))
        topks.append(topk_idx)
        weights.append(torch.rand(topk_idx.shape, generator=gen))
    return xs, topks, weights


def check_ll_dispatch(recv, recv_count, handle, expected, fp8: bool, what: str) -> None:
    """low_latency_dispatch's outputs against one rank's reference 6-tuple."""
    if fp8:
        assert isinstance(recv, tuple) and len(recv) == 2, f"{what}: FP8 recv_x must be a pair"
        check_ll_rows(recv[0], expected[0], expected[2], f"{what}: recv_x")
        check_ll_rows(recv[1], expected[1], expected[2], f"{what}: recv_x_scales", scales=True)
    else:
        check_ll_rows(recv, expected[0], expected[2], f"{what}: recv_x")
    received = (recv_count, handle[0], handle[1], handle[5])
    check(received, expected[2:], f"{what}: (recv_count, src_info, layout_range, recv_token_slots)")


def check_ll_combine(combined, reference, logfmt: bool, what: str) -> None:
    if logfmt:  # LogFMT-10 is lossy and libm's log2/exp2 bits are not part of the contract
        scale = float(reference.float().abs().max().clamp(min=1)) if reference.numel() else 1.0
        torch.testing.assert_close(
            combined.cpu().float(),
            reference.float(),
            rtol=2e-2,
            atol=2e-2 * scale,
            msg=lambda m: f"{what}: {m}",
        )
    else:
        check(combined, reference, what)


def ll_step(buffer, spec: LowLatencySpec, pending=None):
    """Runs ``pending`` (an earlier deferred step's finish) right after this step's dispatch was
    issued. Returns this step's finish for the deferred variant, None otherwise."""
    from ep_ops.reference import reference_low_latency_combine, reference_low_latency_dispatch

    R, rank, device = buffer.group_size, buffer.rank, buffer.device  # noqa: N806
    M, E = spec.num_max, spec.num_experts  # noqa: N806
    xs, topks, weights = ll_inputs(spec, R)
    x, topk_idx, topk_weights = (t[rank].to(device) for t in (xs, topks, weights))
    stats = torch.zeros(E // R, dtype=torch.int32, device=device)
    hooked = spec.variant in ("hook", "deferred")

    recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x,
        topk_idx,
        M,
        E,
        cumulative_local_expert_recv_stats=stats,
        use_fp8=spec.fp8,
        round_scale=spec.round_scale,
        use_ue8m0=spec.ue8m0,
        return_recv_hook=hooked,
    )
    if pending is not None:
        pending()
    hook()
    expected = reference_low_latency_dispatch(xs, topks, M, E, spec.fp8, spec.round_scale, spec.ue8m0)
    check_ll_dispatch(recv, recv_count, handle, expected[rank], spec.fp8, "low_latency_dispatch")
    check(stats, expected[rank][2], "cumulative_local_expert_recv_stats")

    expert = _expert(recv)
    reference = reference_low_latency_combine(
        [_expert((r[0], r[1]) if spec.fp8 else r[0]) for r in expected], topks, weights, M, E, spec.logfmt
    )[rank]
    combine_x, out, kwargs = expert, None, {}
    if spec.variant == "zero_copy":
        buffer.get_next_low_latency_combine_buffer(handle).copy_(expert)
        combine_x, kwargs["zero_copy"] = torch.zeros_like(expert), True  # only its shape counts
    elif spec.variant == "out":
        out = torch.full((x.size(0), spec.hidden), float("nan"), dtype=BF16, device=device)
        kwargs["out"] = out
    combined, _, combine_hook = buffer.low_latency_combine(
        combine_x, topk_idx, topk_weights, handle, use_logfmt=spec.logfmt, return_recv_hook=hooked, **kwargs
    )

    def finish(inputs=(combine_x, topk_idx, topk_weights)) -> None:  # inputs: alive until the receive
        combine_hook()
        if out is not None:
            assert combined.data_ptr() == out.data_ptr(), "low_latency_combine: result not written to out"
        check_ll_combine(combined, reference, spec.logfmt, "low_latency_combine")

    if spec.variant == "deferred":
        return finish
    finish()
    return None


# ---------------------------------------------------------------------------------------------
# one Buffer, many random shapes
# ---------------------------------------------------------------------------------------------

NORMAL_KINDS = ("normal", "normal_fp8", "normal_worst", "normal_worst_fp8")
LL_KINDS = tuple(f"ll{'_fp8' if fp8 else ''}_{variant}" for fp8 in (False, True) for variant in LL_VARIANTS)
STEP_KINDS = NORMAL_KINDS + LL_KINDS
STRESS_STEPS = 48
STRESS_SEED = 6


def schedule(num_steps: int, seed: int) -> list:
    """Step kinds, each at least num_steps // len(STEP_KINDS) times, shuffled; the same on every rank."""
    rng = random.Random(seed)
    kinds = list(STEP_KINDS) * (num_steps // len(STEP_KINDS))
    kinds += rng.choices(STEP_KINDS, k=num_steps - len(kinds))
    rng.shuffle(kinds)
    return kinds


def stress_specs(num_steps: int, seed: int, num_ranks: int) -> list:
    """One spec per step. A low-latency step keeps the previous low-latency step's sizes right
    after a deferred step (so that receive overlaps this step's dispatch) and 60% of the time
    otherwise, else draws new ones."""
    specs, sizes = [], None
    for i, kind in enumerate(schedule(num_steps, seed)):
        step_seed = 1000 * seed + i
        fp8 = "fp8" in kind
        if kind.startswith("normal"):
            specs.append(
                normal_spec(
                    step_seed, num_ranks, fp8, "exact" if "worst" not in kind else ("tight", "loose")[i % 2]
                )
            )
            continue
        after_deferred = bool(specs) and getattr(specs[-1], "variant", None) == "deferred"
        keep = sizes is not None and (after_deferred or random.Random(step_seed).random() < 0.6)
        variant = next(v for v in LL_VARIANTS if kind.endswith(v))
        spec = ll_spec(step_seed, num_ranks, fp8, variant, sizes if keep else None)
        specs.append(spec)
        sizes = spec.sizes
    return specs


def run_steps(buffer, specs: list) -> dict:
    """Runs the steps in order, calling clean_low_latency_buffer where DeepEP users do and
    finishing a deferred receive after the next dispatch when that one has the same sizes (else
    first). Returns counts of what happened."""
    pending, dirty, sizes = None, False, None
    done = Counter()
    for i, spec in enumerate(specs):
        try:
            if isinstance(spec, NormalSpec):
                if pending is not None:
                    pending()
                    pending = None
                normal_step(buffer, spec)
                dirty = True
                done[f"normal{'_worst' if spec.worst != 'exact' else ''}{'_fp8' if spec.fp8 else ''}"] += 1
                continue
            if pending is not None and spec.sizes != sizes:
                pending()
                pending = None
            if dirty or spec.sizes != sizes:
                buffer.clean_low_latency_buffer(spec.num_max, spec.hidden, spec.num_experts)
                done["clean_low_latency_buffer"] += 1
            done["overlapped"] += pending is not None
            pending = ll_step(buffer, spec, pending)
            dirty, sizes = False, spec.sizes
            done[f"ll{'_fp8' if spec.fp8 else ''}_{spec.variant}"] += 1
        except Exception as error:
            error.add_note(f"in step {i} of the stress run: {spec}")
            raise
    if pending is not None:
        pending()
    return dict(done)


def stress_worker(rank, num_ranks, group_name, num_steps=STRESS_STEPS, seed=STRESS_SEED):
    import ep_ops  # noqa: F401  (loads the ops)

    buffer = make_buffer(dist.group.WORLD)
    done = run_steps(buffer, stress_specs(num_steps, seed, num_ranks))
    buffer.destroy()
    return done


def test_one_buffer_many_random_shapes():
    results = parallel_launch(GPU_RANKS, stress_worker, backend="nccl", device="cuda", timeout=TIMEOUT)
    assert all(r == results[0] for r in results), results
    done = results[0]
    assert sum(done.get(k, 0) for k in STEP_KINDS) == STRESS_STEPS, done
    assert all(done.get(k, 0) > 0 for k in STEP_KINDS), done
    assert done["overlapped"] > 0 and done["clean_low_latency_buffer"] > 0, done


# ---------------------------------------------------------------------------------------------
# two CUDA graphs of the low-latency path on one Buffer
# ---------------------------------------------------------------------------------------------

# M, hidden, experts per rank, top-k: DeepEP's decode M with a smaller hidden size, so that every
# rank's CPU reference of every rank stays quick at 4 and 8 ranks (7168 is covered by
# test_ll_cuda.py and the benchmark).
GRAPH_SIZES = (128, 2048, 8, 6)
# Replay order; "normal", "ll" and "ll_resized" are eager steps in between (after "normal",
# clean_low_latency_buffer, as DeepEP users do before going back to low-latency calls).
# "ll_resized" has another hidden size, so its slabs lie elsewhere: the send after it (a replay)
# must first wait until the peers have read everything (decided on the device, ll_common.cuh).
GRAPH_ORDER = (
    "g1", "g2", "g2", "g1", "g1", "g2", "normal", "g1", "g2", "ll", "g2", "g1",
    "ll_resized", "g1", "ll_resized", "g2", "g2",
)  # fmt: skip
GRAPH_RESIZED_HIDDEN = 1024


class Graph:
    """``fn`` captured in a CUDA graph (its outputs are ``outputs``); on CPU, where these workers
    also run to check the test logic, ``replay`` calls ``fn`` again and copies its results over."""

    def __init__(self, fn, device: torch.device):
        self.fn = fn
        self.graph = None
        if device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn()
        else:
            self.outputs = fn()

    def replay(self) -> None:
        if self.graph is None:
            for out, new in zip(self.outputs, self.fn(), strict=True):
                out.copy_(new)
            return
        self.graph.replay()
        torch.cuda.synchronize()


def ll_round_trip(buffer, static: dict, spec: LowLatencySpec):
    """The captured function: low-latency dispatch -> x * 2 -> low-latency combine over the static
    inputs. Returns (recv_x[, recv_x_scales], recv_count, combined_x)."""
    hooked = spec.variant == "hook"

    def step():
        recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            static["x"],
            static["topk_idx"],
            spec.num_max,
            spec.num_experts,
            use_fp8=spec.fp8,
            return_recv_hook=hooked,
        )
        hook()
        combined, _, hook = buffer.low_latency_combine(
            _expert(recv), static["topk_idx"], static["topk_weights"], handle, return_recv_hook=hooked
        )
        hook()
        return (*(recv if spec.fp8 else (recv,)), recv_count, combined)

    return step


def check_round_trip(outputs, spec: LowLatencySpec, inputs, rank: int, what: str) -> None:
    from ep_ops.reference import reference_low_latency_combine, reference_low_latency_dispatch

    xs, topks, weights = inputs
    M, E = spec.num_max, spec.num_experts  # noqa: N806
    expected = reference_low_latency_dispatch(xs, topks, M, E, spec.fp8)
    e = expected[rank]
    recv = (outputs[0], outputs[1]) if spec.fp8 else outputs[0]
    if spec.fp8:
        check_ll_rows(recv[0], e[0], e[2], f"{what}: recv_x")
        check_ll_rows(recv[1], e[1], e[2], f"{what}: recv_x_scales", scales=True)
    else:
        check_ll_rows(recv, e[0], e[2], f"{what}: recv_x")
    check(outputs[-2], e[2], f"{what}: recv_count")
    reference = reference_low_latency_combine(
        [_expert((r[0], r[1]) if spec.fp8 else r[0]) for r in expected], topks, weights, M, E
    )[rank]
    check(outputs[-1], reference, f"{what}: combined_x")


def graph_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401

    buffer = make_buffer(dist.group.WORLD)
    device = buffer.device
    M, hidden, local_experts, topk = GRAPH_SIZES  # noqa: N806
    sizes = (M, hidden, local_experts * num_ranks, topk)
    base = LowLatencySpec(seed=0, tokens=(), hidden=hidden, num_experts=sizes[2], num_topk=topk, num_max=M)
    specs = {
        # every rank a different count, up to M
        "g1": dataclasses.replace(base, tokens=tuple(M - r for r in range(num_ranks))),
        # FP8 with receive hooks inside the graph; the last rank has no tokens
        "g2": dataclasses.replace(
            base,
            tokens=tuple(0 if r == num_ranks - 1 else M // 2 - r for r in range(num_ranks)),
            fp8=True,
            variant="hook",
        ),
    }
    statics, graphs = {}, {}
    for name, spec in specs.items():  # the same order on every rank
        inputs = ll_inputs(dataclasses.replace(spec, seed=1), num_ranks)
        statics[name] = {
            k: t[rank].to(device) for k, t in zip(("x", "topk_idx", "topk_weights"), inputs, strict=True)
        }
        step = ll_round_trip(buffer, statics[name], spec)
        check_round_trip(step(), spec, inputs, rank, f"{name} eager, before capture")
        if device.type == "cuda":
            torch.cuda.synchronize()
        graphs[name] = Graph(step, device)

    replays = Counter()
    for i, name in enumerate(GRAPH_ORDER):
        seed = 100 + i
        what = f"step {i} ({name}) of {GRAPH_ORDER}"
        try:
            if name == "normal":
                normal_step(buffer, normal_spec(seed, num_ranks))
                buffer.clean_low_latency_buffer(M, hidden, sizes[2])
                continue
            if name == "ll":
                ll_step(buffer, ll_spec(seed, num_ranks, fp8=True, variant="hook", sizes=sizes))
                continue
            if name == "ll_resized":
                resized = (M, GRAPH_RESIZED_HIDDEN, *sizes[2:])
                ll_step(buffer, ll_spec(seed, num_ranks, variant="hook", sizes=resized))
                continue
            spec = dataclasses.replace(specs[name], seed=seed, hot=i % 4 == 3)
            inputs = ll_inputs(spec, num_ranks)
            for key, values in zip(("x", "topk_idx", "topk_weights"), inputs, strict=True):
                statics[name][key].copy_(values[rank])
            graphs[name].replay()
            check_round_trip(graphs[name].outputs, spec, inputs, rank, f"replay of {name}")
            replays[name] += 1
        except Exception as error:
            error.add_note(f"in {what}")
            raise
    del graphs
    buffer.destroy()
    return dict(replays)


def test_two_low_latency_graphs_on_one_buffer():
    results = parallel_launch(GPU_RANKS, graph_worker, backend="nccl", device="cuda", timeout=TIMEOUT)
    expected = dict(Counter(name for name in GRAPH_ORDER if name.startswith("g")))
    assert results == [expected] * GPU_RANKS
