"""Tells the compiler that the communication ops must run even when their outputs are unused.

A rank whose compiled graph dropped a dispatch would leave its peers waiting in the exchange
forever, so every op that talks to other ranks is registered as side-effectful: FX's and
Inductor's dead-code elimination keep such nodes.
"""

import torch
from torch.fx.node import has_side_effect

COMMUNICATION_OPS = (
    "dispatch",
    "cached_dispatch",
    "combine",
    "dispatch_permuted",
    "combine_permuted",
    "low_latency_dispatch",
    "low_latency_dispatch_send",
    "low_latency_dispatch_recv",
    "low_latency_combine",
    "low_latency_combine_send",
    "low_latency_combine_recv",
    "low_latency_combine_backward",
    "init_nvl_buffer",
    "release_nvl_buffer",
    "check_nvl_buffers",
)


def mark_communication_ops() -> None:
    for name in COMMUNICATION_OPS:
        has_side_effect(getattr(torch.ops.ep_ops, name).default)
