"""``Buffer`` lifecycle on gloo CPU ranks: several Buffers on different groups at once, destroy and
re-create, ``explicitly_destroy``, a long run of random shapes on one Buffer switching between
normal and low-latency mode, and interpreter exit without ``destroy()``.

One launch of 3 ranks runs every section in turn (spawning ranks costs seconds); each test below
checks one section's result. Every step compares the Buffer's outputs with the pure-PyTorch
reference over the members of the step's group, bitwise.

Semantics checked (ep_ops differs from DeepEP on purpose where noted):

- ``destroy()`` releases the Buffer's tensors; it is idempotent and local (no collective), and
  every later method raises ``RuntimeError("Buffer was destroyed")`` on every rank without leaving
  peers waiting. A new Buffer on the same group works at once.
- ``explicitly_destroy=True``: ``destroy()`` must be called to release at once (as in DeepEP).
  ``explicitly_destroy=False``: ``destroy()`` works too (DeepEP asserts instead); without it the
  Buffer is released by garbage collection, with either flag, and nothing hangs.
- A receive hook of a destroyed Buffer raises, every time it is called (never returns with its
  outputs unfilled).
- A Buffer whose process group was destroyed raises ``ValueError`` naming the group.
- A process that exits with live Buffers (pending receive hooks included) exits promptly: with
  status 0, or torch's own gloo teardown abort (``GLOO_EXIT_ABORT``, mostly when the group was not
  destroyed); nothing hangs.
"""

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cases import assert_same, expect_error

from ep_ops.launch import free_port, parallel_launch

TIMEOUT = 120
BF16 = torch.bfloat16
H_MAX = 256  # largest hidden size of any step: the Buffers are sized for it
M_MAX = 8  # largest num_max_dispatch_tokens_per_rank of any step
EXPERTS_PER_RANK = (1, 2, 4)


# ---------------------------------------------------------------------------------------------
# steps (run inside the ranks): one Buffer call sequence checked against the reference
# ---------------------------------------------------------------------------------------------


def make_buffer(group, explicitly_destroy: bool = False, normal: bool = True, low_latency: bool = True):
    from ep_ops import Buffer

    num_ranks = group.size()
    hidden_bytes = H_MAX * 2  # BF16 (FP8 payloads are sized as BF16 too)
    nvl = max(
        Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
        Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
    )
    rdma = Buffer.get_low_latency_rdma_size_hint(M_MAX, H_MAX, num_ranks, num_ranks)
    return Buffer(
        group,
        num_nvl_bytes=nvl if normal else 0,
        num_rdma_bytes=rdma if low_latency else 0,
        low_latency_mode=low_latency,
        explicitly_destroy=explicitly_destroy,
    )


def _routing(gen, num_tokens, num_topk, num_experts):
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :num_topk]
    holes = torch.rand(ids.shape, generator=gen) < 0.2
    return ids.masked_fill(holes, -1).contiguous()


def _shape(seed: int, num_ranks: int, max_tokens: int) -> dict:
    rng = random.Random(seed)
    experts_per_rank = rng.choice(EXPERTS_PER_RANK)
    num_experts = experts_per_rank * num_ranks
    return {
        "tokens": [rng.randint(0, max_tokens) for _ in range(num_ranks)],
        "hidden": rng.choice([128, H_MAX]),
        "num_experts": num_experts,
        "num_topk": rng.randint(1, min(4, num_experts)),
    }


