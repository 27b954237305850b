"""Runs a function on ``world_size`` local processes joined in one process group.

This is the multi-process harness of the tests and of ``python -m ep_ops.bench``. It imports
only torch, never ``ep_ops._C``, so it works before the extension is built.

Guarantees: every call ends. A worker exception comes back as a ``RuntimeError`` that names the
rank and carries its traceback; ranks still running once a peer has failed are stopped after a
short grace period (they would otherwise wait for the dead peer in a collective); ranks still
running at ``timeout`` are killed and a ``TimeoutError`` names them.
"""

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Every process we start keeps NVLink multicast off (HARDWARE.md: it must stay off on our GPUs).
CHILD_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# How long the surviving ranks get to report their own error once a peer has failed. Enough for
# gloo to notice the closed connection; a rank blocked in NCCL is killed after it.
FAILURE_GRACE_S = 3.0
# How long ranks that all succeeded get to destroy their group and exit before being killed.
EXIT_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (another process may take it before
    it is used: parallel_launch itself does not rely on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def intra_op_threads(device: str, world_size: int) -> int:
    """CPU threads each rank's torch ops get: one for CPU ranks (the ranks are the parallelism),
    an equal share of this process's cores for GPU ranks, whose host work (references, checks)
    would otherwise run world_size x cores threads: at 8 ranks on 128 cores the GPU suite spent
    most of its time oversubscribed."""
    if device != "cuda":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def _rendezvous_store(pg_timeout: float) -> dist.TCPStore:
    """The launch's rendezvous store, served by the launching process on a port the kernel
    picks, so concurrent launches (test shards on one GPU host) never race for a port, and the
    store outlives any rank that dies."""
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=pg_timeout)
    )


def _run_rank(rank, world_size, port, backend, device, pg_timeout, worker, args, conn):
    """Body of one spawned process: join the group, run the worker, send back the outcome."""
    try:
        options = {}
        torch.set_num_threads(intra_op_threads(device, world_size))
        if device == "cuda":
            torch.cuda.set_device(rank)
            options["device_id"] = torch.device("cuda", rank)  # binds the NCCL communicator
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
            **options,
        )
        result = worker(rank, world_size, dist.group.WORLD.group_name, *args)
        conn.send((True, result))
    except BaseException:
        # Report before tearing down: destroying a group whose peer is gone can block.
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs, grace: float) -> None:
    """Lets the processes exit on their own for ``grace`` seconds, then terminates, then kills."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def parallel_launch(
    world_size: int,
    worker: Callable,
    *args,
    timeout: float = 300.0,
    backend: str = "gloo",
    device: str = "cpu",
    pg_timeout: float | None = None,
    failure_grace: float = FAILURE_GRACE_S,
) -> list:
    """Runs ``worker(rank, world_size, group_name, *args)`` on ``world_size`` spawned processes.

    Args:
        world_size: number of processes (ranks), >= 1.
        worker: a module-level (picklable) function; ``group_name`` is the name of the default
            process group, the string every ``torch.ops.ep_ops`` communication op takes.
        args: extra picklable arguments, passed to every rank.
        timeout: seconds for the whole launch, and the process group's collective timeout
            unless ``pg_timeout`` is given.
        backend: ``"gloo"`` or ``"nccl"``.
        device: ``"cpu"`` (one intra-op thread per rank) or ``"cuda"`` (rank r uses GPU r).
        pg_timeout: seconds a collective may wait for its peers before the process group raises
            (``init_process_group(timeout=...)``); default ``timeout``. A short one lets a test
            see a late or dead peer end in an error on the survivors, inside a longer launch.
        failure_grace: seconds the other ranks get to report once a rank has failed (default
            FAILURE_GRACE_S); a test whose survivors raise only after a timeout needs longer.
    Returns:
        The workers' return values (picklable), as a list ordered by rank.
    Raises:
        RuntimeError: a rank raised or died; names the rank(s) and shows the traceback(s).
        TimeoutError: ranks were still running after ``timeout`` seconds; names them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if pg_timeout is None:
        pg_timeout = timeout
    if not pg_timeout > 0:
        raise ValueError(f"pg_timeout must be positive (seconds), got {pg_timeout}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"device='cuda' with world_size {world_size} needs {world_size} GPUs, "
            f"found {torch.cuda.device_count()}"
        )

    ctx = mp.get_context("spawn")
    store = _rendezvous_store(pg_timeout)
    port = store.port
    env = dict(CHILD_ENV, OMP_NUM_THREADS="1") if device == "cpu" else CHILD_ENV
    procs, conns = [], []
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # spawned children copy the parent's environment at start
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_run_rank,
                args=(rank, world_size, port, backend, device, pg_timeout, worker, args, send_end),
                name=f"ep_ops-rank{rank}",
            )
            proc.start()
            send_end.close()
            procs.append(proc)
            conns.append(recv_end)
    except BaseException:
        _stop(procs, grace=0.0)
        raise
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    results, failures = {}, {}
    try:
        results, failures = _collect(procs, conns, time.monotonic() + timeout, failure_grace)
    finally:
        # Ranks that reported success are only tearing their group down: give them a moment.
        done = not failures and len(results) == world_size
        _stop(procs, grace=EXIT_GRACE_S if done else 0.0)
        for conn in conns:
            conn.close()

    if failures:
        order = list(failures)  # arrival order: the first is usually the cause
        lines = [f"ep_ops.parallel_launch: rank(s) {order} of {world_size} failed (first: rank {order[0]})"]
        lines += [f"--- rank {rank} ---\n{failures[rank]}" for rank in failures]
        raise RuntimeError("\n".join(lines))
    running = [rank for rank in range(world_size) if rank not in results]
    if running:
        raise TimeoutError(
            f"ep_ops.parallel_launch: rank(s) {running} of {world_size} still running after "
            f"{timeout:g} s; they were killed"
        )
    return [results[rank] for rank in range(world_size)]


def _collect(procs, conns, deadline, failure_grace):
    """Waits for every rank's outcome until ``deadline`` (or a grace period after a failure).

    Returns ``(results, failures)``: rank -> return value, rank -> traceback text (in the order
    the failures arrived, so the first one is usually the cause).
    """
    results, failures = {}, {}
    pending = set(range(len(procs)))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        handles = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = set(wait(handles, timeout=remaining))
        for rank in sorted(pending):
            conn, proc = conns[rank], procs[rank]
            if conn in ready or proc.sentinel in ready:
                try:
                    ok, payload = conn.recv()
                except (EOFError, OSError):
                    proc.join(timeout=1.0)
                    ok, payload = (
                        False,
                        (
                            f"process exited with code {proc.exitcode} before reporting a result "
                            "(its stderr, above, may say why)\n"
                        ),
                    )
                except Exception:
                    ok, payload = False, f"its result could not be received:\n{traceback.format_exc()}"
                pending.discard(rank)
                if ok:
                    results[rank] = payload
                else:
                    failures[rank] = payload
        if failures and pending:
            deadline = min(deadline, time.monotonic() + failure_grace)
    for rank in pending:
        if failures:
            failures[rank] = "still running after a peer failed; stopped\n"
    return results, failures
