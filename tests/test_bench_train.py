"""bench/train.py without a GPU: the FLOP count, one rawformer run over a tiny config on NumPy (a CuPy
stand-in), the acceptance rule and report, and (when torch is installed) the PyTorch model against ours."""

from __future__ import annotations

import argparse
import types

import numpy as np
import pytest
from bench_modules import load
from rawformer.models import GPT2Config

from rawformer import autograd as ag
from rawformer.training.model import GPT

harness = load("harness")
bench = load("train")

TINY = GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4)


def numpy_as_cupy():
    pool = types.SimpleNamespace(free_all_blocks=lambda: None, total_bytes=lambda: 0)
    stream = types.SimpleNamespace(synchronize=lambda: None)
    return types.SimpleNamespace(
        asarray=np.asarray,
        get_default_memory_pool=lambda: pool,
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream),
    )


def test_config_and_flops():
    cfg = bench.CONFIGS["gpt2-small"]
    assert cfg == GPT2Config()  # the shipped gpt2-small.json is GPT-2 small
    assert (bench.LR, bench.BETAS, bench.WD, bench.CLIP) == (6e-4, (0.9, 0.95), 0.1, 1.0)
    params = 124_439_808 - 1024 * 768  # matrices, norms, biases and the tied head; positions are a lookup
    flops = bench.step_flops(cfg, 8, 1024)
    assert 6 * 0.99 * params * 8192 < flops - 12 * 12 * 1024 * 768 * 8192 < 6 * params * 8192


def test_rawformer_side_runs_and_records(rng):
    host = bench.init_weights(TINY, seed=0)
    data = bench.batches(TINY, 2, 16, 2, seed=1)
    args = argparse.Namespace(warmup=1, steps=2, batch=2, seq=16)
    first, times, mem = bench.run_rawformer(TINY, host, data, args, numpy_as_cupy())
    model = GPT(TINY, {n: w.astype(np.float16) for n, w in host.items()})
    with ag.no_grad():
        want = model.loss(*data[0]).item()
    assert first == pytest.approx(want, rel=1e-3) and len(times) == 2
    rec = bench.record(
        "rawformer", "tiny", args, times, bench.step_flops(TINY, 2, 16), {**mem, "first_loss": first}
    )
    assert rec["tokens_per_s"] == pytest.approx(32 / (rec["ms"] / 1e3))


def test_acceptance_and_report():
    args = argparse.Namespace(batch=8, seq=1024)
    extra = {"peak_bytes": 2**30, "reserved_bytes": 2**31, "first_loss": 10.9}
    ours = bench.record("rawformer", "gpt2-small", args, [0.080] * 3, 10**15, extra)
    torch_fast = bench.record("torch", "gpt2-small", args, [0.060] * 3, 10**15, extra)
    torch_slow = bench.record("torch", "gpt2-small", args, [0.070] * 3, 10**15, extra)
    crit = [harness.Criterion("train step", "fwd+bwd+adamw", "faster", bench.ACCEPT, "rawformer", "torch")]
    assert harness.evaluate(crit, [ours, torch_fast])[0].status == "FAIL"  # 0.75x
    verdicts = harness.evaluate(crit, [ours, torch_slow])  # 0.875x
    assert verdicts[0].status == "PASS"
    header = {"gpu": "test", "date": "d", "commit": "c", "versions": {}, "workload": {}}
    text = bench.markdown(header, [ours, torch_slow], {}, verdicts)
    assert "## ACCEPTANCE" in text and "| 102,400 |" in text  # 8192 tokens / 0.08 s


def test_torch_model_matches_ours(monkeypatch):
    torch = pytest.importorskip("torch")
    host = bench.init_weights(TINY, seed=2)
    x, y = bench.batches(TINY, 3, 16, 1, seed=3)[0]
    ours = GPT(TINY, {n: w.astype(np.float64) for n, w in host.items()})
    loss = ours.loss(x, y)
    loss.backward()
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self: self)  # build it on the CPU
    m = bench.torch_model(torch, TINY, host).double()
    t_loss = m(torch.from_numpy(x), torch.from_numpy(y))
    t_loss.backward()
    assert float(t_loss) == pytest.approx(loss.item(), rel=1e-9)
    g = m.h[0].c_attn.weight.grad.numpy().T  # nn.Linear (out, in) vs Conv1D (in, out)
    np.testing.assert_allclose(g, ours.params["h.0.attn.c_attn.weight"].grad, rtol=1e-5, atol=1e-9)
