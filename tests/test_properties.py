"""Property-based tests (hypothesis) of the ops against the pure-PyTorch reference, inside gloo ranks.

One launch per world size (1, 2, 3): spawning ranks costs seconds, an example milliseconds. Every
rank runs the same ``@given`` tests with ``derandomize=True`` (and no database), so every rank
draws the same examples in the same order. An example is a handful of parameters (token count of
every rank, hidden size, top-k, experts per rank, routing pattern, payload, options, a seed); each
rank builds every rank's inputs from them, calls the op on its own share and compares with the
reference, bitwise.

Keeping the ranks in step: before an example the ranks check that they drew the same one (a
checksum all-reduce; a mismatch stops the property on every rank), and after it they agree on the
outcome (a pass/fail all-reduce), so hypothesis sees the same result on every rank and replays or
shrinks the same examples everywhere. A failure comes back from the launch as text (with
hypothesis' falsifying example) and fails the matching test below.

Properties (examples per world size in ``EXAMPLES``):

- ``normal``: get_dispatch_layout, dispatch (exact and worst-token mode, BF16 / float32 / FP8,
  with and without top-k and weights, any expert_alignment), cached_dispatch and combine (with 0,
  1 or 2 biases) equal the reference bitwise; num_worst_tokens exactly at the largest receive
  count works and one less fails on every rank with a ValueError naming num_worst_tokens; the
  round trip dispatch -> combine of small integers gives x * (number of ranks the token went to)
  exactly (FP8: within the FP8 error), and the combined top-k weights are the weights of the
  token's real experts, exactly.
- ``low_latency``: low_latency_dispatch (whole or send/recv halves; BF16, FP8, FP8 with power-of-2
  scales, UE8M0) and low_latency_combine (whole or halves, with or without LogFMT) equal the
  reference (LogFMT within a tolerance: libm bits are not part of the contract); the round trip
  dispatch -> combine gives x * (sum of the weights of the token's real experts): exactly for
  small integers and dyadic weights over BF16, within the format's error otherwise.

Routing patterns: random distinct experts, random with repeated experts, every token to one
expert (skewed), every token to one rank's experts, -1 everywhere; plus random -1 holes (hole
probability 1 is -1 everywhere too). Token counts start at 0.
"""

import dataclasses
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
from cases import assert_same
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ep_ops.launch import parallel_launch

WORLD_SIZES = (1, 2, 3)
# Examples per property and world size: 2 * (150 + 200 + 200) = 1,100 in all.
EXAMPLES = {1: 150, 2: 200, 3: 200}
TIMEOUT = 120  # one launch runs every property of one world size

ROUTINGS = ("random", "repeated", "one_expert", "one_rank", "nowhere")


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormalExample:
    tokens: tuple  # tokens of every rank
    hidden: int
    num_topk: int
    experts_per_rank: int
    routing: str
    hole_prob: float
    payload: str  # bf16 | fp32 | fp8
    with_topk: bool
    with_weights: bool
    expert_alignment: int
    worst: str  # exact | at_limit | above_limit
    num_biases: int
    seed: int


@dataclasses.dataclass(frozen=True)
class LowLatencyExample:
    tokens: tuple
    num_max: int  # num_max_dispatch_tokens_per_rank
    hidden: int
    num_topk: int
    experts_per_rank: int
    routing: str
    hole_prob: float
    fp8: str  # bf16 | fp8 | fp8_round | fp8_ue8m0
    values: str  # integers (dyadic weights) | random
    halves: bool  # the send/recv ops instead of the whole ones
    use_logfmt: bool
    seed: int


@st.composite
def normal_examples(draw, world_size: int) -> NormalExample:
    payload = draw(st.sampled_from(["bf16", "fp32", "fp8"]))
    with_topk = draw(st.sampled_from([True, True, True, False]))
    return NormalExample(
        tokens=tuple(draw(st.lists(st.integers(0, 10), min_size=world_size, max_size=world_size))),
        hidden=draw(st.sampled_from([128, 256] if payload == "fp8" else [8, 40, 128])),
        num_topk=draw(st.integers(1, 6)),
        experts_per_rank=draw(st.integers(1, 4)),
        routing=draw(st.sampled_from(ROUTINGS)),
        hole_prob=draw(st.sampled_from([0.0, 0.25, 1.0])),
        payload=payload,
        with_topk=with_topk,
        with_weights=with_topk and draw(st.booleans()),
        expert_alignment=draw(st.sampled_from([1, 2, 3, 8, 128])),
        worst=draw(st.sampled_from(["exact", "at_limit", "above_limit"])),
        num_biases=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**20)),
    )


