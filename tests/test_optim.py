"""AdamW and the global gradient norm: the references against a literal per-element loop (torch.optim.AdamW's
update written out), mixed precision with masters, per-tensor decay, overflow detection, argument errors
(CPU); the multi-tensor CUDA kernels against the references (GPU)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from tolerances import assert_close

from rawformer.ops.optim import adamw_ref, adamw_step, grad_norm, grad_norm_ref

optim_mod = importlib.import_module("rawformer.ops.optim")  # rawformer.ops.<name> may also be a function

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6)


def literal_adamw(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    """torch.optim.AdamW's step, one element at a time with the math module."""
    p, m, v = p.copy(), m.copy(), v.copy()
    for i in range(p.size):
        p.flat[i] *= 1 - lr * wd
        m.flat[i] = beta1 * m.flat[i] + (1 - beta1) * g.flat[i]
        v.flat[i] = beta2 * v.flat[i] + (1 - beta2) * g.flat[i] ** 2
        denom = math.sqrt(v.flat[i]) / math.sqrt(1 - beta2**step) + eps
        p.flat[i] -= lr / (1 - beta1**step) * m.flat[i] / denom
    return p, m, v


def test_ref_matches_literal(rng):
    p, g = rng.standard_normal(7), rng.standard_normal(7)
    m, v = rng.standard_normal(7) * 0.1, rng.random(7) * 0.1
    got = adamw_ref(p, g, m, v, step=3, weight_decay=0.1, **HP)
    want = literal_adamw(p, g, m, v, 3, 1e-2, 0.9, 0.99, 1e-6, 0.1)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_public_numpy_step_in_place_multi_tensor(rng):
    shapes = [(3, 4), (5,), (1,)]
    params = [rng.standard_normal(s) for s in shapes]
    grads = [rng.standard_normal(s) for s in shapes]
    ms = [np.zeros(s) for s in shapes]
    vs = [np.zeros(s) for s in shapes]
    before = [p.copy() for p in params]
    adamw_step(params, grads, ms, vs, step=1, weight_decay=[0.1, 0.0, 0.5], grad_scale=0.5, **HP)
    for i, wd in enumerate([0.1, 0.0, 0.5]):
        want = literal_adamw(
            before[i], grads[i] * 0.5, np.zeros(shapes[i]), np.zeros(shapes[i]), 1, 1e-2, 0.9, 0.99, 1e-6, wd
        )
        np.testing.assert_allclose(params[i], want[0], rtol=1e-13)
        np.testing.assert_allclose(ms[i], want[1], rtol=1e-13)
        np.testing.assert_allclose(vs[i], want[2], rtol=1e-13)


def test_numpy_masters_round_into_fp16_params(rng):
    master = rng.standard_normal(6).astype(np.float32)
    param = master.astype(np.float16)
    grad = rng.standard_normal(6).astype(np.float16)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    expect = adamw_ref(master, grad, m, v, step=1, grad_scale=2.0, **HP)[0]
    adamw_step([param], [grad], [m], [v], step=1, grad_scale=2.0, master_params=[master], **HP)
    np.testing.assert_allclose(master, expect, rtol=1e-6)
    np.testing.assert_array_equal(param, master.astype(np.float16))


def test_grad_norm_ref_and_overflow(rng):
    gs = [rng.standard_normal((3, 5)), rng.standard_normal(7)]
    want = math.sqrt(sum(float(np.sum(g * g)) for g in gs))
    got = grad_norm(gs)
    assert got.shape == () and got.dtype == np.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-14)
    assert grad_norm([g.astype(np.float16) for g in gs]).dtype == np.float32
    gs[1][3] = np.inf
    assert math.isinf(grad_norm_ref(gs))
    gs[0][0, 0] = np.nan
    assert math.isnan(float(grad_norm(gs)))
    assert float(grad_norm([])) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(step=0), ValueError, "step"),
        (dict(step=1.0), ValueError, "step"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(beta1=1.0), ValueError, "beta1"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(weight_decay=[0.1, 0.2, 0.3]), ValueError, "weight_decay"),
        (dict(grads=[np.zeros(3)]), ValueError, "grads\\[0\\] has shape"),
        (dict(exp_avg=[]), ValueError, "exp_avg has 0"),
        (dict(exp_avg_sq=[np.zeros(2, np.int32)]), TypeError, "exp_avg_sq"),
        (dict(params=np.zeros(2)), TypeError, "list"),
    ],
)
def test_argument_errors(kwargs, err, match):
    args = dict(params=[np.zeros(2)], grads=[np.zeros(2)], exp_avg=[np.zeros(2)], exp_avg_sq=[np.zeros(2)])
    args.update(step=1, lr=1e-3)
    args.update(kwargs)
    p, g, m, v = (args.pop(n) for n in ("params", "grads", "exp_avg", "exp_avg_sq"))
    with pytest.raises(err, match=match):
        adamw_step(p, g, m, v, **args)


