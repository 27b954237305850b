"""``ep_ops.Buffer`` used the way DeepEP's own tests use ``deep_ep.Buffer``, on gloo CPU ranks.

The checks follow DeepEP's ``tests/test_intranode.py`` (normal dispatch/combine) and
``tests/test_low_latency.py`` (low-latency dispatch/combine): rank-valued inputs whose received
rows must show where they came from, expert counts against the routing, combine as the inverse
of dispatch. On top of that, every output is compared bitwise with the pure-PyTorch multi-rank
reference (``ep_ops.reference``): each rank rebuilds every rank's inputs from a seed, runs the
reference locally and compares its own outputs.

Spawning ranks is slow, so each test function is one launch that loops over its cases: one
launch of 1 rank (the quick round trip, buffer sizes, lifecycle) and one each of 2 and 3 ranks
(normal mode, then low-latency mode).
"""

import pytest
import torch
import torch.distributed as dist
from cases import Case, assert_same, expect_error, routing_of
from torch.distributed.distributed_c10d import _resolve_process_group

from ep_ops.launch import parallel_launch

TIMEOUT = 240  # seconds per launch (and the gloo collective timeout)
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# helpers (run inside the ranks)
# ---------------------------------------------------------------------------------------------


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity measure: 0 for identical tensors, small for close ones."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return (1 - 2 * (x * y).sum() / denominator).item()


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def nvl_bytes(hidden: int, num_ranks: int, element_size: int) -> int:
    """num_nvl_bytes from DeepEP's recipe: the size hint of the dispatch and combine configs."""
    from ep_ops import Buffer

    hidden_bytes = hidden * max(element_size, 2)
    return max(
        Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
        Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
    )


def assert_same_scales(actual, expected, what: str) -> None:
    """``assert_same`` for tensors whose last dim may be 1 with a stride other than 1 (UE8M0
    scales at hidden 512: column-major ``[E_local, R*M, 1]``), which it cannot view as bytes."""
    assert_same(actual.unsqueeze(-1), expected.unsqueeze(-1), what)


def decode(recv_x):
    """A dispatch result as bfloat16/float values: FP8 pairs are cast back."""
    from ep_ops.reference import per_token_cast_back

    return per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x


# ---------------------------------------------------------------------------------------------
# normal mode: get_dispatch_layout, dispatch, cached dispatch, combine
# ---------------------------------------------------------------------------------------------

NORMAL_HIDDEN = 256
NORMAL_TOPK = 3
EXPERTS_PER_RANK = 4
X_KINDS = ("rank", "rand", "fp8_rank", "fp8_rand", "float32")


def normal_inputs(case: Case, rank: int, num_ranks: int) -> dict:
    """Rank ``rank``'s inputs: topk_idx (with -1 holes), every x kind, and two weight sets."""
    from ep_ops.reference import per_token_cast_to_fp8

    topk_idx = routing_of(case, rank, num_ranks)
    num_tokens = topk_idx.size(0)
    gen = torch.Generator().manual_seed(1000 * case.seed + 500 + rank)
    x_rank = torch.full((num_tokens, case.hidden), float(rank), dtype=BF16)
    x_rand = torch.randn(num_tokens, case.hidden, generator=gen).to(BF16)
    # Small integers: every sum of up to three of them is exact in float32.
    x_int = torch.randint(-8, 9, (num_tokens, case.hidden), generator=gen).to(torch.float32)
    weights_rand = torch.rand(num_tokens, case.num_topk, generator=gen)
    no_expert = topk_idx < 0
    return {
        "topk_idx": topk_idx,
        "x": {
            "rank": x_rank,
            "rand": x_rand,
            "fp8_rank": per_token_cast_to_fp8(x_rank),
            "fp8_rand": per_token_cast_to_fp8(x_rand),
            "float32": x_int,
        },
        # DeepEP: weights = rank for the rank-valued x, random otherwise; -1 entries masked to 0.
        "weights": {
            "rank": torch.full((num_tokens, case.num_topk), float(rank)).masked_fill(no_expert, 0),
            "rand": weights_rand.masked_fill(no_expert, 0),
        },
    }


