"""Argument checks shared by ``Buffer``'s normal-mode and low-latency methods."""

import torch


def _check_tensor(t, name: str, method: str, dtype=None, shape=None) -> None:
    """``t`` must be a tensor (of ``dtype``; of ``shape``, where None entries match any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{method}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{method}: {name} must be {dtype}, got {t.dtype}")
    if shape is not None and (
        t.dim() != len(shape) or any(s is not None and t.size(i) != s for i, s in enumerate(shape))
    ):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{method}: {name} must have shape {expected}, got {list(t.shape)}")


def _no_op() -> None:
    """The hook returned without ``return_recv_hook``: the data has already arrived."""