def test_instantiations_listed():
    exprs = optim_mod._instantiations()
    assert any(e.startswith("grad_norm_finish") for e in exprs) and len(exprs) == 11


# ---- GPU ---------------------------------------------------------------------------------------------------

SHAPES = [(1,), (3, 5), (50257, 7), (768,), (4097,), (0,), (1000, 33)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("p_dtype", "g_dtype", "master"),
    [(F32, F32, False), (F16, F16, True), (F32, F16, False), (F16, F32, False), (F32, F32, True)],
)
def test_gpu_adamw_matches_reference(cp, rng, p_dtype, g_dtype, master):
    host_p = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    host_g = [rng.standard_normal(s).astype(g_dtype) for s in SHAPES]
    host_m = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in SHAPES]
    host_v = [rng.random(s).astype(np.float32) * 0.1 for s in SHAPES]
    decays = [0.1 * (i % 2) for i in range(len(SHAPES))]
    params = [cp.asarray(p.astype(p_dtype)) for p in host_p]
    masters = [cp.asarray(p) for p in host_p] if master else None
    grads, ms, vs = ([cp.asarray(a) for a in lst] for lst in (host_g, host_m, host_v))
    for step in (1, 2):
        adamw_step(
            params, grads, ms, vs, step=step, weight_decay=decays, grad_scale=0.5, master_params=masters, **HP
        )
        for i in range(len(SHAPES)):
            src = host_p[i] if master else host_p[i].astype(p_dtype)
            rp, rm, rv = adamw_ref(
                src, host_g[i], host_m[i], host_v[i], step=step, weight_decay=decays[i], grad_scale=0.5, **HP
            )
            assert_close(ms[i], rm, F32, f"exp_avg[{i}]")
            assert_close(vs[i], rv, F32, f"exp_avg_sq[{i}]")
            if master:
                assert_close(masters[i], rp, F32, f"master[{i}]")
                assert cp.array_equal(params[i], masters[i].astype(p_dtype))
                host_p[i] = masters[i].get()
            else:
                assert_close(params[i], rp, p_dtype, f"param[{i}]", scale=1.0)
                host_p[i] = params[i].get().astype(np.float32)
            host_m[i], host_v[i] = ms[i].get(), vs[i].get()


@pytest.mark.gpu
def test_gpu_grad_norm(cp, rng):
    host = [rng.standard_normal(s).astype(np.float32 if i % 2 else np.float16) for i, s in enumerate(SHAPES)]
    grads = [cp.asarray(g) for g in host]
    norm = grad_norm(grads)
    assert norm.shape == () and norm.dtype == np.float32 and not isinstance(norm, np.ndarray)
    assert_close(norm, np.asarray(grad_norm_ref(host)), F32, "norm", rtol=2e-6)
    assert float(grad_norm(grads)) == float(norm), "deterministic"
    grads[2][5, 3] = cp.inf
    assert math.isinf(float(grad_norm(grads)))
    grads[4][0] = cp.nan
    assert math.isnan(float(grad_norm(grads)))
    big = [cp.full((5000,), 60000, dtype=cp.float16)]  # squares overflow fp16 but not the fp32 sum
    np.testing.assert_allclose(float(grad_norm(big)), 60000 * math.sqrt(5000), rtol=1e-6)
