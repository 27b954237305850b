"""Deterministic per-rank inputs: every rank can rebuild every other rank's inputs from the
seed, so a worker runs the multi-rank reference locally and compares its own outputs."""

import dataclasses

import torch

from ep_ops.reference import per_token_cast_to_fp8, reference_layout


@dataclasses.dataclass(frozen=True)
class Case:
    num_tokens: int = 12
    hidden: int = 256
    num_topk: int = 3
    num_experts: int = 12
    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    with_topk: bool = True
    with_weights: bool = True
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    routing: str = "random"  # random | nowhere (all -1) | one_rank (everything to rank 0) | skewed
    seed: int = 0

    def tokens_of(self, rank: int) -> int:
        # Ranks get different token counts (one of them may get 0 when num_tokens is small).
        return max(0, self.num_tokens - 3 * rank) if self.num_tokens < 6 else self.num_tokens + rank


def fit_worst_tokens(num_worst_tokens: int, case: Case, world_size: int) -> int:
    """``num_worst_tokens`` doubled until it bounds what one rank can receive at this world size
    (every token of every rank); 0 (exact mode) stays 0."""
    most = sum(case.tokens_of(r) for r in range(world_size))
    while 0 < num_worst_tokens < most:
        num_worst_tokens *= 2
    return num_worst_tokens


def for_world(case: Case, world_size: int) -> Case:
    """``case`` made valid on ``world_size`` ranks, unchanged where it already is: the expert
    count rounded up to a multiple of the ranks (with ``num_topk`` experts on rank 0 for the
    ``one_rank`` routing), and the worst-token bound grown to fit every token of every rank."""
    num_experts = case.num_experts
    per_rank = -(-num_experts // world_size)
    if case.routing == "one_rank":
        per_rank = max(per_rank, case.num_topk)
    if num_experts % world_size or num_experts // world_size < per_rank:
        num_experts = per_rank * world_size
    worst = fit_worst_tokens(case.num_worst_tokens, case, world_size)
    return dataclasses.replace(case, num_experts=num_experts, num_worst_tokens=worst)


def routing_of(case: Case, rank: int, world_size: int) -> torch.Tensor:
    """[T, K] int64 expert ids with -1 holes; distinct ids per token."""
    gen = torch.Generator().manual_seed(1000 * case.seed + rank)
    num_tokens = case.tokens_of(rank)
    scores = torch.rand(num_tokens, case.num_experts, generator=gen)
    topk = scores.topk(case.num_topk, dim=1).indices
    holes = torch.rand(num_tokens, case.num_topk, generator=gen) < 0.2
    topk = topk.masked_fill(holes, -1)
    if case.routing == "nowhere":
        topk.fill_(-1)
    elif case.routing == "one_rank":
        per_rank = case.num_experts // world_size
        topk = torch.stack(
            [torch.randperm(per_rank, generator=gen)[: case.num_topk] for _ in range(num_tokens)]
        )
        topk = topk.reshape(num_tokens, case.num_topk).to(torch.int64)
    elif case.routing == "skewed":
        topk[:, 0] = 0
        topk[:, 1:] = torch.where(topk[:, 1:] == 0, -1, topk[:, 1:])
    return topk.contiguous()


def inputs_of(case: Case, rank: int, world_size: int) -> dict:
    """Everything rank `rank` passes to dispatch for `case`."""
    gen = torch.Generator().manual_seed(1000 * case.seed + 100 + rank)
    num_tokens = case.tokens_of(rank)
    x = torch.randn(num_tokens, case.hidden, generator=gen).to(case.dtype)
    x_scales = None
    if case.fp8:
        x, x_scales = per_token_cast_to_fp8(x.to(torch.bfloat16))
    topk_idx = routing_of(case, rank, world_size)
    _, _, is_token_in_rank = reference_layout(topk_idx, case.num_experts, world_size)
    weights = torch.rand(num_tokens, case.num_topk, generator=gen).masked_fill(topk_idx < 0, 0)
    return {
        "x": x,
        "x_scales": x_scales,
        "topk_idx": topk_idx if case.with_topk else None,
        "topk_weights": weights if case.with_topk and case.with_weights else None,
        "is_token_in_rank": is_token_in_rank,
    }


def all_inputs(case: Case, world_size: int) -> list[dict]:
    return [inputs_of(case, r, world_size) for r in range(world_size)]


def assert_same(actual, expected, what: str) -> None:
    """Bitwise equality of tensors (or tuples of tensors), dtype, shape and stride included."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{what}[{i}]")
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel():
        # Strides of size-1 dims carry no meaning (opcheck ignores them too).
        significant = [d for d in range(actual.dim()) if actual.size(d) > 1]
        a_strides = [actual.stride(d) for d in significant]
        e_strides = [expected.stride(d) for d in significant]
        assert a_strides == e_strides, f"{what}: stride {actual.stride()} != {expected.stride()}"
    # reshape(-1) gives stride 1 even where a size-1 last dim had another stride.
    a, e = actual.cpu(), expected.cpu()
    if a.numel():
        a, e = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, e))
    assert torch.equal(a, e), f"{what}: values differ"


def expect_error(exc_type, needles, fn, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)`` must raise exactly ``exc_type`` with every needle in its message;
    returns the message."""
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001  (the type is checked below)
        message = str(error)
        assert type(error) is exc_type, f"expected {exc_type.__name__}, got {type(error).__name__}: {message}"
        for needle in needles:
            assert needle in message, f"{needle!r} not in the message: {message}"
        return message
    raise AssertionError(f"expected {exc_type.__name__} containing {needles}, nothing was raised")
