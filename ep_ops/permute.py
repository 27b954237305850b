"""Grouping received rows by local expert ("permute") and the inverse ("unpermute").

A dispatch delivers rows in source order (source rank, then source token), each with the local
experts it is for. Grouped expert kernels want the opposite: all rows of local expert 0, then of
expert 1, ..., each group optionally padded with zero rows to a multiple (FP8 GEMM tiles) or to
a fixed size (capacity). This module builds that mapping from the routing alone and applies it
with gathers, so it is plain PyTorch: autograd, fake tensors and Inductor handle it, and the
gradient of ``permute`` is ``unpermute`` and vice versa.

Here it runs as a pass of its own after ``ep_ops.dispatch`` (and before ``ep_ops.combine``). The
ops ``ep_ops.dispatch_permuted`` / ``ep_ops.combine_permuted`` fuse it into the communication:
the received rows land straight in this layout and combine sums a row's pairs as it sends the row
back, bitwise equal to ``permute`` after ``dispatch`` and ``unpermute`` before ``combine``
(``make_permute_map``'s ``num_out`` and ``pad_multiple``, not ``rows_per_expert``). This module
stays the documented layout, the reference of those ops, and the path of the token dispatcher's
capacity layout.

Notation: N = received rows, K = expert slots per row, E = local experts, P = permuted rows.
A *pair* is (row r, slot k) with local expert ``local_idx[r, k]`` (-1 = no expert here); a row
must name each local expert at most once (top-k indices do). Within an expert group the pairs
come in row order, so the layout is deterministic.
"""

from typing import NamedTuple

import torch


class PermuteMap(NamedTuple):
    """Where every (row, slot) pair goes in the permuted layout, and back.

    Attributes:
        pair_slot: ``[N, K]`` int64, the permuted row of each pair, or -1 (no local expert,
            dropped for capacity, or past ``num_out``).
        slot_pair: ``[P]`` int64, the flat pair index ``r * K + k`` of each permuted row, or -1
            for a padding row.
        tokens_per_expert: ``[E]`` int64 rows of each expert group, padding included.
    """

    pair_slot: torch.Tensor
    slot_pair: torch.Tensor
    tokens_per_expert: torch.Tensor


