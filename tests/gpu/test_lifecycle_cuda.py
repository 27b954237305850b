"""``Buffer`` lifecycle on GPU_RANKS GPUs of one host (EP_OPS_GPU_RANKS, default 2).

- ``destroy()`` gives the GPU memory back. The NVLink buffers are symmetric memory, outside
  torch's caching allocator, so the device's free memory (``torch.cuda.mem_get_info``) is what is
  measured, with every rank at the same point (a peer's mapping of our memory keeps it alive) and
  the allocator's cache emptied; ``torch.cuda.memory_allocated`` must come back too. The first of
  MEMORY_CYCLES build / use / destroy cycles only warms up one-time allocations (NCCL, the
  symmetric-memory set-up); the others are checked. The figures are printed (they show in the
  pytest log).
- Two Buffers on two groups (``dist.new_group`` of all ranks, twice) at once, used interleaved,
  one with a receive pending while the other works.
- A Buffer re-created on its group after ``destroy()``, several times; two Buffers sharing one
  group's NVLink memory; a larger Buffer replacing a smaller one's memory while both are alive.

One launch runs the three sections in turn (memory first, in fresh processes); each test checks
one section's result. Every step compares its outputs with the reference (test_stress_cuda.py).
"""

import gc

import pytest
import torch
import torch.distributed as dist
from cases import expect_error
from gpu_ranks import GPU_RANKS, needs_gpu_ranks
from test_buffer import nvl_bytes
from test_stress_cuda import ll_spec, ll_step, make_buffer, normal_spec, normal_step

from ep_ops.launch import parallel_launch

pytestmark = [pytest.mark.gpu, needs_gpu_ranks]

TIMEOUT = 180
MIB = 1 << 20
MEMORY_NVL_BYTES = 10**9  # DeepEP's usual num_nvl_bytes: far above the measurement noise
MEMORY_CYCLES = 3
MEMORY_TOLERANCE = 64 * MIB  # free memory after destroy() may differ this much from before building
ALLOCATED_TOLERANCE = 1 * MIB


# ---------------------------------------------------------------------------------------------
# sections (run inside the ranks)
# ---------------------------------------------------------------------------------------------


def _memory_now(device: torch.device) -> dict:
    """Free device memory and torch's allocated/reserved bytes, once every rank got here with
    its garbage collected and its work finished."""
    gc.collect()
    torch.cuda.synchronize(device)
    dist.barrier()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return {
        "free": free,
        "total": total,
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }


def ll_after_normal(buffer, spec):
    """A low-latency step after normal-mode calls on ``buffer``: clean_low_latency_buffer first,
    as DeepEP users do."""
    buffer.clean_low_latency_buffer(spec.num_max, spec.hidden, spec.num_experts)
    return ll_step(buffer, spec)


def memory(rank: int, num_ranks: int) -> dict | None:
    from ep_ops import Buffer
    from ep_ops.nvl import nvl_usable

    world = dist.group.WORLD
    if str(dist.get_backend(world)) != "nccl":
        return None  # CPU run of this file's logic: nothing to measure
    device = torch.device("cuda", torch.cuda.current_device())
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(128, 7168, num_ranks, 8 * num_ranks)
    cycles = []
    for cycle in range(MEMORY_CYCLES):
        before = _memory_now(device)
        buffer = Buffer(
            world, num_nvl_bytes=MEMORY_NVL_BYTES, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True
        )
        built = _memory_now(device)
        normal_step(buffer, normal_spec(10 + cycle, num_ranks, hiddens=(1024, 7168)))
        ll_after_normal(buffer, ll_spec(20 + cycle, num_ranks, variant="zero_copy", hiddens=(2048, 7168)))
        used = _memory_now(device)
        buffer.destroy()
        del buffer
        after = _memory_now(device)
        cycles.append({"before": before, "built": built, "used": used, "after": after})
    return {
        "nvl": nvl_usable(world),
        "num_nvl_bytes": MEMORY_NVL_BYTES,
        "num_rdma_bytes": num_rdma_bytes,
        "cycles": cycles,
    }


