"""Dead and late peers on CPU (gloo): the ranks still waiting raise an error instead of hanging.

The timeout is the process group's: ``init_process_group(timeout=...)``, which
``parallel_launch`` takes from ``pg_timeout`` (default: the launch's ``timeout``). Each test sets
a short one; the launch itself has room to spare. A late rank never calls the op (it waits until
the others have reported, so they see a timeout and not a closed connection); a dead rank exits
without calling it. Every rank first runs the op once with the others, so the group is known to
work. The survivors write their outcome to a file (a dead peer makes the launch itself fail).

Every op starts with a header exchange (csrc/collective/process_group.cpp), point to point on
CPU groups, so the survivors raise an error that names the op, the phase and the missing rank:
``ep_ops.dispatch: rank 0 timed out in the header exchange ... waiting to hear from rank 1:
rank 1 has not called ep_ops.dispatch within the process group's timeout ...`` for a late peer,
``... lost rank 1 in the header exchange ... (has rank 1 died?)`` for a dead one, each followed by
gloo's own message.
"""

import os
import re
import time
from pathlib import Path

import pytest
import torch
from outcomes import read_outcomes, write_outcome

from ep_ops.launch import parallel_launch

LAUNCH_TIMEOUT = 120
SLACK = 10.0  # seconds past the process group's timeout within which the survivors must raise
TIMED_OUT = re.compile(r"time[d ]?\s*out", re.IGNORECASE)
LATE = 1  # the late or dead rank
HIDDEN, EXPERTS_PER_RANK, NUM_TOPK, LL_MAX = 128, 2, 2, 4


