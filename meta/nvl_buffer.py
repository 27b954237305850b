"""Fakes of the NVLink buffer set-up ops. They run once per Buffer, outside compiled regions;
the fakes exist so that every op of the library has its contract written down."""

import torch

from ._checks import check_value


@torch.library.register_fake("ep_ops::init_nvl_buffer")
def init_nvl_buffer(device_hint, group_name, num_bytes, low_latency=False, timeout_s=100.0):
    """Allocates the group's NVLink buffer (symmetric memory) on device_hint's device and
    exchanges it with every rank of the group (the low-latency ops' buffer with low_latency=True,
    the normal ops' otherwise; a group can hold one of each). Its kernels wait up to ``timeout_s``
    seconds for a peer. Returns the local ``[num_bytes]`` uint8 tensor."""
    check_value(num_bytes > 0, "init_nvl_buffer", f"num_bytes must be positive, got {num_bytes}")
    check_value(
        0 < timeout_s < 1e6, "init_nvl_buffer", f"timeout_s must be in (0, 1e6) seconds, got {timeout_s}"
    )
    return device_hint.new_empty((num_bytes,), dtype=torch.uint8)


@torch.library.register_fake("ep_ops::release_nvl_buffer")
def release_nvl_buffer(device_hint, group_name, low_latency=False):
    """Forgets the group's NVLink buffer of that kind; those ops fall back to the collective backend."""
    return None


@torch.library.register_fake("ep_ops::check_nvl_buffers")
def check_nvl_buffers(device_hint, group_name):
    """Raises if a wait on one of the group's NVLink buffers timed out; no outputs."""
    return None
