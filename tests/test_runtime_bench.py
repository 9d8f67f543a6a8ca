"""bench/e2e.py without a GPU: the roofline's weight bytes, the HF name map, the acceptance rules, and one
whole run_config over tiny configs on NumPy (a CuPy stand-in), HF skipped."""

from __future__ import annotations

import types

import numpy as np
import pytest
from bench_modules import load
from rawformer.models import GPT2Config, LlamaConfig

from rawformer.memory import KVArena

harness = load("harness")
e2e = load("e2e")


def test_weight_bytes_and_names():
    # GPT-2 124M: everything but the 1024 x 768 position table (the tied head is read once)
    gpt2 = GPT2Config()
    assert e2e.weight_bytes_per_token(gpt2, 2) == 2 * (124_439_808 - 1024 * 768)
    llama = e2e.CONFIGS["llama-1b"]
    total = sum(int(np.prod(s)) for s in e2e.module_for(llama).weight_shapes(llama).values())
    assert e2e.weight_bytes_per_token(llama, 2) == 2 * (total - 32000 * 2048)  # the input embedding: rows
    assert 1.0e9 < total < 1.2e9
    assert e2e.hf_name(gpt2, "h.0.ln_1.weight") == "transformer.h.0.ln_1.weight"
    assert e2e.hf_name(llama, "layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert e2e.hf_name(llama, "lm_head.weight") == "lm_head.weight"


def rec(config, impl, phase, batch, tok_s, **extra):
    return dict(config=config, impl=impl, phase=phase, batch=batch, status="ok", tok_s=tok_s, **extra)


def test_verdicts():
    results = [
        {
            "config": "gpt2-small", "roofline_tok_s": 12000.0,
            "records": [rec("gpt2-small", "rawformer", "decode", 1, 900.0, decode_only_tok_s=1000.0),
                        rec("gpt2-small", "hf", "decode", 1, 20.0),
                        rec("gpt2-small", "rawformer", "decode", 64, 2000.0),
                        rec("gpt2-small", "hf", "decode", 64, 1100.0)],
        },
        {
            "config": "llama-1b", "roofline_tok_s": 1400.0,
            "records": [rec("llama-1b", "rawformer", "decode", 1, 600.0, decode_only_tok_s=750.0),
                        rec("llama-1b", "hf", "decode", 1, 20.0)],
        },
    ]  # fmt: skip
    v = [(x.status, x.text.split(":")[0]) for x in e2e.verdicts(results)]
    assert v == [
        ("PASS", "gpt2-small batch-1 decode >= 2x HF transformers"),
        ("FAIL", "gpt2-small batch-64 decode >= 2x HF transformers"),  # 1.82x
        ("PASS", "llama-1b batch-1 decode >= 2x HF transformers"),
        ("SKIP", "llama-1b batch-64 decode >= 2x HF transformers"),  # not run
        ("PASS", "llama-1b batch-1 decode >= 50% of the weight-streaming roofline"),  # 750 / 1400
    ]


def test_run_config_on_numpy(monkeypatch):
    """The whole per-config flow (pool, Generator, timed calls, records, report) on a NumPy stand-in."""
    cp = types.SimpleNamespace(
        asnumpy=np.asarray,
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: 0)),
    )
    monkeypatch.setattr(
        e2e,
        "CONFIGS",
        {
            "gpt2-small": GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4),
            "llama-1b": LlamaConfig(
                vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            ),
        },
    )  # fmt: skip
    draw, build = e2e.random_weights, e2e.build_model
    monkeypatch.setattr(
        e2e, "random_weights", lambda sh, seed, dt, xp, std: draw(sh, seed, np.float32, np, std)
    )
    monkeypatch.setattr(e2e, "build_model", lambda cfg, w, xp: build(cfg, w, np))
    monkeypatch.setattr(e2e, "KVArena", lambda *a, xp=None, **k: KVArena(*a, xp=np, **k))
    args = e2e.build_parser().parse_args(
        ["--prompt", "8", "--new", "5", "--reps", "2", "--batches", "1,3", "--no-graphs", "--no-hf"]
    )
    results = [e2e.run_config(name, args, cp, None, 3000.0) for name in e2e.CONFIGS]
    for res in results:
        got = {(r["impl"], r["phase"], r["batch"]): r for r in res["records"]}
        assert set(got) == {("rawformer", p, b) for p in ("decode", "prefill") for b in (1, 3)}
        assert all(r["status"] == "ok" and r["tok_s"] > 0 for r in got.values())
        assert got[("rawformer", "decode", 3)]["decode_steps"] == 4
        assert res["roofline_tok_s"] == pytest.approx(3000e9 / res["weight_bytes"])
    header = {
        "gpu": "cpu", "date": "now", "commit": "abc", "dirty": False, "copy_ceiling_gbps": 3000.0,
        "workload": {"prompt": 8, "new": 5, "reps": 2, "hf_reps": 3, "hf_attn": "sdpa", "no_graphs": True},
    }  # fmt: skip
    text = e2e.markdown(header, results, e2e.verdicts(results))
    assert "| 1 |" in text and "| 3 |" in text and "## ACCEPTANCE" in text