def _inputs(rank: int, num_ranks: int):
    gen = torch.Generator().manual_seed(rank)
    num_experts = EXPERTS_PER_RANK * num_ranks
    x = torch.randn(LL_MAX, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(LL_MAX, num_experts, generator=gen).argsort(dim=1)[:, :NUM_TOPK].contiguous()
    return x, topk_idx, torch.rand(topk_idx.shape, generator=gen), num_experts


def _ops(group_name: str, num_ranks: int, rank: int, via_buffer: bool):
    """name -> a callable running that op on this rank's inputs (dispatch first: combine and the
    low-latency combine use its outputs)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    from ep_ops import Buffer

    ops = torch.ops.ep_ops
    x, topk_idx, weights, num_experts = _inputs(rank, num_ranks)
    _, _, mask = ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    group = _resolve_process_group(group_name)
    buffer = Buffer(
        group,
        num_nvl_bytes=Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks),
        num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(LL_MAX, HIDDEN, num_ranks, num_experts),
    )
    state = {}

    def dispatch():
        if via_buffer:
            recv_x, _, _, _, handle, _ = buffer.dispatch(x, is_token_in_rank=mask)
            state["normal"] = (recv_x, handle)
        else:
            out = ops.dispatch(x, None, topk_idx, weights, mask, num_experts, 1, 0, group_name)
            state["normal"] = (out[0], (out[5], out[6], mask))

    def combine():
        recv_x, (rank_prefix_matrix, recv_src_idx, is_token_in_rank) = state["normal"]
        if via_buffer:
            buffer.combine(recv_x, (rank_prefix_matrix, recv_src_idx, is_token_in_rank))
        else:
            ops.combine(
                recv_x, None, None, None, is_token_in_rank, rank_prefix_matrix, recv_src_idx, group_name
            )

    def low_latency_dispatch():
        if via_buffer:
            buffer.low_latency_dispatch(x, topk_idx, LL_MAX, num_experts, use_fp8=False)
        else:
            ops.low_latency_dispatch(x, topk_idx, LL_MAX, num_experts, False, False, False, group_name)

    return {"dispatch": dispatch, "combine": combine, "low_latency_dispatch": low_latency_dispatch}


def peer_worker(rank, num_ranks, group_name, op_name, fault, out_dir, via_buffer):
    """Every rank runs dispatch (and ``op_name``) once together; then rank LATE is late or dead
    while the others call ``op_name`` again and record what happened in ``out_dir``."""
    import ep_ops  # noqa: F401  (loads the ops)

    out = Path(out_dir)
    ops = _ops(group_name, num_ranks, rank, via_buffer)
    ops["dispatch"]()
    ops[op_name]()
    if rank == LATE:
        if fault == "dead":
            os._exit(1)  # no exception, no goodbye: like a crash
        # Late: stay alive (a closed connection would end the wait early) until every other
        # rank has written its outcome, and never call the op.
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(list(out.glob("rank*.json"))) < num_ranks - 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        return "late"
    start = time.monotonic()
    try:
        ops[op_name]()
        outcome = {"raised": None, "message": "", "elapsed": time.monotonic() - start}
    except Exception as error:  # noqa: BLE001  (recorded and checked by the test)
        outcome = {"raised": type(error).__name__, "message": str(error), "elapsed": time.monotonic() - start}
    write_outcome(out, rank, outcome)
    return "survived"


def run_fault(tmp_path, num_ranks, op_name, fault, pg_timeout, via_buffer=False) -> dict:
    """Launches peer_worker; returns {survivor rank: outcome}."""
    start = time.monotonic()
    try:
        results = parallel_launch(
            num_ranks, peer_worker, op_name, fault, str(tmp_path), via_buffer,
            timeout=LAUNCH_TIMEOUT, pg_timeout=pg_timeout,
        )  # fmt: skip
        assert fault == "late", f"the launch succeeded although rank {LATE} died: {results}"
        assert results[LATE] == "late" and results.count("survived") == num_ranks - 1, results
    except RuntimeError as error:
        # A dead rank fails the launch; the survivors' outcomes are in their files.
        assert fault == "dead" and f"rank(s) [{LATE}]" in str(error), str(error)
    assert time.monotonic() - start < LAUNCH_TIMEOUT
    return read_outcomes(tmp_path, [rank for rank in range(num_ranks) if rank != LATE])


def check_raised(outcomes: dict, pg_timeout: float, fault: str) -> None:
    for rank, outcome in outcomes.items():
        what = f"rank {rank}: {outcome}"
        assert outcome["raised"] == "RuntimeError", what
        assert outcome["elapsed"] < pg_timeout + SLACK, what
        if fault == "late":
            assert TIMED_OUT.search(outcome["message"]), what
            assert outcome["elapsed"] > 0.8 * pg_timeout, f"raised before the timeout: {what}"


@pytest.fixture(scope="module")
def late_dispatch(tmp_path_factory):
    """2 ranks, rank 1 never calls dispatch; process-group timeout 10 s."""
    pg_timeout = 10.0
    return pg_timeout, run_fault(tmp_path_factory.mktemp("late_dispatch"), 2, "dispatch", "late", pg_timeout)


def test_late_peer_dispatch_raises(late_dispatch):
    pg_timeout, outcomes = late_dispatch
    check_raised(outcomes, pg_timeout, "late")


def names_peer_and_phase(outcomes: dict, op: str) -> None:
    for rank, outcome in outcomes.items():
        message = outcome["message"]
        assert f"ep_ops.{op}: rank {rank}" in message, message
        assert f"rank {LATE}" in message.split(":", 1)[1] and "header exchange" in message, message


def test_error_names_peer_and_phase(late_dispatch):
    _, outcomes = late_dispatch
    names_peer_and_phase(outcomes, "dispatch")
    assert f"rank {LATE} has not called ep_ops.dispatch" in outcomes[0]["message"]


def test_late_peer_combine_three_ranks(tmp_path):
    """Rank 1 takes part in dispatch, then never calls combine: ranks 0 and 2 raise."""
    outcomes = run_fault(tmp_path, 3, "combine", "late", pg_timeout=5.0, via_buffer=True)
    assert sorted(outcomes) == [0, 2]
    check_raised(outcomes, 5.0, "late")
    names_peer_and_phase(outcomes, "combine")


def test_late_peer_low_latency_dispatch(tmp_path):
    outcomes = run_fault(tmp_path, 2, "low_latency_dispatch", "late", pg_timeout=5.0, via_buffer=True)
    check_raised(outcomes, 5.0, "late")
    names_peer_and_phase(outcomes, "low_latency_dispatch")


def test_dead_peer_combine(tmp_path):
    """Rank 1 exits (as if crashed) instead of calling combine: rank 0 raises (at once: gloo
    sees the closed connection)."""
    outcomes = run_fault(tmp_path, 2, "combine", "dead", pg_timeout=5.0)
    check_raised(outcomes, 5.0, "dead")
    names_peer_and_phase(outcomes, "combine")
    assert f"has rank {LATE} died?" in outcomes[0]["message"], outcomes[0]["message"]


# Device groups (NCCL) exchange the headers in one all-to-all that the host watches
# (csrc/collective/watched_exchange.h): NCCL would hang on a lost peer until its watchdog ends the
# process, so ep_ops gives up at 80% of the group's timeout and names the ranks that never
# checked in at the group's store. EP_OPS_HEADER_EXCHANGE=all_to_all puts CPU groups on the same
# path, so these run it over gloo; tests/gpu/test_dead_peer_nccl.py runs it over NCCL.


def test_watched_exchange_late_peer_three_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_OPS_HEADER_EXCHANGE", "all_to_all")
    outcomes = run_fault(tmp_path, 3, "combine", "late", pg_timeout=5.0, via_buffer=True)
    assert sorted(outcomes) == [0, 2]
    check_raised(outcomes, 5.0, "late")
    names_peer_and_phase(outcomes, "combine")
    for outcome in outcomes.values():
        message = outcome["message"]
        assert "waiting for rank 1: rank 1 has not called ep_ops.combine" in message, message
        assert "80% of the process group's timeout (5 s)" in message, message
        assert outcome["elapsed"] < 5.0, f"not before the group's timeout: {outcome}"


def test_watched_exchange_dead_peer(tmp_path, monkeypatch):
    """Rank 1 exits instead of calling dispatch: gloo's all-to-all fails at once, and rank 0
    names rank 1 (it never checked in) after a short grace for the other survivors."""
    monkeypatch.setenv("EP_OPS_HEADER_EXCHANGE", "all_to_all")
    outcomes = run_fault(tmp_path, 2, "dispatch", "dead", pg_timeout=5.0)
    check_raised(outcomes, 5.0, "dead")
    names_peer_and_phase(outcomes, "dispatch")
    assert "lost rank 1 in the header exchange" in outcomes[0]["message"], outcomes[0]["message"]
    assert "has rank 1 died?" in outcomes[0]["message"], outcomes[0]["message"]


def slow_peer_worker(rank, num_ranks, group_name):
    """Rank 1 comes 1.5 s late to a dispatch: rank 0 checks in at the store after 0.5 s, the
    exchange then completes on both, and rank 0 takes its check-in back."""
    from torch.distributed.distributed_c10d import _get_default_store

    ops = _ops(group_name, num_ranks, rank, via_buffer=False)
    ops["dispatch"]()  # exchange 0 (the Buffer built in _ops makes no exchange on CPU)
    if rank == LATE:
        time.sleep(1.5)
    ops["dispatch"]()  # exchange 1
    store = _get_default_store()  # WORLD's store: the one the check-ins go to
    return [store.check([f"ep_ops/header_exchange/{n}/rank{r}"]) for n in range(3) for r in range(num_ranks)]


def test_watched_exchange_slow_peer_completes_and_leaves_no_key(monkeypatch):
    monkeypatch.setenv("EP_OPS_HEADER_EXCHANGE", "all_to_all")
    results = parallel_launch(2, slow_peer_worker, timeout=LAUNCH_TIMEOUT, pg_timeout=10.0)
    assert results == [[False] * 6, [False] * 6], results
