"""Fused cross-entropy: the float64 reference against a literal per-row formula and finite differences,
ignore_index, in-place gradients and argument errors (CPU); every CUDA version against the reference (GPU)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from tolerances import assert_close, poison

from rawformer.ops.loss import cross_entropy, cross_entropy_ref

loss_mod = importlib.import_module("rawformer.ops.loss")  # rawformer.ops.<name> may also be a function

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def literal_loss(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = []
    for row, tgt in zip(x, t, strict=True):
        top = max(row)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in row))
        out.append(lse - row[tgt])
    return np.array(out)


def test_ref_matches_literal(rng):
    x = rng.standard_normal((6, 11)) * 5
    t = rng.integers(0, 11, 6)
    loss, lse, _ = cross_entropy_ref(x, t)
    np.testing.assert_allclose(loss, literal_loss(x, t), rtol=1e-13)
    np.testing.assert_allclose(lse, loss + x[np.arange(6), t], rtol=1e-13)


def test_ref_gradient_is_finite_difference(rng):
    x = rng.standard_normal((3, 7))
    t = np.array([2, -100, 6])
    scale = 0.37
    _, _, grad = cross_entropy_ref(x, t, grad_scale=scale)
    h = 1e-6
    fd = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xp, xm = x.copy(), x.copy()
            xp[i, j] += h
            xm[i, j] -= h
            fd[i, j] = (
                scale * (cross_entropy_ref(xp, t)[0].sum() - cross_entropy_ref(xm, t)[0].sum()) / (2 * h)
            )
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    assert np.all(grad[1] == 0)


def test_public_numpy_path_dtypes_and_in_place(rng):
    x = (rng.standard_normal((5, 9)) * 3).astype(np.float32)
    t = np.array([0, 8, -100, 4, 4], dtype=np.int32)
    loss, lse = cross_entropy(x, t)
    assert loss.dtype == np.float32 and lse.dtype == np.float32 and loss.shape == (5,)
    assert loss[2] == 0 and np.isfinite(lse[2])
    ref_loss, ref_lse, ref_grad = cross_entropy_ref(x, t, grad_scale=0.5)
    buf = x.copy()
    loss2, _ = cross_entropy(buf, t, dlogits=buf, grad_scale=0.5)  # in place
    np.testing.assert_allclose(buf, ref_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss2, ref_loss, rtol=1e-6)
    x64 = x.astype(np.float64)
    assert cross_entropy(x64, t)[0].dtype == np.float64


def test_ref_extreme_rows():
    x = np.array([[1e4, 1e4, -np.inf], [np.nan, 0.0, 0.0]])
    loss, lse, grad = cross_entropy_ref(x, np.array([0, 1]))
    np.testing.assert_allclose(lse[0], 1e4 + math.log(2))
    np.testing.assert_allclose(grad[0], [-0.5, 0.5, 0.0])
    assert np.isnan(loss[1]) and np.isnan(lse[1])


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(logits=np.zeros((2, 3, 4), np.float32)), ValueError, "shape"),
        (dict(targets=np.zeros(2, np.float32)), TypeError, "integer"),
        (dict(targets=np.zeros(3, np.int64)), ValueError, "targets has shape"),
        (dict(targets=np.array([0, 5])), ValueError, "outside"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(grad_scale=float("nan")), ValueError, "grad_scale"),
        (dict(dlogits=np.zeros((2, 4), np.float32)), ValueError, "dlogits"),
        (dict(dlogits=np.zeros((2, 5), np.float16)), TypeError, "dlogits"),
        (dict(logits=np.zeros((2, 5), np.int32)), TypeError, "logits"),
        (dict(version=2), ValueError, "version"),
    ],
)
def test_argument_errors(kwargs, err, match):
    args = dict(logits=np.zeros((2, 5), np.float32), targets=np.array([0, 1]))
    args.update(kwargs)
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(err, match=match):
        cross_entropy(logits, targets, **args)


def test_instantiations_listed():
    exprs = loss_mod._instantiations()
    assert len(exprs) == 6 and all(e.startswith("cross_entropy_v") for e in exprs)
    assert loss_mod.v3_max_vocab(np.float16) == 65536 and loss_mod.v3_max_vocab(np.float32) == 32768


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("version", [None, 1, 2, 3])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (3, 17), (7, 1000), (5, 50257), (2, 4096)])
def test_gpu_matches_reference(cp, rng, dtype, version, rows, vocab):
    if version == 3 and vocab > loss_mod.v3_max_vocab(dtype):
        pytest.skip("version 3 holds at most 32768 float32 logits per row")
    x = (rng.standard_normal((rows, vocab)) * 4).astype(dtype)
    t = rng.integers(0, vocab, rows)
    t[rows // 2] = -100
    ref_loss, ref_lse, ref_grad = cross_entropy_ref(x, t, grad_scale=0.25)
    xd = cp.asarray(x)
    dl = poison(cp, x.shape, dtype)
    loss, lse = cross_entropy(xd, cp.asarray(t), dlogits=dl, grad_scale=0.25, version=version)
    assert loss.dtype == np.float32 and lse.dtype == np.float32
    assert_close(lse, ref_lse, F32, "lse", rtol=1e-5 if dtype == F32 else 5e-5)
    assert_close(loss, ref_loss, F32, "loss", scale=float(np.abs(ref_lse).max()))
    assert_close(dl, ref_grad, dtype, "dlogits", scale=0.25)
    # without a gradient, and in place
    loss2, _ = cross_entropy(xd, cp.asarray(t), version=version)
    assert_close(loss2, ref_loss, F32, "loss", scale=float(np.abs(ref_lse).max()))
    cross_entropy(xd, cp.asarray(t.astype(np.int32)), dlogits=xd, grad_scale=0.25, version=version)
    assert_close(xd, ref_grad, dtype, "in-place dlogits", scale=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, 1])
def test_gpu_row_strided_view_and_bad_target(cp, rng, version):
    full = cp.asarray(rng.standard_normal((4, 40)).astype(np.float32))
    x = full[:, 3:36]  # rows 33 long with a stride of 40: misaligned starts
    t = cp.asarray([1, 2, 40, 0])  # 40 is out of range: NaN loss
    dl = poison(cp, x.shape, np.float32)
    loss, lse = cross_entropy(x, t, dlogits=dl, version=version)
    ref_loss, ref_lse, ref_grad = cross_entropy_ref(x.get(), np.array([1, 2, -100, 0]))
    assert np.isnan(float(loss[2]))
    assert_close(lse, ref_lse, F32, "lse")
    keep = [0, 1, 3]
    assert_close(loss[cp.asarray(keep)], ref_loss[keep], F32, "loss")
    assert_close(dl[cp.asarray(keep)], ref_grad[keep], F32, "dlogits")
    with pytest.raises(ValueError, match="version=2"):
        cross_entropy(x, t, dlogits=dl, version=2)  # rows of x and dl at different offsets mod 16
