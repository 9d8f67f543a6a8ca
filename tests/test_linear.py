"""rf.linear / rf.linear_swiglu: the NumPy reference on the CPU, the GEMV kernels (<= 8 rows) and the cuBLAS
path on the GPU, against float64."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from graph_standin import assert_replays_equal
from tolerances import assert_written_close, poison_pool

import rawformer as rf

lin = importlib.import_module("rawformer.ops.linear")  # the module (rawformer.ops.linear is the function)

# ---- CPU: the reference and the argument checks ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_matches_einsum(rng, dtype):
    x = rng.standard_normal((2, 3, 17)).astype(dtype)
    w = rng.standard_normal((17, 11)).astype(dtype)
    b = rng.standard_normal(11).astype(dtype)
    want = np.einsum("abk,kn->abn", x.astype(np.float64), w.astype(np.float64)) + b
    y = rf.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (2, 3, 11)
    np.testing.assert_allclose(y, want, rtol=1e-6 if dtype == np.float32 else 1e-12)
    g, u = x @ w, x @ w[:, ::-1]
    sw = rf.linear_swiglu(x, w, np.ascontiguousarray(w[:, ::-1]))
    np.testing.assert_allclose(sw, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def test_transposed_weight_and_zero_rows(rng):
    x = rng.standard_normal((0, 6)).astype(np.float32)
    wt = rng.standard_normal((9, 6)).astype(np.float32)
    assert rf.linear(x, wt.T).shape == (0, 9)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(rf.linear(x, wt.T), x.astype(np.float64) @ wt.T.astype(np.float64), rtol=1e-5)


def test_argument_errors(rng):
    x = rng.standard_normal((2, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="do not chain"):
        rf.linear(x, w.T)
    with pytest.raises(ValueError, match="2-D"):
        rf.linear(x, w[:, 0])
    with pytest.raises(TypeError, match="dtype"):
        rf.linear(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="bias"):
        rf.linear(x, w, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        rf.linear(x.astype(np.int32), w)
    with pytest.raises(ValueError, match="w_up"):
        rf.linear_swiglu(x, w, rng.standard_normal((5, 4)).astype(np.float32))


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("k,n", [(1, 8), (63, 264), (2053, 2056), (130, 5640)])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_contiguous_weight(cp, rng, dtype, k, n, rows):
    """A C-contiguous (K, N) weight (cuBLAS at every row count) against the float64 reference."""
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    poison_pool(cp)
    y = rf.linear(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    assert y.dtype == dtype and y.shape == (rows, n)
    assert_written_close(y, lin.linear_ref(x, w, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8, 9])
@pytest.mark.parametrize("k,n", [(8, 3), (768, 50257), (2048, 1001), (4104, 17), (2048, 5632), (5632, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_nk_transposed_weight(cp, rng, dtype, rows, k, n, bias):
    x = rng.standard_normal((rows, k)).astype(dtype)
    wt = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)  # (N, K): x @ wt.T, like the lm head
    b = rng.standard_normal(n).astype(dtype) if bias else None
    poison_pool(cp)
    y = rf.linear(cp.asarray(x), cp.asarray(wt).T, None if b is None else cp.asarray(b))
    assert_written_close(y, lin.linear_ref(x, wt.T, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", lin.NK_SHAPES)
def test_every_nk_configuration(cp, rng, monkeypatch, config):
    """Each compiled (rows per warp, loads in flight) configuration, odd N and K, rows 1..8."""
    monkeypatch.setattr(lin, "NK_CONFIG", config)
    monkeypatch.setattr(lin, "GEMV_MAX_ROWS", 8)  # the compiled 2-8 row kernels (bench/decode_profile.py)
    for rows in (1, 5, 8):
        x = rng.standard_normal((rows, 1000)).astype(np.float16)
        wt = (rng.standard_normal((1001, 1000)) / 32).astype(np.float16)
        poison_pool(cp)
        assert_written_close(rf.linear(cp.asarray(x), cp.asarray(wt).T), lin.linear_ref(x, wt.T), np.float16)
        y = rf.linear_swiglu(cp.asarray(x), cp.asarray(wt).T, cp.asarray(wt[::-1].copy()).T)
        assert_written_close(y, lin.linear_swiglu_ref(x, wt.T, wt[::-1].T), np.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 12])
@pytest.mark.parametrize("k,n", [(64, 8), (2048, 5632), (333, 1000)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_linear_swiglu(cp, rng, dtype, rows, k, n, bias, layout):
    x = rng.standard_normal((rows, k)).astype(dtype)
    wg = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    wu = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    bg = rng.standard_normal(n).astype(dtype) if bias else None
    bu = rng.standard_normal(n).astype(dtype) if bias else None
    poison_pool(cp)
    dev = [None if a is None else cp.asarray(a) for a in (x, wg, wu, bg, bu)]
    if layout == "nk":  # the models' layout: transposed views of (N, K) matrices (the GEMV path)
        dev[1], dev[2] = cp.ascontiguousarray(dev[1].T).T, cp.ascontiguousarray(dev[2].T).T
    y = rf.linear_swiglu(*dev)
    assert_written_close(y, lin.linear_swiglu_ref(x, wg, wu, bg, bu), dtype)


@pytest.mark.gpu
def test_fallbacks_strided_and_misaligned(cp, rng):
    """Layouts the GEMV does not take (N not a vector multiple, a non-transposed strided view, an x row
    slice) go to cuBLAS with the same result."""
    x = rng.standard_normal((3, 40)).astype(np.float16)
    w = rng.standard_normal((40, 26)).astype(np.float16)
    for wd in (cp.asarray(w), cp.asarray(w)[:, 1:25], cp.asarray(np.ascontiguousarray(w[:, :24]))):
        want = lin.linear_ref(x, cp.asnumpy(wd))
        assert_written_close(rf.linear(cp.asarray(x), wd), want, np.float16)
    xd = cp.asarray(rng.standard_normal((3, 41)).astype(np.float16))[:, 1:]
    assert_written_close(rf.linear(xd, cp.asarray(w)), lin.linear_ref(cp.asnumpy(xd), w), np.float16)


@pytest.mark.gpu
def test_gemv_deterministic_and_graph_replays(cp, rng):
    """Repeated launches and CUDA-graph replays of the GEMV give bit-identical results."""
    from rawformer.kernels import gemm

    x = cp.asarray(rng.standard_normal((2, 4096)).astype(np.float16))
    w = cp.asarray((rng.standard_normal((1024, 4096)) / 64).astype(np.float16)).T
    first = rf.linear(x, w)
    for _ in range(3):
        assert bool((rf.linear(x, w) == first).all())
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gemm.prepare()
        rf.linear(x, w)
        stream.begin_capture()
        y = rf.linear(x, w)
        graph = stream.end_capture()
        for _ in range(5):
            y.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            assert bool((y == first).all())


@pytest.mark.gpu
def test_pdl_chain_matches_plain_launches(cp, rng, monkeypatch):
    """A chain of PDL-launched kernels (GEMV -> add_rms_norm -> GEMV -> SwiGLU GEMV), eager and captured in a
    CUDA graph, gives bit-identical results to the same chain launched plainly (RAWFORMER_PDL=0)."""

    h, i = 1024, 2816
    x = cp.asarray(rng.standard_normal((1, h)).astype(np.float16))
    w1 = cp.asarray((rng.standard_normal((h, h)) / 32).astype(np.float16))
    wg = cp.asarray((rng.standard_normal((i, h)) / 32).astype(np.float16))
    wu = cp.asarray((rng.standard_normal((i, h)) / 32).astype(np.float16))
    ln = cp.asarray((1 + rng.standard_normal(h) / 10).astype(np.float16))

    def chain():
        a = rf.linear(x, w1.T)
        y, r = rf.add_rms_norm(a, x, ln, 1e-5)
        return rf.linear_swiglu(y + 0, wg.T, wu.T), r

    monkeypatch.setenv("RAWFORMER_PDL", "0")
    want = [cp.asnumpy(t) for t in chain()]
    monkeypatch.setenv("RAWFORMER_PDL", "1")
    got = [cp.asnumpy(t) for t in chain()]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    assert_replays_equal(cp, chain, want)
