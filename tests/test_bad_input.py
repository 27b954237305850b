"""Bad input gets a clear error naming the argument, on every rank, and never a hang.

Every case runs on every rank of a gloo CPU group. After each error the same worker runs a good
dispatch and compares it bitwise with the reference: the group is still usable, nothing hung and
no rank is one collective ahead of the others. The exception types are those the C++ raises:
``TORCH_CHECK_VALUE`` -> ``ValueError``, ``TORCH_CHECK_TYPE`` -> ``TypeError``, ``TORCH_CHECK``
-> ``RuntimeError`` (the fakes use ``torch._check_value`` / ``_check_type`` to the same effect).

======================================  =================================================  ===========  ==========================================
category                                input (ops: ``torch.ops.ep_ops.*``; B = Buffer)      raises       message contains
======================================  =================================================  ===========  ==========================================
wrong dtype                             dispatch x int32; B.dispatch x int32                 TypeError    ``x must be``
                                        dispatch topk_idx int32; get_dispatch_layout too     TypeError    ``topk_idx``
                                        dispatch topk_weights float64                        TypeError    ``topk_weights``
                                        dispatch is_token_in_rank int32                      TypeError    ``is_token_in_rank``
                                        cached_dispatch / combine x int32                    TypeError    ``x must be``
                                        low_latency_dispatch x float32                       TypeError    ``x must be bfloat16``
                                        low_latency_combine topk_weights float64             TypeError    ``topk_weights``
                                        low_latency_combine_backward grad float32            TypeError    ``grad_combined_x``
                                        low_latency_*_recv packed/partials not uint8         TypeError    ``recv_packed`` / ``recv_partials``
wrong shape                             dispatch topk_weights with K+1 columns               ValueError   ``topk_weights``
                                        dispatch is_token_in_rank [T, R+1]                   ValueError   ``is_token_in_rank``
                                        dispatch / B.dispatch x 1-D                          ValueError   ``x``, ``2-D``
                                        dispatch / low_latency_dispatch topk_idx rows        ValueError   ``topk_idx``
                                        low_latency_dispatch_recv recv_packed shape          ValueError   ``recv_packed``
expert ids out of range                 get_dispatch_layout / dispatch / low_latency_*       ValueError   ``topk_idx``, ``num_experts``
                                        (ids >= num_experts, ids < -1)
FP8 payload                             dispatch hidden not a multiple of 128                ValueError   ``multiple of 128``
                                        dispatch float8 x without x_scales                   TypeError    ``x_scales``
                                        dispatch / cached_dispatch / B.dispatch x_scales     TypeError    ``x_scales``
                                        float16; x_scales with a wrong column count          ValueError   ``x_scales``
                                        low_latency_dispatch use_fp8, hidden 200             ValueError   ``multiple of 128``
low-latency token limit                 low_latency_dispatch / B.low_latency_dispatch /      ValueError   ``num_max_dispatch_tokens_per_rank``
                                        low_latency_combine: T > M
num_worst_tokens too small              dispatch / B.dispatch                                ValueError   ``num_worst_tokens (W)``, the row count
num_experts not a multiple of R         dispatch, get_dispatch_layout, low_latency_*,        ValueError   ``num_experts``, ``multiple``
                                        B.get_low_latency_rdma_size_hint
UE8M0 options                           use_ue8m0 without round_scale / without use_fp8      ValueError   ``use_ue8m0``, ``round_scale``/``use_fp8``
combine rows vs handle                  combine / B.combine x with N+1 rows                  ValueError   ``rows``, ``the handle``
recv_token_slots                        low_latency_combine wrong shape / int64              ValueError   ``recv_token_slots``
                                                                                             /TypeError
bad handle (Buffer)                     B.combine / B.low_latency_combine handle not a       ValueError   ``handle``
                                        tuple of the right length
bogus group_name                        dispatch, combine, low_latency_dispatch              ValueError   ``group_name``, the name
NVLink wait timeout                     B(timeout_s=0 / -1 / nan)                            ValueError   ``timeout_s must be``
                                        B(timeout_s="5")                                     TypeError    ``timeout_s must be``
one rank bad (header consensus)         only rank 1 passes bad input (dispatch,              rank 1: its  rank 1: its own; others: ``rank 1
                                        cached_dispatch, combine, low_latency_dispatch,      own; others  rejected its input``
                                        low_latency_combine); through B, failing the op's    RuntimeError
                                        checks or B's own Python checks (x 1-D, handle
                                        with topk_idx, bad handle, stats dtype, async_finish
                                        with return_recv_hook, out shape, zero_copy without
                                        the buffer, a destroyed Buffer)
ranks disagree                          hidden, x dtype, num_worst_tokens (dispatch),        ValueError   ``disagree`` and the field
                                        num_experts / M (low_latency_dispatch)               (all ranks)
fakes (FakeTensorMode + ShapeEnv)       the local (not data-dependent) categories above,     same types   same argument names
                                        on fake tensors, world size 2; bogus group_name
======================================  =================================================  ===========  ==========================================
"""

