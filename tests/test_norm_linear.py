"""rf.add_rms_norm_linear: the NumPy reference against an independent float64 formula and the unfused ops on
the CPU; on the GPU the fused kernel (gemv_nk_norm) against the float64 reference, its fallbacks, PDL chains
and graph replays, and a Llama decode through it against the unfused path."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import test_models_reference as ref
from graph_standin import assert_replays_equal
from rawformer.models import LlamaConfig, llama
from rawformer.models.common import norm_linear
from test_models_reference import MiniArena, MiniPool
from tolerances import assert_close, assert_written_close, poison_pool

import rawformer as rf
from rawformer.kernels import modules

lin = importlib.import_module("rawformer.ops.linear")
nl = importlib.import_module("rawformer.ops.norm_linear")

EPS = 1e-5


def _formula(a, x, g, eps, w, b=None, w2=None, b2=None):
    """Straight float64 maths with no rounding at all: s = x + a, h = s / rms(s) * g, y = h @ w + b."""
    s = x.astype(np.float64) + (0 if a is None else a.astype(np.float64))
    h = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps) * (1 if g is None else g.astype(np.float64))
    y = h @ w.astype(np.float64) + (0 if b is None else b.astype(np.float64))
    if w2 is None:
        return y, s
    u = h @ w2.astype(np.float64) + (0 if b2 is None else b2.astype(np.float64))
    return y / (1 + np.exp(-y)) * u, s


def _inputs(rng, shape, n, dtype, *, add=True, bias=False, dual=False, scale=1.0):
    k = shape[-1]
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    a = rng.standard_normal(shape).astype(dtype) if add else None
    g = (1 + rng.standard_normal(k) / 10).astype(dtype)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    w2 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype) if dual else None
    b2 = rng.standard_normal(n).astype(dtype) if dual and bias else None
    return a, x, g, w, b, w2, b2


# ---- CPU: the reference, the composition it stands for, the argument checks --------------------------------


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_is_the_formula_in_float64(rng, add, dual, bias):
    a, x, g, w, b, w2, b2 = _inputs(rng, (2, 3, 24), 7, np.float64, add=add, bias=bias, dual=dual)
    y, s = rf.add_rms_norm_linear(a, x, g, EPS, w, b, w2=w2, b2=b2)
    want_y, want_s = _formula(a, x, g, EPS, w, b, w2, b2)
    assert y.shape == (2, 3, 7) and s.shape == (2, 3, 24) and y.dtype == s.dtype == np.float64
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, want_s, rtol=0, atol=0)
    if not add:
        assert s is x  # no add: the residual stream is handed back, not copied


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_float32_equals_the_unfused_ops(rng, add, dual):
    """float32: bit for bit what rf.add_rms_norm (rf.rms_norm) then rf.linear (rf.linear_swiglu) give, the
    intermediate s and h rounded to float32 the same way."""
    a, x, g, w, b, w2, b2 = _inputs(rng, (5, 40), 9, np.float32, add=add, bias=True, dual=dual)
    y, s = rf.add_rms_norm_linear(a, x, g, EPS, w, b, w2=w2, b2=b2)
    h, s_ref = (rf.rms_norm(x, g, EPS), x) if a is None else rf.add_rms_norm(a, x, g, EPS)
    y_ref = rf.linear(h, w, b) if w2 is None else rf.linear_swiglu(h, w, w2, b, b2)
    assert y.dtype == s.dtype == np.float32
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(y, y_ref)
    # the model helper (the CPU path of models/llama.py: the same ops, its GEMMs in float32)
    y2, s2 = norm_linear(a, x, g, EPS, w, b, w2, b2)
    np.testing.assert_array_equal(s2, s_ref)
    np.testing.assert_allclose(y2, y_ref, rtol=1e-5, atol=1e-5)


def test_no_weight_transposed_view_and_zero_rows(rng):
    a, x, _, w, _, _, _ = _inputs(rng, (3, 16), 5, np.float32)
    wt = np.ascontiguousarray(w.T)  # (N, K): the models' layout, passed as wt.T
    y, _ = rf.add_rms_norm_linear(a, x, None, EPS, wt.T)
    np.testing.assert_allclose(y, _formula(a, x, None, EPS, w)[0], rtol=2e-5, atol=2e-6)
    y, s = rf.add_rms_norm_linear(a[:0], x[:0], None, EPS, w)
    assert y.shape == (0, 5) and s.shape == (0, 16)


def test_argument_errors(rng):
    a, x, g, w, b, _, _ = _inputs(rng, (2, 8), 3, np.float32, bias=True)
    with pytest.raises(ValueError, match="a has shape"):
        rf.add_rms_norm_linear(a[:1], x, g, EPS, w)
    with pytest.raises(ValueError, match="ln_w has shape"):
        rf.add_rms_norm_linear(a, x, g[:4], EPS, w)
    with pytest.raises(TypeError, match="a has dtype"):
        rf.add_rms_norm_linear(a.astype(np.float64), x, g, EPS, w)
    with pytest.raises(ValueError, match="eps"):
        rf.add_rms_norm_linear(a, x, g, -1.0, w)
    with pytest.raises(ValueError, match="do not chain"):
        rf.add_rms_norm_linear(a, x, g, EPS, w.T)
    with pytest.raises(ValueError, match="bias"):
        rf.add_rms_norm_linear(a, x, g, EPS, w, b[:2])
    with pytest.raises(ValueError, match="w2"):
        rf.add_rms_norm_linear(a, x, g, EPS, w, w2=np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="b2 is given without w2"):
        rf.add_rms_norm_linear(a, x, g, EPS, w, b2=b)
    with pytest.raises(TypeError, match="x has dtype"):
        rf.add_rms_norm_linear(None, x.astype(np.int32), None, EPS, w)


def test_every_instantiation_is_registered():
    """Every gemv_nk_norm the launcher can ask for (dtype x row tile x shape x dual) is in the family list
    that test_cuda_compile compiles with nvcc."""
    exprs = set(modules.registered_families()["gemv"])
    for t in ("__half", "float"):
        for m in lin._ROW_TILES:
            for rows, unroll in lin.NK_SHAPES:
                for dual in ("false", "true"):
                    assert f"gemv::gemv_nk_norm<{t}, {m}, {rows}, {unroll}, {dual}>" in exprs


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts gemv_nk_norm launches (the real launcher runs): proves a case took the fused path."""
    calls = []
    real = lin._gemv_nk

    def spy(*args, norm=None):
        if norm is not None:
            calls.append(args[0].shape)
        return real(*args, norm=norm)

    monkeypatch.setattr(lin, "_gemv_nk", spy)
    return calls


