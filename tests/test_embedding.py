"""Embedding gather and its deterministic scatter-add backward: references against loops and the adjoint
identity, argument errors (CPU); the CUDA kernels against the references, exactly, and run-to-run
bit-identity of the backward (GPU)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from tolerances import assert_close, poison

from rawformer.ops.embedding import embedding, embedding_backward, embedding_backward_ref, embedding_ref

emb_mod = importlib.import_module("rawformer.ops.embedding")  # rawformer.ops.<name> may also be a function

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def test_ref_gather_and_scatter_loops(rng):
    w = rng.standard_normal((7, 5))
    ids = rng.integers(0, 7, (3, 4))
    out = embedding_ref(w, ids)
    assert out.shape == (3, 4, 5)
    for idx in np.ndindex(ids.shape):
        np.testing.assert_array_equal(out[idx], w[ids[idx]])
    g = rng.standard_normal((3, 4, 5))
    dw = embedding_backward_ref(ids, g, 7)
    expect = np.zeros((7, 5))
    for idx in np.ndindex(ids.shape):
        expect[ids[idx]] += g[idx]
    np.testing.assert_allclose(dw, expect, rtol=1e-15)


def test_adjoint_identity(rng):
    """<embedding(W), G> == <W, embedding_backward(G)> for any W, G: the backward is the forward's adjoint."""
    w = rng.standard_normal((11, 3))
    ids = rng.integers(0, 11, (17,))
    g = rng.standard_normal((17, 3))
    lhs = np.sum(embedding_ref(w, ids) * g)
    rhs = np.sum(w * embedding_backward_ref(ids, g, 11))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_public_numpy_paths(rng):
    w = rng.standard_normal((9, 4)).astype(np.float16)
    ids = np.array([[0, 8], [3, 3]], dtype=np.int32)
    out = embedding(w, ids)
    assert out.dtype == np.float16 and out.shape == (2, 2, 4)
    np.testing.assert_array_equal(out, w[ids])
    g = rng.standard_normal((2, 2, 4)).astype(np.float32)
    dw = embedding_backward(ids, g, 9)
    assert dw.dtype == np.float32 and dw.shape == (9, 4)
    np.testing.assert_allclose(dw[3], g[1, 0] + g[1, 1], rtol=1e-6)
    buf = np.ones((9, 4), np.float32)
    embedding_backward(ids, g, 9, out=buf, accumulate=True)
    np.testing.assert_allclose(buf, dw + 1, rtol=1e-6)
    embedding_backward(ids, g, 9, out=buf)
    np.testing.assert_allclose(buf, dw, rtol=1e-6)
    assert embedding(w, np.zeros((0, 3), np.int64)).shape == (0, 3, 4)


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda: embedding(np.zeros((3, 2), np.float32), np.array([3])), ValueError, "outside"),
        (lambda: embedding(np.zeros((3, 2), np.float32), np.array([-1])), ValueError, "outside"),
        (lambda: embedding(np.zeros((3, 2), np.float32), np.array([0.0])), TypeError, "integer"),
        (lambda: embedding(np.zeros(3, np.float32), np.array([0])), ValueError, "shape"),
        (lambda: embedding_backward(np.array([0]), np.zeros((2, 2), np.float32), 3), ValueError, "dout"),
        (lambda: embedding_backward(np.array([0]), np.zeros((1, 2), np.float32), 3.0), TypeError, "num_"),
        (lambda: embedding_backward(np.array([0]), np.zeros((1, 2), np.float32), 3, accumulate=True),
         ValueError, "needs out"),
        (lambda: embedding_backward(np.array([0]), np.zeros((1, 2), np.float32), 3, out=np.zeros((3, 2))),
         TypeError, "float32"),
        (lambda: embedding_backward(np.array([5]), np.zeros((1, 2), np.float32), 3), ValueError, "outside"),
    ],
)  # fmt: skip
def test_argument_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_instantiations_listed():
    assert len(emb_mod._instantiations()) == 4


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize(
    ("vocab", "hidden", "shape"), [(1, 1, (1,)), (50257, 768, (2, 9)), (97, 19, (3, 111))]
)
def test_gpu_forward_exact(cp, rng, dtype, vocab, hidden, shape):
    w = rng.standard_normal((vocab, hidden)).astype(dtype)
    ids = rng.integers(0, vocab, shape).astype(np.int32)
    out = embedding(cp.asarray(w), cp.asarray(ids))
    np.testing.assert_array_equal(out.get(), w[ids])
    # a column-sliced table (row stride != H) and int64 ids
    wide = cp.asarray(rng.standard_normal((vocab, hidden + 3)).astype(dtype))
    out2 = embedding(wide[:, 1 : hidden + 1], cp.asarray(ids.astype(np.int64)))
    np.testing.assert_array_equal(out2.get(), wide.get()[:, 1 : hidden + 1][ids])


@pytest.mark.gpu
def test_gpu_forward_bad_id_gives_nan(cp):
    out = embedding(cp.ones((4, 3), cp.float32), cp.asarray([1, 4, -1]))
    host = out.get()
    assert np.all(host[0] == 1) and np.all(np.isnan(host[1:]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize(
    ("vocab", "hidden", "shape"), [(1, 1, (1,)), (50257, 768, (4, 256)), (13, 130, (1000,))]
)
def test_gpu_backward_matches_reference(cp, rng, dtype, vocab, hidden, shape):
    ids = rng.integers(0, vocab, shape)
    ids.reshape(-1)[: ids.size // 3] = 0  # one frequent id (a long segment)
    g = rng.standard_normal(shape + (hidden,)).astype(dtype)
    ref = embedding_backward_ref(ids, g, vocab)
    dw = embedding_backward(cp.asarray(ids), cp.asarray(g), vocab)
    assert dw.dtype == np.float32
    assert_close(dw, ref, F32, "dweight", scale=float(np.abs(g).max()) * 4)
    again = embedding_backward(cp.asarray(ids), cp.asarray(g), vocab)
    assert cp.array_equal(dw, again), "the backward must be bit-identical run to run"
    out = poison(cp, (vocab, hidden), np.float32)
    embedding_backward(cp.asarray(ids), cp.asarray(g), vocab, out=out)
    assert cp.array_equal(out, dw)
    embedding_backward(cp.asarray(ids), cp.asarray(g), vocab, out=out, accumulate=True)
    assert_close(out, 2 * ref, F32, "accumulated", scale=float(np.abs(g).max()) * 8)