def check_rows_by_source_rank(values: torch.Tensor, rank_prefix_matrix: torch.Tensor, rank: int) -> None:
    """DeepEP's check_data: every row is constant, and rows [rpm[i-1][rank], rpm[i][rank]) hold i."""
    assert torch.equal(values.amin(dim=1), values.amax(dim=1)), "a received row is not constant"
    begin = 0
    for i in range(rank_prefix_matrix.size(0)):
        end = int(rank_prefix_matrix[i][rank])
        assert torch.all(values[begin:end].float() == i), f"rows from rank {i} do not hold {i}"
        begin = end
    assert begin == values.size(0)


def normal_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401  (loads the ops)
    from ep_ops import Buffer
    from ep_ops.reference import reference_combine, reference_dispatch, reference_layout

    group = _resolve_process_group(group_name)
    num_experts = EXPERTS_PER_RANK * num_ranks
    num_local = EXPERTS_PER_RANK
    hidden = NORMAL_HIDDEN

    # A buffer sized for bfloat16 only: float32 payloads need twice the bytes.
    small = Buffer(group, num_nvl_bytes=nvl_bytes(hidden, num_ranks, 2))
    buffer = Buffer(group, num_nvl_bytes=nvl_bytes(hidden, num_ranks, 4))
    assert (buffer.rank, buffer.group_size, buffer.group_name) == (rank, num_ranks, group_name)

    cases = (
        Case(num_tokens=10, hidden=hidden, num_topk=NORMAL_TOPK, num_experts=num_experts, seed=1),
        # 4, 1, 0 tokens on ranks 0, 1, 2: empty sends and receives.
        Case(num_tokens=4, hidden=hidden, num_topk=NORMAL_TOPK, num_experts=num_experts, seed=2),
        Case(
            num_tokens=7,
            hidden=hidden,
            num_topk=NORMAL_TOPK,
            num_experts=num_experts,
            routing="skewed",
            seed=3,
        ),
    )
    checked = 0
    for case in cases:
        inputs = [normal_inputs(case, r, num_ranks) for r in range(num_ranks)]
        mine = inputs[rank]
        topk_idx = mine["topk_idx"]
        num_tokens = topk_idx.size(0)

        # ---- get_dispatch_layout vs the reference, and DeepEP's global counts
        layouts = [reference_layout(inp["topk_idx"], num_experts, num_ranks) for inp in inputs]
        num_tokens_per_rank, rdma, num_tokens_per_expert, is_token_in_rank, event = (
            buffer.get_dispatch_layout(topk_idx, num_experts)
        )
        assert rdma is None
        event.current_stream_wait()
        assert_same((num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank), layouts[rank], "layout")
        gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
        gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
        dist.all_reduce(gbl_num_tokens_per_rank, group=group)
        dist.all_reduce(gbl_num_tokens_per_expert, group=group)
        masks = [layout[2] for layout in layouts]
        count = is_token_in_rank.sum(dim=1, keepdim=True)  # ranks each token goes to

        for kind in X_KINDS:
            xs = [inp["x"][kind] for inp in inputs]
            is_fp8 = kind.startswith("fp8")
            x_payloads = [x[0] for x in xs] if is_fp8 else xs
            x_scales = [x[1] for x in xs] if is_fp8 else None
            current_x = xs[rank]
            source = decode(current_x)  # what this rank's tokens are worth, as values
            weight_kind = "rank" if kind in ("rank", "fp8_rank") else "rand"
            weights = [inp["weights"][weight_kind] for inp in inputs]
            topks = [inp["topk_idx"] for inp in inputs]

            if kind == "float32":
                expect_error(
                    ValueError,
                    [f"num_nvl_bytes={small.num_nvl_bytes}", str(nvl_bytes(hidden, num_ranks, 4))],
                    small.dispatch,
                    current_x,
                    is_token_in_rank=is_token_in_rank,
                )

            for with_topk in (False, True):
                what = f"{case} x={kind} topk={with_topk}"
                args = {
                    "x": current_x,
                    "num_tokens_per_rank": num_tokens_per_rank,
                    "is_token_in_rank": is_token_in_rank,
                    "num_tokens_per_expert": num_tokens_per_expert,
                    "config": Buffer.get_dispatch_config(num_ranks),
                }
                if with_topk:
                    args.update(topk_idx=topk_idx, topk_weights=weights[rank])
                recv_x, recv_topk_idx, recv_topk_weights, counts_list, handle, event = buffer.dispatch(**args)
                event.current_stream_wait()
                refs = reference_dispatch(
                    x_payloads,
                    x_scales,
                    topks if with_topk else None,
                    weights if with_topk else None,
                    masks,
                    num_experts,
                )
                ref = refs[rank]

                # -- bitwise against the reference
                rank_prefix_matrix, recv_src_idx, handle_mask = handle
                assert handle_mask is is_token_in_rank
                assert_same(rank_prefix_matrix, ref[5], f"{what}: rank_prefix_matrix")
                assert_same(recv_src_idx, ref[6], f"{what}: recv_src_idx")
                if is_fp8:
                    assert isinstance(recv_x, tuple) and len(recv_x) == 2
                    assert_same(recv_x, (ref[0], ref[1]), f"{what}: recv_x")
                else:
                    assert_same(recv_x, ref[0], f"{what}: recv_x")
                if with_topk:
                    assert_same(recv_topk_idx, ref[2], f"{what}: recv_topk_idx")
                    assert_same(recv_topk_weights, ref[3], f"{what}: recv_topk_weights")
                    assert counts_list == ref[4].tolist(), f"{what}: {counts_list} != {ref[4].tolist()}"
                else:
                    assert recv_topk_idx is None and recv_topk_weights is None and counts_list == []

                # -- DeepEP's checks
                values = decode(recv_x)
                num_recv = values.size(0)
                assert int(gbl_num_tokens_per_rank[rank]) == num_recv
                if kind in ("rank", "fp8_rank"):
                    check_rows_by_source_rank(values, rank_prefix_matrix, rank)
                if with_topk:
                    assert recv_topk_idx.shape == (num_recv, NORMAL_TOPK)
                    in_range = recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < num_local))
                    assert bool(in_range.all()), f"{what}: local expert ids out of range"
                    assert counts_list == gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist()
                    assert all(type(c) is int for c in counts_list)
                    for i, expected in enumerate(counts_list):
                        assert int(recv_topk_idx.eq(i).sum()) == expected
                    if weight_kind == "rank":
                        check_weights = recv_topk_weights.clone()
                        missing = recv_topk_idx.eq(-1)
                        row_max = check_weights.amax(dim=1, keepdim=True).expand_as(check_weights)
                        check_weights[missing] = row_max[missing]
                        check_rows_by_source_rank(check_weights, rank_prefix_matrix, rank)

                    # expert_alignment: counts rounded up, still a list of python ints
                    aligned = buffer.dispatch(**args, expert_alignment=4)
                    assert aligned[3] == [round_up(c, 4) for c in counts_list], f"{what}: aligned counts"
                    assert all(type(c) is int for c in aligned[3])
                    assert_same(aligned[0], recv_x, f"{what}: recv_x with expert_alignment=4")

                # -- cached dispatch along the handle equals the normal dispatch
                cached_x, c_idx, c_weights, c_counts, c_handle, event = buffer.dispatch(
                    current_x, handle=handle, config=Buffer.get_dispatch_config(num_ranks)
                )
                event.current_stream_wait()
                assert (c_idx, c_weights, c_counts) == (None, None, None)
                assert all(a is b for a, b in zip(c_handle, handle, strict=True))
                assert_same(cached_x, recv_x, f"{what}: cached dispatch")

                # -- combine: every token gets the sum of its rows, weights come back whole
                combine_args = {"x": values, "handle": handle, "config": Buffer.get_combine_config(num_ranks)}
                if with_topk:
                    combine_args["topk_weights"] = recv_topk_weights
                combined_x, combined_weights, event = buffer.combine(**combine_args)
                event.current_stream_wait()
                expected_x = (source.float() * count).to(values.dtype)
                assert_same(combined_x, expected_x, f"{what}: combined_x == x * ranks of the token")
                ref_combined = reference_combine(
                    [decode((r[0], r[1]) if is_fp8 else r[0]) for r in refs],
                    [r[3] for r in refs] if with_topk else None,
                    None,
                    None,
                    [(masks[r], refs[r][5], refs[r][6]) for r in range(num_ranks)],
                )[rank]
                assert_same(combined_x, ref_combined[0], f"{what}: combined_x vs reference")
                if with_topk:
                    assert_same(combined_weights, weights[rank], f"{what}: combined_topk_weights")
                    assert_same(combined_weights, ref_combined[1], f"{what}: combined weights vs reference")
                else:
                    assert combined_weights is None

                # -- worst-token mode: static shapes, same prefix, padding has no experts
                if with_topk:
                    max_tokens = max(inp["topk_idx"].size(0) for inp in inputs)
                    num_worst = max(max_tokens * num_ranks, 1)
                    w_x, w_idx, w_weights, w_list, w_handle, _ = buffer.dispatch(
                        **args, num_worst_tokens=num_worst
                    )
                    assert w_list == [], f"{what}: worst-token mode returns an empty list"
                    w_values = decode(w_x)
                    assert w_values.shape == (num_worst, hidden)
                    assert w_idx.shape == w_weights.shape == (num_worst, NORMAL_TOPK)
                    assert w_handle[1].shape == (num_worst,)
                    assert_same(w_handle[0], rank_prefix_matrix, f"{what}: worst rank_prefix_matrix")
                    assert torch.equal(w_values[:num_recv], values)
                    if is_fp8:
                        assert torch.equal(w_x[1][:num_recv], recv_x[1])
                    assert torch.equal(w_idx[:num_recv], recv_topk_idx)
                    assert torch.equal(w_weights[:num_recv], recv_topk_weights)
                    assert bool((w_idx[num_recv:] == -1).all())
                    assert bool((w_handle[1][num_recv:] == -1).all())
                    assert bool((w_values[num_recv:] == 0).all())
                    # Cached dispatch and combine take the padded handle and padded rows.
                    w_cached = buffer.dispatch(current_x, handle=w_handle)[0]
                    assert_same(w_cached, w_x, f"{what}: cached dispatch of a worst-token handle")
                    w_combined, w_combined_weights, _ = buffer.combine(
                        w_values, w_handle, topk_weights=w_weights
                    )
                    assert_same(w_combined, combined_x, f"{what}: combine of worst-token rows")
                    assert_same(w_combined_weights, combined_weights, f"{what}: worst combined weights")

                # -- bias: a tuple of two, a single tensor, a tuple with None
                if kind in ("rank", "float32") and with_topk:
                    gen = torch.Generator().manual_seed(rank)
                    bias_0 = torch.randint(-4, 5, (num_tokens, hidden), generator=gen).to(values.dtype)
                    bias_1 = torch.full((num_tokens, hidden), 2.0, dtype=values.dtype)
                    for bias, b0, b1 in (
                        ((bias_0, bias_1), bias_0, bias_1),
                        (bias_0, bias_0, None),
                        ((None, bias_1), None, bias_1),
                    ):
                        biased, _, _ = buffer.combine(values, handle, bias=bias)
                        expected = source.float() * count
                        expected = expected + (b0.float() if b0 is not None else 0)
                        expected = expected + (b1.float() if b1 is not None else 0)
                        assert_same(biased, expected.to(values.dtype), f"{what}: combine with bias")
                checked += 1
    small.destroy()
    buffer.destroy()
    return checked


