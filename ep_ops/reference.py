"""Pure-PyTorch reference of every ep_ops primitive, simulating all ranks in one process.

Every function takes per-rank lists of inputs (``xs[r]`` is what rank ``r`` passes to the real
op) and returns a per-rank list of outputs (``out[r]`` is what rank ``r``'s op returns), bitwise
equal to the real kernels unless a docstring says otherwise. Plain loops are used where they make
the rules easier to read; this module is for tests and CPU benchmarks, not for speed.

Notation: R = number of ranks (the length of the lists), T = tokens of one rank, H = hidden size,
K = num_topk, E = num_experts, E_local = E / R (expert ``g`` lives on rank ``g // E_local`` as
local expert ``g % E_local``), M = num_max_dispatch_tokens_per_rank, N = rows a rank received.

This module imports neither ``ep_ops._C`` nor ``torch.distributed``.
"""

import torch

FP8_BLOCK = 128  # channels per FP8 scale
UE8M0_PACK = 4  # UE8M0 scales packed per int32
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_AMAX_MIN = 1e-4  # amax clamp before computing a scale
LOGFMT_LEVELS = 511  # LogFMT-10: 9 magnitude bits, codes 1..511 (0 = exact zero)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

__all__ = [
    "logfmt_decode",
    "logfmt_encode",
    "logfmt_roundtrip",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "reference_cached_dispatch",
    "reference_combine",
    "reference_combine_permuted",
    "reference_dispatch",
    "reference_dispatch_permuted",
    "reference_layout",
    "reference_low_latency_combine",
    "reference_low_latency_combine_backward",
    "reference_low_latency_dispatch",
]


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _num_local_experts(num_experts: int, num_ranks: int) -> int:
    if num_ranks <= 0:
        raise ValueError(f"the number of ranks must be positive, got {num_ranks}")
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be a positive multiple of the number of ranks ({num_ranks})"
        )
    return num_experts // num_ranks


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _per_rank(values, num_ranks: int, name: str) -> list:
    """``values`` as a list of length R; ``None`` means absent on every rank."""
    if values is None:
        return [None] * num_ranks
    values = list(values)
    if len(values) != num_ranks:
        raise ValueError(f"{name} must have one entry per rank ({num_ranks}), got {len(values)}")
    if any(v is None for v in values) and not all(v is None for v in values):
        raise ValueError(f"{name} must be given on every rank or on none")
    return values


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32, or float64 for float64 payloads."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_rows(t: torch.Tensor, num_rows: int, fill) -> torch.Tensor:
    """``t`` ([n, ...], n <= num_rows) followed by rows filled with ``fill``, ``num_rows`` in all."""
    out = torch.full((num_rows, *t.shape[1:]), fill, dtype=t.dtype)
    out[: t.size(0)] = t
    return out


def _local_expert_ids(topk_idx: torch.Tensor, rank: int, num_local: int) -> torch.Tensor:
    """[*, K] int64 global ids -> local ids on ``rank`` (-1 where the expert is not there)."""
    local = topk_idx - rank * num_local
    return torch.where((topk_idx >= 0) & (local >= 0) & (local < num_local), local, -1)


def _expert_rank(expert: int, num_local: int) -> int:
    return expert // num_local


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def _is_token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: token t has at least one expert on rank r."""
    num_local = _num_local_experts(num_experts, num_ranks)
    out = torch.zeros((topk_idx.size(0), num_ranks), dtype=torch.bool)
    for t in range(topk_idx.size(0)):
        for g in topk_idx[t].tolist():
            if g >= 0:
                out[t, _expert_rank(g, num_local)] = True
    return out


def reference_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Reference of ``ep_ops::get_dispatch_layout`` (one rank; no communication).

    Args:
        topk_idx: ``[T, K]`` int64 global expert ids in ``[0, E)``, -1 = none.
    Returns:
        num_tokens_per_rank ``[R]`` int32 (tokens with at least one expert on rank r),
        num_tokens_per_expert ``[E]`` int32 (occurrences of expert e in topk_idx),
        is_token_in_rank ``[T, R]`` bool.
    """
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be 2-D int64, got shape {tuple(topk_idx.shape)} {topk_idx.dtype}")
    _num_local_experts(num_experts, num_ranks)
    valid = topk_idx[topk_idx >= 0]
    if valid.numel() and int(valid.max()) >= num_experts:
        raise ValueError(f"topk_idx has expert id {int(valid.max())} >= num_experts ({num_experts})")
    is_token_in_rank = _is_token_in_rank(topk_idx, num_experts, num_ranks)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
    num_tokens_per_expert = torch.bincount(valid, minlength=num_experts).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


# ---------------------------------------------------------------------------------------------
# normal dispatch / cached dispatch / combine
# ---------------------------------------------------------------------------------------------


def _rank_prefix_matrix(is_token_in_ranks: list) -> torch.Tensor:
    """[R, R] int32: rpm[i][j] = tokens ranks 0..i send to rank j (inclusive prefix over i)."""
    sent = torch.stack([m.sum(dim=0).to(torch.int64) for m in is_token_in_ranks])  # [R(src), R(dst)]
    return sent.cumsum(dim=0).to(torch.int32)


def _gather_to_rank(tensors: list, is_token_in_ranks: list, dst: int) -> torch.Tensor:
    """Rows of ``tensors[i]`` sent to ``dst``, concatenated by source rank then token index."""
    return torch.cat([t[m[:, dst]] for t, m in zip(tensors, is_token_in_ranks, strict=True)], dim=0)


