"""bench/accuracy_bundled.py on the CPU: the bundled model on two of its held-out evaluation windows, every
variant (float64 reference, INT8 weights, the stepped scoring over a float and an INT8 KV cache)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bench_modules import load

VARIANTS = ["fp64", "int8", "int8-g128", "fp64 steps", "fp64 kv8", "int8 steps", "int8 kv8"]


@pytest.fixture(scope="module")
def ab():
    for name in ("harness", "e2e", "accuracy"):  # imported by name by the script
        load(name)
    return load("accuracy_bundled")


@pytest.fixture(scope="module")
def three(ab):
    """(training config, 3 evaluation windows (3, 257), their description)."""
    tcfg = ab.train_config(ab.MODEL)
    return (tcfg, *ab.held_out_windows(tcfg, "3"))


def test_windows_are_the_evaluation_windows(three):
    from rawformer.training.data import eval_batches, load_corpus

    tcfg, rows, info = three
    corpus = load_corpus(tcfg.data, held_out_fraction=tcfg.held_out_fraction)
    x, y = zip(*eval_batches(corpus.held_out, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches), strict=True)
    x, y = np.concatenate(x), np.concatenate(y)
    assert len(x) == info["source_windows"] == tcfg.eval_batches * tcfg.batch_size  # the card's 512
    first, mid, last = 0, round((len(x) - 1) / 2), len(x) - 1
    assert info["window_index"] == [first, mid, last]
    np.testing.assert_array_equal(rows[:, :-1], x[[first, mid, last]])
    np.testing.assert_array_equal(rows[:, 1:], y[[first, mid, last]])
    assert info["held_out_tokens"] == corpus.held_out.size and rows.shape == (3, tcfg.seq_len + 1)


def test_bundled_mode_on_the_cpu(ab, three, tmp_path, capsys):
    from rawformer.commands.eval import gpt2_loss_numpy, load_eval_model

    argv = ["--cpu", "--windows", "3", "--batch", "2", "--positions", "40", "--kv-step", "6"]
    assert ab.main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "accuracy_bundled.json").read_text())
    head, recs = data["header"], {r["variant"]: r for r in data["records"]}
    assert list(recs) == VARIANTS
    assert head["tokens"] == 120 and head["data"]["windows"] == 3 and head["kv_step"] == 6
    ref = recs["fp64"]
    assert 1 < ref["ppl"] < 20 and ref["ppl_vs_reference"] == 0 and ref["top1_agreement"] == 1
    # the reference is `rawformer eval`'s loss (its float32 NumPy GPT-2) on the same bytes
    ev, rows = load_eval_model(ab.MODEL, None), three[1]
    loss = gpt2_loss_numpy(ev["model_config"], ev["weights"], rows[:, :40], rows[:, 1:41]) / 120
    assert ref["nll"] == pytest.approx(loss, rel=1e-5)
    for name, r in recs.items():
        assert math.isfinite(r["ppl"]) and math.isfinite(r["mean_kl"]), name
        assert abs(r["ppl_vs_reference"]) < 0.05, name  # loose: INT8 weights / cache move it by < 1%
    # the stepped scoring through a float cache is the prefill's math (float64): the same logits
    assert recs["fp64 steps"]["logits_rel_error"] < 1e-9 and abs(recs["fp64 steps"]["ppl_vs_base"]) < 1e-9
    assert recs["int8 steps"]["logits_rel_error"] == pytest.approx(recs["int8"]["logits_rel_error"], rel=1e-6)
    # quantized weights / a quantized cache really change the logits (the INT8 cache is what is read)
    for name in ("int8", "int8-g128", "fp64 kv8", "int8 kv8"):
        assert recs[name]["logits_rel_error"] > 1e-5 and recs[name]["mean_kl"] > 0, name
        assert recs[name]["ppl_vs_base_se"] is not None and recs[name]["bar"], name
    assert recs["fp64 kv8"]["base"] == "fp64 steps" and recs["int8 kv8"]["base"] == "int8 steps"
    md = (tmp_path / "accuracy_bundled.md").read_text()
    assert "## ACCEPTANCE" in md and "| fp64 kv8 | float64 | steps | int8 |" in md
    out = capsys.readouterr().out
    assert out.count("stdlib-gpt held-out: INT8 weights") == 2 and out.count("INT8 KV cache (") == 2


def test_verdicts_and_arguments(ab):
    rec = {"bar": True, "kv_cache": "float16", "variant": "int8", "base": "fp16", "ppl": 2.3}
    got = ab.verdicts(
        [
            {**rec, "ppl_vs_base": 0.009, "ppl_vs_base_se": 1e-4},
            {**rec, "ppl_vs_base": 0.011, "ppl_vs_base_se": 1e-4, "kv_cache": "int8", "variant": "fp16 kv8"},
            {**rec, "ppl_vs_base": float("nan"), "ppl_vs_base_se": None},
            {**rec, "bar": False, "ppl_vs_base": 0.5, "ppl_vs_base_se": None},
        ]
    )
    assert [v.status for v in got] == ["PASS", "FAIL", "FAIL"]
    assert "INT8 KV cache (fp16 kv8) perplexity <= +1% of fp16: +1.100% ± 0.010%" in got[1].text
    for bad in (["--windows", "some"], ["--kv-step", "17"], ["--positions", "0"]):
        with pytest.raises(SystemExit):
            ab.main(["--cpu", *bad, "--out", "/nonexistent"])


def test_accuracy_hands_over_bundled(ab, tmp_path):
    load("e2e")  # imported by name by accuracy.py
    acc = load("accuracy")
    argv = [
        "--bundled",
        "--cpu",
        "--windows",
        "1",
        "--positions",
        "8",
        "--kv-step",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert acc.main(argv) == 0
    records = json.loads((tmp_path / "accuracy_bundled.json").read_text())["records"]
    assert [r["variant"] for r in records] == VARIANTS and records[0]["ppl_rel_se"] is None  # one window
