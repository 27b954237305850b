"""The NVLink backend's peer memory: one symmetric-memory buffer per process group.

With a buffer registered for a group, the CUDA dispatch, cached dispatch and combine of that
group run the NVLink kernels (csrc/cuda/); without one they use the collective backend (NCCL).
``ep_ops.Buffer`` registers one when built on an NCCL group of one host; code that calls the ops
directly (compiled graphs) calls :func:`init_nvl_buffer` once, before any capture.
"""

import os

import torch
import torch.distributed as dist

MAX_NVL_RANKS = 8
CONTROL_BYTES = 64 * 1024  # csrc/cuda/nvl_buffer.h kControlBytes


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


# group_name -> [local buffer, number of holders]: several Buffers on one group share one
# registration, released when the last holder releases it. Every rank makes the same calls in
# the same order, so every rank takes the same branch below.
_registered: dict[str, list] = {}


def init_nvl_buffer(group: dist.ProcessGroup, num_bytes: int) -> torch.Tensor:
    """Allocates and exchanges the group's NVLink buffer (every rank of the group must call this,
    in the same order, outside graph capture). Returns the local uint8 tensor; keep it alive and
    call :func:`release_nvl_buffer` once per call when done. A group that already has a buffer
    of at least ``num_bytes`` shares it."""
    held = _registered.get(group.group_name)
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
    local = torch.ops.ep_ops.init_nvl_buffer(hint, group.group_name, num_bytes)
    holders = 1 if held is None else held[1] + 1  # a larger buffer replaced the old one
    _registered[group.group_name] = [local, holders]
    return local


def release_nvl_buffer(group_name: str) -> None:
    """Drops one hold on the group's buffer; the last one unregisters it (the ops then use the
    collective backend for that group)."""
    held = _registered.get(group_name)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _registered[group_name]
    hint = torch.empty(0, device=torch.device("cuda", torch.cuda.current_device()))
    torch.ops.ep_ops.release_nvl_buffer(hint, group_name)


def nvl_bytes_needed(max_recv_rows: int, hidden_bytes: int, num_topk: int, num_scales: int = 0) -> int:
    """Bytes a buffer needs so that a rank can receive ``max_recv_rows`` dispatch rows (and
    return as many in combine): control words plus two regions of that many rows."""

    def round16(n):
        return (n + 15) // 16 * 16

    row = hidden_bytes + round16(4 * num_scales) + round16(8 * num_topk) + round16(4 * num_topk) + 16
    return CONTROL_BYTES + 2 * max_recv_rows * row
