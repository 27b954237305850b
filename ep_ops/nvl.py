"""The NVLink backend's peer memory: symmetric-memory buffers per process group.

A group holds up to two: the normal ops' buffer and the low-latency ops' buffer. With one
registered, the CUDA ops of that kind (dispatch, cached dispatch, combine; or the low-latency
dispatch and combine and their halves) run the NVLink kernels (csrc/cuda/); without one they use
the collective backend (NCCL). ``ep_ops.Buffer`` registers them when built on an NCCL group of one
host (``num_nvl_bytes`` for the normal one, ``num_rdma_bytes`` for the low-latency one); code that
calls the ops directly (compiled graphs) calls :func:`init_nvl_buffer` once, before any capture.
"""

import os

import torch
import torch.distributed as dist

MAX_NVL_RANKS = 8
CONTROL_BYTES = 64 * 1024  # csrc/cuda/nvl_buffer.h kControlBytes
DEFAULT_TIMEOUT_S = 100.0  # as long as DeepEP's kernels wait; EP_OPS_NVL_TIMEOUT_S overrides

from ep_ops.meta.wire import ROW_ALIGN, combine_row_bytes, dispatch_row_bytes, round_up  # noqa: E402


def nvl_usable(group: dist.ProcessGroup) -> bool:
    """NVLink kernels apply: CUDA build, NCCL group, at most 8 ranks, all on this host with peer
    access. ``EP_OPS_BACKEND=collective`` turns them off."""
    if os.environ.get("EP_OPS_BACKEND", "auto") == "collective":
        return False
    if not torch.cuda.is_available() or dist.get_backend(group) != "nccl":
        return False
    size = group.size()
    if size > MAX_NVL_RANKS or size > torch.cuda.device_count():
        return False  # ranks beyond this host's GPUs: not one NVLink domain
    me = torch.cuda.current_device()
    return all(torch.cuda.can_device_access_peer(me, d) for d in range(torch.cuda.device_count()) if d != me)


# (group_name, low_latency) -> [local buffer, number of holders]: several Buffers on one group
# share one registration, released when the last holder releases it. Every rank makes the same
# calls in the same order, so every rank takes the same branch below.
_registered: dict[tuple[str, bool], list] = {}


def nvl_timeout_s(timeout_s: float | None = None) -> float:
    """The NVLink kernels' wait timeout in seconds: ``timeout_s`` if given, else the environment's
    ``EP_OPS_NVL_TIMEOUT_S``, else 100. Checked: a positive finite number."""
    if timeout_s is None:
        value = os.environ.get("EP_OPS_NVL_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(value)
        except ValueError:
            raise ValueError(f"EP_OPS_NVL_TIMEOUT_S must be a number of seconds, got {value!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}")
    if not 0 < timeout_s < 1e6:
        raise ValueError(f"timeout_s must be a positive number of seconds below 1e6, got {timeout_s}")
    return float(timeout_s)


def init_nvl_buffer(
    group: dist.ProcessGroup, num_bytes: int, low_latency: bool = False, timeout_s: float | None = None
) -> torch.Tensor:
    """Allocates and exchanges the group's NVLink buffer (every rank of the group must call this,
    in the same order, outside graph capture): the low-latency ops' buffer with ``low_latency``,
    the normal ops' otherwise. Returns the local uint8 tensor; keep it alive and call
    :func:`release_nvl_buffer` once per call when done. A group that already has a buffer of that
    kind of at least ``num_bytes`` shares it (and its timeout).

    ``timeout_s`` (default :func:`nvl_timeout_s`): how long a kernel waits for a peer. When a wait
    gives up, the kernels of that call stop without touching data, the buffer becomes unusable,
    and the next op on it (or :func:`check_nvl_buffers`) raises a ``RuntimeError`` naming the
    rank, the peer and the phase; an exact-mode dispatch raises in the same call."""
    timeout_s = nvl_timeout_s(timeout_s)
    key = (group.group_name, low_latency)
    held = _registered.get(key)
    if held is not None and held[0].numel() >= num_bytes:
        held[1] += 1
        return held[0]
    import warnings

    from torch.distributed import _symmetric_memory as symm_mem

    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, a no-op in newer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
    hint = torch.empty(0, device=torch.device("cuda", torch.cuda.current_device()))
    local = torch.ops.ep_ops.init_nvl_buffer(hint, group.group_name, num_bytes, low_latency, timeout_s)
    holders = 1 if held is None else held[1] + 1  # a larger buffer replaced the old one
    _registered[key] = [local, holders]
    return local


def release_nvl_buffer(group_name: str, low_latency: bool = False) -> None:
    """Drops one hold on the group's buffer of that kind; the last one unregisters it (those ops
    then use the collective backend for that group)."""
    key = (group_name, low_latency)
    held = _registered.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _registered[key]
    hint = torch.empty(0, device=torch.device("cuda", torch.cuda.current_device()))
    torch.ops.ep_ops.release_nvl_buffer(hint, group_name, low_latency)


def check_nvl_buffers(group: dist.ProcessGroup) -> None:
    """Raises ``RuntimeError`` (naming the rank, the peer and the phase) if a kernel on one of the
    group's NVLink buffers gave up waiting for a peer. Every op on the buffers checks this first;
    code that only replays CUDA graphs calls it between replays (no device sync: the record sits
    in pinned host memory)."""
    if not torch.cuda.is_available():
        return
    hint = torch.empty(0, device=torch.device("cuda", torch.cuda.current_device()))
    torch.ops.ep_ops.check_nvl_buffers(hint, group.group_name)


def nvl_bytes_needed(max_recv_rows: int, hidden_bytes: int, num_topk: int, num_scales: int = 0) -> int:
    """Bytes a buffer needs so that a rank can receive ``max_recv_rows`` dispatch rows (and
    return as many in combine): control words plus two regions of that many rows."""
    # Fields rounded to 16 bytes, and each row starts on a 128-byte line (csrc/cuda/nvl_rows.cuh).
    fields = sum(round_up(n, 16) for n in (4 * num_scales, 8 * num_topk, 4 * num_topk)) + 16
    row = round_up(hidden_bytes + fields, 128)
    return CONTROL_BYTES + 2 * max_recv_rows * row


def ll_bytes_needed(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int) -> int:
    """Bytes a low-latency buffer needs (csrc/cuda/ll_layout.h): control words, then two
    alternating slabs for each of dispatch rows (BF16 format, the larger), top-k weights and
    combine partials, each slab one row per (source rank, token slot). Rounded up to 128."""
    rows = num_ranks * num_max_dispatch_tokens_per_rank
    per_slab_set = rows * (
        dispatch_row_bytes(hidden, num_topk, False)
        + round_up(4 * num_topk, ROW_ALIGN)
        + combine_row_bytes(hidden, False)
    )
    return round_up(CONTROL_BYTES + 2 * per_slab_set, 128)