# ---------------------------------------------------------------------------------------------
# low-latency mode
# ---------------------------------------------------------------------------------------------

LL_HIDDEN = 512  # UE8M0 packs four 128-channel scales: hidden must be a multiple of 512
LL_TOPK = 3
LL_MAX_TOKENS = 8
RANK_OFFSET = 128
FP8_MODES = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))


def ll_inputs(rank: int, num_ranks: int) -> tuple:
    """DeepEP's low-latency input: x = rank - 128 with the last 128 channels = token index;
    random top-k with some -1 holes; random positive weights (also at the holes)."""
    num_tokens = LL_MAX_TOKENS - 2 * rank  # different per rank, always <= M
    num_experts = EXPERTS_PER_RANK * num_ranks
    gen = torch.Generator().manual_seed(77 + rank)
    x = torch.ones((num_tokens, LL_HIDDEN), dtype=BF16) * (rank - RANK_OFFSET)
    x[:, -128:] = torch.arange(num_tokens, dtype=BF16).view(-1, 1)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = scores.topk(LL_TOPK, dim=-1).indices
    topk_idx[torch.rand(num_tokens, LL_TOPK, generator=gen) < 0.2] = -1
    topk_weights = torch.randn(num_tokens, LL_TOPK, generator=gen).abs()
    return x, topk_idx.contiguous(), topk_weights