@st.composite
def low_latency_examples(draw, world_size: int) -> LowLatencyExample:
    tokens = tuple(draw(st.lists(st.integers(0, 6), min_size=world_size, max_size=world_size)))
    fp8 = draw(st.sampled_from(["bf16", "bf16", "fp8", "fp8_round", "fp8_ue8m0"]))
    return LowLatencyExample(
        tokens=tokens,
        num_max=max(1, *tokens) + draw(st.sampled_from([0, 0, 1, 3])),  # often exactly at the limit
        hidden=512 if fp8 == "fp8_ue8m0" else draw(st.sampled_from([128, 256])),
        num_topk=draw(st.integers(1, 5)),
        experts_per_rank=draw(st.integers(1, 3)),
        routing=draw(st.sampled_from(ROUTINGS)),
        hole_prob=draw(st.sampled_from([0.0, 0.25, 1.0])),
        fp8=fp8,
        values=draw(st.sampled_from(["integers", "random"])),
        halves=draw(st.booleans()),
        use_logfmt=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


def routing_of(gen, num_tokens, num_topk, num_experts, num_ranks, routing, hole_prob, seed):
    """``[T, K]`` int64 global expert ids (-1 = none) for one rank."""
    shape = (num_tokens, num_topk)
    per_rank = num_experts // num_ranks
    if routing == "random":  # distinct experts (-1 in the columns past num_experts)
        order = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :num_topk]
        ids = torch.full(shape, -1, dtype=torch.int64)
        ids[:, : order.size(1)] = order
    elif routing == "repeated":  # the same expert may come twice in a row
        ids = torch.randint(0, num_experts, shape, generator=gen)
    elif routing == "one_expert":  # every token of every rank to one expert
        ids = torch.full(shape, -1, dtype=torch.int64)
        ids[:, 0] = seed % num_experts
    elif routing == "one_rank":  # every token to (distinct) experts of one rank
        order = torch.rand(num_tokens, per_rank, generator=gen).argsort(dim=1)[:, :num_topk]
        ids = torch.full(shape, -1, dtype=torch.int64)
        ids[:, : order.size(1)] = order + (seed % num_ranks) * per_rank
    else:  # nowhere
        ids = torch.full(shape, -1, dtype=torch.int64)
    holes = torch.rand(shape, generator=gen) < hole_prob
    if routing == "one_expert":
        holes[:, 0] = False
    return ids.masked_fill(holes, -1).contiguous()


def normal_inputs(ex: NormalExample, rank: int, num_ranks: int) -> dict:
    """Everything rank ``rank`` passes for ``ex``: payload x (+ scales), its small-integer twin
    x_int (+ scales), routing, weights (random even where topk_idx is -1: the op must drop them)
    and biases."""
    from ep_ops.reference import per_token_cast_to_fp8, reference_layout

    gen = torch.Generator().manual_seed(ex.seed * 1009 + rank)
    num_tokens, num_experts = ex.tokens[rank], ex.experts_per_rank * num_ranks
    topk_idx = routing_of(
        gen, num_tokens, ex.num_topk, num_experts, num_ranks, ex.routing, ex.hole_prob, ex.seed
    )
    _, _, is_token_in_rank = reference_layout(topk_idx, num_experts, num_ranks)
    x = torch.randn(num_tokens, ex.hidden, generator=gen)
    x_int = torch.randint(-8, 9, (num_tokens, ex.hidden), generator=gen).float()
    x_scales = x_int_scales = None
    if ex.payload == "fp8":
        x, x_scales = per_token_cast_to_fp8(x.to(torch.bfloat16))
        x_int, x_int_scales = per_token_cast_to_fp8(x_int.to(torch.bfloat16))
    else:
        dtype = torch.bfloat16 if ex.payload == "bf16" else torch.float32
        x, x_int = x.to(dtype), x_int.to(dtype)
    bias_dtype = torch.bfloat16 if ex.payload == "fp8" else x.dtype
    biases = [
        torch.randint(-4, 5, (num_tokens, ex.hidden), generator=gen).to(bias_dtype)
        for _ in range(ex.num_biases)
    ]
    return {
        "x": x,
        "x_scales": x_scales,
        "x_int": x_int,
        "x_int_scales": x_int_scales,
        "topk_idx": topk_idx,
        "topk_weights": torch.rand(num_tokens, ex.num_topk, generator=gen),
        "is_token_in_rank": is_token_in_rank,
        "biases": biases,
    }