def normal_step(buffer, seed: int, fp8: bool = False, worst: bool = False) -> None:
    """get_dispatch_layout, dispatch, cached dispatch and combine through ``buffer``."""
    from ep_ops.reference import (
        per_token_cast_back,
        per_token_cast_to_fp8,
        reference_combine,
        reference_dispatch,
        reference_layout,
    )

    R, rank = buffer.group_size, buffer.rank  # noqa: N806
    shape = _shape(seed, R, 8)
    E, H, K = shape["num_experts"], shape["hidden"], shape["num_topk"]  # noqa: N806
    xs, scales, topks, weights, masks = [], [], [], [], []
    for r in range(R):
        gen = torch.Generator().manual_seed(seed * 131 + r)
        topk_idx = _routing(gen, shape["tokens"][r], K, E)
        x = torch.randn(shape["tokens"][r], H, generator=gen).to(BF16)
        x_scales = None
        if fp8:
            x, x_scales = per_token_cast_to_fp8(x)
        xs.append(x)
        scales.append(x_scales)
        topks.append(topk_idx)
        weights.append(torch.rand(topk_idx.shape, generator=gen).masked_fill(topk_idx < 0, 0))
        masks.append(reference_layout(topk_idx, E, R)[2])
    scales = scales if fp8 else None

    num_tokens_per_rank, _, num_tokens_per_expert, mask, _ = buffer.get_dispatch_layout(topks[rank], E)
    assert_same(
        (num_tokens_per_rank, num_tokens_per_expert, mask), reference_layout(topks[rank], E, R), "layout"
    )
    exact = reference_dispatch(xs, scales, topks, weights, masks, E)
    most = max(int(exact[j][5][R - 1, j]) for j in range(R))
    num_worst_tokens = most if worst else 0
    expected = reference_dispatch(xs, scales, topks, weights, masks, E, 1, num_worst_tokens)
    x_arg = (xs[rank], scales[rank]) if fp8 else xs[rank]
    recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
        x_arg,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=mask,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topks[rank],
        topk_weights=weights[rank],
        num_worst_tokens=num_worst_tokens,
    )
    e = expected[rank]
    if fp8:
        assert_same(recv_x, (e[0], e[1]), "dispatch recv_x")
    else:
        assert_same(recv_x, e[0], "dispatch recv_x")
    assert_same((recv_idx, recv_weights, handle[0], handle[1]), (e[2], e[3], e[5], e[6]), "dispatch")
    assert counts == (e[4].tolist() if num_worst_tokens == 0 else []), counts
    again = buffer.dispatch(x_arg, handle=handle)[0]
    assert_same(again, recv_x, "cached dispatch")

    def rows(out):  # the expert output: received rows, FP8 decoded
        return per_token_cast_back(out[0], out[1]) if fp8 else out[0]

    handles = [(masks[j], expected[j][5], expected[j][6]) for j in range(R)]
    combined, combined_weights, _ = buffer.combine(
        rows((recv_x[0], recv_x[1]) if fp8 else (recv_x, None)), handle, topk_weights=recv_weights
    )
    ref = reference_combine(
        [rows(expected[j]) for j in range(R)], [expected[j][3] for j in range(R)], None, None, handles
    )[rank]
    assert_same((combined, combined_weights), ref, "combine")


def ll_step(buffer, seed: int, fp8: bool = False, variant: str = "plain"):
    """low_latency_dispatch and low_latency_combine through ``buffer``. ``variant``: plain, hook
    (both with return_recv_hook), zero_copy (combine reads get_next_low_latency_combine_buffer),
    or deferred: the combine's receive hook and the last check are returned, to be run later
    (receive halves are local, so other traffic may come in between)."""
    from ep_ops.reference import (
        per_token_cast_back,
        reference_low_latency_combine,
        reference_low_latency_dispatch,
    )

    R, rank = buffer.group_size, buffer.rank  # noqa: N806
    rng = random.Random(seed)
    M = rng.randint(1, M_MAX)  # noqa: N806
    shape = _shape(seed, R, M)
    E, H, K = shape["num_experts"], shape["hidden"], shape["num_topk"]  # noqa: N806
    xs, topks, weights = [], [], []
    for r in range(R):
        gen = torch.Generator().manual_seed(seed * 137 + r)
        topks.append(_routing(gen, shape["tokens"][r], K, E))
        xs.append(torch.randn(shape["tokens"][r], H, generator=gen).to(BF16))
        weights.append(torch.rand(topks[r].shape, generator=gen))
    x, topk_idx, topk_weights = xs[rank], topks[rank], weights[rank]

    expected = reference_low_latency_dispatch(xs, topks, M, E, fp8)
    hooked = variant == "hook"
    recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, M, E, use_fp8=fp8, return_recv_hook=hooked
    )
    hook()
    e = expected[rank]
    if fp8:
        # Scales are [E_local, R*M, H/128] column-major: compare through a trailing unit dim.
        assert_same(recv[0], e[0], "ll recv_x")
        assert_same(recv[1].unsqueeze(-1), e[1].unsqueeze(-1), "ll recv_x_scales")
    else:
        assert_same(recv, e[0], "ll recv_x")
    assert_same((recv_count, handle[0], handle[1], handle[5]), (e[2], e[3], e[4], e[5]), "ll dispatch")

    def decode(received):
        return per_token_cast_back(received[0], received[1]) if fp8 else received[0]

    mine = decode(recv if fp8 else (recv,))
    ref = reference_low_latency_combine([decode(expected[j]) for j in range(R)], topks, weights, M, E)[rank]
    if variant == "zero_copy":
        buffer.get_next_low_latency_combine_buffer(handle).copy_(mine)
        combined, _, hook = buffer.low_latency_combine(mine, topk_idx, topk_weights, handle, zero_copy=True)
    else:
        combined, _, hook = buffer.low_latency_combine(
            mine, topk_idx, topk_weights, handle, return_recv_hook=variant in ("hook", "deferred")
        )

    def finish():
        hook()
        assert_same(combined, ref, "ll combine")

    if variant == "deferred":
        return finish
    finish()
    return None