def ll_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401
    from ep_ops import Buffer
    from ep_ops.reference import (
        per_token_cast_back,
        reference_low_latency_combine,
        reference_low_latency_dispatch,
    )

    group = _resolve_process_group(group_name)
    num_experts = EXPERTS_PER_RANK * num_ranks
    num_local = EXPERTS_PER_RANK
    M, hidden = LL_MAX_TOKENS, LL_HIDDEN  # noqa: N806
    hint = Buffer.get_low_latency_rdma_size_hint(M, hidden, num_ranks, num_experts)
    assert hint > 0
    buffer = Buffer(group, num_rdma_bytes=hint, low_latency_mode=True, num_qps_per_rank=num_local)

    inputs = [ll_inputs(r, num_ranks) for r in range(num_ranks)]
    xs, topks, weights = ([inp[i] for inp in inputs] for i in range(3))
    x, topk_idx, topk_weights = inputs[rank]
    num_tokens = x.size(0)
    all_topk_idx = torch.cat(topks)
    valid_weight_sum = topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1, keepdim=True)

    recv_stats = torch.zeros(num_local, dtype=torch.int32)
    expected_stats = torch.zeros(num_local, dtype=torch.int32)
    dispatch_wait = torch.zeros(num_ranks, dtype=torch.int64)
    combine_wait = torch.zeros(num_ranks, dtype=torch.int64)
    checked = 0
    for return_recv_hook in (False, True):
        for use_fp8, round_scale, use_ue8m0 in FP8_MODES:
            what = f"hook={return_recv_hook} fp8={use_fp8} round_scale={round_scale} ue8m0={use_ue8m0}"
            packed_recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                x,
                topk_idx,
                M,
                num_experts,
                cumulative_local_expert_recv_stats=recv_stats,
                dispatch_wait_recv_cost_stats=dispatch_wait,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                async_finish=not return_recv_hook,
                return_recv_hook=return_recv_hook,
            )
            if return_recv_hook:
                assert torch.equal(recv_stats, expected_stats), "stats must wait for the hook"
                hook()
                hook()  # a second call does nothing
            else:
                event.current_stream_wait()
            expected_stats += recv_count
            assert torch.equal(recv_stats, expected_stats), f"{what}: cumulative_local_expert_recv_stats"
            assert bool((dispatch_wait > 0).all()) and len(set(dispatch_wait.tolist())) == 1

            # -- bitwise against the reference
            refs = reference_low_latency_dispatch(xs, topks, M, num_experts, use_fp8, round_scale, use_ue8m0)
            ref = refs[rank]
            src_info, layout_range, h_max, h_hidden, h_experts, recv_token_slots = handle
            assert (h_max, h_hidden, h_experts) == (M, hidden, num_experts)
            if use_fp8:
                assert isinstance(packed_recv_x, tuple)
                assert_same(packed_recv_x[0], ref[0], f"{what}: recv_x")
                assert_same_scales(packed_recv_x[1], ref[1], f"{what}: recv_x_scales")
                scale_cols = hidden // (512 if use_ue8m0 else 128)
                assert packed_recv_x[1].shape == (num_local, num_ranks * M, scale_cols)
                assert packed_recv_x[1].dtype == (torch.int32 if use_ue8m0 else torch.float32)
                assert packed_recv_x[1].stride(1) == 1, "scales must be column-major in the last two dims"
            else:
                assert_same(packed_recv_x, ref[0], f"{what}: recv_x")
            assert_same((recv_count, src_info, layout_range, recv_token_slots), ref[2:], f"{what}: handle")

            # -- DeepEP's checks, per local expert
            if use_fp8:
                simulated_gemm_x = per_token_cast_back(packed_recv_x[0], packed_recv_x[1].contiguous())
            else:
                simulated_gemm_x = packed_recv_x.clone()
            for i in range(num_local):
                expert_id = rank * num_local + i
                recv_x = simulated_gemm_x[i]
                num_valid = int(recv_count[i])
                assert num_valid == int((all_topk_idx == expert_id).sum()), f"{what}: recv_count[{i}]"
                recv_x = recv_x[:num_valid]
                recv_src_info = src_info[i][:num_valid]
                recv_x_amin = recv_x[:, :-128].amin(dim=-1)
                assert torch.equal(recv_x_amin, recv_x[:, :-128].amax(dim=-1))
                if round_scale:
                    assert num_valid == 0 or calc_diff(recv_x[:, -1], recv_src_info.view(-1)) < 0.007
                else:
                    assert int((recv_x[:, -128:] - recv_src_info.view(-1, 1)).abs().sum()) == 0
                for j in range(num_ranks):
                    begin, count = int(layout_range[i][j] >> 32), int(layout_range[i][j] & 0xFFFFFFFF)
                    assert count == int((topks[j] == expert_id).sum()), f"{what}: rank {j}'s rows"
                    assert bool((recv_src_info[begin : begin + count] < topks[j].size(0)).all())
                    if not round_scale:
                        assert int((recv_x_amin == j - RANK_OFFSET).sum()) == count
                        assert int((recv_x[begin : begin + count, :-128] - j + RANK_OFFSET).abs().sum()) == 0
                # Rows past recv_count are empty.
                assert bool((src_info[i][num_valid:] == -1).all())

            # -- combine: plain, zero-copy, out=, LogFMT
            all_gemm_x = [per_token_cast_back(r[0], r[1].contiguous()) if use_fp8 else r[0] for r in refs]
            ref_combined = reference_low_latency_combine(all_gemm_x, topks, weights, M, num_experts)[rank]
            ref_logfmt = None
            for use_logfmt in (False, True):
                for zero_copy, use_out in ((False, False), (True, False), (False, True), (True, True)):
                    how = f"{what} logfmt={use_logfmt} zero_copy={zero_copy} out={use_out}"
                    combine_input = simulated_gemm_x
                    if zero_copy:
                        buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
                        combine_input = torch.zeros_like(simulated_gemm_x)  # only its shape counts
                    out = torch.full((num_tokens, hidden), float("nan"), dtype=BF16) if use_out else None
                    combined_x, event, hook = buffer.low_latency_combine(
                        combine_input,
                        topk_idx,
                        topk_weights,
                        handle,
                        use_logfmt=use_logfmt,
                        zero_copy=zero_copy,
                        async_finish=not return_recv_hook,
                        return_recv_hook=return_recv_hook,
                        out=out,
                        combine_wait_recv_cost_stats=combine_wait,
                    )
                    hook() if return_recv_hook else event.current_stream_wait()
                    if use_out:
                        assert combined_x.data_ptr() == out.data_ptr(), f"{how}: result not written to out"
                    assert combined_x.shape == (num_tokens, hidden) and combined_x.dtype == BF16
                    assert not bool(torch.isnan(combined_x).any()), f"{how}: NaN in the result"
                    diff = calc_diff(x * valid_weight_sum, combined_x)
                    if use_logfmt:
                        assert diff < 2e-3, f"{how}: {diff=}"
                        if ref_logfmt is None:
                            ref_logfmt = combined_x.clone()
                        # Every LogFMT call of the same inputs gives the same bits.
                        assert torch.equal(combined_x, ref_logfmt), f"{how}: not deterministic"
                        torch.testing.assert_close(
                            combined_x.float(), ref_combined.float(), rtol=0.02, atol=0.02 * float(
                                ref_combined.float().abs().max().clamp(min=1))
                        )  # fmt: skip
                    else:
                        assert diff < (9e-4 if use_fp8 else 1e-5), f"{how}: {diff=}"
                        assert_same(combined_x, ref_combined, f"{how}: vs reference")
                    checked += 1
            assert bool((combine_wait > 0).all())

    # Too small a num_rdma_bytes: the error names the size the call needs.
    small = Buffer(group, num_rdma_bytes=hint - 128, low_latency_mode=True)
    expect_error(
        ValueError, ["num_rdma_bytes", str(hint)], small.low_latency_dispatch, x, topk_idx, M, num_experts
    )
    expect_error(
        ValueError, ["num_rdma_bytes", str(hint)], small.low_latency_combine, simulated_gemm_x, topk_idx,
        topk_weights, handle,
    )  # fmt: skip
    # The group still works after those (purely local) errors.
    again, *_ = buffer.low_latency_dispatch(x, topk_idx, M, num_experts, use_fp8=False)
    ref = reference_low_latency_dispatch(xs, topks, M, num_experts)[rank]
    assert_same(again, ref[0], "dispatch after the errors")
    buffer.destroy()
    return checked