def low_latency_inputs(ex: LowLatencyExample, rank: int, num_ranks: int) -> dict:
    gen = torch.Generator().manual_seed(ex.seed * 1013 + rank)
    num_tokens, num_experts = ex.tokens[rank], ex.experts_per_rank * num_ranks
    topk_idx = routing_of(
        gen, num_tokens, ex.num_topk, num_experts, num_ranks, ex.routing, ex.hole_prob, ex.seed
    )
    shape = (num_tokens, ex.num_topk)
    if ex.values == "integers":  # exact in BF16 all the way: small integers times quarters
        x = torch.randint(-4, 5, (num_tokens, ex.hidden), generator=gen).to(torch.bfloat16)
        weights = torch.randint(0, 5, shape, generator=gen).float() / 4
    else:
        x = torch.randn(num_tokens, ex.hidden, generator=gen).to(torch.bfloat16)
        weights = torch.rand(shape, generator=gen)
    return {"x": x, "topk_idx": topk_idx, "topk_weights": weights}


# ---------------------------------------------------------------------------------------------
# ranks in step
# ---------------------------------------------------------------------------------------------


class RanksDiverged(BaseException):  # noqa: N818  (BaseException: hypothesis must not shrink it)
    """The ranks drew different examples: the property stops on every rank."""


class ExampleFailed(AssertionError):
    """An example failed on some rank (raised on every rank)."""


class Ranks:
    def __init__(self, rank: int, num_ranks: int, group_name: str):
        import ep_ops  # noqa: F401  (loads the ops)

        self.rank, self.num_ranks, self.group_name = rank, num_ranks, group_name
        self.ops = torch.ops.ep_ops

    def _gather(self, value: int) -> list:
        """Every rank's ``value`` (an all-reduce of one-hot rows: gloo has no all-gather of
        tensors into one)."""
        row = torch.zeros(self.num_ranks, dtype=torch.int64)
        row[self.rank] = value
        dist.all_reduce(row)
        return row.tolist()

    def same_example(self, example) -> None:
        digests = self._gather(zlib.crc32(repr(example).encode()))
        if len(set(digests)) != 1:
            raise RanksDiverged(f"ranks drew different examples (checksums {digests}); this one: {example}")

    def agree(self, error) -> None:
        """Raises on every rank when the example failed on any rank, the same exception type from
        the same line everywhere (and without the local error as its context): hypothesis tells
        failures apart by where they were raised, and must shrink the same way on every rank."""
        failed = self._gather(0 if error is None else 1)
        if any(failed):
            bad = [r for r, f in enumerate(failed) if f]
            here = "".join(traceback.format_exception(error)) if error is not None else "passed here\n"
            raise ExampleFailed(f"rank(s) {bad} failed this example; on rank {self.rank}: {here}")

    def run(self, name: str, strategy, body, max_examples: int) -> dict:
        """Runs ``body(self, example)`` over hypothesis' examples in step with the other ranks."""
        calls = 0

        @settings(
            derandomize=True,
            database=None,
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
            print_blob=False,
        )
        @given(example=strategy)
        def prop(example):
            nonlocal calls
            calls += 1
            self.same_example(example)
            error = None
            try:
                body(self, example)
            except Exception as e:  # noqa: BLE001  (shared with the other ranks, then re-raised)
                error = e
            self.agree(error)

        try:
            prop()
        except (Exception, RanksDiverged):
            return {
                "examples": calls,
                "error": f"rank {self.rank}, property {name}:\n{traceback.format_exc()}",
            }
        return {"examples": calls, "error": None}


# ---------------------------------------------------------------------------------------------
# properties (run inside the ranks)
# ---------------------------------------------------------------------------------------------


def _column(inputs, key):
    values = [i[key] for i in inputs]
    return None if values[0] is None else values