def _round_up(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return (t + (multiple - 1)) // multiple * multiple


def make_permute_map(
    local_idx: torch.Tensor,
    num_local_experts: int,
    *,
    pad_multiple: int | None = None,
    num_out: int | None = None,
    rows_per_expert: int | None = None,
) -> PermuteMap:
    """Builds the grouped layout of the pairs in ``local_idx``.

    Args:
        local_idx: ``[N, K]`` int64 local expert ids in ``[0, num_local_experts)``, -1 = none.
        num_local_experts: E.
        pad_multiple: each group's row count is rounded up to this multiple (zero rows).
        num_out: static P. Groups are laid out back to back; pairs that land at or past
            ``num_out`` are dropped (their rows get no expert output). No host sync.
        rows_per_expert: static group size G (capacity): group e occupies rows
            ``[e * G, (e + 1) * G)``, pairs past G are dropped; P = E * G. Rounded up to
            ``pad_multiple``. No host sync.

    With neither ``num_out`` nor ``rows_per_expert`` (exact mode) P is the sum of the padded
    group sizes, read back from the device once (an unbacked SymInt under ``torch.compile``).
    """
    if num_out is not None and rows_per_expert is not None:
        raise ValueError("make_permute_map: give num_out or rows_per_expert, not both")
    if local_idx.dim() != 2:
        raise ValueError(f"make_permute_map: local_idx must be 2-D [N, K], got {tuple(local_idx.shape)}")
    if local_idx.dtype != torch.int64:
        raise TypeError(f"make_permute_map: local_idx must be int64, got {local_idx.dtype}")
    if pad_multiple is not None and pad_multiple < 1:
        raise ValueError(f"make_permute_map: pad_multiple must be >= 1, got {pad_multiple}")
    num_rows, num_slots = local_idx.shape
    num_experts = num_local_experts
    device = local_idx.device
    valid = local_idx >= 0
    expert = torch.where(valid, local_idx, num_experts)  # column E collects the empty slots

    # Position of each pair inside its expert group: earlier rows of the same expert first.
    onehot = torch.zeros((num_rows, num_experts + 1), dtype=torch.int64, device=device)
    onehot.scatter_(1, expert, 1)
    before = torch.cumsum(onehot, dim=0) - onehot
    position = before.gather(1, expert)
    counts = onehot[:, :num_experts].sum(dim=0)

    if rows_per_expert is not None:
        group = (
            rows_per_expert if pad_multiple is None else -(-rows_per_expert // pad_multiple) * pad_multiple
        )
        keep = valid & (position < group)
        slot = expert * group + position
        total = num_experts * group
        tokens_per_expert = torch.full((num_experts,), group, dtype=torch.int64, device=device)
    else:
        padded = counts if pad_multiple is None else _round_up(counts, pad_multiple)
        offsets = torch.cumsum(padded, dim=0) - padded
        offsets = torch.cat([offsets, offsets.new_zeros(1)])  # the empty-slot column
        slot = offsets[expert] + position
        if num_out is not None:
            total = num_out
            keep = valid & (slot < total)
        else:
            total = padded.sum().item()
            torch._check(total >= 0)
            keep = valid
        tokens_per_expert = padded

    pair_slot = torch.where(keep, slot, -1)
    # Inverse map: one write per kept pair; the dropped ones all go to the extra last entry.
    pair_ids = torch.arange(num_rows * num_slots, dtype=torch.int64, device=device)
    slot_pair = torch.full((total + 1,), -1, dtype=torch.int64, device=device)
    slot_pair.scatter_(0, torch.where(keep, slot, total).reshape(-1), pair_ids)
    return PermuteMap(pair_slot, slot_pair[:total], tokens_per_expert)


def slot_pair_of(pair_slot: torch.Tensor, num_permuted) -> torch.Tensor:
    """``PermuteMap.slot_pair`` rebuilt from ``pair_slot`` ([N, K]) and P = ``num_permuted``
    (the fused dispatch returns only pair_slot)."""
    keep = pair_slot >= 0
    pair_ids = torch.arange(pair_slot.numel(), dtype=torch.int64, device=pair_slot.device)
    slot_pair = torch.full((num_permuted + 1,), -1, dtype=torch.int64, device=pair_slot.device)
    slot_pair.scatter_(0, torch.where(keep, pair_slot, num_permuted).reshape(-1), pair_ids)
    return slot_pair[:num_permuted]


def permute(x: torch.Tensor, pmap: PermuteMap, num_slots: int) -> torch.Tensor:
    """Rows of ``x`` ([N, H]) in the grouped layout: ``[P, H]``, padding rows zero.

    ``num_slots`` is K of the map (pair ``r * K + k`` is row r)."""
    # A leading zero row serves the padding slots (and keeps the gather valid when N = 0).
    x_ext = torch.cat([x.new_zeros((1, x.size(1))), x])
    rows = torch.where(pmap.slot_pair >= 0, pmap.slot_pair // num_slots + 1, 0)
    return x_ext.index_select(0, rows)


def permute_probs(weights: torch.Tensor, pmap: PermuteMap) -> torch.Tensor:
    """The weight of each permuted row: ``weights`` ([N, K]) gathered into ``[P]``, 0 on padding."""
    flat = torch.cat([weights.new_zeros(1), weights.reshape(-1)])
    return flat.index_select(0, pmap.slot_pair + 1)


def unpermute(h: torch.Tensor, pmap: PermuteMap) -> torch.Tensor:
    """Inverse of ``permute``: row r gets the **sum** of its pairs' rows of ``h`` ([P, H]).

    Returns ``[N, H]`` in h's dtype; the sum runs in float32 (float64 for float64) in slot order,
    so it is deterministic."""
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    h_ext = torch.cat([h.new_zeros((1, h.size(1))), h])
    index = pmap.pair_slot + 1
    out = h_ext.index_select(0, index[:, 0]).to(acc_dtype)
    for k in range(1, index.size(1)):
        out = out + h_ext.index_select(0, index[:, k]).to(acc_dtype)
    return out.to(h.dtype)


def unpermute_probs(grad_probs: torch.Tensor, pmap: PermuteMap) -> torch.Tensor:
    """Transpose of ``permute_probs``: ``[P]`` back to ``[N, K]`` (0 where a pair has no slot)."""
    flat = torch.cat([grad_probs.new_zeros(1), grad_probs])
    return flat.index_select(0, (pmap.pair_slot + 1).reshape(-1)).reshape(pmap.pair_slot.shape)
