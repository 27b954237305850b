"""Small runs of ep_ops' CUDA kernels under compute-sanitizer (memcheck, racecheck, synccheck).

Usage, on a machine with 2 or more GPUs of one host (after building the extension):

    python3 scripts/sanitize_nvl.py --tool memcheck
    python3 scripts/sanitize_nvl.py --tool racecheck
    python3 scripts/sanitize_nvl.py --tool synccheck
    python3 scripts/sanitize_nvl.py --tool memcheck --path ll --ranks 4 -- --print-limit 20
    python3 scripts/sanitize_nvl.py                  # the workload alone, without a sanitizer

Options:
    --tool {memcheck,racecheck,synccheck,none}  none (the default) runs the workload in this
        process tree. Any other tool reruns this script (with --tool none) under
        ``compute-sanitizer --tool TOOL --target-processes all --report-api-errors no``: the ranks
        are child processes, so every process is checked. The sanitizer's output is passed
        through; the script exits 1 unless every process's summary line (``ERROR SUMMARY``,
        ``RACECHECK SUMMARY``) counts 0 and the workload succeeded. API errors are not reported
        because NCCL probes for kernel images while it sets up its communicators
        (``cudaErrorNoKernelImageForDevice``, expected, not ours); ep_ops checks its own launches.
    --path {normal,ll,all}  normal: NVLink dispatch, cached dispatch and combine (exact, with
        notify's per-expert counts as ``Buffer.dispatch`` asks, and worst-token); ll:
        ``Buffer.low_latency_dispatch`` / ``low_latency_combine`` (BF16, FP8, FP8 with UE8M0
        scales, receive hooks, zero-copy, LogFMT, a combine receive left pending across the next
        dispatch); all (default): both.
    --ranks N  GPUs, one rank each (default 2).
    --plant-fault RANK  after the workload, rank RANK writes outside any allocation (a fill
        through a strided view 64 GiB past a tensor): a self-test showing that the sanitizer
        checks the ranks, which are child processes. The run then passes only if some process
        reports an error (the planted one).
    Arguments after ``--`` are passed to compute-sanitizer as they are.

memcheck runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every torch tensor is an
allocation of its own and an access past its end is reported (inside the caching allocator's
larger blocks it would not be).

compute-sanitizer is looked up on PATH, then in $CUDA_HOME/bin and /usr/local/cuda/bin.
Outputs are compared with the reference, so a run also fails on wrong results. Kernels run many
times slower under a sanitizer (racecheck most), hence the small sizes. Running the sanitizer by
hand works too:
``compute-sanitizer --target-processes all --tool memcheck python3 scripts/sanitize_nvl.py``.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

from ep_ops.launch import CHILD_ENV, parallel_launch

TOOLS = ("memcheck", "racecheck", "synccheck")
LAUNCH_TIMEOUT = 540  # seconds for the ranks' whole run (racecheck is the slowest tool)
SUMMARY = re.compile(r"\b([A-Z]+) SUMMARY: (\d+)")


# ---------------------------------------------------------------------------------------------
# the workload (inside the ranks)
# ---------------------------------------------------------------------------------------------


def normal_path(rank, world_size, group_name, device, tokens=64, hidden=256, topk=4, experts_per_rank=4):
    """NVLink dispatch (exact mode with notify's per-expert counts, as Buffer.dispatch asks), cached
    dispatch and combine, exact and worst-token, against the reference."""
    from ep_ops import _C
    from ep_ops.nvl import init_nvl_buffer, nvl_bytes_needed, release_nvl_buffer
    from ep_ops.reference import reference_combine, reference_dispatch, reference_layout

    ops = torch.ops.ep_ops
    experts = experts_per_rank * world_size
    nvl = device.type == "cuda"
    if nvl:
        init_nvl_buffer(dist.group.WORLD, nvl_bytes_needed(tokens * world_size, 2 * hidden, topk))
    xs, topks, weights, masks = [], [], [], []
    for r in range(world_size):  # every rank's inputs, on CPU, for the reference
        gen = torch.Generator().manual_seed(r)
        num_tokens = tokens - 5 * r
        xs.append(torch.randn(num_tokens, hidden, generator=gen).bfloat16())
        topk_idx = torch.rand(num_tokens, experts, generator=gen).topk(topk, dim=1).indices
        topks.append(topk_idx.masked_fill(torch.rand(topk_idx.shape, generator=gen) < 0.2, -1))
        weights.append(torch.rand(topk_idx.shape, generator=gen).masked_fill(topks[-1] < 0, 0))
        masks.append(reference_layout(topks[-1], experts, world_size)[2])
    x, topk_idx, topk_weights = (t[rank].to(device) for t in (xs, topks, weights))
    for worst in (0, tokens * world_size):
        dist.barrier()  # ranks start each call together: the sanitizer slows them unevenly
        expected = reference_dispatch(xs, None, topks, weights, masks, experts, 1, worst)
        _, _, in_rank = ops.get_dispatch_layout(topk_idx, experts, world_size)
        with_counts = nvl and worst == 0  # notify also counts per expert, as for Buffer.dispatch
        if with_counts:
            _C.request_dispatch_counts(group_name)
        out = ops.dispatch(x, None, topk_idx, topk_weights, in_rank, experts, 1, worst, group_name)
        if with_counts and _C.take_dispatch_counts(group_name) != expected[rank][4].tolist():
            raise AssertionError(f"rank {rank}: notify's per-expert counts differ from the reference")
        cached, _ = ops.cached_dispatch(x, None, in_rank, out[5], out[6], group_name)
        combined, combined_weights = ops.combine(
            out[0], out[3], None, None, in_rank, out[5], out[6], group_name
        )
        handles = [(masks[j], expected[j][5], expected[j][6]) for j in range(world_size)]
        reference = reference_combine(
            [e[0] for e in expected], [e[3] for e in expected], None, None, handles
        )[rank]
        for name, got, want in (
            ("dispatch recv_x", out[0], expected[rank][0]),
            ("cached_dispatch recv_x", cached, expected[rank][0]),
            ("combine combined_x", combined, reference[0]),
            ("combine combined_topk_weights", combined_weights, reference[1]),
        ):
            if not torch.equal(got.cpu(), want):
                raise AssertionError(
                    f"rank {rank}, num_worst_tokens={worst}: {name} differs from the reference"
                )
    if nvl:
        torch.cuda.synchronize()
        release_nvl_buffer(dist.group.WORLD.group_name)
    return 2


# (use_fp8, round_scale, use_ue8m0, return_recv_hook, zero_copy, use_logfmt)
LL_CASES = (
    (False, False, False, False, False, False),
    (False, False, False, True, False, False),
    (True, False, False, False, False, False),
    (True, True, True, True, False, False),
    (False, False, False, False, True, False),
    (True, False, False, True, False, True),
)


def ll_path(rank, world_size, group_name, device, num_max=16, hidden=512, topk=4, experts_per_rank=4):
    """Buffer.low_latency_dispatch -> x * 2 -> low_latency_combine over LL_CASES, then a combine
    whose receive waits until the next dispatch was issued; against the reference (LogFMT with a
    tolerance)."""
    from ep_ops import Buffer
    from ep_ops.reference import (
        per_token_cast_back,
        reference_low_latency_combine,
        reference_low_latency_dispatch,
    )

    def expert(received):
        return (per_token_cast_back(*received) if isinstance(received, tuple) else received) * 2

    group = dist.group.WORLD
    experts = experts_per_rank * world_size
    buffer = Buffer(
        group,
        num_nvl_bytes=Buffer.get_combine_config(world_size).get_nvl_buffer_size_hint(2 * hidden, world_size),
        num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(num_max, hidden, world_size, experts),
        low_latency_mode=True,
    )
    xs, topks, weights = [], [], []
    for r in range(world_size):  # every rank's inputs, on CPU; the last rank sends no tokens
        gen = torch.Generator().manual_seed(100 + r)
        num_tokens = 0 if r == world_size - 1 else num_max - r
        xs.append(torch.randn(num_tokens, hidden, generator=gen).bfloat16())
        topk_idx = torch.rand(num_tokens, experts, generator=gen).topk(topk, dim=1).indices
        topks.append(topk_idx.masked_fill(torch.rand(topk_idx.shape, generator=gen) < 0.2, -1))
        weights.append(torch.rand(topk_idx.shape, generator=gen))
    x, topk_idx, topk_weights = (t[rank].to(device) for t in (xs, topks, weights))

    def start(use_fp8, round_scale, use_ue8m0, hooked, zero_copy, use_logfmt, after_dispatch=None):
        """Dispatch, expert, combine; returns the combine's finish (its receive and the check).
        ``after_dispatch`` runs right after the dispatch was issued."""
        what = f"rank {rank}, fp8={use_fp8} ue8m0={use_ue8m0} hook={hooked} zero_copy={zero_copy} logfmt={use_logfmt}"
        recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            x,
            topk_idx,
            num_max,
            experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            return_recv_hook=hooked,
        )
        if after_dispatch is not None:
            after_dispatch()
        hook()
        expected = reference_low_latency_dispatch(
            xs, topks, num_max, experts, use_fp8, round_scale, use_ue8m0
        )
        if not torch.equal(recv_count.cpu(), expected[rank][2]):
            raise AssertionError(f"{what}: recv_count differs from the reference")
        combine_x = expert(recv)
        if zero_copy:
            buffer.get_next_low_latency_combine_buffer(handle).copy_(combine_x)
        combined, _, hook = buffer.low_latency_combine(
            combine_x, topk_idx, topk_weights, handle, use_logfmt=use_logfmt, zero_copy=zero_copy,
            return_recv_hook=hooked,
        )  # fmt: skip
        reference = reference_low_latency_combine(
            [expert((e[0], e[1]) if use_fp8 else e[0]) for e in expected], topks, weights, num_max, experts,
            use_logfmt,
        )[rank]  # fmt: skip

        def finish():
            hook()
            if use_logfmt:
                torch.testing.assert_close(combined.cpu(), reference, rtol=2e-2, atol=5e-2)
            elif not torch.equal(combined.cpu(), reference):
                raise AssertionError(f"{what}: combined_x differs from the reference")

        return finish

    for case in LL_CASES:
        dist.barrier()  # ranks start each call together: the sanitizer slows them unevenly
        start(*case)()
    # DeepEP's two-micro-batch overlap: a combine's receive left pending across the next dispatch.
    dist.barrier()
    pending = start(*LL_CASES[1])
    start(*LL_CASES[3], after_dispatch=pending)()
    if device.type == "cuda":
        torch.cuda.synchronize()
    buffer.destroy()
    return len(LL_CASES) + 2


def plant_out_of_bounds_write(device):
    """Writes one float 64 GiB past a small tensor: a view made through __cuda_array_interface__
    (which, unlike as_strided, does not check the storage's size), filled by torch's own kernel."""

    class PastTheEnd:
        def __init__(self, tensor):
            self.__cuda_array_interface__ = {
                "shape": (2,),
                "strides": (64 << 30,),
                "typestr": "<f4",
                "data": (tensor.data_ptr(), False),
                "version": 2,
            }

    small = torch.zeros(4, device=device)
    torch.as_tensor(PastTheEnd(small), device=device).fill_(1.0)
    torch.cuda.synchronize(device)


def worker(rank, world_size, group_name, path, plant_rank=-1, device="cuda"):
    import ep_ops  # noqa: F401  (loads the ops)

    device = torch.device(device, rank) if device == "cuda" else torch.device(device)
    done = {}
    if path in ("normal", "all"):
        done["normal"] = normal_path(rank, world_size, group_name, device)
    if path in ("ll", "all"):
        done["ll"] = ll_path(rank, world_size, group_name, device)
    if rank == plant_rank:
        plant_out_of_bounds_write(device)
    return done


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def find_sanitizer() -> str | None:
    for candidate in (
        shutil.which("compute-sanitizer"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"),
        "/usr/local/cuda/bin/compute-sanitizer",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def sanitize(tool: str, path: str, ranks: int, extra: list, plant_rank: int = -1) -> int:
    """Reruns this script under compute-sanitizer; 0 when every process's summary counts 0 (with
    a planted fault: when some process reports an error)."""
    exe = find_sanitizer()
    if exe is None:
        print("sanitize_nvl: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return 2
    command = [exe, "--tool", tool, "--target-processes", "all", "--report-api-errors", "no", *extra]
    command += [sys.executable, os.path.abspath(__file__), "--path", path, "--ranks", str(ranks)]
    command += ["--plant-fault", str(plant_rank)] if plant_rank >= 0 else []
    env = {**os.environ, **CHILD_ENV}
    if tool == "memcheck":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    print("+", shlex.join(command), flush=True)
    summaries = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            match = SUMMARY.search(line)
            if match:
                summaries.append(int(match.group(2)))
    found = sum(summaries)
    print(
        f"sanitize_nvl: {tool} over the {path} path on {ranks} ranks: {len(summaries)} process "
        f"summaries, {found} errors/hazards reported; workload exit status {proc.returncode}",
        flush=True,
    )
    if plant_rank >= 0:
        caught = found > 0
        print(
            f"sanitize_nvl: the fault planted on rank {plant_rank} was {'' if caught else 'NOT '}reported",
            flush=True,
        )
        return 0 if caught else 1
    return 0 if proc.returncode == 0 and summaries and found == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=(*TOOLS, "none"), default="none")
    parser.add_argument("--path", choices=("normal", "ll", "all"), default="all")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--plant-fault", dest="plant_rank", type=int, default=-1, metavar="RANK")
    parser.add_argument("extra", nargs="*", help="after --: arguments for compute-sanitizer")
    args = parser.parse_args(argv)
    if args.tool != "none":
        return sanitize(args.tool, args.path, args.ranks, args.extra, args.plant_rank)
    results = parallel_launch(
        args.ranks, worker, args.path, args.plant_rank, backend="nccl", device="cuda", timeout=LAUNCH_TIMEOUT
    )
    print(f"sanitize_nvl: workload done on {args.ranks} ranks: {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