def _device(cp, arrays, nk_layout=True):
    a, x, g, w, b, w2, b2 = (None if v is None else cp.asarray(v) for v in arrays)
    if nk_layout:  # the models' layout: transposed views of C-contiguous (N, K) matrices
        w = cp.ascontiguousarray(w.T).T
        w2 = None if w2 is None else cp.ascontiguousarray(w2.T).T
    return a, x, g, w, b, w2, b2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("k,n", [(8, 3), (2056, 1001), (2048, 2560), (5632, 2048), (8192, 17), (2048, 32000)])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_fused_against_reference(cp, rng, fused_calls, dtype, k, n, add, bias, dual):
    if dual and n == 32000:
        pytest.skip("no DUAL lm head")
    host = _inputs(rng, (1, k), n, dtype, add=add, bias=bias, dual=dual, scale=3.0)
    a, x, g, w, b, w2, b2 = _device(cp, host)
    poison_pool(cp)
    y, s = rf.add_rms_norm_linear(a, x, g, EPS, w, b, w2=w2, b2=b2)
    assert fused_calls == [(1, k)], "the fused kernel did not run"
    assert y.dtype == s.dtype == dtype and y.shape == (1, n) and s.shape == (1, k)
    want_y, want_s = nl.add_rms_norm_linear_ref(*host[:3], EPS, *host[3:])
    assert_written_close(y, want_y, dtype)
    assert_close(cp.asnumpy(s).astype(np.float64), want_s, dtype)  # exact but for fp32 double rounding
    if not add:
        assert s is x
    # the unfused ops (add_rms_norm + the plain GEMV): the same within the dtype's tolerance
    h, s2 = (rf.rms_norm(x, g, EPS), x) if a is None else rf.add_rms_norm(a, x, g, EPS)
    y2 = rf.linear(h, w, b) if w2 is None else rf.linear_swiglu(h, w, w2, b, b2)
    assert np.array_equal(cp.asnumpy(s), cp.asnumpy(s2))  # the same float32 add, rounded the same way
    assert_close(cp.asnumpy(y).astype(np.float64), cp.asnumpy(y2).astype(np.float64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", lin.NK_SHAPES)
@pytest.mark.parametrize("dual", [False, True])
def test_every_configuration_and_row_tile(cp, rng, monkeypatch, fused_calls, config, dual):
    """Each (rows per warp, loads in flight) configuration and row tiles 1..8 (GEMV_MAX_ROWS raised as the
    sweep does), odd N; 8 rows of K = 4104 fp16 exceed the 48 KB of staged h and fall back (same result)."""
    monkeypatch.setattr(lin, "NK_CONFIG", config)
    monkeypatch.setattr(lin, "GEMV_MAX_ROWS", 8)
    for rows, k, fused in (
        (1, 1000, True),
        (2, 1000, True),
        (5, 1000, True),
        (8, 1000, True),
        (8, 4104, False),
    ):
        fused_calls.clear()
        host = _inputs(rng, (rows, k), 1001, np.float16, bias=True, dual=dual)
        dev = _device(cp, host)
        poison_pool(cp)
        y, s = rf.add_rms_norm_linear(*dev[:3], EPS, *dev[3:5], w2=dev[5], b2=dev[6])
        assert bool(fused_calls) == fused, (rows, k)
        want_y, want_s = nl.add_rms_norm_linear_ref(*host[:3], EPS, *host[3:])
        assert_written_close(y, want_y, np.float16)
        assert_close(cp.asnumpy(s).astype(np.float64), want_s, np.float16)


@pytest.mark.gpu
def test_fallback_layouts(cp, rng, fused_calls):
    """Layouts the fused kernel does not take give the unfused ops' result: a C-contiguous (K, N) weight, K
    not a vector multiple, a misaligned x row, two rows (GEMV_MAX_ROWS = 1)."""
    cases = []
    host = _inputs(rng, (1, 64), 24, np.float16, bias=True)
    cases.append((host, _device(cp, host, nk_layout=False)))
    host = _inputs(rng, (1, 60), 24, np.float16)
    cases.append((host, _device(cp, host)))
    host = _inputs(rng, (2, 64), 24, np.float16)
    cases.append((host, _device(cp, host)))
    host = _inputs(rng, (1, 64), 24, np.float16)
    dev = list(_device(cp, host))
    wide = cp.zeros((1, 65), cp.float16)
    wide[:, 1:] = dev[1]
    dev[1] = wide[:, 1:]  # a view 2 bytes off 16-byte alignment
    cases.append((host, tuple(dev)))
    for host, dev in cases:
        poison_pool(cp)
        y, s = rf.add_rms_norm_linear(*dev[:3], EPS, *dev[3:5], w2=dev[5], b2=dev[6])
        want_y, want_s = nl.add_rms_norm_linear_ref(*host[:3], EPS, *host[3:])
        assert_written_close(y, want_y, np.float16)
        assert_close(cp.asnumpy(s).astype(np.float64), want_s, np.float16)
    assert fused_calls == []


@pytest.mark.gpu
def test_strided_norm_weight_and_biases(cp, rng, fused_calls):
    """Strided views of ln_w, bias and b2 (every other element) still run fused, with the right values."""
    host = _inputs(rng, (1, 64), 24, np.float16, bias=True, dual=True)
    a, x, g, w, b, w2, b2 = _device(cp, host)
    g2, bb, bb2 = (cp.repeat(v, 2)[::2] for v in (g, b, b2))  # equal values, stride 2
    assert not g2.flags.c_contiguous
    y, s = rf.add_rms_norm_linear(a, x, g2, EPS, w, bb, w2=w2, b2=bb2)
    assert fused_calls == [(1, 64)]
    want_y, want_s = nl.add_rms_norm_linear_ref(*host[:3], EPS, *host[3:])
    assert_written_close(y, want_y, np.float16)
    assert_close(cp.asnumpy(s).astype(np.float64), want_s, np.float16)


@pytest.mark.gpu
def test_pdl_chain_and_graph_replays(cp, rng, monkeypatch):
    """A decode-like chain (GEMV -> fused qkv-like GEMV -> GEMV -> fused DUAL GEMV -> GEMV -> fused lm head)
    gives bit-identical results launched plainly, with PDL, and replayed from a CUDA graph."""
    h, i = 1024, 2816
    x0 = cp.asarray(rng.standard_normal((1, h)).astype(np.float16))

    def mat(n, k):
        return cp.asarray((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)).T  # (k, n) view

    w_in, w_qkv, w_o, head = mat(h, h), mat(1280, h), mat(h, 1280), mat(5000, h)
    w_g, w_u, w_d = mat(i, h), mat(i, h), mat(h, i)
    ln = [cp.asarray((1 + rng.standard_normal(h) / 10).astype(np.float16)) for _ in range(3)]

    def chain():
        m = rf.linear(x0, w_in)
        qkv, x = rf.add_rms_norm_linear(m, x0, ln[0], EPS, w_qkv)
        a = rf.linear(qkv, w_o)
        g, x = rf.add_rms_norm_linear(a, x, ln[1], EPS, w_g, w2=w_u)
        m = rf.linear(g, w_d)
        logits, x = rf.add_rms_norm_linear(m, x, ln[2], EPS, head)
        return qkv, g, logits, x

    monkeypatch.setenv("RAWFORMER_PDL", "0")
    want = [cp.asnumpy(t) for t in chain()]
    monkeypatch.setenv("RAWFORMER_PDL", "1")
    got = [cp.asnumpy(t) for t in chain()]
    for g_, w_ in zip(got, want, strict=True):
        assert np.array_equal(g_, w_)
    assert_replays_equal(cp, chain, want)


LLAMA_GPU = LlamaConfig(
    vocab_size=97, hidden_size=256, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64,
)  # fmt: skip


def _llama_decode(cp, model, steps):
    """Greedy decode of one sequence, one token per step: (tokens, every step's last-row logits)."""
    cfg = model.config
    arena = MiniArena(cfg.num_hidden_layers, model.num_kv_heads, model.head_dim, 48, 16, model.dtype, cp)
    pool = MiniPool(48, 16, seed=3)
    logits = model.forward(pool.prepare([0], [[5, 17, 2, 40, 8, 1, 63]], cp), arena, last_only=True)
    toks, outs = [], []
    for _ in range(steps):
        outs.append(ref.f64(logits)[0])
        toks.append(int(outs[-1].argmax()))
        logits = model.forward(pool.prepare([0], [[toks[-1]]], cp), arena, last_only=True)
    return toks, np.stack(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_llama_decode_fused_equals_unfused(cp, monkeypatch, fused_calls, dtype):
    """Llama decode steps through the fused kernels (2 per layer + the head) give the greedy tokens (float16:
    up to a near-tie) and, within tolerance, the logits of the unfused add_rms_norm + GEMV path."""
    model = llama.init_random(LLAMA_GPU, seed=2, dtype=dtype, xp=cp, std=0.08)
    steps = 12
    fused_toks, fused_logits = _llama_decode(cp, model, steps)
    per_step = 2 * LLAMA_GPU.num_hidden_layers + 1
    # every decode step fused; the prefill (7 rows) only in its head (last_only: one row left)
    assert len(fused_calls) == per_step * steps + 1
    monkeypatch.setattr(nl, "_fused_layout", lambda *args: None)  # the unfused ops, as before the fusion
    plain_toks, plain_logits = _llama_decode(cp, model, steps)
    assert len(fused_calls) == per_step * steps + 1
    tol = (1e-2 if dtype == np.float16 else 2e-4) * np.abs(plain_logits).max()
    if dtype == np.float32:
        assert fused_toks == plain_toks
    for i, (f, p) in enumerate(zip(fused_toks, plain_toks, strict=True)):
        assert np.abs(fused_logits[i] - plain_logits[i]).max() <= tol, f"step {i}"
        if f != p:  # float16: only a near-tie may flip (then the sequences part and the comparison ends)
            assert plain_logits[i][p] - plain_logits[i][f] <= tol, f"step {i}: greedy token changed"
            break
