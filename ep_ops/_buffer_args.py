"""Argument checks shared by ``Buffer``'s normal-mode and low-latency methods."""

import torch


def _check_tensor(t, name: str, method: str, dtype=None, shape=None) -> None:
    """``t`` must be a tensor (of ``dtype``; of ``shape``, where None entries match any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{method}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{method}: {name} must be {dtype}, got {t.dtype}")
    if shape is not None and not _shape_matches(t.shape, shape):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{method}: {name} must have shape {expected}, got {list(t.shape)}")


def _shape_matches(actual, expected) -> bool:
    """``actual`` (a torch.Size) has ``expected``'s rank and sizes, None matching any size. A
    plain loop: this runs several times in every Buffer call."""
    if len(actual) != len(expected):
        return False
    for size, want in zip(actual, expected, strict=True):
        if want is not None and size != want:
            return False
    return True


def _check_handle_tuple(handle, length: int, expected: str, source: str, method: str) -> tuple:
    """``handle`` must be a tuple (or list) of ``length`` items, as ``source`` returned it;
    the error shows ``expected``, the tuple's fields."""
    if not isinstance(handle, (tuple, list)) or len(handle) != length:
        raise ValueError(
            f"{method}: handle must be the tuple {expected} returned by {source}, got {type(handle).__name__}"
            + (f" of length {len(handle)}" if isinstance(handle, (tuple, list)) else "")
        )
    return tuple(handle)


def _no_op() -> None:
    """The hook returned without ``return_recv_hook``: the data has already arrived."""
