"""Input checks shared by the fakes. They repeat the kernels' checks with ``torch._check`` so
that a traced program fails at trace time with the same message a real call would give."""

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def world_size(group_name: str) -> int:
    """Number of ranks of the process group registered under ``group_name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name).size()
    except RuntimeError as error:
        raise ValueError(
            f"ep_ops: group_name '{group_name}' names no registered process group (pass "
            "group.group_name of a group created with torch.distributed)"
        ) from error


def check(cond, op: str, message: str) -> None:
    torch._check(cond, lambda: f"ep_ops.{op}: {message}")


def check_value(cond, op: str, message: str) -> None:
    torch._check_value(cond, lambda: f"ep_ops.{op}: {message}")


def check_type(cond, op: str, message: str) -> None:
    torch._check_type(cond, lambda: f"ep_ops.{op}: {message}")


def check_matrix(t: torch.Tensor, op: str, name: str, dtype: torch.dtype, rows, cols=None) -> None:
    """``t`` must be 2-D with ``rows`` rows (and ``cols`` columns when given) of ``dtype``."""
    check_value(t.dim() == 2, op, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    check_type(t.dtype == dtype, op, f"{name} must be {dtype}, got {t.dtype}")
    check_value(t.size(0) == rows, op, f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    if cols is not None:
        check_value(
            t.size(1) == cols,
            op,
            f"{name} must have {cols} columns, got shape {tuple(t.shape)}",
        )


def check_same_device(t: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    check_value(t.device == x.device, op, f"{name} must be on {x.device} like x, got {t.device}")


def check_experts(num_experts: int, num_ranks: int, op: str) -> int:
    """Returns the number of experts per rank."""
    check_value(num_experts > 0, op, f"num_experts must be positive, got {num_experts}")
    check_value(
        num_experts % num_ranks == 0,
        op,
        f"num_experts ({num_experts}) must be a multiple of the number of ranks ({num_ranks})",
    )
    return num_experts // num_ranks


def check_payload(x: torch.Tensor, x_scales, op: str) -> int:
    """Checks a BF16/float payload or an FP8 (x, x_scales) pair; returns the scale columns."""
    check_value(x.dim() == 2, op, f"x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x_scales is None:
        check_type(
            x.dtype in FLOAT_DTYPES,
            op,
            f"x must be bfloat16, float16, float32 or float64 (or float8_e4m3fn with x_scales), "
            f"got {x.dtype}",
        )
        return 0
    check_type(
        x.dtype == torch.float8_e4m3fn,
        op,
        f"x must be float8_e4m3fn when x_scales is given, got {x.dtype}",
    )
    hidden = x.size(1)
    check_value(hidden % 128 == 0, op, f"FP8 hidden size must be a multiple of 128, got {hidden}")
    check_matrix(x_scales, op, "x_scales", torch.float32, x.size(0), hidden // 128)
    check_same_device(x_scales, x, op, "x_scales")
    return hidden // 128
