"""bench/kv_memory.py on a small workload: its files, and numbers that agree with each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import kv_memory  # noqa: E402


@pytest.mark.parametrize("dist", kv_memory.DISTRIBUTIONS)
def test_lengths_stay_in_range_and_are_seeded(dist):
    rng = np.random.default_rng(0)
    x = kv_memory.draw_lengths(rng, 5000, 16, 2048, dist)
    assert x.min() >= 16 and x.max() <= 2048 and x.dtype.kind == "i"
    a = kv_memory.workload(3, 50, (16, 64), (16, 32), dist)
    b = kv_memory.workload(3, 50, (16, 64), (16, 32), dist)
    assert all((a[k] == b[k]).all() for k in a)
    if dist == "loguniform":  # short requests are more common than long ones
        assert np.median(x) < 0.5 * (16 + 2048) / 2
    with pytest.raises(ValueError, match="unknown distribution"):
        kv_memory.draw_lengths(rng, 3, 1, 2, "normal")


def test_simulation_numbers_agree():
    work = kv_memory.workload(1, 24, (16, 200), (16, 100), "uniform")
    r = kv_memory.simulate(work, max_len=512, block_size=16, seed=1)
    p, o = work["prompt_lens"], work["output_lens"]
    assert r["contiguous_slots"] == 24 * 512
    assert r["final_tokens"] == int((p + o).sum())
    assert r["paged_peak_tokens"] <= r["paged_peak_slots"] <= r["paged_final_slots"]
    assert r["paged_final_slots"] - r["final_tokens"] < 24 * 16  # less than one block per request
    assert r["saved_peak"] >= r["saved_final"] > 0
    assert 0 <= r["waste_at_peak"] <= r["waste_worst_step"] < 1
    assert r["steps"] == int(o.max()) - 1  # the prefill gives the first token
    s = r["series"]
    assert s["live"][0] == 24 and len(s["step"]) == r["steps"] + 1


def test_main_writes_results(tmp_path, capsys):
    argv = ["--requests", "12", "--prompt", "16", "100", "--output", "16", "60", "--max-len", "256"]
    assert kv_memory.main([*argv, "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| uniform | gpt2-small |" in out and "waste" in out
    data = json.loads((tmp_path / "kv_memory.json").read_text())
    assert len(data["records"]) == 2 * len(kv_memory.CONFIGS)
    rec = data["records"][0]
    assert rec["contiguous_bytes"] == 12 * 256 * rec["token_bytes"]
    assert rec["token_bytes"] == kv_memory.token_bytes(kv_memory.CONFIGS[rec["config"]])
    assert data["header"]["workload"]["requests"] == 12
    md = (tmp_path / "kv_memory.md").read_text()
    assert "## ACCEPTANCE" in md and "| loguniform | llama-1b |" in md
    with pytest.raises(SystemExit, match="must fit"):
        kv_memory.main(["--max-len", "100", "--out", str(tmp_path)])
