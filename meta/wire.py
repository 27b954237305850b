"""Sizes of the byte rows the low-latency halves exchange.

The send halves return these rows as ordinary ``uint8`` tensors, so a compiled graph can hold
them between the send and the recv op. The C++ side computes the same sizes in
``csrc/collective/wire_format.h``; opcheck's fake-vs-real comparison keeps the two in step.
"""

FP8_BLOCK = 128  # channels per FP8 scale
UE8M0_PACK = 4  # UE8M0 scales packed per int32
ROW_ALIGN = 16  # every wire row is padded to 16 bytes so kernels can move it in int4 units


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def dispatch_row_bytes(hidden: int, num_topk: int, use_fp8: bool) -> int:
    """One token's row: payload, float32 scales (FP8), int32 source index, int32 expert ids."""
    payload = hidden if use_fp8 else 2 * hidden
    scales = 4 * (hidden // FP8_BLOCK) if use_fp8 else 0
    return round_up(payload + scales + 4 + 4 * num_topk, ROW_ALIGN)


def logfmt_row_bytes(hidden: int) -> int:
    """LogFMT-10: 10 bits per value, plus a float32 (log-min, log-step) pair per 128 channels."""
    return round_up(hidden * 10 // 8 + 8 * (hidden // FP8_BLOCK), ROW_ALIGN)


def combine_row_bytes(hidden: int, use_logfmt: bool) -> int:
    """One partial sum sent back to a token's rank: BF16, or LogFMT-10 encoded."""
    return logfmt_row_bytes(hidden) if use_logfmt else round_up(2 * hidden, ROW_ALIGN)