# ---------------------------------------------------------------------------------------------
# sections of the 3-rank launch
# ---------------------------------------------------------------------------------------------

GROUPS = {"world": (0, 1, 2), "01": (0, 1), "12": (1, 2)}
STEP_KINDS = (
    "normal",
    "normal_fp8",
    "normal_worst",
    "ll",
    "ll_fp8",
    "ll_hook",
    "ll_zero_copy",
    "ll_deferred",
)


def schedule(num_steps: int, seed: int) -> list:
    """(group, step kind, seed) for every step; the same list on every rank. Each rank runs the
    steps of its groups in this order: one global order of collectives, so no rank waits on a
    peer that waits on it."""
    rng = random.Random(seed)
    return [(rng.choice(list(GROUPS)), rng.choice(STEP_KINDS), 1000 + i) for i in range(num_steps)]


def run_step(buffer, kind: str, seed: int):
    if kind.startswith("normal"):
        normal_step(buffer, seed, fp8=kind == "normal_fp8", worst=kind == "normal_worst")
        return None
    variant = {"ll_hook": "hook", "ll_zero_copy": "zero_copy", "ll_deferred": "deferred"}.get(kind, "plain")
    return ll_step(buffer, seed, fp8=kind == "ll_fp8", variant=variant)


def several_groups(rank: int) -> dict:
    """Buffers on WORLD, [0, 1] and [1, 2] at once (rank 1 holds five, two groups' worth), used
    interleaved; WORLD also has a normal-only and a low-latency-only Buffer beside the full one.
    A deferred receive hook completes after the rank's next step, on whatever group."""
    subgroups = {"01": dist.new_group([0, 1]), "12": dist.new_group([1, 2])}  # every rank calls
    groups = {"world": dist.group.WORLD, **subgroups}
    buffers = {name: make_buffer(g) for name, g in groups.items() if rank in GROUPS[name]}
    world_normal = make_buffer(dist.group.WORLD, low_latency=False)
    world_ll = make_buffer(dist.group.WORLD, normal=False)
    done, pending = Counter(), []
    for i, (name, kind, seed) in enumerate(schedule(48, seed=6)):
        if rank not in GROUPS[name]:
            continue
        buffer = buffers[name]
        if name == "world" and i % 2:  # alternate with the single-mode Buffers of WORLD
            buffer = world_normal if kind.startswith("normal") else world_ll
        finish = run_step(buffer, kind, seed)
        for earlier in pending:
            earlier()
        pending = [finish] if finish else []
        done[name] += 1
    for earlier in pending:
        earlier()
    return dict(done)


def destroy_and_recreate(rank: int) -> dict:
    results = {}
    subgroups = {"01": dist.new_group([0, 1]), "12": dist.new_group([1, 2])}
    groups = {"world": dist.group.WORLD, **subgroups}
    x = torch.zeros(2, 128, dtype=BF16)
    topk_idx = torch.zeros(2, 1, dtype=torch.int64)
    for name, group in groups.items():
        if rank not in GROUPS[name]:
            continue
        buffer = make_buffer(group)
        normal_step(buffer, seed=1)
        ll_step(buffer, seed=2)
        buffer.destroy()
        buffer.destroy()  # idempotent
        # Local checks raise at once; the communicating methods still take part in their op's
        # header exchange (every member of the group calls them here, in the same order).
        expect_error(RuntimeError, ["destroyed"], buffer.get_dispatch_layout, topk_idx, group.size())
        expect_error(
            RuntimeError,
            ["destroyed"],
            buffer.dispatch,
            x,
            is_token_in_rank=torch.ones(2, group.size(), dtype=torch.bool),
        )
        expect_error(RuntimeError, ["destroyed"], buffer.low_latency_dispatch, x, topk_idx, 2, group.size())
        expect_error(RuntimeError, ["destroyed"], buffer.clean_low_latency_buffer, 2, 128, group.size())
        expect_error(RuntimeError, ["destroyed"], buffer.get_local_buffer_tensor, torch.uint8)
        again = make_buffer(group)  # the same group, at once
        normal_step(again, seed=3, fp8=True)
        ll_step(again, seed=4, fp8=True)
        results[name] = "ok"

    # Many Buffers created and destroyed in a row on one group.
    for i in range(12):
        buffer = make_buffer(dist.group.WORLD)
        (normal_step if i % 2 else ll_step)(buffer, seed=100 + i)
        buffer.destroy()
    results["recreated"] = 12

    # A Buffer outliving its group: a clear error, not a crash or a hang; WORLD still works.
    doomed = dist.new_group([0, 1, 2])
    buffer = make_buffer(doomed)
    normal_step(buffer, seed=5)
    doomed_name = doomed.group_name
    dist.destroy_process_group(doomed)
    mask = torch.ones(2, 3, dtype=torch.bool)
    expect_error(ValueError, ["group_name", doomed_name], buffer.dispatch, x, is_token_in_rank=mask)
    normal_step(make_buffer(dist.group.WORLD), seed=6)
    results["group_destroyed"] = "ok"
    return results