def check_normal(r: Ranks, ex: NormalExample) -> None:
    from ep_ops.reference import (
        per_token_cast_back,
        reference_cached_dispatch,
        reference_combine,
        reference_dispatch,
        reference_layout,
    )

    R, rank, ops, g = r.num_ranks, r.rank, r.ops, r.group_name  # noqa: N806
    num_experts = ex.experts_per_rank * R
    inputs = [normal_inputs(ex, i, R) for i in range(R)]
    me = inputs[rank]
    mask = me["is_token_in_rank"]
    topk_idx = me["topk_idx"] if ex.with_topk else None
    weights = me["topk_weights"] if ex.with_weights else None
    column = {key: _column(inputs, key) for key in ("x", "x_scales", "is_token_in_rank")}
    column["topk_idx"] = _column(inputs, "topk_idx") if ex.with_topk else None
    column["topk_weights"] = _column(inputs, "topk_weights") if ex.with_weights else None

    assert_same(
        ops.get_dispatch_layout(me["topk_idx"], num_experts, R),
        reference_layout(me["topk_idx"], num_experts, R),
        "get_dispatch_layout",
    )

    def reference(num_worst_tokens):
        return reference_dispatch(
            column["x"], column["x_scales"], column["topk_idx"], column["topk_weights"],
            column["is_token_in_rank"], num_experts, ex.expert_alignment, num_worst_tokens,
        )  # fmt: skip

    def dispatch(num_worst_tokens):
        return ops.dispatch(
            me["x"], me["x_scales"], topk_idx, weights, mask, num_experts, ex.expert_alignment,
            num_worst_tokens, g,
        )  # fmt: skip

    exact = reference(0)
    most = max(int(exact[j][5][R - 1, j]) for j in range(R))  # the most rows any rank receives
    num_worst_tokens = {"exact": 0, "at_limit": most, "above_limit": most + 1 + ex.seed % 3}[ex.worst]
    expected = exact if num_worst_tokens == 0 else reference(num_worst_tokens)
    out = dispatch(num_worst_tokens)
    assert_same(out, expected[rank], f"dispatch (num_worst_tokens={num_worst_tokens})")
    if ex.worst == "at_limit" and most > 1:
        # One row short of the limit: every rank raises (all of them know every rank's count).
        # (With most == 1, one less is 0: exact mode.)
        try:
            dispatch(most - 1)
        except ValueError as error:
            assert "num_worst_tokens" in str(error) and str(most) in str(error), str(error)
        else:
            raise AssertionError(f"dispatch with num_worst_tokens={most - 1} < {most} rows did not raise")

    handles = [(inputs[i]["is_token_in_rank"], expected[i][5], expected[i][6]) for i in range(R)]
    cached = ops.cached_dispatch(me["x"], me["x_scales"], mask, out[5], out[6], g)
    assert_same(
        cached,
        reference_cached_dispatch(column["x"], column["x_scales"], handles)[rank],
        "cached_dispatch",
    )

    if ex.payload != "fp8":
        biases = [inputs[i]["biases"] for i in range(R)]
        bias_0 = [b[0] for b in biases] if ex.num_biases >= 1 else None
        bias_1 = [b[1] for b in biases] if ex.num_biases >= 2 else None
        recv_weights = [expected[i][3] for i in range(R)] if ex.with_weights else None
        combined = ops.combine(
            out[0], out[3] if ex.with_weights else None, None if bias_0 is None else bias_0[rank],
            None if bias_1 is None else bias_1[rank], mask, out[5], out[6], g,
        )  # fmt: skip
        reference_out = reference_combine(
            [expected[i][0] for i in range(R)], recv_weights, bias_0, bias_1, handles
        )
        assert_same(combined, reference_out[rank], "combine")

    # Round trip of small integers along the same handle: each token comes back once per rank
    # it went to; its weights come back once per real expert.
    recv_int, recv_int_scales = ops.cached_dispatch(me["x_int"], me["x_int_scales"], mask, out[5], out[6], g)
    rows = recv_int if ex.payload != "fp8" else per_token_cast_back(recv_int, recv_int_scales)
    combined_int, combined_weights = ops.combine(
        rows, out[3] if ex.with_weights else None, None, None, mask, out[5], out[6], g
    )
    copies = mask.sum(dim=1, keepdim=True).float()
    if ex.payload == "fp8":
        sent = per_token_cast_back(me["x_int"], me["x_int_scales"]).float()
        target = sent * copies
        # Rows are decoded exactly on both sides; only the BF16 sums of up to R copies round.
        torch.testing.assert_close(combined_int.float(), target, rtol=2**-7, atol=0)
    else:
        target = (me["x_int"].float() * copies + 0.0).to(me["x_int"].dtype)  # + 0.0: no -0.0
        assert_same(combined_int, target, "round trip dispatch -> combine")
    if ex.with_weights:
        real = me["topk_weights"].masked_fill(me["topk_idx"] < 0, 0)
        assert_same(combined_weights, real, "round trip of topk_weights")


