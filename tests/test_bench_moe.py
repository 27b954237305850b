"""``python -m ep_ops.bench_moe`` end to end on 2 gloo ranks with tiny sizes, and its command-line
checks. The compiled steps use the "eager" backend (Dynamo's fullgraph capture, no code
generation) to keep the launch at a few seconds; test_moe_layer.py compiles the same layer with
Inductor."""

import json
import re

import pytest

from ep_ops import bench_moe

TINY = [
    "--ranks", "2", "--backend", "gloo", "--compile-backend", "eager", "--iters", "2", "--warmup", "1",
    "--tokens", "16", "--hidden", "32", "--ffn", "16", "--experts", "4", "--topk", "2",
    "--decode-tokens", "4", "--decode-hidden", "32", "--decode-ffn", "16", "--decode-experts", "4",
    "--decode-topk", "2", "--shared-ffn", "8", "--timeout", "120",
]  # fmt: skip


def test_bench_moe_runs_both_steps_on_cpu_ranks(tmp_path, capsys):
    path = tmp_path / "moe.json"
    assert bench_moe.main([*TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "speedup" in out, out
    assert "train (exact)" in out and "decode (low latency)" in out, out
    assert "FAIL" not in out, out
    record = json.loads(path.read_text())
    assert [r["step"] for r in record["results"]] == ["train (exact)", "decode (low latency)"]
    for result in record["results"]:
        assert result["matches_eager"] and result["eager_ms"] > 0 and result["compiled_ms"] > 0, result
    assert record["config"]["device"] == "cpu" and record["date"] and record["machine"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experts", "5"], "--experts (5) must be a multiple of --ranks (2)"),
        (["--decode-topk", "9"], "--decode-topk (9) must be in 1..--decode-experts (4)"),
        (["--steps", "train,prefill"], "--steps must name some of train, decode"),
        (["--iters", "0"], "--iters must be >= 1"),
    ],
)
def test_bench_moe_rejects_bad_options(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench_moe.main([*TINY, *args])
