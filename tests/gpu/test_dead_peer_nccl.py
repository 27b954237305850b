"""A peer that stops on the collective backend over NCCL: the waiting ranks get ep_ops' error.

Without a Buffer the ops run on the collective backend (NCCL all-to-alls). Every op starts with a
header exchange that the host watches (csrc/collective/watched_exchange.h): NCCL alone would hang
until its watchdog ends the process at the group's timeout, with a message that names no peer;
ep_ops gives up at 80% of that timeout, names the ranks that never checked in at the group's
store, aborts the group's communicators and raises. tests/test_dead_peer.py runs the same path
over gloo on CPU (EP_OPS_HEADER_EXCHANGE=all_to_all).
"""

import time

import pytest
import torch
from gpu_ranks import GPU_RANKS, crash_last_rank, needs_gpu_ranks, store_barrier, survivors_of_crash
from outcomes import write_outcome

from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

PG_TIMEOUT_S = 6.0
GIVE_UP_S = 0.8 * PG_TIMEOUT_S
SLACK_S = 3.0
HIDDEN, EXPERTS_PER_RANK, NUM_TOPK, NUM_TOKENS = 256, 4, 4, 32


def _dispatch_call(rank: int, num_ranks: int, group_name: str):
    """An exact-mode dispatch of this rank's inputs on the collective backend."""
    ops = torch.ops.ep_ops
    gen = torch.Generator().manual_seed(rank)
    num_experts = EXPERTS_PER_RANK * num_ranks
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16).to(device)
    topk_idx = torch.rand(NUM_TOKENS, num_experts, generator=gen).argsort(dim=1)[:, :NUM_TOPK].to(device)
    weights = torch.rand(topk_idx.shape, generator=gen).to(device)
    _, _, mask = ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    return lambda: ops.dispatch(x, None, topk_idx, weights, mask, num_experts, 1, 0, group_name)


def _timed(call) -> dict:
    start = time.monotonic()
    seen = {}
    try:
        call()
        torch.cuda.synchronize()
        seen["returned"] = True
    except RuntimeError as error:
        seen["error"] = str(error)
    seen["after_s"] = time.monotonic() - start
    seen["context_usable"] = torch.ones(4, device="cuda").sum().item() == 4.0
    return seen


def late_peer_worker(rank: int, num_ranks: int, group_name: str) -> dict:
    """One dispatch together; then the last rank stays away (on the launch's store, not in NCCL)
    until the others have reported, and returns without calling dispatch."""
    import ep_ops  # noqa: F401  (loads the ops)

    dispatch = _dispatch_call(rank, num_ranks, group_name)
    dispatch()
    torch.cuda.synchronize()
    store_barrier("nccl late: ready", num_ranks)
    seen = {} if rank == num_ranks - 1 else _timed(dispatch)
    store_barrier("nccl late: reported", num_ranks)
    return seen


def test_late_peer_named_before_the_watchdog():
    results = parallel_launch(
        GPU_RANKS, late_peer_worker, backend="nccl", device="cuda", timeout=120, pg_timeout=PG_TIMEOUT_S
    )
    late = GPU_RANKS - 1
    assert results[late] == {}, results[late]
    for rank, seen in enumerate(results[:late]):
        where = f"rank {rank}: {seen}"
        error = seen.get("error", "")
        assert "returned" not in seen, where
        assert f"ep_ops.dispatch: rank {rank} timed out in the header exchange" in error, where
        assert f"waiting for rank {late}: rank {late} has not called ep_ops.dispatch" in error, where
        assert "80% of the process group's timeout (6 s)" in error, where
        assert GIVE_UP_S - 0.1 < seen["after_s"] < GIVE_UP_S + SLACK_S, where
        assert seen["context_usable"], where


def dead_peer_worker(rank: int, num_ranks: int, group_name: str, out_dir: str) -> str:
    """One dispatch together; then the last rank exits and the others dispatch again and record
    what they saw in out_dir (a dead rank fails the launch itself)."""
    import ep_ops  # noqa: F401  (loads the ops)

    dispatch = _dispatch_call(rank, num_ranks, group_name)
    dispatch()
    crash_last_rank("nccl dead: ready", rank, num_ranks)
    seen = _timed(dispatch)
    write_outcome(out_dir, rank, seen)
    return "survived"


def test_dead_peer_named_before_the_watchdog(tmp_path):
    late = GPU_RANKS - 1
    survivors = survivors_of_crash(
        dead_peer_worker, tmp_path, pg_timeout=PG_TIMEOUT_S,
        failure_grace=PG_TIMEOUT_S + SLACK_S,  # the survivors raise only at GIVE_UP_S
    )  # fmt: skip
    for rank, seen in survivors.items():
        error = seen.get("error", "")
        assert f"ep_ops.dispatch: rank {rank}" in error and f"rank {late}" in error, seen
        assert "header exchange" in error, seen
        assert seen["after_s"] < GIVE_UP_S + SLACK_S, seen
        assert seen["context_usable"], seen