def explicit_destroy(rank: int) -> dict:
    world = dist.group.WORLD
    results = {}

    # explicitly_destroy=True: used, then destroy() releases it; later calls raise.
    buffer = make_buffer(world, explicitly_destroy=True)
    assert buffer.explicitly_destroy is True
    normal_step(buffer, seed=7)
    ll_step(buffer, seed=8)
    buffer.get_local_buffer_tensor(torch.uint8)  # allocates the scratch bytes
    buffer.destroy()
    assert buffer._raw == {} and buffer._combine_buffers == [None, None], "destroy() must release"
    expect_error(RuntimeError, ["destroyed"], buffer.get_comm_stream)
    results["explicit"] = "ok"

    # explicitly_destroy=False: destroy() works too (DeepEP asserts the flag instead).
    buffer = make_buffer(world, explicitly_destroy=False)
    normal_step(buffer, seed=9)
    buffer.destroy()
    expect_error(RuntimeError, ["destroyed"], buffer.get_comm_stream)
    results["implicit_destroy_call"] = "ok"

    # Never destroyed: garbage collection releases it, with either flag, and nothing hangs.
    for flag in (False, True):
        buffer = make_buffer(world, explicitly_destroy=flag)
        ll_step(buffer, seed=10, variant="zero_copy")
        ref = weakref.ref(buffer)
        del buffer
        gc.collect()
        assert ref() is None, f"explicitly_destroy={flag}: the Buffer is still referenced"
    results["collected"] = "ok"

    # A receive hook of a destroyed Buffer raises, and again on a second call: it never returns
    # as if done with its outputs unfilled.
    buffer = make_buffer(world)
    x = torch.ones(2, 128, dtype=BF16)
    topk_idx = torch.tensor([[0], [2]], dtype=torch.int64)
    recv_x, _, _, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, 2, 3, use_fp8=False, return_recv_hook=True
    )
    buffer.destroy()
    expect_error(RuntimeError, ["destroyed"], hook)
    expect_error(RuntimeError, ["destroyed"], hook)
    results["hook_after_destroy"] = "ok"

    normal_step(make_buffer(world), seed=11)  # the group is unaffected
    return results


def stress(rank: int, iterations: int) -> dict:
    """One Buffer, random shapes, switching between normal and low-latency mode; the zero-copy
    combine buffers are cleaned with clean_low_latency_buffer at every switch to low latency."""
    buffer = make_buffer(dist.group.WORLD)
    rng = random.Random(2024)
    kinds = Counter()
    previous = None
    for i in range(iterations):
        kind = rng.choice(STEP_KINDS)
        mode = "normal" if kind.startswith("normal") else "ll"
        if mode == "ll" and previous == "normal":
            buffer.clean_low_latency_buffer(M_MAX, H_MAX, buffer.group_size)
            for combine_buffer in buffer._combine_buffers:
                assert combine_buffer is None or not combine_buffer.any(), "clean_low_latency_buffer"
        finish = run_step(buffer, kind, 5000 + i)
        if finish:
            finish()
        kinds[kind] += 1
        previous = mode
    buffer.destroy()
    return dict(kinds)


STRESS_ITERATIONS = 60


def lifecycle_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401  (loads the ops)

    assert num_ranks == 3
    return {
        "several_groups": several_groups(rank),
        "destroy_and_recreate": destroy_and_recreate(rank),
        "explicit_destroy": explicit_destroy(rank),
        "stress": stress(rank, STRESS_ITERATIONS),
    }


