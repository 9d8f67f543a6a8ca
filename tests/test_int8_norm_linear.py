"""rf.int8_add_rms_norm_linear: the residual add and RMSNorm in the prologue of the INT8 GEMV.

CPU: the NumPy path equals rf.add_rms_norm / rf.rms_norm followed by rf.int8_linear / int8_linear_swiglu on
NumPy arrays (the float64 references), s is x + a, argument errors. GPU: the fused kernel (one row, every
GEMV version, plain and DUAL, channel and group-wise, fp16 and fp32, with and without the add, bias) against
the float64 reference of the unfused math over NaN-poisoned outputs; s written by CTA 0 only where a is
given; the unfused fallbacks (several rows, K not a multiple of 16); a CUDA-graph chain of fused launches
(PDL) equal to plain launches."""

from __future__ import annotations

import numpy as np
import pytest
from graph_standin import assert_replays_equal
from tolerances import assert_close

import rawformer as rf
from rawformer.ops import quant
from rawformer.ops.int8_norm_linear import int8_add_rms_norm_linear_ref

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def operands(xp, rng, rows, k, n, dtype, group=None, dual=False, bias=False):
    """x, a (rows, K), ln_w (K,), qw (K -> N), bias, up, b_up: random, on xp."""

    def arr(shape, scale=1.0, shift=0.0):
        return xp.asarray((shift + scale * rng.standard_normal(shape)).astype(dtype))

    def qw():
        return rf.quantize_int8(arr((k, n), 1 / np.sqrt(k)), group_size=group)

    x, a, ln_w = arr((rows, k)), arr((rows, k), 0.5), arr(k, 0.1, 1.0)
    w, up = qw(), (qw() if dual else None)
    b = arr(n) if bias else None
    b_up = arr(n) if bias and dual else None
    return x, a, ln_w, w, b, up, b_up


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("with_a", [False, True])
def test_cpu_equals_the_unfused_ops(rng, dual, with_a):
    x, a, ln_w, qw, b, up, b_up = operands(np, rng, 3, 40, 9, np.float32, dual=dual, bias=True)
    a = a if with_a else None
    y, s = rf.int8_add_rms_norm_linear(a, x, ln_w, 1e-5, qw, b, up=up, b_up=b_up)
    h, s_want = (rf.rms_norm(x, ln_w, 1e-5), x) if a is None else rf.add_rms_norm(a, x, ln_w, 1e-5)
    y_want = rf.int8_linear(h, qw, b) if up is None else rf.int8_linear_swiglu(h, qw, up, b, b_up)
    assert y.dtype == x.dtype and y.shape == (3, 9)
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(s, s_want)
    if a is None:
        assert s is x