def two_groups(rank: int, num_ranks: int) -> dict:
    """Buffers on two groups of all ranks, used interleaved: a low-latency combine of one stays
    pending while the other runs whole steps; then one is destroyed and the other goes on."""
    R = num_ranks  # noqa: N806
    everyone = list(range(R))
    group_a, group_b = dist.new_group(everyone), dist.new_group(everyone)  # every rank calls both
    a, b = make_buffer(group_a), make_buffer(group_b)
    assert a.group_name != b.group_name, (a.group_name, b.group_name)

    normal_step(a, normal_spec(1, R))
    normal_step(b, normal_spec(2, R, fp8=True))
    finish_a = ll_after_normal(a, ll_spec(3, R, variant="deferred"))  # a's combine receive pending
    ll_after_normal(b, ll_spec(4, R, fp8=True, variant="hook"))
    normal_step(b, normal_spec(5, R, worst="tight"))
    finish_a()
    ll_step(a, ll_spec(6, R, fp8=True))
    normal_step(a, normal_spec(7, R, fp8=True, worst="loose"))
    ll_after_normal(b, ll_spec(8, R, variant="zero_copy"))

    a.destroy()
    no_tokens = torch.zeros(1, 1, dtype=torch.int64)
    expect_error(RuntimeError, ["destroyed"], a.get_dispatch_layout, no_tokens, R)
    normal_step(b, normal_spec(9, R))
    ll_after_normal(b, ll_spec(10, R, variant="out"))
    b.destroy()
    return {"steps": 11}


def recreate(rank: int, num_ranks: int) -> dict:
    from ep_ops import Buffer

    world, R = dist.group.WORLD, num_ranks  # noqa: N806
    no_tokens = torch.zeros(1, 1, dtype=torch.int64)
    results = {}

    # Destroy, then a new Buffer on the same group, a few times over.
    for i in range(3):
        buffer = make_buffer(world)
        normal_step(buffer, normal_spec(30 + i, R, fp8=i == 1))
        ll_after_normal(buffer, ll_spec(40 + i, R, fp8=i != 1, variant="hook"))
        buffer.destroy()
        buffer.destroy()  # idempotent
        expect_error(RuntimeError, ["destroyed"], buffer.get_dispatch_layout, no_tokens, R)
    results["recreated"] = 3

    # Two Buffers on one group share its NVLink memory: destroying one leaves the other working.
    first, second = make_buffer(world), make_buffer(world)
    normal_step(first, normal_spec(50, R))
    ll_step(second, ll_spec(51, R, variant="deferred"))()
    first.destroy()
    normal_step(second, normal_spec(52, R, fp8=True))
    ll_after_normal(second, ll_spec(53, R, fp8=True, variant="hook"))
    second.destroy()
    results["shared"] = "ok"

    # A small Buffer, then a larger one on the same group while the small one is alive (the
    # group's memory is replaced by a larger one), then the small one destroyed first.
    small_hiddens, small_sizes = (128, 256), (8, 512, 4 * R, 4)
    small = Buffer(
        world,
        num_nvl_bytes=nvl_bytes(max(small_hiddens), R, 2),
        num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(8, 512, R, 4 * R),
        low_latency_mode=True,
    )
    normal_step(small, normal_spec(60, R, hiddens=small_hiddens))
    ll_after_normal(small, ll_spec(61, R, variant="hook", sizes=small_sizes))
    big = make_buffer(world)
    normal_step(big, normal_spec(62, R, hiddens=(7168,)))
    normal_step(small, normal_spec(63, R, fp8=True, hiddens=small_hiddens))
    ll_after_normal(small, ll_spec(64, R, fp8=True, sizes=small_sizes))
    small.destroy()
    normal_step(big, normal_spec(65, R, worst="tight"))
    ll_after_normal(big, ll_spec(66, R, fp8=True))
    big.destroy()
    results["replaced"] = "ok"

    # And a last one on the group, after all that.
    last = make_buffer(world)
    normal_step(last, normal_spec(70, R, fp8=True, worst="loose"))
    ll_after_normal(last, ll_spec(71, R, variant="zero_copy"))
    last.destroy()
    results["last"] = "ok"
    return results