@pytest.fixture(scope="module")
def three_ranks():
    return parallel_launch(3, lifecycle_worker, timeout=TIMEOUT)


def test_several_buffers_on_different_groups(three_ranks):
    steps = schedule(48, seed=6)
    for rank, result in enumerate(three_ranks):
        expected = Counter(name for name, _, _ in steps if rank in GROUPS[name])
        assert result["several_groups"] == dict(expected), (rank, result["several_groups"])


def test_destroy_and_recreate(three_ranks):
    for rank, result in enumerate(three_ranks):
        names = [name for name in GROUPS if rank in GROUPS[name]]
        expected = dict.fromkeys(names, "ok") | {"recreated": 12, "group_destroyed": "ok"}
        assert result["destroy_and_recreate"] == expected


def test_explicitly_destroy(three_ranks):
    keys = ("explicit", "implicit_destroy_call", "collected", "hook_after_destroy")
    for result in three_ranks:
        assert result["explicit_destroy"] == dict.fromkeys(keys, "ok")


def test_stress_one_buffer_switching_modes(three_ranks):
    results = [result["stress"] for result in three_ranks]
    assert all(r == results[0] for r in results)
    assert sum(results[0].values()) == STRESS_ITERATIONS
    assert set(results[0]) == set(STEP_KINDS)  # every kind of step came up


# ---------------------------------------------------------------------------------------------
# interpreter exit
# ---------------------------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    sys.path.insert(0, {tests!r})
    rank, world_size, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    import ep_ops  # noqa: F401
    from test_lifecycle import ll_step, make_buffer, normal_step

    group = dist.group.WORLD
    sub = dist.new_group(list(range(world_size)))
    kept = [make_buffer(group, explicitly_destroy=True), make_buffer(group), make_buffer(sub)]
    normal_step(kept[0], seed=1)
    ll_step(kept[1], seed=2, variant="zero_copy")
    normal_step(kept[2], seed=3)
    # A receive hook never called, on a Buffer never destroyed.
    x = torch.ones(1, 128, dtype=torch.bfloat16)
    topk_idx = torch.zeros(1, 1, dtype=torch.int64)
    kept.append(kept[1].low_latency_dispatch(x, topk_idx, 1, world_size, use_fp8=False, return_recv_hook=True))
    print("ready", flush=True)
    # Exit without destroy(); with or without dist.destroy_process_group().
    if {destroy_process_group!r}:
        dist.destroy_process_group()
    """
)


EXIT_TIMEOUT = 60  # seconds for the whole script: start, import, work and exit (~5 s here)
# torch's own teardown of a gloo group that was never destroyed sometimes aborts at exit (SIGABRT,
# this message on stderr), with or without ep_ops: 5 of 40 two-rank runs of a script that only
# does init_process_group, new_group, all_reduce, all_to_all_single and exits (torch 2.13, CPU);
# 0 of 20 with destroy_process_group() at the end, yet once in a full CI run after it as well.
GLOO_EXIT_ABORT = "terminate called without an active exception"


@pytest.mark.parametrize(
    ("num_ranks", "destroy_process_group"),
    [(1, False), (2, True), (2, False)],
    ids=["1rank", "2ranks", "2ranks-group-not-destroyed"],
)
def test_interpreter_exit_without_destroy(tmp_path, num_ranks, destroy_process_group):
    """Live Buffers (one with explicitly_destroy=True), a receive hook never called: the process
    exits promptly. Exit status 0, except that torch's gloo teardown may abort (GLOO_EXIT_ABORT),
    mostly without destroy_process_group: what must never happen is a hang or another failure."""
    script = tmp_path / "exit_without_destroy.py"
    script.write_text(
        EXIT_SCRIPT.format(tests=str(Path(__file__).parent), destroy_process_group=destroy_process_group)
    )
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(num_ranks), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(num_ranks)
    ]
    outcomes = []
    try:
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, EXIT_TIMEOUT - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} of {num_ranks} had not exited {EXIT_TIMEOUT} s after starting")
            outcomes.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (code, out, err) in enumerate(outcomes):
        # Seen in CI after destroy_process_group too (1 of several runs): torch's abort, not a hang.
        torch_abort = code == -signal.SIGABRT and GLOO_EXIT_ABORT in err
        assert (code == 0 or torch_abort) and "ready" in out, (
            f"rank {rank}: exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
        )