def _recv_src_idx(is_token_in_ranks: list, dst: int) -> torch.Tensor:
    """[N] int32 source token index of every row ``dst`` receives."""
    return torch.cat([m[:, dst].nonzero().flatten() for m in is_token_in_ranks]).to(torch.int32)


def _count_per_local_expert(recv_topk_idx: torch.Tensor, num_local: int, alignment: int) -> torch.Tensor:
    """[E_local] int32: rows whose local ids contain e (once per row), rounded up to alignment."""
    counts = [int((recv_topk_idx == e).any(dim=1).sum()) for e in range(num_local)]
    return torch.tensor([_round_up(c, alignment) for c in counts], dtype=torch.int32)


def _check_is_token_in_ranks(xs: list, is_token_in_ranks: list, num_ranks: int) -> None:
    for r, (x, m) in enumerate(zip(xs, is_token_in_ranks, strict=True)):
        if m.dtype != torch.bool or tuple(m.shape) != (x.size(0), num_ranks):
            raise ValueError(
                f"is_token_in_rank of rank {r} must be bool [{x.size(0)}, {num_ranks}], "
                f"got {m.dtype} {tuple(m.shape)}"
            )


def _check_payload(x: torch.Tensor, x_scale, rank: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x of rank {rank} must be 2-D, got shape {tuple(x.shape)}")
    if x_scale is None:
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"x of rank {rank} must be a float dtype (FP8 needs x_scales), got {x.dtype}")
        return
    if x.dtype != torch.float8_e4m3fn:
        raise ValueError(f"x of rank {rank} must be float8_e4m3fn with x_scales, got {x.dtype}")
    expected = (x.size(0), x.size(1) // FP8_BLOCK)
    if x.size(1) % FP8_BLOCK or x_scale.dtype != torch.float32 or tuple(x_scale.shape) != expected:
        raise ValueError(
            f"x_scales of rank {rank} must be float32 {expected} (hidden a multiple of 128), "
            f"got {x_scale.dtype} {tuple(x_scale.shape)}"
        )


def reference_dispatch(
    xs,
    x_scales,
    topk_idxs,
    topk_weights,
    is_token_in_ranks,
    num_experts: int,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
):
    """Reference of ``ep_ops::dispatch`` over all ranks.

    Args (one entry per rank; x_scales / topk_idxs / topk_weights may be ``None`` = absent):
        xs[i]: ``[T_i, H]`` bfloat16/float16/float32/float64, or float8_e4m3fn with
            x_scales[i] ``[T_i, H/128]`` float32 (the scales travel with the row).
        topk_idxs[i]: ``[T_i, K]`` int64 global expert ids (-1 = none).
        topk_weights[i]: ``[T_i, K]`` float32 (needs topk_idxs).
        is_token_in_ranks[i]: ``[T_i, R]`` bool.
        num_worst_tokens: 0 = exact mode (N rows); W > 0 = every row-indexed output has W rows,
            padding rows being recv_x 0, scales 0, topk_idx -1, weights 0, src_idx -1.
    Returns:
        per rank j the 7-tuple (recv_x ``[N, H]`` x's dtype, recv_x_scales ``[N, H/128]`` float32
        or empty float32, recv_topk_idx ``[N, K]`` int64 local ids (-1 = not on j) or empty int64,
        recv_topk_weights ``[N, K]`` float32 (0 where not on j) or empty float32,
        num_recv_tokens_per_expert ``[E_local]`` int32 (rows holding local expert e, counted once
        per row, rounded up to expert_alignment; real rows only) or empty int32 without top-k,
        rank_prefix_matrix ``[R, R]`` int32 (same on all ranks), recv_src_idx ``[N]`` int32).
        Rank j receives token t of rank i iff is_token_in_ranks[i][t, j]; rows are ordered by
        source rank, then source token index.
    Raises:
        ValueError on inconsistent inputs, or when some rank receives more than num_worst_tokens.
    """
    xs = list(xs)
    num_ranks = len(xs)
    x_scales = _per_rank(x_scales, num_ranks, "x_scales")
    topk_idxs = _per_rank(topk_idxs, num_ranks, "topk_idxs")
    topk_weights = _per_rank(topk_weights, num_ranks, "topk_weights")
    is_token_in_ranks = _per_rank(is_token_in_ranks, num_ranks, "is_token_in_ranks")
    has_scales, has_topk, has_weights = (
        x_scales[0] is not None,
        topk_idxs[0] is not None,
        topk_weights[0] is not None,
    )
    if has_weights and not has_topk:
        raise ValueError("topk_weights needs topk_idxs")
    if expert_alignment < 1:
        raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
    if num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
    for r in range(num_ranks):
        _check_payload(xs[r], x_scales[r], r)
    _check_is_token_in_ranks(xs, is_token_in_ranks, num_ranks)
    num_local = _num_local_experts(num_experts, num_ranks) if has_topk else 0

    rpm = _rank_prefix_matrix(is_token_in_ranks)
    outputs = []
    for j in range(num_ranks):
        num_recv = int(rpm[num_ranks - 1, j])
        if num_worst_tokens > 0 and num_recv > num_worst_tokens:
            raise ValueError(
                f"rank {j} receives {num_recv} tokens, more than num_worst_tokens ({num_worst_tokens})"
            )
        rows = num_worst_tokens if num_worst_tokens > 0 else num_recv

        recv_x = _pad_rows(_gather_to_rank(xs, is_token_in_ranks, j), rows, 0)
        recv_src_idx = _pad_rows(_recv_src_idx(is_token_in_ranks, j), rows, -1)
        recv_x_scales = torch.empty(0, dtype=torch.float32)
        if has_scales:
            recv_x_scales = _pad_rows(_gather_to_rank(x_scales, is_token_in_ranks, j), rows, 0)
        recv_topk_idx = torch.empty(0, dtype=torch.int64)
        recv_topk_weights = torch.empty(0, dtype=torch.float32)
        counts = torch.empty(0, dtype=torch.int32)
        if has_topk:
            local = _local_expert_ids(_gather_to_rank(topk_idxs, is_token_in_ranks, j), j, num_local)
            counts = _count_per_local_expert(local, num_local, expert_alignment)
            recv_topk_idx = _pad_rows(local, rows, -1)
            if has_weights:
                weights = _gather_to_rank(topk_weights, is_token_in_ranks, j)
                weights = torch.where(local >= 0, weights, torch.zeros((), dtype=torch.float32))
                recv_topk_weights = _pad_rows(weights, rows, 0)
        outputs.append(
            (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, counts, rpm.clone(), recv_src_idx)
        )
    return outputs


def _check_handles(handles, num_ranks: int) -> list:
    handles = list(handles)
    if len(handles) != num_ranks:
        raise ValueError(f"handles must have one entry per rank ({num_ranks}), got {len(handles)}")
    for r, (m, rpm, src) in enumerate(handles):
        if m.dtype != torch.bool or m.dim() != 2 or m.size(1) != num_ranks:
            raise ValueError(f"handle of rank {r}: is_token_in_rank must be bool [T, {num_ranks}]")
        if rpm.dtype != torch.int32 or tuple(rpm.shape) != (num_ranks, num_ranks):
            raise ValueError(
                f"handle of rank {r}: rank_prefix_matrix must be int32 [{num_ranks}, {num_ranks}]"
            )
        if src.dtype != torch.int32 or src.dim() != 1:
            raise ValueError(f"handle of rank {r}: recv_src_idx must be 1-D int32")
        if src.size(0) < int(rpm[num_ranks - 1, r]):
            raise ValueError(f"handle of rank {r}: recv_src_idx has fewer rows than rank_prefix_matrix says")
    return handles


def reference_cached_dispatch(xs, x_scales, handles):
    """Reference of ``ep_ops::cached_dispatch`` over all ranks.

    Args:
        xs[i]: ``[T_i, H]`` float or float8_e4m3fn; x_scales[i] ``[T_i, H/128]`` float32 or None.
        handles[i]: (is_token_in_rank ``[T_i, R]`` bool, rank_prefix_matrix ``[R, R]`` int32,
            recv_src_idx ``[N_i]`` int32) from an earlier dispatch.
    Returns:
        per rank j (recv_x ``[N_j, H]``, recv_x_scales ``[N_j, H/128]`` float32 or empty float32),
        N_j = recv_src_idx.size(0): rows as dispatch ordered them, worst-token padding rows zero.
    """
    xs = list(xs)
    num_ranks = len(xs)
    x_scales = _per_rank(x_scales, num_ranks, "x_scales")
    handles = _check_handles(handles, num_ranks)
    is_token_in_ranks = [h[0] for h in handles]
    for r in range(num_ranks):
        _check_payload(xs[r], x_scales[r], r)
    _check_is_token_in_ranks(xs, is_token_in_ranks, num_ranks)
    outputs = []
    for j in range(num_ranks):
        rows = handles[j][2].size(0)
        recv_x = _pad_rows(_gather_to_rank(xs, is_token_in_ranks, j), rows, 0)
        recv_x_scales = torch.empty(0, dtype=torch.float32)
        if x_scales[0] is not None:
            recv_x_scales = _pad_rows(_gather_to_rank(x_scales, is_token_in_ranks, j), rows, 0)
        outputs.append((recv_x, recv_x_scales))
    return outputs


def _combine_rows(rows_per_rank: list, handles: list, acc_dtype: torch.dtype, num_tokens: list) -> list:
    """Sums each source token's rows over destination ranks j = 0..R-1 in that order.

    rows_per_rank[j] is ``[N_j, C]`` in dispatch order; returns per source rank i ``[T_i, C]`` of
    ``acc_dtype``, starting from zeros (acc = acc + row.to(acc_dtype), one add per rank).
    """
    num_ranks = len(handles)
    width = rows_per_rank[0].shape[1:]
    accs = [torch.zeros((num_tokens[i], *width), dtype=acc_dtype) for i in range(num_ranks)]
    for j in range(num_ranks):
        rpm, src_idx = handles[j][1], handles[j][2]
        for i in range(num_ranks):
            begin = int(rpm[i - 1, j]) if i > 0 else 0
            end = int(rpm[i, j])
            for p in range(begin, end):
                t = int(src_idx[p])
                accs[i][t] = accs[i][t] + rows_per_rank[j][p].to(acc_dtype)
    return accs


def reference_combine(xs, topk_weights, bias_0s, bias_1s, handles):
    """Reference of ``ep_ops::combine`` over all ranks.

    Args:
        xs[j]: ``[N_j, H]`` float rows in the order dispatch delivered them to rank j (only the
            first rank_prefix_matrix[R-1][j] rows count; worst-token padding is ignored).
        topk_weights[j]: ``[N_j, K]`` float32 or None (on all ranks).
        bias_0s[i], bias_1s[i]: ``[T_i, H]`` of x's dtype or None.
        handles[i]: (is_token_in_rank, rank_prefix_matrix, recv_src_idx) of the dispatch.
    Returns:
        per rank i (combined_x ``[T_i, H]`` x's dtype, combined_topk_weights ``[T_i, K]`` float32
        or empty float32). For each token: acc = 0 (float32; float64 for float64 x); acc += row
        for every destination rank in ascending order; acc += bias_0; acc += bias_1; cast to x's
        dtype. Weights likewise in float32, without bias. Tokens sent nowhere get 0 (+ biases).
    """
    xs = list(xs)
    num_ranks = len(xs)
    handles = _check_handles(handles, num_ranks)
    topk_weights = _per_rank(topk_weights, num_ranks, "topk_weights")
    bias_0s = _per_rank(bias_0s, num_ranks, "bias_0s")
    bias_1s = _per_rank(bias_1s, num_ranks, "bias_1s")
    dtype = xs[0].dtype
    for j, x in enumerate(xs):
        if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or x.dtype != dtype:
            raise ValueError(f"x of rank {j} must be 2-D {dtype} (not FP8), got {x.dtype} {tuple(x.shape)}")
        if x.size(0) != handles[j][2].size(0):
            raise ValueError(
                f"x of rank {j} has {x.size(0)} rows, the handle received {handles[j][2].size(0)}"
            )
    num_tokens = [h[0].size(0) for h in handles]
    acc_dtype = _accumulate_dtype(dtype)

    accs = _combine_rows(xs, handles, acc_dtype, num_tokens)
    weight_accs = None
    if topk_weights[0] is not None:
        weight_accs = _combine_rows(topk_weights, handles, torch.float32, num_tokens)

    outputs = []
    for i in range(num_ranks):
        acc = accs[i]
        if bias_0s[i] is not None:
            acc = acc + bias_0s[i].to(acc_dtype)
        if bias_1s[i] is not None:
            acc = acc + bias_1s[i].to(acc_dtype)
        combined_weights = weight_accs[i] if weight_accs is not None else torch.empty(0, dtype=torch.float32)
        outputs.append((acc.to(dtype), combined_weights))
    return outputs


# ---------------------------------------------------------------------------------------------
# fused permute: dispatch_permuted / combine_permuted
# ---------------------------------------------------------------------------------------------


def _permuted_layout(local: torch.Tensor, num_local: int, pad_multiple: int, num_out: int):
    """The grouped layout of one rank's pairs (row r, slot k) with local expert local[r, k]:
    group e holds expert e's pairs in row order, padded to pad_multiple; groups back to back.
    Returns (pair_slot ``[N, K]`` int64 (-1: no pair, or dropped at or past num_out),
    tokens_per_expert ``[E_local]`` int64 (padded sizes), P)."""
    num_rows, num_topk = local.shape
    pair_slot = torch.full((num_rows, num_topk), -1, dtype=torch.int64)
    sizes, offset = [], 0
    for e in range(num_local):
        pairs = [(r, k) for r in range(num_rows) for k in range(num_topk) if int(local[r, k]) == e]
        for position, (r, k) in enumerate(pairs):
            slot = offset + position
            if num_out == 0 or slot < num_out:
                pair_slot[r, k] = slot
        sizes.append(_round_up(len(pairs), pad_multiple))
        offset += sizes[-1]
    return pair_slot, torch.tensor(sizes, dtype=torch.int64), num_out if num_out > 0 else offset


def reference_dispatch_permuted(
    xs,
    x_scales,
    topk_idxs,
    topk_weights,
    is_token_in_ranks,
    num_experts: int,
    num_worst_tokens: int = 0,
    pad_multiple: int = 1,
    num_out: int = 0,
):
    """Reference of ``ep_ops::dispatch_permuted``: ``reference_dispatch``, then each rank's
    received rows copied to their pairs' rows of the grouped layout (``ep_ops.permute``'s).

    Args: as ``reference_dispatch`` (topk_idxs required, each expert at most once per row), and
        pad_multiple: each expert group padded with zero rows to this multiple (1 = none).
        num_out: 0 = exact (P = the padded total); > 0 = P on every rank, pairs whose slot is at
            or past it dropped.
    Returns:
        per rank j the 7-tuple (permuted_x ``[P, H]`` x's dtype (zero padding rows),
        permuted_x_scales ``[P, H/128]`` float32 or empty, permuted_probs ``[P]`` float32 (the
        pair's weight, 0 on padding) or empty, tokens_per_expert ``[E_local]`` int64, pair_slot
        ``[N, K]`` int64, rank_prefix_matrix ``[R, R]`` int32, recv_src_idx ``[N]`` int32).
    """
    if topk_idxs is None:
        raise ValueError("topk_idxs is required")
    if pad_multiple < 1 or num_out < 0:
        raise ValueError(f"pad_multiple must be >= 1 and num_out >= 0, got {pad_multiple}, {num_out}")
    dispatched = reference_dispatch(
        xs, x_scales, topk_idxs, topk_weights, is_token_in_ranks, num_experts, 1, num_worst_tokens
    )
    num_local = _num_local_experts(num_experts, len(dispatched))
    outputs = []
    for recv_x, recv_scales, local, weights, _, rpm, src_idx in dispatched:
        pair_slot, tokens_per_expert, num_permuted = _permuted_layout(local, num_local, pad_multiple, num_out)
        has_scales, has_weights = recv_scales.dim() == 2, weights.dim() == 2
        permuted_x = torch.zeros((num_permuted, recv_x.size(1)), dtype=recv_x.dtype)
        permuted_scales = torch.zeros((num_permuted, recv_scales.size(1)) if has_scales else (0,))
        probs = torch.zeros((num_permuted,) if has_weights else (0,))
        for r, k in (pair_slot >= 0).nonzero().tolist():
            slot = int(pair_slot[r, k])
            permuted_x[slot] = recv_x[r]
            if has_scales:
                permuted_scales[slot] = recv_scales[r]
            if has_weights:
                probs[slot] = weights[r, k]
        outputs.append((permuted_x, permuted_scales, probs, tokens_per_expert, pair_slot, rpm, src_idx))
    return outputs


def reference_combine_permuted(hs, probs, pair_slots, handles):
    """Reference of ``ep_ops::combine_permuted``.

    Args (one entry per rank):
        hs[j]: ``[P_j, H]`` float in the permuted layout; probs[j]: ``[P_j]`` float32 or None.
        pair_slots[j]: ``[N_j, K]`` int64 from the dispatch; handles[j]: (is_token_in_rank,
            rank_prefix_matrix, recv_src_idx).
    Returns:
        per rank i (combined_x ``[T_i, H]`` h's dtype, combined_probs ``[T_i, K]`` float32 or
        empty float32). Received row n of rank j is first acc = h[pair_slot[n, 0]] (a zero row
        where the slot is -1), acc = acc + h[pair_slot[n, k]] for k = 1..K-1, in float32
        (float64 for float64 h), cast to h's dtype (``ep_ops.permute.unpermute``); probs give
        probs[pair_slot[n, k]] (0 where -1). Then ``reference_combine`` of those rows.
    """
    num_ranks = len(hs)
    probs = _per_rank(probs, num_ranks, "probs")
    rows, weights = [], []
    for h, p, pair_slot in zip(hs, probs, pair_slots, strict=True):
        acc_dtype = _accumulate_dtype(h.dtype)
        zero = torch.zeros(h.size(1), dtype=acc_dtype)
        sums = torch.empty((pair_slot.size(0), h.size(1)), dtype=h.dtype)
        pair_probs = torch.zeros(pair_slot.shape)
        for n in range(pair_slot.size(0)):
            acc = None
            for k, slot in enumerate(pair_slot[n].tolist()):
                value = h[slot].to(acc_dtype) if slot >= 0 else zero
                acc = value if acc is None else acc + value
                if p is not None and slot >= 0:
                    pair_probs[n, k] = p[slot]
            sums[n] = acc.to(h.dtype)
        rows.append(sums)
        weights.append(pair_probs)
    return reference_combine(rows, weights if probs[0] is not None else None, None, None, handles)


# ---------------------------------------------------------------------------------------------
# FP8 cast and UE8M0 packing
# ---------------------------------------------------------------------------------------------


def _round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(scale)) for positive normal float32, exactly (on the bits, no libm)."""
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    has_mantissa = (bits & 0x7FFFFF) != 0
    exponent = exponent + has_mantissa.to(torch.int32)
    return (exponent << 23).view(torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False):
    """Per-token, per-128-channel FP8 cast (what low_latency_dispatch does in-kernel).

    Args:
        x: ``[T, H]`` bfloat16 (any float works), H a multiple of 128.
    Returns:
        (``[T, H]`` float8_e4m3fn, scales_inv ``[T, H/128]`` float32) with, per group,
        amax = max(max|x|, 1e-4) in float32, scale_inv = amax / 448 (rounded up to a power of 2
        when round_scale), q = (x.float() * (1 / scale_inv)).to(float8_e4m3fn), the reciprocal
        taken in float32 first.
    """
    if x.dim() != 2 or x.size(1) % FP8_BLOCK != 0:
        raise ValueError(f"x must be [T, H] with H a multiple of 128, got {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    groups = x.float().view(num_tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = groups.abs().amax(dim=-1).clamp(min=FP8_AMAX_MIN)
    scale_inv = amax / FP8_MAX
    if round_scale:
        scale_inv = _round_up_pow2(scale_inv)
    scale = torch.ones_like(scale_inv) / scale_inv
    q = (groups * scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.view(num_tokens, hidden), scale_inv.contiguous()


def pack_ue8m0(scales_inv: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` float32 power-of-2 scales -> ``[..., G/4]`` int32: byte = exponent bits
    ((bits >> 23) & 0xFF), group 4j in the lowest byte of int32 j."""
    if scales_inv.size(-1) % UE8M0_PACK != 0:
        raise ValueError(f"the scale count must be a multiple of 4, got {scales_inv.size(-1)}")
    exponent = ((scales_inv.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int64)
    exponent = exponent.view(*scales_inv.shape[:-1], scales_inv.size(-1) // UE8M0_PACK, UE8M0_PACK)
    packed = torch.zeros(exponent.shape[:-1], dtype=torch.int64)
    for b in range(UE8M0_PACK):
        packed |= exponent[..., b] << (8 * b)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement wrap
    return packed.to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """``[..., G/4]`` int32 UE8M0 -> ``[..., G]`` float32 scales 2 ** (byte - 127)."""
    wide = packed.to(torch.int64)
    exponents = [(wide >> (8 * b)) & 0xFF for b in range(UE8M0_PACK)]
    exponent = torch.stack(exponents, dim=-1).flatten(-2)
    return (exponent << 23).to(torch.int32).view(torch.float32)


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decodes ``[..., H]`` float8_e4m3fn with scales ``[..., H/128]`` float32 or
    ``[..., H/512]`` int32 UE8M0 to bfloat16: (x.float() * scale_of_its_group).to(bfloat16)."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    elif scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 or int32 (UE8M0), got {scales.dtype}")
    hidden = x_fp8.size(-1)
    if scales.size(-1) * FP8_BLOCK != hidden:
        raise ValueError(f"scales have {scales.size(-1)} groups, hidden size {hidden} needs {hidden // 128}")
    groups = x_fp8.float().reshape(*x_fp8.shape[:-1], hidden // FP8_BLOCK, FP8_BLOCK)
    return (groups * scales.unsqueeze(-1)).reshape(x_fp8.shape).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# LogFMT-10
# ---------------------------------------------------------------------------------------------


def logfmt_encode(v: torch.Tensor):
    """LogFMT-10 encoding of a float32 vector ``[H]`` (H a multiple of 128), per 128 channels.

    Returns (codes ``[H]`` int32 = (sign << 9) | q, q in [1, 511], 0 for exact zeros;
    lmin ``[H/128]`` float32; step ``[H/128]`` float32). A group of zeros has lmin = step = 0.
    q = 1 when step == 0, else round((log2|v| - lmin) / step) + 1, with step = (lmax - lmin) / 510.
    """
    v = v.float().reshape(-1, FP8_BLOCK)
    codes = torch.zeros(v.shape, dtype=torch.int32)
    lmins = torch.zeros(v.size(0), dtype=torch.float32)
    steps = torch.zeros(v.size(0), dtype=torch.float32)
    for g in range(v.size(0)):
        group = v[g]
        nz = group != 0
        if not bool(nz.any()):
            continue
        logs = torch.log2(group.abs())
        lmin, lmax = logs[nz].min(), logs[nz].max()
        step = (lmax - lmin) / (LOGFMT_LEVELS - 1)
        if float(step) == 0.0:
            q = torch.ones_like(codes[g])
        else:
            q = (torch.round((logs - lmin) / step) + 1).clamp(1, LOGFMT_LEVELS).to(torch.int32)
        sign = (group < 0).to(torch.int32)
        codes[g] = torch.where(nz, (sign << 9) | q, 0)
        lmins[g], steps[g] = lmin, step
    return codes.flatten(), lmins, steps


def logfmt_decode(codes: torch.Tensor, lmins: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`logfmt_encode`: ``[H]`` float32, code 0 -> 0, else
    (-1)^sign * exp2(lmin + (q - 1) * step)."""
    codes = codes.reshape(-1, FP8_BLOCK)
    q = (codes & 0x1FF).float()
    negative = (codes >> 9) & 1 == 1
    magnitude = torch.exp2(lmins.unsqueeze(-1) + (q - 1) * steps.unsqueeze(-1))
    value = torch.where(negative, -magnitude, magnitude)
    return torch.where(codes == 0, torch.zeros((), dtype=torch.float32), value).flatten()


def logfmt_roundtrip(v: torch.Tensor) -> torch.Tensor:
    """LogFMT-10 encode then decode of ``[H]`` (or ``[..., H]``) values; returns float32 of v's
    shape. Bits may differ from the C++ kernels (libm log2/exp2): compare with a tolerance."""
    flat = v.float().reshape(-1, v.size(-1))
    rows = [logfmt_decode(*logfmt_encode(row)) for row in flat]
    return torch.stack(rows).reshape(v.shape) if rows else flat.reshape(v.shape)


# ---------------------------------------------------------------------------------------------
# low-latency layout
# ---------------------------------------------------------------------------------------------


class _LowLatencyLayout:
    """Where every (source rank s, token t, k) lands in the low-latency layout.

    Attributes:
        rows[j][e]: list of (s, t) for local expert e of rank j, in block order (s, then t).
        place[s][t][k]: (j, e, pos) of the row of token t's k-th expert, or None (-1).
        slot_tokens[s][j]: rank s's tokens with at least one expert on rank j (each in slot t, its
        own index).
    """

    def __init__(self, topk_idxs: list, num_experts: int, num_max: int):
        num_ranks = len(topk_idxs)
        num_local = _num_local_experts(num_experts, num_ranks)
        self.num_ranks, self.num_local, self.num_max = num_ranks, num_local, num_max
        self.rows = [[[] for _ in range(num_local)] for _ in range(num_ranks)]
        self.place = []
        self.slot_tokens = [[[] for _ in range(num_ranks)] for _ in range(num_ranks)]
        for s, topk_idx in enumerate(topk_idxs):
            if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
                raise ValueError(f"topk_idx of rank {s} must be 2-D int64")
            if topk_idx.size(0) > num_max:
                raise ValueError(
                    f"rank {s} has {topk_idx.size(0)} tokens, more than "
                    f"num_max_dispatch_tokens_per_rank ({num_max})"
                )
            ids = topk_idx.tolist()
            for row in ids:
                if any(g >= num_experts for g in row):
                    raise ValueError(f"topk_idx of rank {s} has an expert id >= num_experts ({num_experts})")
            self.place.append([[None] * len(row) for row in ids])
        # Block order: s ascending, then t ascending; one row per (token, distinct local expert).
        for s, topk_idx in enumerate(topk_idxs):
            for t, row in enumerate(topk_idx.tolist()):
                positions = {}
                for k, g in enumerate(row):
                    if g < 0:
                        continue
                    if g not in positions:
                        j, e = g // num_local, g % num_local
                        positions[g] = (j, e, len(self.rows[j][e]))
                        self.rows[j][e].append((s, t))
                    self.place[s][t][k] = positions[g]
                for j in sorted({g // num_local for g in row if g >= 0}):
                    self.slot_tokens[s][j].append(t)

    def block_begin(self, j: int, e: int, s: int) -> int:
        """Position of source rank s's first row in expert e's block on rank j."""
        return sum(1 for (src, _) in self.rows[j][e] if src < s)

    def block_count(self, j: int, e: int, s: int) -> int:
        return sum(1 for (src, _) in self.rows[j][e] if src == s)

    def flat_row(self, e: int, pos: int) -> int:
        """Index of row (e, pos) in the flattened [E_local * R*M] rows."""
        return e * self.num_ranks * self.num_max + pos


def reference_low_latency_dispatch(
    xs,
    topk_idxs,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool = False,
    round_scale: bool = False,
    use_ue8m0: bool = False,
):
    """Reference of ``ep_ops::low_latency_dispatch`` over all ranks.

    Args:
        xs[s]: ``[T_s, H]`` bfloat16, T_s <= M. topk_idxs[s]: ``[T_s, K]`` int64 (-1 = none).
    Returns:
        per rank j the 6-tuple:
        recv_x ``[E_local, R*M, H]`` bfloat16 (float8_e4m3fn with use_fp8, cast on the source row
        by :func:`per_token_cast_to_fp8`), zero in unused rows;
        recv_x_scales ``[E_local, R*M, H/128]`` float32 (``[E_local, R*M, H/512]`` int32 UE8M0),
        column-major in the last two dims, zero in unused rows; or empty float32 without FP8;
        recv_count ``[E_local]`` int32; src_info ``[E_local, R*M]`` int32 (-1 unused);
        layout_range ``[E_local, R]`` int64 = (begin << 32) | count;
        recv_token_slots ``[R, M, K]`` int32 = e * R*M + pos for token t of source s whose
        k-th expert is local expert e of j, else -1 (a token's slot is its own index t).
        Expert e's block holds one row per (token, distinct expert), by source rank then token.
    """
    xs = list(xs)
    num_ranks = len(xs)
    topk_idxs = _per_rank(topk_idxs, num_ranks, "topk_idxs")
    num_max = num_max_dispatch_tokens_per_rank
    if num_max <= 0:
        raise ValueError(f"num_max_dispatch_tokens_per_rank must be positive, got {num_max}")
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("use_ue8m0 needs use_fp8 and round_scale")
    hidden = xs[0].size(1)
    num_topk = topk_idxs[0].size(1)
    for s, (x, topk_idx) in enumerate(zip(xs, topk_idxs, strict=True)):
        if x.dim() != 2 or x.dtype != torch.bfloat16 or x.size(1) != hidden:
            raise ValueError(f"x of rank {s} must be bfloat16 [T, {hidden}], got {x.dtype} {tuple(x.shape)}")
        if tuple(topk_idx.shape) != (x.size(0), num_topk):
            raise ValueError(
                f"topk_idx of rank {s} must be [{x.size(0)}, {num_topk}], got {tuple(topk_idx.shape)}"
            )
    if use_fp8 and hidden % (FP8_BLOCK * (UE8M0_PACK if use_ue8m0 else 1)) != 0:
        raise ValueError(f"hidden size {hidden} is not a multiple of the FP8/UE8M0 block")
    layout = _LowLatencyLayout(topk_idxs, num_experts, num_max)
    num_local, slots = layout.num_local, num_ranks * num_max

    # What each source rank puts on the wire: the (possibly FP8-cast) row and its scales.
    payloads, payload_scales = xs, [None] * num_ranks
    if use_fp8:
        casts = [per_token_cast_to_fp8(x, round_scale) for x in xs]
        payloads = [q for q, _ in casts]
        payload_scales = [pack_ue8m0(sc) if use_ue8m0 else sc for _, sc in casts]

    outputs = []
    for j in range(num_ranks):
        recv_x = torch.zeros((num_local, slots, hidden), dtype=payloads[0].dtype)
        recv_x_scales = torch.empty(0, dtype=torch.float32)
        if use_fp8:
            scale_cols = payload_scales[0].size(1)
            scales_t = torch.zeros((num_local, scale_cols, slots), dtype=payload_scales[0].dtype)
            recv_x_scales = scales_t.transpose(1, 2)
        recv_count = torch.zeros(num_local, dtype=torch.int32)
        src_info = torch.full((num_local, slots), -1, dtype=torch.int32)
        layout_range = torch.zeros((num_local, num_ranks), dtype=torch.int64)
        for e in range(num_local):
            for pos, (s, t) in enumerate(layout.rows[j][e]):
                recv_x[e, pos] = payloads[s][t]
                if use_fp8:
                    recv_x_scales[e, pos] = payload_scales[s][t]
                src_info[e, pos] = t
            recv_count[e] = len(layout.rows[j][e])
            for s in range(num_ranks):
                begin, count = layout.block_begin(j, e, s), layout.block_count(j, e, s)
                layout_range[e, s] = (begin << 32) | count
        recv_token_slots = torch.full((num_ranks, num_max, num_topk), -1, dtype=torch.int32)
        for s in range(num_ranks):
            for t in layout.slot_tokens[s][j]:
                for k, where in enumerate(layout.place[s][t]):
                    if where is not None and where[0] == j:
                        recv_token_slots[s, t, k] = layout.flat_row(where[1], where[2])
        outputs.append((recv_x, recv_x_scales, recv_count, src_info, layout_range, recv_token_slots))
    return outputs


def _check_ll_combine_inputs(xs, topk_idxs, topk_weights, num_max, num_experts) -> _LowLatencyLayout:
    num_ranks = len(xs)
    layout = _LowLatencyLayout(topk_idxs, num_experts, num_max)
    for j, x in enumerate(xs):
        if (
            x.dim() != 3
            or x.dtype != torch.bfloat16
            or tuple(x.shape[:2]) != (layout.num_local, num_ranks * num_max)
        ):
            raise ValueError(
                f"x of rank {j} must be bfloat16 [{layout.num_local}, {num_ranks * num_max}, H], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
    for s, (idx, w) in enumerate(zip(topk_idxs, topk_weights, strict=True)):
        if w.dtype != torch.float32 or w.shape != idx.shape:
            raise ValueError(
                f"topk_weights of rank {s} must be float32 {tuple(idx.shape)}, got {w.dtype} {tuple(w.shape)}"
            )
    return layout


def _ll_partial(x_j: torch.Tensor, places: list, weights: torch.Tensor, j: int) -> torch.Tensor:
    """Expert rank j's partial for one token: p = 0 (float32); p = p + w[k] * row for each k whose
    expert is on j, in k order (separate multiply and add); rounded once to bfloat16."""
    p = torch.zeros(x_j.size(-1), dtype=torch.float32)
    for k, where in enumerate(places):
        if where is not None and where[0] == j:
            _, e, pos = where
            p = p + weights[k] * x_j[e, pos].float()
    return p.to(torch.bfloat16)


def reference_low_latency_combine(
    xs,
    topk_idxs,
    topk_weights,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_logfmt: bool = False,
):
    """Reference of ``ep_ops::low_latency_combine`` over all ranks.

    Args:
        xs[j]: ``[E_local, R*M, H]`` bfloat16 expert outputs in low_latency_dispatch's layout.
        topk_idxs[s], topk_weights[s]: rank s's ``[T_s, K]`` int64 / float32 routing.
    Returns:
        per rank s combined_x ``[T_s, H]`` bfloat16. Each expert rank j computes a partial per
        token (see :func:`_ll_partial`), optionally LogFMT-10 round-tripped; the token's rank sums
        the partials of the ranks holding its experts, ascending, in float32 from 0 and rounds
        to bfloat16. Tokens without experts get 0.
    """
    xs = list(xs)
    num_ranks = len(xs)
    topk_idxs = _per_rank(topk_idxs, num_ranks, "topk_idxs")
    topk_weights = _per_rank(topk_weights, num_ranks, "topk_weights")
    layout = _check_ll_combine_inputs(
        xs, topk_idxs, topk_weights, num_max_dispatch_tokens_per_rank, num_experts
    )
    hidden = xs[0].size(2)
    outputs = []
    for s in range(num_ranks):
        num_tokens = topk_idxs[s].size(0)
        combined = torch.zeros((num_tokens, hidden), dtype=torch.bfloat16)
        for t in range(num_tokens):
            places = layout.place[s][t]
            expert_ranks = sorted({where[0] for where in places if where is not None})
            if not expert_ranks:
                continue
            acc = torch.zeros(hidden, dtype=torch.float32)
            for j in expert_ranks:
                partial = _ll_partial(xs[j], places, topk_weights[s][t], j).float()
                if use_logfmt:
                    partial = logfmt_roundtrip(partial)
                acc = acc + partial
            combined[t] = acc.to(torch.bfloat16)
        outputs.append(combined)
    return outputs


def reference_low_latency_combine_backward(
    grad_outs,
    xs,
    topk_idxs,
    topk_weights,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
):
    """Reference of ``ep_ops::low_latency_combine_backward`` over all ranks.

    Args:
        grad_outs[s]: ``[T_s, H]`` bfloat16 gradient of rank s's combined_x.
        xs[j], topk_idxs[s], topk_weights[s]: as in :func:`reference_low_latency_combine`.
    Returns:
        per rank r (grad_x ``[E_local, R*M, H]`` bfloat16, grad_topk_weights ``[T_r, K]`` float32):
        grad_x[e, pos] = (w[k] * g[t].float()).to(bfloat16) for the (token, k) of that row (when
        a token selects the same expert twice, the terms are summed in k order in float32 before
        rounding); zero in unused rows. grad_topk_weights[t, k] = sum_h g[t, h] * x[e, pos, h] in
        float32 (reduction order of torch's sum: compare with a tolerance); 0 where
        topk_idx == -1.
    """
    xs = list(xs)
    num_ranks = len(xs)
    grad_outs = _per_rank(grad_outs, num_ranks, "grad_outs")
    topk_idxs = _per_rank(topk_idxs, num_ranks, "topk_idxs")
    topk_weights = _per_rank(topk_weights, num_ranks, "topk_weights")
    layout = _check_ll_combine_inputs(
        xs, topk_idxs, topk_weights, num_max_dispatch_tokens_per_rank, num_experts
    )
    hidden = xs[0].size(2)
    for s, g in enumerate(grad_outs):
        if g.dtype != torch.bfloat16 or tuple(g.shape) != (topk_idxs[s].size(0), hidden):
            raise ValueError(f"grad_out of rank {s} must be bfloat16 [{topk_idxs[s].size(0)}, {hidden}]")

    grad_xs = [torch.zeros_like(x) for x in xs]
    grad_weights = [torch.zeros(w.shape, dtype=torch.float32) for w in topk_weights]
    for j in range(num_ranks):
        for e in range(layout.num_local):
            for pos, (s, t) in enumerate(layout.rows[j][e]):
                g = grad_outs[s][t].float()
                acc = torch.zeros_like(g)  # like every sum here, from a float32 zero
                for k, where in enumerate(layout.place[s][t]):
                    if where == (j, e, pos):
                        acc = acc + topk_weights[s][t, k] * g
                        grad_weights[s][t, k] = (g * xs[j][e, pos].float()).sum()
                grad_xs[j][e, pos] = acc.to(torch.bfloat16)
    return list(zip(grad_xs, grad_weights, strict=True))
