"""``python -m ep_ops.bench`` end to end on 2 gloo ranks with tiny sizes, and its command-line
checks (the GPU timing itself, L2 flush or idle start, runs only on the GPU machines)."""

import json
import re

import pytest

from ep_ops import bench

TINY = [
    "--ranks", "2", "--backend", "gloo", "--iters", "2", "--warmup", "1", "--tokens", "16",
    "--hidden", "256", "--experts", "8", "--topk", "2", "--low-latency-tokens", "4", "--timeout", "120",
]  # fmt: skip


@pytest.mark.parametrize("idle_start", [False, True])
def test_bench_checks_and_times_every_op_on_cpu_ranks(tmp_path, capsys, idle_start):
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--json", str(path), *(["--idle-start"] if idle_start else [])]) == 0
    out = capsys.readouterr().out
    assert "FAILED checks" not in out, out
    record = json.loads(path.read_text())
    assert record["checks"] and all(record["checks"].values()), record["checks"]
    assert record["config"]["idle_start"] is idle_start
    ops = [row["op"] for row in record["rows"]]
    for op in (
        "layout",
        "dispatch BF16",
        "dispatch FP8",
        "cached dispatch BF16",
        "cached dispatch FP8",
        "combine BF16",
    ):
        assert op in ops, ops
    assert all(row["time_us"] > 0 for row in record["rows"]), record["rows"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experts", "5"], "--experts (5) must be a multiple of --ranks (2)"),
        (["--topk", "9"], "--topk (9) must be <= --experts (8)"),
        (["--hidden", "100"], "--hidden (100) must be a multiple of 128"),
        (["--iters", "0"], "--ranks and --iters must be >= 1"),
        (["--nvl-bytes", "-1"], "--nvl-bytes must be >= 0, got -1"),
    ],
)
def test_bench_rejects_bad_options(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main([*TINY, *args])


def test_bench_takes_the_nvl_buffer_size_as_deepep_writes_it():
    cfg = bench.resolve_config(bench.parse_args([*TINY, "--nvl-bytes", "1e9"]))
    assert cfg.nvl_bytes == 1_000_000_000
    assert bench.resolve_config(bench.parse_args(TINY)).nvl_bytes == 0  # sized to the workload