import logging

import pytest
import torch
from cases import Case, assert_same, expect_error, inputs_of
from torch.distributed.distributed_c10d import _resolve_process_group

from ep_ops.launch import parallel_launch

TIMEOUT = 240
BF16 = torch.bfloat16
HIDDEN = 256
NUM_TOPK = 3
EXPERTS_PER_RANK = 4
LL_MAX = 4  # num_max_dispatch_tokens_per_rank
LL_TOPK = 2
BOGUS_GROUP = "no_such_group_name"


# ---------------------------------------------------------------------------------------------
# helpers (run inside the ranks)
# ---------------------------------------------------------------------------------------------


class Ranks:
    """Everything a worker needs: the group, good inputs of every rank, and a good dispatch."""

    def __init__(self, rank: int, num_ranks: int, group_name: str):
        import ep_ops  # noqa: F401  (loads the ops)

        self.rank, self.num_ranks, self.group_name = rank, num_ranks, group_name
        self.group = _resolve_process_group(group_name)
        self.num_experts = EXPERTS_PER_RANK * num_ranks
        self.case = Case(num_tokens=6, hidden=HIDDEN, num_topk=NUM_TOPK, num_experts=self.num_experts, seed=5)
        self.all_inputs = [inputs_of(self.case, r, num_ranks) for r in range(num_ranks)]
        self.good_runs = 0
        mine = self.all_inputs[rank]
        self.x, self.topk_idx, self.weights = mine["x"], mine["topk_idx"], mine["topk_weights"]
        self.mask = mine["is_token_in_rank"]
        self.num_tokens = self.x.size(0)
        outputs = self.good_dispatch()
        self.recv_x, self.handle = outputs[0], (self.mask, outputs[5], outputs[6])
        # Low-latency inputs: LL_MAX - 1 tokens of every rank, and a good dispatch of them.
        gen = torch.Generator().manual_seed(11 + rank)
        self.ll_x = torch.randn(LL_MAX - 1, HIDDEN, generator=gen).to(BF16)
        self.ll_topk = torch.stack(
            [torch.randperm(self.num_experts, generator=gen)[:LL_TOPK] for _ in range(LL_MAX - 1)]
        )
        self.ll_weights = torch.rand(LL_MAX - 1, LL_TOPK, generator=gen)
        ll = self.ops.low_latency_dispatch(
            self.ll_x, self.ll_topk, LL_MAX, self.num_experts, False, False, False, group_name
        )
        self.ll_recv_x, self.ll_slots = ll[0], ll[5]

    @property
    def ops(self):
        return torch.ops.ep_ops

    def good_dispatch(self):
        """A dispatch of the good inputs, compared bitwise with the reference."""
        from ep_ops.reference import reference_dispatch

        inputs = self.all_inputs
        mine = inputs[self.rank]
        outputs = self.ops.dispatch(
            mine["x"], None, mine["topk_idx"], mine["topk_weights"], mine["is_token_in_rank"],
            self.num_experts, 1, 0, self.group_name,
        )  # fmt: skip
        expected = reference_dispatch(
            [i["x"] for i in inputs],
            None,
            [i["topk_idx"] for i in inputs],
            [i["topk_weights"] for i in inputs],
            [i["is_token_in_rank"] for i in inputs],
            self.num_experts,
        )[self.rank]
        assert_same(outputs, expected, f"good dispatch #{self.good_runs}")
        self.good_runs += 1
        return outputs

    def fails(self, exc_type, needles, fn, *args, **kwargs) -> str:
        """Every rank: this error; then a good dispatch still works."""
        message = expect_error(exc_type, needles, fn, *args, **kwargs)
        self.good_dispatch()
        return message

    def one_rank_fails(self, bad_rank, exc_type, needles, op_name, fn, *args, **kwargs) -> str:
        """``bad_rank`` gets its own error; the others learn that it rejected its input."""
        if self.rank == bad_rank:
            return self.fails(exc_type, needles, fn, *args, **kwargs)
        return self.fails(
            RuntimeError, [f"ep_ops.{op_name}", f"rank {bad_rank} rejected its input"], fn, *args, **kwargs
        )

    def dispatch(self, x=None, x_scales=None, topk_idx="good", topk_weights="good", mask=None, **kw):
        """ops.dispatch of the good inputs with some of them replaced."""
        return self.ops.dispatch(
            self.x if x is None else x,
            x_scales,
            self.topk_idx if isinstance(topk_idx, str) else topk_idx,
            self.weights if isinstance(topk_weights, str) else topk_weights,
            self.mask if mask is None else mask,
            kw.get("num_experts", self.num_experts),
            kw.get("expert_alignment", 1),
            kw.get("num_worst_tokens", 0),
            kw.get("group_name", self.group_name),
        )

    def ll_dispatch(self, x=None, topk_idx=None, **kw):
        return self.ops.low_latency_dispatch(
            self.ll_x if x is None else x,
            self.ll_topk if topk_idx is None else topk_idx,
            kw.get("num_max", LL_MAX),
            kw.get("num_experts", self.num_experts),
            kw.get("use_fp8", False),
            kw.get("round_scale", False),
            kw.get("use_ue8m0", False),
            kw.get("group_name", self.group_name),
        )

    def ll_combine(self, x=None, topk_idx=None, topk_weights=None, slots=None, **kw):
        return self.ops.low_latency_combine(
            self.ll_recv_x if x is None else x,
            self.ll_topk if topk_idx is None else topk_idx,
            self.ll_weights if topk_weights is None else topk_weights,
            self.ll_slots if slots is None else slots,
            kw.get("num_max", LL_MAX),
            kw.get("use_logfmt", False),
            kw.get("group_name", self.group_name),
        )

    def combine(self, x=None, topk_weights=None, group_name=None):
        mask, rpm, src = self.handle
        return self.ops.combine(
            self.recv_x if x is None else x, topk_weights, None, None, mask, rpm, src,
            group_name or self.group_name,
        )  # fmt: skip