def check_low_latency(r: Ranks, ex: LowLatencyExample) -> None:
    from ep_ops.reference import (
        per_token_cast_back,
        reference_low_latency_combine,
        reference_low_latency_dispatch,
    )

    R, rank, ops, g = r.num_ranks, r.rank, r.ops, r.group_name  # noqa: N806
    num_experts, M = ex.experts_per_rank * R, ex.num_max  # noqa: N806
    use_fp8 = ex.fp8 != "bf16"
    round_scale = ex.fp8 in ("fp8_round", "fp8_ue8m0")
    use_ue8m0 = ex.fp8 == "fp8_ue8m0"
    inputs = [low_latency_inputs(ex, i, R) for i in range(R)]
    xs, topks, weights = (_column(inputs, key) for key in ("x", "topk_idx", "topk_weights"))
    x, topk_idx, topk_weights = xs[rank], topks[rank], weights[rank]

    expected = reference_low_latency_dispatch(xs, topks, M, num_experts, use_fp8, round_scale, use_ue8m0)
    options = (M, num_experts, use_fp8, round_scale, use_ue8m0, g)
    if ex.halves:
        packed = ops.low_latency_dispatch_send(x, topk_idx, *options)
        out = ops.low_latency_dispatch_recv(
            packed, M, ex.hidden, ex.num_topk, num_experts, use_fp8, use_ue8m0, g
        )
    else:
        out = ops.low_latency_dispatch(x, topk_idx, *options)
    assert_same(out, expected[rank], "low_latency_dispatch")

    # Identity experts: the received rows (FP8 decoded to BF16) go straight back.
    def expert_output(received):
        return received[0] if not use_fp8 else per_token_cast_back(received[0], received[1])

    expert_outs = [expert_output(expected[j]) for j in range(R)]
    slots = out[5]
    if ex.halves:
        partials = ops.low_latency_combine_send(
            expert_output(out), topk_idx, topk_weights, slots, M, ex.use_logfmt, g
        )
        combined = ops.low_latency_combine_recv(
            partials, topk_idx, ex.hidden, num_experts, M, ex.use_logfmt, g
        )
    else:
        combined = ops.low_latency_combine(
            expert_output(out), topk_idx, topk_weights, slots, M, ex.use_logfmt, g
        )
    reference_out = reference_low_latency_combine(expert_outs, topks, weights, M, num_experts, ex.use_logfmt)[
        rank
    ]
    if ex.use_logfmt:  # libm's log2/exp2 bits are not part of the contract
        assert combined.dtype == torch.bfloat16 and combined.shape == reference_out.shape
        torch.testing.assert_close(combined, reference_out, rtol=2e-2, atol=1e-2)
    else:
        assert_same(combined, reference_out, "low_latency_combine")

    # Round trip: x times the sum of the weights of the token's real experts (a repeated expert
    # counts once per top-k slot).
    weight_sum = topk_weights.masked_fill(topk_idx < 0, 0).sum(dim=1, keepdim=True)
    target = x.float() * weight_sum + 0.0  # + 0.0: sums start from +0.0, so no -0.0
    if ex.values == "integers" and not use_fp8 and not ex.use_logfmt:
        assert_same(combined, target.to(torch.bfloat16), "low-latency round trip")
        return
    # Error bound per element, relative to the row's scale (largest |x| times the sum of |w|):
    # BF16 partials and sum; FP8 adds 2^-4 of a group's amax; LogFMT-10 ~1% of each partial.
    rel = 2**-6 + (2**-3 if use_fp8 else 0) + (2**-4 if ex.use_logfmt else 0)
    scale = x.float().abs().amax(dim=1, keepdim=True) * weight_sum.abs()
    error = (combined.float() - target).abs()
    worst = (error - rel * scale).max() if error.numel() else torch.tensor(0.0)
    assert worst <= 1e-6, f"low-latency round trip off by {error.max()} (bound {rel} * row scale)"


PROPERTIES = {
    "normal": (normal_examples, check_normal),
    "low_latency": (low_latency_examples, check_low_latency),
}


def property_worker(rank, num_ranks, group_name, examples):
    ranks = Ranks(rank, num_ranks, group_name)
    return {
        name: ranks.run(name, strategy(num_ranks), body, examples)
        for name, (strategy, body) in PROPERTIES.items()
    }


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"{n}ranks")
def launch(request):
    num_ranks = request.param
    return num_ranks, parallel_launch(num_ranks, property_worker, EXAMPLES[num_ranks], timeout=TIMEOUT)


def _check(launch, name):
    num_ranks, results = launch
    outcomes = [result[name] for result in results]
    errors = [o["error"] for o in outcomes if o["error"]]
    assert not errors, "\n".join(errors)
    counts = {o["examples"] for o in outcomes}
    assert counts == {EXAMPLES[num_ranks]}, f"{name} on {num_ranks} rank(s): examples per rank {counts}"


def test_normal_properties(launch):
    _check(launch, "normal")


def test_low_latency_properties(launch):
    _check(launch, "low_latency")