def test_argument_errors(rng):
    x, a, ln_w, qw, _, up, _ = operands(np, rng, 2, 32, 8, np.float32, dual=True)
    with pytest.raises(ValueError, match="a"):
        rf.int8_add_rms_norm_linear(a[:, :16], x, ln_w, 1e-5, qw)
    with pytest.raises(ValueError, match="ln_w"):
        rf.int8_add_rms_norm_linear(a, x, ln_w[:5], 1e-5, qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        rf.int8_add_rms_norm_linear(a, x, ln_w, 1e-5, np.ones((32, 8), np.float32))
    with pytest.raises(ValueError, match="b_up is given without up"):
        rf.int8_add_rms_norm_linear(a, x, ln_w, 1e-5, qw, b_up=np.ones(8, np.float32))
    other = rf.quantize_int8(np.ones((32, 4), np.float32))
    with pytest.raises(ValueError, match="shape and grouping"):
        rf.int8_add_rms_norm_linear(a, x, ln_w, 1e-5, qw, up=other)
    with pytest.raises(ValueError, match="eps"):
        rf.int8_add_rms_norm_linear(a, x, ln_w, -1.0, qw)


def test_instantiations_cover_the_norm_kernels():
    exprs = set(quant._instantiations())
    for dtype in (F16, F32):
        for group in (None, 128):
            for v in quant.GEMV_VERSIONS:
                for dual in (False, True):
                    assert quant.gemv_expression(dtype, 1, group, v, dual, norm=True) in exprs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dual", [False, True])
def test_gpu_fused_matches_reference(cp, rng, dtype, group, dual):
    k, n = 1024 + 256, 1003  # one row; K a multiple of 16 (and of the group), N odd
    x, a, ln_w, qw, b, up, b_up = operands(cp, rng, 1, k, n, dtype, group, dual, bias=True)
    for version in quant.GEMV_VERSIONS:
        for with_a in (False, True):
            aa = a if with_a else None
            want_y, want_s = int8_add_rms_norm_linear_ref(aa, x.get(), ln_w.get(), 1e-5, qw, b, up, b_up)
            y = cp.full((1, n), np.nan, dtype=dtype)  # poisoned outputs
            s_out = None if aa is None else cp.full((1, k), np.nan, dtype=dtype)
            quant._gemv_cupy(x, qw, b, version, up, b_up, norm=(aa, ln_w, s_out, 1e-5), out=y)
            assert_close(y, want_y, dtype, name=f"y v{version} a={with_a}")
            if aa is not None:
                assert_close(s_out, want_s, dtype, name="s")
            got_y, got_s = rf.int8_add_rms_norm_linear(aa, x, ln_w, 1e-5, qw, b, up=up, b_up=b_up)
            assert_close(got_y, want_y, dtype, name="op y")
            assert_close(got_s, want_s, dtype, name="op s")


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", [(3, 512), (1, 72)])
def test_gpu_unfused_fallbacks(cp, rng, rows, k):
    """Several rows or a padded K take the unfused ops: the same result."""
    x, a, ln_w, qw, b, up, b_up = operands(cp, rng, rows, k, 37, F16, dual=True, bias=True)
    y, s = rf.int8_add_rms_norm_linear(a, x, ln_w, 1e-5, qw, b, up=up, b_up=b_up)
    want_y, want_s = int8_add_rms_norm_linear_ref(a.get(), x.get(), ln_w.get(), 1e-5, qw, b, up, b_up)
    assert_close(y, want_y, F16)
    assert_close(s, want_s, F16)


@pytest.mark.gpu
def test_gpu_fused_chain_in_a_graph_equals_plain_launches(cp, rng, monkeypatch):
    """A Llama-like chain (fused qkv-style projection, a plain GEMV, fused gate/up, down, fused head), each
    kernel reading what the one before wrote, replayed from a CUDA graph (PDL launches) over NaN-filled
    outputs, equals the chain launched plainly (RAWFORMER_PDL=0) bit for bit."""
    h, i = 1024, 1376
    x = cp.asarray(rng.standard_normal((1, h)).astype(F16))
    ln1, ln2 = (cp.asarray((1 + 0.1 * rng.standard_normal(h)).astype(F16)) for _ in range(2))

    def qw(kk, nn, group=None):
        return rf.quantize_int8(
            cp.asarray((rng.standard_normal((kk, nn)) / np.sqrt(kk)).astype(F16)), group_size=group
        )

    w_in, w_o, gate, up, down, head = qw(h, h), qw(h, h, 128), qw(h, i), qw(h, i), qw(i, h), qw(h, 999)

    def chain():
        y, s = rf.int8_add_rms_norm_linear(None, x, ln1, 1e-5, w_in)
        o = rf.int8_linear(y, w_o)
        g, s = rf.int8_add_rms_norm_linear(o, s, ln2, 1e-5, gate, up=up)
        m = rf.int8_linear(g, down)
        logits, s = rf.int8_add_rms_norm_linear(m, s, ln1, 1e-5, head)
        return logits, s

    monkeypatch.setenv("RAWFORMER_PDL", "0")
    want = [cp.asnumpy(t) for t in chain()]
    assert all(np.isfinite(w).all() for w in want)
    monkeypatch.setenv("RAWFORMER_PDL", "1")
    assert_replays_equal(cp, chain, want)


@pytest.mark.gpu
def test_gpu_quantized_llama_decode_fused_equals_unfused(cp, monkeypatch):
    """A quantized Llama's batch-1 decode (CUDA graphs) through the fused kernels gives the greedy tokens of
    the unfused ops (NORM_MAX_TOKENS = 0 turns the fusion off)."""
    from rawformer.models import LlamaConfig, init_random
    from rawformer.models.quantize import quantize_model

    from rawformer.runtime import Generator, make_pool

    cfg = LlamaConfig(
        vocab_size=89, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = quantize_model(init_random(cfg, 0, np.float32, cp, std=0.3), "int8")
    calls = []
    gemv = quant._gemv_cupy

    def counting(*args, **kwargs):  # counts the int8_gemv_norm launches
        if kwargs.get("norm") is not None:
            calls.append(1)
        return gemv(*args, **kwargs)

    monkeypatch.setattr(quant, "_gemv_cupy", counting)

    def run():
        gen = Generator(model, make_pool(model, 256), max_batch=1)
        return gen.generate([[1, 5, 9, 2]], 12).token_ids[0]

    fused = run()
    assert len(calls) >= 2 * cfg.num_hidden_layers + 1  # every norm of a decode step went through it
    monkeypatch.setattr(quant, "NORM_MAX_TOKENS", 0)
    calls.clear()
    assert run() == fused and not calls
