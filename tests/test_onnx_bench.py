"""bench/onnx_bench.py runs end to end on the CPU (a tiny config): the overhead chain, export -> load ->
native decode next to the runtime's own, the executor profile, the report with its acceptance lines. Run as a
subprocess: it is a script, not a module to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "onnx_bench.py"


def test_bench_onnx_cpu_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "onnx.md").read_text()
    assert "## ACCEPTANCE" in md and "us per node" in md and "| tiny | 8 |" in md
    assert "path native" in md and "greedy tokens identical" in r.stdout + r.stderr
    assert (tmp_path / "onnx.json").is_file()