def fp8_pair(x: torch.Tensor):
    from ep_ops.reference import per_token_cast_to_fp8

    return per_token_cast_to_fp8(x.to(BF16))


# ---------------------------------------------------------------------------------------------
# every rank passes the same kind of bad input (world size 2)
# ---------------------------------------------------------------------------------------------


def all_ranks_bad_worker(rank, num_ranks, group_name):
    from ep_ops import Buffer

    r = Ranks(rank, num_ranks, group_name)
    ops, x, T, E, R = r.ops, r.x, r.num_tokens, r.num_experts, num_ranks  # noqa: N806
    mask, rpm, src = r.handle
    messages = []
    fails = lambda *a, **k: messages.append(r.fails(*a, **k))  # noqa: E731

    # ---- wrong dtype
    fails(TypeError, ["ep_ops.dispatch", "x must be", "Int"], r.dispatch, x=x.to(torch.int32))
    fails(TypeError, ["topk_idx must be", "Long", "Int"], r.dispatch, topk_idx=r.topk_idx.int())
    fails(TypeError, ["topk_weights must be", "Double"], r.dispatch, topk_weights=r.weights.double())
    fails(TypeError, ["is_token_in_rank must be", "Bool"], r.dispatch, mask=r.mask.int())
    fails(TypeError, ["ep_ops.get_dispatch_layout", "topk_idx must be int64"],
          ops.get_dispatch_layout, r.topk_idx.int(), E, R)  # fmt: skip
    fails(TypeError, ["ep_ops.cached_dispatch", "x must be"], ops.cached_dispatch,
          x.int(), None, mask, rpm, src, group_name)  # fmt: skip
    fails(TypeError, ["ep_ops.combine", "x must be a floating dtype"], r.combine, x=r.recv_x.int())
    fails(TypeError, ["ep_ops.low_latency_dispatch", "x must be bfloat16"], r.ll_dispatch, x=r.ll_x.float())
    fails(TypeError, ["ep_ops.low_latency_combine", "topk_weights must be"],
          r.ll_combine, topk_weights=r.ll_weights.double())  # fmt: skip
    fails(TypeError, ["recv_token_slots must be int32"], r.ll_combine, slots=r.ll_slots.long())
    grad = torch.zeros(r.ll_x.shape, dtype=torch.float32)
    fails(TypeError, ["ep_ops.low_latency_combine_backward", "grad_combined_x must be"],
          ops.low_latency_combine_backward, grad, r.ll_recv_x, r.ll_topk, r.ll_weights, r.ll_slots,
          LL_MAX, group_name)  # fmt: skip
    fails(TypeError, ["ep_ops.low_latency_dispatch_recv", "recv_packed must be uint8"],
          ops.low_latency_dispatch_recv, torch.zeros(R, LL_MAX, 16, dtype=torch.int32), LL_MAX, HIDDEN,
          LL_TOPK, E, False, False, group_name)  # fmt: skip
    fails(TypeError, ["ep_ops.low_latency_combine_recv", "recv_partials must be uint8"],
          ops.low_latency_combine_recv, torch.zeros(R, LL_MAX, 16, dtype=torch.int32), r.ll_topk, HIDDEN,
          E, LL_MAX, False, group_name)  # fmt: skip

    # ---- wrong shape
    fails(
        ValueError,
        [f"topk_weights must have {NUM_TOPK} columns"],
        r.dispatch,
        topk_weights=torch.zeros(T, NUM_TOPK + 1),
    )
    fails(ValueError, ["is_token_in_rank must have", "columns"], r.dispatch,
          mask=torch.zeros(T, R + 1, dtype=torch.bool))  # fmt: skip
    fails(ValueError, ["x must be 2-D"], r.dispatch, x=x.flatten())
    fails(ValueError, ["topk_weights needs topk_idx"], r.dispatch, topk_idx=None)
    fails(ValueError, ["topk_idx must have", "rows"], r.dispatch, topk_idx=r.topk_idx[:-1], topk_weights=None)
    fails(ValueError, ["ep_ops.low_latency_dispatch", "topk_idx must have", "rows"],
          r.ll_dispatch, topk_idx=r.ll_topk[:-1])  # fmt: skip
    fails(ValueError, ["recv_packed must have shape"], ops.low_latency_dispatch_recv,
          torch.zeros(R, LL_MAX, 16, dtype=torch.uint8), LL_MAX, HIDDEN, LL_TOPK, E, False, False,
          group_name)  # fmt: skip

    # ---- expert ids out of range
    too_big, too_small = r.topk_idx.clone(), r.topk_idx.clone()
    too_big[0, 0], too_small[-1, -1] = E, -2
    for bad in (too_big, too_small):
        wrong = str(int(bad.max()) if int(bad.max()) >= E else int(bad.min()))
        fails(ValueError, ["ep_ops.get_dispatch_layout", "topk_idx holds expert ids", wrong, f"num_experts={E}"],
              ops.get_dispatch_layout, bad, E, R)  # fmt: skip
        fails(ValueError, ["ep_ops.dispatch", "topk_idx holds expert ids", wrong], r.dispatch, topk_idx=bad)
    ll_bad = r.ll_topk.clone()
    ll_bad[0, 1] = E + 3
    fails(ValueError, ["ep_ops.low_latency_dispatch", "topk_idx", str(E + 3), f"num_experts={E}"],
          r.ll_dispatch, topk_idx=ll_bad)  # fmt: skip
    ll_bad[0, 1] = -5
    fails(ValueError, ["ep_ops.low_latency_combine", "topk_idx", "-5"], r.ll_combine, topk_idx=ll_bad)

    # ---- FP8 payloads
    q, scales = fp8_pair(x)
    q_odd = torch.zeros(T, 200, dtype=torch.float8_e4m3fn)
    fails(ValueError, ["FP8 hidden size must be a multiple of 128, got 200"], r.dispatch, x=q_odd,
          x_scales=torch.ones(T, 1))  # fmt: skip
    fails(TypeError, ["x must be", "float8_e4m3fn with x_scales", "Float8_e4m3fn"], r.dispatch, x=q)
    fails(TypeError, ["x_scales must be", "Half"], r.dispatch, x=q, x_scales=scales.half())
    fails(ValueError, ["x_scales must have 2 columns"], r.dispatch, x=q, x_scales=torch.ones(T, 3))
    fails(TypeError, ["x must be float8_e4m3fn when x_scales is given"], r.dispatch, x=x, x_scales=scales)
    fails(TypeError, ["ep_ops.cached_dispatch", "x_scales must be"], ops.cached_dispatch, q, scales.double(),
          mask, rpm, src, group_name)  # fmt: skip
    fails(ValueError, ["ep_ops.low_latency_dispatch", "FP8 hidden size must be a multiple of 128, got 200"],
          r.ll_dispatch, x=torch.zeros(2, 200, dtype=BF16), topk_idx=r.ll_topk[:2], use_fp8=True)  # fmt: skip

    # ---- low-latency token limit
    many = torch.zeros(LL_MAX + 1, HIDDEN, dtype=BF16)
    many_topk = torch.zeros(LL_MAX + 1, LL_TOPK, dtype=torch.int64)
    fails(ValueError, [f"x has {LL_MAX + 1} tokens", f"num_max_dispatch_tokens_per_rank ({LL_MAX})"],
          r.ll_dispatch, x=many, topk_idx=many_topk)  # fmt: skip
    fails(ValueError, ["ep_ops.low_latency_combine", "num_max_dispatch_tokens_per_rank"], r.ll_combine,
          topk_idx=many_topk, topk_weights=torch.zeros(LL_MAX + 1, LL_TOPK))  # fmt: skip
    fails(ValueError, ["num_max_dispatch_tokens_per_rank must be positive"], r.ll_dispatch, num_max=0)

    # ---- num_worst_tokens too small: every rank names the same first overflowing rank
    received = [int(rpm[R - 1, j]) for j in range(R)]
    worst = max(received) - 1  # too small for at least one rank
    first = next(j for j in range(R) if received[j] > worst)
    fails(ValueError, [f"num_worst_tokens ({worst})", f"{received[first]} tokens rank {first} receives"],
          r.dispatch, num_worst_tokens=worst)  # fmt: skip
    fails(ValueError, ["num_worst_tokens must be >= 0"], r.dispatch, num_worst_tokens=-1)
    fails(ValueError, ["expert_alignment must be >= 1"], r.dispatch, expert_alignment=0)

    # ---- num_experts not a multiple of the world size
    odd = E + 1
    fails(ValueError, [f"num_experts ({odd}) must be a multiple of the number of ranks ({R})"],
          r.dispatch, num_experts=odd)  # fmt: skip
    fails(ValueError, ["ep_ops.get_dispatch_layout", f"num_experts ({odd})"], ops.get_dispatch_layout,
          r.topk_idx, odd, R)  # fmt: skip
    fails(ValueError, ["ep_ops.low_latency_dispatch", f"num_experts ({odd})"], r.ll_dispatch, num_experts=odd)
    fails(ValueError, ["num_experts must be positive"], r.dispatch, num_experts=0)

    # ---- UE8M0 options
    fails(ValueError, ["use_ue8m0 needs round_scale"], r.ll_dispatch, use_fp8=True, use_ue8m0=True)
    fails(ValueError, ["use_ue8m0 needs use_fp8"], r.ll_dispatch, round_scale=True, use_ue8m0=True)
    fails(ValueError, ["UE8M0 hidden size must be a multiple of 512"], r.ll_dispatch, use_fp8=True,
          round_scale=True, use_ue8m0=True)  # fmt: skip

    # ---- combine rows must match the handle
    n = r.recv_x.size(0)
    fails(ValueError, ["ep_ops.combine", f"x has {n + 1} rows but the handle received {n}"], r.combine,
          x=torch.zeros(n + 1, HIDDEN, dtype=r.recv_x.dtype))  # fmt: skip
    fails(
        ValueError,
        ["ep_ops.combine", "topk_weights must have"],
        r.combine,
        topk_weights=torch.zeros(n + 1, 3),
    )

    # ---- recv_token_slots from another shape
    fails(ValueError, ["recv_token_slots must have shape", "from the dispatch handle"], r.ll_combine,
          slots=r.ll_slots[:, :-1])  # fmt: skip
    fails(ValueError, ["x must have", "rows per expert"], r.ll_combine, x=r.ll_recv_x[:, :-1])

    # ---- a group_name that names no group
    for fn in (r.dispatch, r.combine, r.ll_dispatch, r.ll_combine):
        fails(ValueError, ["group_name", BOGUS_GROUP], fn, group_name=BOGUS_GROUP)

    # ---- the same through Buffer (arguments of the DeepEP signature)
    hint = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(HIDDEN * 4, R)
    buffer = Buffer(r.group, num_nvl_bytes=hint, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
        LL_MAX, HIDDEN, R, E))  # fmt: skip
    for bad_timeout, error in (
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
    ):
        fails(error, ["timeout_s must be"], Buffer, r.group, num_nvl_bytes=hint, timeout_s=bad_timeout)
    layout = buffer.get_dispatch_layout(r.topk_idx, E)
    kwargs = {
        "num_tokens_per_rank": layout[0],
        "is_token_in_rank": layout[3],
        "num_tokens_per_expert": layout[2],
    }
    fails(TypeError, ["ep_ops.dispatch", "x must be"], buffer.dispatch, x.int(), **kwargs)
    fails(ValueError, ["Buffer.dispatch", "x must have shape [*, *]"], buffer.dispatch, x.flatten(), **kwargs)
    fails(TypeError, ["x_scales must be"], buffer.dispatch, (q, scales.half()), **kwargs)
    fails(ValueError, ["x_scales"], buffer.dispatch, (q, scales, scales), **kwargs)
    fails(ValueError, [f"num_tokens_per_rank must have shape [{R}]"], buffer.dispatch, x, is_token_in_rank=layout[3],
          num_tokens_per_rank=layout[0][:1])  # fmt: skip
    fails(ValueError, ["num_tokens_per_expert is required"], buffer.dispatch, x, topk_idx=r.topk_idx,
          is_token_in_rank=layout[3])  # fmt: skip
    fails(ValueError, [f"num_worst_tokens ({worst})"], buffer.dispatch, x, topk_idx=r.topk_idx,
          num_worst_tokens=worst, **kwargs)  # fmt: skip
    handle = (rpm, src, mask)
    fails(ValueError, ["Buffer.combine", "handle must be the tuple"], buffer.combine, r.recv_x, handle[:2])
    fails(ValueError, ["x has"], buffer.combine, torch.zeros(n + 1, HIDDEN, dtype=r.recv_x.dtype), handle)
    fails(ValueError, ["use_ue8m0 needs round_scale"], buffer.low_latency_dispatch, r.ll_x, r.ll_topk,
          LL_MAX, E, use_fp8=True, use_ue8m0=True)  # fmt: skip
    fails(ValueError, ["num_max_dispatch_tokens_per_rank"], buffer.low_latency_dispatch, many, many_topk,
          LL_MAX, E)  # fmt: skip
    fails(TypeError, ["cumulative_local_expert_recv_stats must be torch.int32"], buffer.low_latency_dispatch,
          r.ll_x, r.ll_topk, LL_MAX, E, cumulative_local_expert_recv_stats=torch.zeros(E // R))  # fmt: skip
    fails(ValueError, ["Buffer.low_latency_combine", "handle must be the tuple"], buffer.low_latency_combine,
          r.ll_recv_x, r.ll_topk, r.ll_weights, (1, 2))  # fmt: skip
    fails(ValueError, ["num_experts (5) must be a multiple of num_ranks"],
          Buffer.get_low_latency_rdma_size_hint, LL_MAX, HIDDEN, 2, 5)  # fmt: skip
    buffer.destroy()

    # The fakes need a registered group for the world size: they run here too (no communication).
    fake_messages, fake_problems = check_fakes(rank, num_ranks, group_name)
    return len(messages), r.good_runs, len(fake_messages), fake_problems


@pytest.fixture(scope="module")
def two_ranks():
    """One launch of 2 ranks for the real ops and the fakes (spawning ranks is slow)."""
    return parallel_launch(2, all_ranks_bad_worker, timeout=TIMEOUT)


def test_every_rank_gets_the_error(two_ranks):
    counts = [result[:2] for result in two_ranks]
    assert counts[0] == counts[1], counts
    num_errors, num_good = counts[0]
    assert num_errors == 72 and num_good == num_errors + 1


# ---------------------------------------------------------------------------------------------
# only one rank passes bad input; ranks disagree (world size 3)
# ---------------------------------------------------------------------------------------------


def one_rank_bad_worker(rank, num_ranks, group_name):
    from ep_ops import Buffer

    r = Ranks(rank, num_ranks, group_name)
    ops, x, E, R = r.ops, r.x, r.num_experts, num_ranks  # noqa: N806
    mask, rpm, src = r.handle
    bad = rank == 1  # the one rank whose input is wrong
    messages = []

    def one(exc, needles, op, fn, *args, **kwargs):
        messages.append(r.one_rank_fails(1, exc, needles, op, fn, *args, **kwargs))

    one(TypeError, ["x must be"], "dispatch", r.dispatch, x=x.int() if bad else x)
    wrong_ids = r.topk_idx.clone()
    wrong_ids[0, 0] = E
    one(
        ValueError,
        ["topk_idx holds expert ids"],
        "dispatch",
        r.dispatch,
        topk_idx=wrong_ids if bad else r.topk_idx,
    )
    one(ValueError, ["topk_weights must have"], "dispatch", r.dispatch,
        topk_weights=torch.zeros(r.num_tokens, 1) if bad else r.weights)  # fmt: skip
    q, scales = fp8_pair(x)
    one(TypeError, ["x_scales must be"], "cached_dispatch", ops.cached_dispatch, q,
        scales.half() if bad else scales, mask, rpm, src, group_name)  # fmt: skip
    n = r.recv_x.size(0)
    one(ValueError, ["rows but the handle received"], "combine", r.combine,
        x=torch.zeros(n + 1, HIDDEN, dtype=r.recv_x.dtype) if bad else r.recv_x)  # fmt: skip
    many, many_topk = (
        torch.zeros(LL_MAX + 1, HIDDEN, dtype=BF16),
        torch.zeros(LL_MAX + 1, LL_TOPK, dtype=torch.int64),
    )
    one(ValueError, ["num_max_dispatch_tokens_per_rank"], "low_latency_dispatch", r.ll_dispatch,
        x=many if bad else None, topk_idx=many_topk if bad else None)  # fmt: skip
    one(ValueError, ["use_ue8m0 needs round_scale"], "low_latency_dispatch", r.ll_dispatch,
        use_fp8=True, use_ue8m0=bad)  # fmt: skip
    one(ValueError, ["recv_token_slots must have shape"], "low_latency_combine", r.ll_combine,
        slots=r.ll_slots[:, :-1] if bad else r.ll_slots)  # fmt: skip
    one(TypeError, ["x must be bfloat16"], "low_latency_combine", r.ll_combine,
        x=r.ll_recv_x.float() if bad else r.ll_recv_x)  # fmt: skip
    # Through Buffer: the op's own check on rank 1, the consensus on the others.
    buffer = Buffer(
        r.group, num_nvl_bytes=Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(HIDDEN * 4, R)
    )
    one(TypeError, ["x must be"], "dispatch", buffer.dispatch, x.int() if bad else x, is_token_in_rank=mask)
    # Buffer's own (Python) checks failing on rank 1 alone: rank 1 still takes part in the op's
    # header exchange, so the others raise instead of waiting or pairing with its next call.
    one(ValueError, ["Buffer.dispatch: x must have shape"], "dispatch", buffer.dispatch,
        x.flatten() if bad else x, is_token_in_rank=mask)  # fmt: skip
    handle = (rpm, src, mask)
    one(ValueError, ["topk_idx and topk_weights must be None when a handle is given"], "cached_dispatch",
        buffer.dispatch, x, handle=handle, topk_idx=r.topk_idx if bad else None)  # fmt: skip
    one(ValueError, ["Buffer.combine: handle must be the tuple"], "combine", buffer.combine, r.recv_x,
        handle[:2] if bad else handle)  # fmt: skip
    ll_buffer = Buffer(r.group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(LL_MAX, HIDDEN, R, E))
    stats = torch.zeros(E // R, dtype=torch.float32 if bad else torch.int32)
    one(TypeError, ["cumulative_local_expert_recv_stats must be torch.int32"], "low_latency_dispatch",
        ll_buffer.low_latency_dispatch, r.ll_x, r.ll_topk, LL_MAX, E,
        cumulative_local_expert_recv_stats=stats)  # fmt: skip
    one(ValueError, ["async_finish and return_recv_hook"], "low_latency_dispatch_send",
        ll_buffer.low_latency_dispatch, r.ll_x, r.ll_topk, LL_MAX, E, use_fp8=False, return_recv_hook=True,
        async_finish=bad)  # fmt: skip
    recv_x, _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(r.ll_x, r.ll_topk, LL_MAX, E, use_fp8=False)
    out = torch.empty(r.ll_x.size(0) + (1 if bad else 0), HIDDEN, dtype=BF16)
    one(ValueError, ["Buffer.low_latency_combine: out must have shape"], "low_latency_combine",
        ll_buffer.low_latency_combine, recv_x, r.ll_topk, r.ll_weights, ll_handle, out=out)  # fmt: skip
    one(ValueError, ["zero_copy=True", "get_next_low_latency_combine_buffer"], "low_latency_combine_send",
        ll_buffer.low_latency_combine, recv_x, r.ll_topk, r.ll_weights, ll_handle, zero_copy=bad,
        return_recv_hook=True)  # fmt: skip
    if bad:
        ll_buffer.destroy()
    one(RuntimeError, ["Buffer was destroyed"], "low_latency_dispatch", ll_buffer.low_latency_dispatch,
        r.ll_x, r.ll_topk, LL_MAX, E)  # fmt: skip
    ll_buffer.destroy()

    # ---- ranks disagree: every rank raises ValueError naming the field
    def disagree(field, fn, *args, **kwargs):
        messages.append(r.fails(ValueError, ["ranks disagree on", field], fn, *args, **kwargs))

    wide = torch.zeros(r.num_tokens, HIDDEN * (rank + 1), dtype=BF16)
    disagree("hidden", r.dispatch, x=wide)
    disagree("x dtype", r.dispatch, x=x.float() if bad else x)
    disagree("num_worst_tokens", r.dispatch, num_worst_tokens=100 + rank)
    disagree("hidden", ops.cached_dispatch, wide, None, mask, rpm, src, group_name)
    disagree("num_experts", r.ll_dispatch, num_experts=E * (2 if bad else 1))
    disagree("num_max_dispatch_tokens_per_rank", r.ll_dispatch, num_max=LL_MAX + rank)
    buffer.destroy()
    return len(messages), r.good_runs


def test_one_rank_bad_and_disagreeing_ranks():
    results = parallel_launch(3, one_rank_bad_worker, timeout=TIMEOUT)
    assert len(set(results)) == 1, results
    num_errors, num_good = results[0]
    assert num_errors == 24 and num_good == num_errors + 1


# ---------------------------------------------------------------------------------------------
# the fakes: same bad inputs under FakeTensorMode, same errors
# ---------------------------------------------------------------------------------------------


def check_fakes(rank, num_ranks, group_name):
    """Bad inputs on fake tensors: each must raise the real kernel's exception type naming the
    argument. Returns (messages, {known problem: what happened})."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import ep_ops  # noqa: F401

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # expected errors
    ops, R, G = torch.ops.ep_ops, num_ranks, group_name  # noqa: N806
    T, H, K, E, M = 5, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK * num_ranks, LL_MAX  # noqa: N806
    messages, problems = [], {}

    def fails(exc_type, needles, fn, *args, **kwargs):
        messages.append(expect_error(exc_type, needles, fn, *args, **kwargs))

    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(T, H, dtype=BF16)
        topk = torch.empty(T, K, dtype=torch.int64)
        weights = torch.empty(T, K)
        mask = torch.empty(T, R, dtype=torch.bool)

        def dispatch(x=x, x_scales=None, topk=topk, weights=weights, mask=mask, E=E, W=0, G=G):  # noqa: N803
            return ops.dispatch(x, x_scales, topk, weights, mask, E, 1, W, G)

        # Good calls trace: exact mode gives an unbacked row count, worst-token mode a static one.
        outputs = dispatch()
        assert isinstance(outputs[0].shape[0], torch.SymInt) and outputs[0].shape[1] == H
        assert dispatch(W=64)[2].shape == (64, K)
        recv = torch.empty(7, H, dtype=BF16)
        rpm, src = torch.empty(R, R, dtype=torch.int32), torch.empty(7, dtype=torch.int32)
        assert ops.combine(recv, None, None, None, mask, rpm, src, G)[0].shape == (T, H)

        # wrong dtype
        fails(TypeError, ["ep_ops.dispatch", "x must be"], dispatch, x=x.int())
        fails(TypeError, ["topk_idx must be"], dispatch, topk=topk.int())
        fails(TypeError, ["topk_weights must be"], dispatch, weights=weights.double())
        fails(TypeError, ["is_token_in_rank must be"], dispatch, mask=mask.int())
        fails(TypeError, ["ep_ops.get_dispatch_layout", "topk_idx must be int64"],
              ops.get_dispatch_layout, topk.int(), E, R)  # fmt: skip
        fails(TypeError, ["ep_ops.combine", "x must be a floating dtype"], ops.combine, recv.int(), None, None,
              None, mask, rpm, src, G)  # fmt: skip
        fails(TypeError, ["ep_ops.cached_dispatch", "x must be"], ops.cached_dispatch, x.int(), None, mask,
              rpm, src, G)  # fmt: skip
        # wrong shape
        fails(ValueError, ["topk_weights must have"], dispatch, weights=torch.empty(T, K + 1))
        fails(
            ValueError, ["is_token_in_rank must have"], dispatch, mask=torch.empty(T, R + 1, dtype=torch.bool)
        )
        fails(ValueError, ["x must be 2-D"], dispatch, x=torch.empty(T * H, dtype=BF16))
        fails(ValueError, ["topk_idx must have"], dispatch, topk=topk[:-1], weights=None)
        # FP8
        q, scales = torch.empty(T, H, dtype=torch.float8_e4m3fn), torch.empty(T, H // 128)
        assert dispatch(x=q, x_scales=scales)[1].shape[1] == H // 128
        fails(ValueError, ["FP8 hidden size must be a multiple of 128"], dispatch,
              x=torch.empty(T, 200, dtype=torch.float8_e4m3fn), x_scales=torch.empty(T, 1))  # fmt: skip
        fails(TypeError, ["float8_e4m3fn with x_scales"], dispatch, x=q)
        fails(TypeError, ["x_scales must be"], dispatch, x=q, x_scales=scales.half())
        fails(ValueError, ["x_scales must have"], dispatch, x=q, x_scales=torch.empty(T, 3))
        # numbers
        fails(ValueError, ["num_worst_tokens must be >= 0"], dispatch, W=-1)
        fails(ValueError, ["num_experts must be positive"], dispatch, E=0)
        if R > 1:
            fails(ValueError, [f"num_experts ({E + 1}) must be a multiple"], dispatch, E=E + 1)
            fails(ValueError, [f"num_experts ({E + 1})"], ops.get_dispatch_layout, topk, E + 1, R)
        # combine
        fails(ValueError, ["x has 8 rows but the handle received 7"], ops.combine,
              torch.empty(8, H, dtype=BF16), None, None, None, mask, rpm, src, G)  # fmt: skip
        fails(ValueError, ["is_token_in_rank must be"], ops.combine, recv, None, None, None,
              torch.empty(T, R + 1, dtype=torch.bool), rpm, src, G)  # fmt: skip

        # low latency
        ll_x, ll_topk, ll_w = (
            torch.empty(3, H, dtype=BF16),
            torch.empty(3, 2, dtype=torch.int64),
            torch.empty(3, 2),
        )

        def ll_dispatch(x=ll_x, topk=ll_topk, M=M, E=E, fp8=False, rs=False, ue=False, G=G):  # noqa: N803
            return ops.low_latency_dispatch(x, topk, M, E, fp8, rs, ue, G)

        recv_x, _, _, _, _, slots = ll_dispatch()
        assert recv_x.shape == (E // R, R * M, H) and slots.shape == (R, M, 2)

        def ll_combine(x=recv_x, topk=ll_topk, w=ll_w, slots=slots, M=M, G=G):  # noqa: N803
            return ops.low_latency_combine(x, topk, w, slots, M, False, G)

        assert ll_combine().shape == (3, H)
        fails(TypeError, ["x must be bfloat16"], ll_dispatch, x=ll_x.float())
        fails(ValueError, [f"x has {M + 1} tokens", "num_max_dispatch_tokens_per_rank"], ll_dispatch,
              x=torch.empty(M + 1, H, dtype=BF16), topk=torch.empty(M + 1, 2, dtype=torch.int64))  # fmt: skip
        fails(ValueError, ["use_ue8m0 needs round_scale"], ll_dispatch, fp8=True, ue=True)
        fails(ValueError, ["FP8 hidden size must be a multiple of 128"], ll_dispatch,
              x=torch.empty(3, 200, dtype=BF16), fp8=True)  # fmt: skip
        if R > 1:
            fails(ValueError, [f"num_experts ({E + 1})"], ll_dispatch, E=E + 1)
        fails(ValueError, ["recv_token_slots must have shape"], ll_combine, slots=slots[:, :-1])
        fails(TypeError, ["recv_token_slots must be int32"], ll_combine, slots=slots.long())
        fails(TypeError, ["topk_weights must be"], ll_combine, w=ll_w.double())
        fails(ValueError, ["rows per expert"], ll_combine, x=recv_x[:, :-1])
        fails(ValueError, ["num_max_dispatch_tokens_per_rank"], ll_combine,
              topk=torch.empty(M + 1, 2, dtype=torch.int64), w=torch.empty(M + 1, 2))  # fmt: skip

        # A group_name that names no group: ValueError naming group_name, like the real kernels.
        expect_error(ValueError, ["group_name", BOGUS_GROUP], dispatch, G=BOGUS_GROUP)
    return messages, problems


def test_fakes_reject_bad_input(two_ranks):
    """check_fakes ran on both ranks of the two_ranks launch (world size 2 for the fakes)."""
    assert [result[2] for result in two_ranks] == [31, 31]
    problems = {key: value for result in two_ranks for key, value in result[3].items()}
    assert not problems