def multi_rank_worker(rank, num_ranks, group_name):
    return normal_worker(rank, num_ranks, group_name), ll_worker(rank, num_ranks, group_name)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_dispatch_combine_and_low_latency(num_ranks):
    """Normal mode (normal_worker), then low-latency mode (ll_worker), in one launch."""
    results = parallel_launch(num_ranks, multi_rank_worker, timeout=TIMEOUT)
    num_normal = len(("random", "small", "skewed")) * len(X_KINDS) * 2  # cases x kinds x with/without top-k
    num_low_latency = 2 * len(FP8_MODES) * 8  # hook x FP8 modes x combine variants
    assert results == [(num_normal, num_low_latency)] * num_ranks


# ---------------------------------------------------------------------------------------------
# one rank: the whole round trip quickly, buffer sizes, destroy, Config and EventOverlap
# ---------------------------------------------------------------------------------------------


class _WaitCounter:
    """An event-like object (DeepEP's EventHandle has current_stream_wait)."""

    def __init__(self):
        self.waits = 0

    def current_stream_wait(self):
        self.waits += 1


def single_rank_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401
    from ep_ops import Buffer
    from ep_ops.config import Config
    from ep_ops.event import EventOverlap
    from ep_ops.reference import reference_layout, reference_low_latency_dispatch

    group = _resolve_process_group(group_name)
    hidden, num_experts, M = 256, 4, 4  # noqa: N806

    # ---- Config and EventOverlap basics
    config = Buffer.get_dispatch_config(1)
    assert isinstance(config, Config) and isinstance(Buffer.get_combine_config(1), Config)
    assert config.get_nvl_buffer_size_hint(hidden * 2, 1) > 0
    assert config.get_rdma_buffer_size_hint(hidden * 2, 1) == 0  # one host
    assert Config(24, 6, 256, 6, 128).num_sms == 24
    expect_error(ValueError, ["num_sms"], Config, 23)
    expect_error(ValueError, ["num_max_nvl_chunked_send_tokens"], Config, 20, 256, 256)
    expect_error(TypeError, ["hidden_bytes"], config.get_nvl_buffer_size_hint, 1.5, 1)
    with EventOverlap() as event:
        assert event.event is None
    EventOverlap().current_stream_wait()
    counter = _WaitCounter()
    with EventOverlap(counter, extra_tensors=(torch.ones(1),)):
        pass
    EventOverlap(counter).current_stream_wait()
    assert counter.waits == 2
    assert isinstance(Buffer.capture(), EventOverlap)
    assert isinstance(Buffer.is_sm90_compiled(), bool)

    # ---- buffer sizes: too small a num_nvl_bytes names what the call needs
    needed = nvl_bytes(hidden, 1, 2)
    topk_idx = torch.tensor([[0, 3], [-1, 1], [2, -1]], dtype=torch.int64)
    x = torch.arange(3, dtype=BF16).view(-1, 1).repeat(1, hidden)
    small = Buffer(group, num_nvl_bytes=1024)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = small.get_dispatch_layout(
        topk_idx, num_experts
    )
    assert_same((num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank), reference_layout(
        topk_idx, num_experts, 1), "layout")  # fmt: skip
    expect_error(
        ValueError, ["num_nvl_bytes=1024", f"needs {needed} bytes"], small.dispatch, x,
        is_token_in_rank=is_token_in_rank,
    )  # fmt: skip
    buffer = Buffer(group, num_nvl_bytes=needed, num_rdma_bytes=0)
    assert buffer.get_comm_stream() is None
    assert buffer.get_local_buffer_tensor(torch.int32).numel() == needed // 4
    assert buffer.get_local_buffer_tensor(BF16, (4, 8), offset=16).shape == (4, 8)

    # ---- the round trip on one rank: everything stays here
    weights = torch.tensor([[0.5, 0.25], [0.0, 1.0], [2.0, 0.0]])
    previous = Buffer.capture()
    recv_x, recv_idx, recv_weights, counts, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        previous_event=previous,
        async_finish=True,
    )
    with event:
        pass
    assert torch.equal(recv_x, x) and torch.equal(recv_idx, topk_idx) and torch.equal(recv_weights, weights)
    assert counts == [1, 1, 1, 1]
    combined, combined_weights, event = buffer.combine(
        recv_x, handle, topk_weights=recv_weights, async_finish=True
    )
    event.current_stream_wait()
    assert torch.equal(combined, x) and torch.equal(combined_weights, weights)
    expect_error(ValueError, ["handle"], buffer.combine, recv_x, handle[:2])
    expect_error(ValueError, ["topk_idx"], buffer.dispatch, x, handle=handle, topk_idx=topk_idx)
    expect_error(ValueError, ["is_token_in_rank"], buffer.dispatch, x)

    # ---- low latency on one rank
    hint = Buffer.get_low_latency_rdma_size_hint(M, hidden, 1, num_experts)
    expect_error(ValueError, ["num_experts"], Buffer.get_low_latency_rdma_size_hint, M, hidden, 3, 4)
    ll = Buffer(group, num_rdma_bytes=hint, low_latency_mode=True)
    recv, recv_count, ll_handle, _, _ = ll.low_latency_dispatch(x, topk_idx, M, num_experts, use_fp8=False)
    ref = reference_low_latency_dispatch([x], [topk_idx], M, num_experts)[0]
    assert_same((recv, recv_count, *ll_handle[:2]), (ref[0], ref[2], ref[3], ref[4]), "ll dispatch")
    combined_x, _, _ = ll.low_latency_combine(recv, topk_idx, weights, ll_handle)
    assert torch.equal(combined_x, (x.float() * weights.sum(1, keepdim=True)).to(BF16))
    ll.clean_low_latency_buffer(M, hidden, num_experts)

    # ---- destroy: every later call raises RuntimeError
    for b in (buffer, ll, small):
        b.destroy()
        b.destroy()  # idempotent
    expect_error(RuntimeError, ["destroyed"], buffer.dispatch, x, handle=handle)
    expect_error(RuntimeError, ["destroyed"], buffer.get_dispatch_layout, topk_idx, num_experts)
    expect_error(RuntimeError, ["destroyed"], buffer.combine, recv_x, handle)
    expect_error(RuntimeError, ["destroyed"], ll.low_latency_dispatch, x, topk_idx, M, num_experts)
    expect_error(RuntimeError, ["destroyed"], ll.low_latency_combine, recv, topk_idx, weights, ll_handle)
    expect_error(RuntimeError, ["destroyed"], ll.get_next_low_latency_combine_buffer, ll_handle)
    return "ok"


def test_single_rank_buffer():
    assert parallel_launch(1, single_rank_worker, timeout=TIMEOUT) == ["ok"]


def test_nvl_timeout_setting(monkeypatch):
    """The NVLink wait timeout: the argument, else EP_OPS_NVL_TIMEOUT_S, else 100 s; checked."""
    from ep_ops.nvl import DEFAULT_TIMEOUT_S, nvl_timeout_s

    monkeypatch.delenv("EP_OPS_NVL_TIMEOUT_S", raising=False)
    assert nvl_timeout_s() == DEFAULT_TIMEOUT_S == 100.0
    assert nvl_timeout_s(2) == 2.0
    monkeypatch.setenv("EP_OPS_NVL_TIMEOUT_S", "7.5")
    assert nvl_timeout_s() == 7.5 and nvl_timeout_s(3.0) == 3.0
    monkeypatch.setenv("EP_OPS_NVL_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="EP_OPS_NVL_TIMEOUT_S must be a number of seconds, got 'soon'"):
        nvl_timeout_s()
    monkeypatch.setenv("EP_OPS_NVL_TIMEOUT_S", "-1")
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        nvl_timeout_s()