def lifecycle_worker(rank, num_ranks, group_name):
    import ep_ops  # noqa: F401  (loads the ops)

    sections = {}
    for name, section in (("memory", memory), ("two_groups", two_groups), ("recreate", recreate)):
        try:
            sections[name] = section(rank, num_ranks)
        except Exception as error:
            error.add_note(f"in section {name} of the lifecycle run")
            raise
    return sections


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lifecycle():
    return parallel_launch(GPU_RANKS, lifecycle_worker, backend="nccl", device="cuda", timeout=TIMEOUT)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / MIB:+.1f} MiB"


def memory_report(results: list) -> str:
    lines = []
    for rank, result in enumerate(results):
        lines.append(
            f"rank {rank}: Buffer(num_nvl_bytes={result['num_nvl_bytes']}, "
            f"num_rdma_bytes={result['num_rdma_bytes']}), NVLink kernels: {result['nvl']}"
        )
        for i, c in enumerate(result["cycles"]):
            before = c["before"]
            lines.append(
                f"  cycle {i}{' (warm-up)' if i == 0 else ''}: free {before['free'] / 2**30:.3f} GiB of "
                f"{before['total'] / 2**30:.1f} before building; free memory change vs before: "
                f"built {_mib(c['built']['free'] - before['free'])}, "
                f"used {_mib(c['used']['free'] - before['free'])}, "
                f"destroyed {_mib(c['after']['free'] - before['free'])}; torch allocated "
                f"{before['allocated']} -> {c['used']['allocated']} -> {c['after']['allocated']} bytes"
            )
    return "\n".join(lines)


def test_destroy_returns_gpu_memory(lifecycle, capsys):
    results = [r["memory"] for r in lifecycle]
    with capsys.disabled():
        print("\ntest_lifecycle_cuda memory (mem_get_info deltas per rank):\n" + memory_report(results))
    for rank, result in enumerate(results):
        cycles = result["cycles"]
        for i, c in enumerate(cycles[1:], start=1):
            what = f"rank {rank}, cycle {i}"
            held = c["before"]["free"] - c["used"]["free"]
            if result["nvl"]:
                assert held >= 0.9 * result["num_nvl_bytes"], (
                    f"{what}: the Buffer held {held} bytes, expected at least num_nvl_bytes "
                    f"({result['num_nvl_bytes']}) of symmetric memory: is the measurement right?"
                )
            kept = c["before"]["free"] - c["after"]["free"]
            assert kept <= MEMORY_TOLERANCE, (
                f"{what}: {kept} bytes not returned after destroy() (held {held})"
            )
            grown = c["after"]["allocated"] - c["before"]["allocated"]
            assert grown <= ALLOCATED_TOLERANCE, f"{what}: torch's allocated bytes grew by {grown}"
        drift = cycles[1]["before"]["free"] - cycles[-1]["after"]["free"]
        assert drift <= MEMORY_TOLERANCE, f"rank {rank}: free memory fell {drift} bytes over the cycles"


def test_two_buffers_on_two_groups(lifecycle):
    assert [r["two_groups"] for r in lifecycle] == [{"steps": 11}] * GPU_RANKS


def test_recreate_after_destroy(lifecycle):
    expected = {"recreated": 3, "shared": "ok", "replaced": "ok", "last": "ok"}
    assert [r["recreate"] for r in lifecycle] == [expected] * GPU_RANKS
