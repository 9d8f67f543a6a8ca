"""Layer norm / RMS norm: references against independent formulas and finite differences, the NumPy path and
its argument errors, the kernel selection (CPU); every CUDA version, the fused residual add, the backward
with dweight / dbias and the Numba path against the float64 references (GPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tolerances import assert_close, poison

import rawformer as rf
from rawformer.kernels import registered_families
from rawformer.ops import norms

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def _data(rng, shape, dtype, offset=0.5, scale=2.0):
    """Random rows with a non-zero mean (so centring matters), as `dtype`."""
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


# ---- references (CPU) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 19), (2, 3, 97)])
def test_layer_norm_ref_matches_numpy_var(rng, shape):
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    y, mean, rstd = norms.layer_norm_ref(x, w, b, eps=1e-5)
    expect_rstd = 1 / np.sqrt(np.var(x, axis=-1) + 1e-5)  # np.var: biased by default
    np.testing.assert_allclose(mean, np.mean(x, axis=-1), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(rstd, expect_rstd, rtol=1e-13)
    expect = (x - np.mean(x, axis=-1, keepdims=True)) * expect_rstd[..., None] * w + b
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


def test_layer_norm_ref_known_values():
    y, mean, rstd = norms.layer_norm_ref(np.array([1.0, 2.0, 3.0, 4.0]), eps=0.0)
    assert mean == 2.5 and math.isclose(rstd, 1 / math.sqrt(1.25))
    np.testing.assert_allclose(y, np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25), rtol=1e-15)
    # a constant row normalises to zero, with rstd = 1 / sqrt(eps)
    y, _, rstd = norms.layer_norm_ref(np.full(5, 3.0), eps=0.25)
    assert np.all(y == 0) and rstd == 2.0


@pytest.mark.parametrize("shape", [(1,), (5, 19), (2, 2, 33)])
def test_rms_norm_ref_matches_vector_norm(rng, shape):
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape[-1])
    y, rstd = norms.rms_norm_ref(x, w, eps=1e-6)
    rms = np.linalg.norm(x, axis=-1) / math.sqrt(shape[-1])
    np.testing.assert_allclose(rstd, 1 / np.sqrt(rms**2 + 1e-6), rtol=1e-13)
    np.testing.assert_allclose(y, x / np.sqrt(rms**2 + 1e-6)[..., None] * w, rtol=1e-12, atol=1e-13)
    y, rstd = norms.rms_norm_ref(np.array([3.0, 4.0]), eps=0.0)  # mean square 12.5
    np.testing.assert_allclose(y, np.array([3.0, 4.0]) / math.sqrt(12.5), rtol=1e-15)


def _numeric_grad(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of `a` (modified in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("with_weight", [True, False])
def test_layer_norm_backward_ref_finite_differences(rng, with_weight):
    x = rng.standard_normal((3, 7)) * 2 + 0.3
    w = rng.standard_normal(7) if with_weight else None
    b = rng.standard_normal(7)
    dy = rng.standard_normal((3, 7))
    eps = 1e-3

    def loss():
        return float(np.sum(norms.layer_norm_ref(x, w, b, eps)[0] * dy))

    _, mean, rstd = norms.layer_norm_ref(x, w, b, eps)
    dx, dw, db = norms.layer_norm_backward_ref(dy, x, w, mean, rstd)
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, _numeric_grad(loss, b), rtol=1e-6, atol=1e-8)
    if with_weight:
        np.testing.assert_allclose(dw, _numeric_grad(loss, w), rtol=1e-6, atol=1e-8)


def test_rms_norm_backward_ref_finite_differences(rng):
    x = rng.standard_normal((4, 6))
    w = rng.standard_normal(6)
    dy = rng.standard_normal((4, 6))

    def loss():
        return float(np.sum(norms.rms_norm_ref(x, w, 1e-3)[0] * dy))

    _, rstd = norms.rms_norm_ref(x, w, 1e-3)
    dx, dw = norms.rms_norm_backward_ref(dy, x, w, rstd)
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, _numeric_grad(loss, w), rtol=1e-6, atol=1e-8)


# ---- the NumPy path (CPU) --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_layer_norm_numpy_path(rng, dtype):
    x = _data(rng, (4, 3, 37), dtype)
    w, b = _data(rng, 37, dtype), _data(rng, 37, dtype)
    y, mean, rstd = rf.layer_norm(x, w, b, eps=1e-5, return_stats=True)
    ref, ref_mean, ref_rstd = norms.layer_norm_ref(x, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, ref.astype(dtype))
    stats_dtype = F64 if dtype == F64 else F32
    assert mean.dtype == stats_dtype and rstd.dtype == stats_dtype and mean.shape == (4, 3)
    np.testing.assert_array_equal(mean, ref_mean.astype(stats_dtype))
    np.testing.assert_array_equal(rstd, ref_rstd.astype(stats_dtype))
    assert isinstance(rf.layer_norm(x), np.ndarray)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_rms_norm_numpy_path(rng, dtype):
    x = _data(rng, (5, 24), dtype)
    w = _data(rng, 24, dtype)
    y, rstd = rf.rms_norm(x, w, eps=1e-6, return_stats=True)
    ref, ref_rstd = norms.rms_norm_ref(x, w, 1e-6)
    np.testing.assert_array_equal(y, ref.astype(dtype))
    assert rstd.shape == (5,) and rstd.dtype == (F64 if dtype == F64 else F32)
    np.testing.assert_array_equal(rstd, ref_rstd.astype(rstd.dtype))
    np.testing.assert_array_equal(rf.rms_norm(x), norms.rms_norm_ref(x)[0].astype(dtype))


@pytest.mark.parametrize("dtype", [F16, F32])
def test_add_norms_numpy_round_h_first(rng, dtype):
    x, r = _data(rng, (6, 40), dtype), _data(rng, (6, 40), dtype, offset=-1.0)
    w, b = _data(rng, 40, dtype), _data(rng, 40, dtype)
    h_expect = (x.astype(np.float64) + r.astype(np.float64)).astype(dtype)
    y, h, mean, rstd = rf.add_layer_norm(x, r, w, b, return_stats=True)
    np.testing.assert_array_equal(h, h_expect)
    np.testing.assert_array_equal(y, norms.layer_norm_ref(h_expect, w, b)[0].astype(dtype))
    np.testing.assert_array_equal(mean, norms.layer_norm_ref(h_expect)[1].astype(F32))
    y, h = rf.add_rms_norm(x, r, w)
    np.testing.assert_array_equal(h, h_expect)
    np.testing.assert_array_equal(y, norms.rms_norm_ref(h_expect, w)[0].astype(dtype))
    y, h, rstd = rf.add_rms_norm(x, r, return_stats=True)
    assert rstd.shape == (6,)


def test_out_and_non_contiguous_numpy(rng):
    base = _data(rng, (8, 30), F32)
    x = base[::2, ::3]  # (4, 10), strided both ways
    assert not x.flags.c_contiguous
    w = _data(rng, 10, F32)
    expect = norms.layer_norm_ref(np.ascontiguousarray(x), w)[0].astype(F32)
    np.testing.assert_array_equal(rf.layer_norm(x, w), expect)
    out = poison(np, x.shape, F32)
    assert rf.layer_norm(x, w, out=out) is out
    np.testing.assert_array_equal(out, expect)
    t = rf.rms_norm(base.T)  # Fortran-ordered view: rows along the first axis of base
    np.testing.assert_array_equal(t, norms.rms_norm_ref(np.ascontiguousarray(base.T))[0].astype(F32))


def test_zero_rows_and_empty_rows_numpy():
    y, mean, rstd = rf.layer_norm(np.zeros((0, 5), F32), return_stats=True)
    assert y.shape == (0, 5) and mean.shape == (0,) and rstd.shape == (0,)
    y, mean, rstd = rf.layer_norm(np.zeros((3, 0), F32), return_stats=True)
    assert y.shape == (3, 0) and np.all(np.isnan(mean)) and np.all(np.isnan(rstd))
    y, rstd = rf.rms_norm(np.zeros((2, 0, 4), F16), return_stats=True)
    assert y.shape == (2, 0, 4) and rstd.shape == (2, 0)
    dx, dw, db = rf.layer_norm_backward(
        np.zeros((0, 5), F32), np.zeros((0, 5), F32), np.ones(5, F32), np.zeros(0, F32), np.ones(0, F32)
    )
    assert dx.shape == (0, 5) and np.all(dw == 0) and np.all(db == 0)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_backward_numpy_path(rng, dtype):
    x, dy = _data(rng, (3, 5, 21), dtype), _data(rng, (3, 5, 21), dtype, offset=0.0)
    w = _data(rng, 21, dtype)
    _, mean, rstd = rf.layer_norm(x, w, return_stats=True)
    dx, dw, db = rf.layer_norm_backward(dy, x, w, mean, rstd)
    rdx, rdw, rdb = norms.layer_norm_backward_ref(dy, x, w, mean, rstd)
    for got, ref in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, ref.astype(dtype))
    # no weight: dweight None and, by default, dbias None; has_bias asks for dbias
    dx, dw, db = rf.layer_norm_backward(dy, x, None, mean, rstd)
    assert dw is None and db is None
    np.testing.assert_array_equal(dx, norms.layer_norm_backward_ref(dy, x, None, mean, rstd)[0].astype(dtype))
    _, dw, db = rf.layer_norm_backward(dy, x, None, mean, rstd, has_bias=True)
    assert dw is None and db is not None
    _, dw, db = rf.layer_norm_backward(dy, x, w, mean, rstd, has_bias=False)
    assert dw is not None and db is None
    _, rstd = rf.rms_norm(x, w, return_stats=True)
    dx, dw = rf.rms_norm_backward(dy, x, w, rstd)
    rdx, rdw = norms.rms_norm_backward_ref(dy, x, w, rstd)
    np.testing.assert_array_equal(dx, rdx.astype(dtype))
    np.testing.assert_array_equal(dw, rdw.astype(dtype))
    assert rf.rms_norm_backward(dy, x, None, rstd)[1] is None


def test_argument_errors(rng):
    x = _data(rng, (4, 8), F32)
    w = np.ones(8, F32)
    with pytest.raises(ValueError, match="weight"):
        rf.layer_norm(x, np.ones(7, F32))
    with pytest.raises(ValueError, match="bias"):
        rf.layer_norm(x, w, np.ones((1, 8), F32))
    with pytest.raises(TypeError, match="weight"):
        rf.layer_norm(x, np.ones(8, F16))
    with pytest.raises(TypeError, match="x"):
        rf.layer_norm(x.astype(np.int32))
    with pytest.raises(TypeError, match="x"):
        rf.rms_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="dimension"):
        rf.layer_norm(np.ones((), F32))
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eps"):
            rf.layer_norm(x, eps=bad)
        with pytest.raises(ValueError, match="eps"):
            rf.rms_norm(x, eps=bad)
    with pytest.raises(TypeError, match="eps"):
        rf.rms_norm(x, eps="small")
    with pytest.raises(ValueError, match="residual"):
        rf.add_layer_norm(x, x[:, :4])
    with pytest.raises(TypeError, match="residual"):
        rf.add_rms_norm(x, x.astype(F16))
    with pytest.raises(TypeError, match="residual"):
        rf.add_layer_norm(x, None)
    with pytest.raises(ValueError, match="out"):
        rf.layer_norm(x, out=np.empty((4, 9), F32))
    with pytest.raises(TypeError, match="out"):
        rf.rms_norm(x, out=np.empty((4, 8), F16))
    with pytest.raises(ValueError, match="impl"):
        rf.layer_norm(x, impl="cuda")  # a CPU array
    with pytest.raises(ValueError, match="impl"):
        rf.layer_norm(x, impl="triton")
    with pytest.raises(ValueError, match="version"):
        rf.layer_norm(x, version=2)  # versions pick CUDA kernels
    with pytest.raises(ValueError, match="version"):
        rf.rms_norm(x, version=9)
    with pytest.raises(TypeError, match="version"):
        rf.rms_norm(x, version="2")


def test_backward_argument_errors(rng):
    x, dy = _data(rng, (4, 8), F32), _data(rng, (4, 8), F32)
    w = np.ones(8, F32)
    _, mean, rstd = rf.layer_norm(x, w, return_stats=True)
    with pytest.raises(ValueError, match="dy"):
        rf.layer_norm_backward(dy[:, :7], x, w, mean, rstd)
    with pytest.raises(TypeError, match="dy"):
        rf.layer_norm_backward(dy.astype(F16), x, w, mean, rstd)
    with pytest.raises(ValueError, match="mean"):
        rf.layer_norm_backward(dy, x, w, mean[:3], rstd)
    with pytest.raises(TypeError, match="rstd"):
        rf.layer_norm_backward(dy, x, w, mean, rstd.astype(np.int32))
    with pytest.raises(TypeError, match="mean"):
        rf.layer_norm_backward(dy, x, w, None, rstd)
    with pytest.raises(ValueError, match="weight"):
        rf.rms_norm_backward(dy, x, np.ones(9, F32), rstd)
    with pytest.raises(ValueError, match="rstd"):
        rf.rms_norm_backward(dy, x, w, rstd.reshape(2, 2))
    with pytest.raises(ValueError, match="version"):
        rf.rms_norm_backward(dy, x, w, rstd, version=1)


# ---- kernel selection (CPU) ------------------------------------------------------------------------------

_SELECTION_COLS = sorted(
    {1, 2, 3, 4, 7, 8, 19, 31, 32, 33, 64, 97, 111, 128, 255, 256, 257, 512, 989, 1024, 1025}
    | {2047, 2048, 4096, 4097, 8192, 8193, 16384, 16385, 32000, 32768, 32769, 131072, 131073}
)


def _widths(dtype):
    return (1, 16 // dtype.itemsize)


def test_every_plan_is_registered_and_holds_the_row():
    registered = set(registered_families()["norms"])
    assert len(registered) == len(registered_families()["norms"]), "duplicate name expressions"
    for dtype in (F16, F32):
        for vw in _widths(dtype):
            for cols in _SELECTION_COLS:
                if cols % vw:
                    continue
                for rms in (False, True):
                    for plan_fn, max_fn in (
                        (norms._forward_plan, norms.forward_max_cols),
                        (norms._backward_plan, norms.backward_max_cols),
                    ):
                        for version in (1, 2, 3, 4):
                            limit = max_fn(version, dtype, vw > 1)
                            if limit is not None and cols > limit:
                                with pytest.raises(ValueError, match=f"version={version}"):
                                    plan_fn(version, dtype, vw, cols, rms)
                                continue
                            plan = plan_fn(version, dtype, vw, cols, rms)
                            assert plan.expr in registered, plan.expr
                            if version in (2, 3):  # the register kernels must hold the whole row
                                args = [int(a) for a in plan.expr.split("<")[1].rstrip(">").split(",")[1:4]]
                                width, vecs, threads = args
                                assert width == vw and threads * vecs * vw >= cols, plan


def test_default_versions():
    # forward: a warp per row up to 2048 halves / 1024 floats, a block per row up to 32768 / 16384
    assert norms.default_forward_version(2048, F16) == 2
    assert norms.default_forward_version(2049, F16) == 3
    assert norms.default_forward_version(1025, F32) == 3
    assert norms.default_forward_version(32000, F16) == 3
    assert norms.default_forward_version(32769, F16) == 4
    assert norms.default_forward_version(16385, F32) == 4
    assert norms.default_forward_version(131072, F16) == 4
    assert norms.default_forward_version(513, F16, vectorised=False) == 3
    assert norms.default_forward_version(8193, F16, vectorised=False) == 4
    # backward: fused up to 8192, then the two-pass column version
    assert norms.default_backward_version(1024, F32) == 2
    assert norms.default_backward_version(1025, F16) == 3
    assert norms.default_backward_version(8192, F16) == 3
    assert norms.default_backward_version(8193, F16) == 4


def test_launch_constants_match_the_cuda_source():
    """The launcher's block shapes are the kernels' compile-time constants."""
    from rawformer.kernels import modules

    src = (modules.source_dir() / "norms.cu").read_text()
    for name, value in (
        ("kTileBlock", norms._FWD_TILE_BLOCK),
        ("kTileBlockBwd", norms._BWD_TILE_BLOCK),
        ("kColThreads", norms._COL_THREADS),
        ("kReduceRows", norms._REDUCE_ROWS),
    ):
        assert f"constexpr int {name} = {value};" in src, name
    assert "blockIdx.x * 256 + threadIdx.x" in src and norms._V1_THREADS == 256  # norm_backward_dwdb_v1


# ---- GPU -------------------------------------------------------------------------------------------------

GPU_COLS = [1, 19, 97, 111, 989, 1025, 4097, 32000, 131073]
GPU_ROWS = [0, 1, 3, 1000]
_BIG = 4_000_000  # rows * cols above this run only with -m full


def _grid():
    for cols in GPU_COLS:
        for rows in GPU_ROWS:
            marks = [pytest.mark.gpu]
            if rows * cols > _BIG:
                marks.append(pytest.mark.full)
            yield pytest.param(rows, cols, marks=marks, id=f"{rows}x{cols}")


def _fits(max_fn, version, cols, dtype, x):
    """Whether `version` holds rows of `cols` for these arrays (vectorised when 16-byte accesses apply)."""
    vectorised = (cols * dtype.itemsize) % 16 == 0 and x.data.ptr % 16 == 0
    limit = max_fn(version, dtype, vectorised)
    return limit is None or cols <= limit


def _poison_pool(cp, *nbytes):
    """Fill freed pool blocks of these sizes with NaN bytes, so outputs the op allocates start as garbage."""
    blocks = [cp.full(max(1, n), 0xFF, dtype=np.uint8) for n in nbytes]
    del blocks


@pytest.mark.parametrize("version", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize(("rows", "cols"), list(_grid()))
def test_gpu_layer_norm_forward(cp, rng, rows, cols, dtype, version):
    x_h = _data(rng, (rows, cols), dtype)
    w_h, b_h = _data(rng, cols, dtype, offset=1.0, scale=0.5), _data(rng, cols, dtype, offset=0.0, scale=0.5)
    x, w, b = cp.asarray(x_h), cp.asarray(w_h), cp.asarray(b_h)
    if version is not None and rows and not _fits(norms.forward_max_cols, version, cols, dtype, x):
        with pytest.raises(ValueError, match=f"version={version}"):
            rf.layer_norm(x, w, b, version=version)
        return
    out = poison(cp, (rows, cols), dtype)
    y, mean, rstd = rf.layer_norm(x, w, b, eps=1e-5, out=out, return_stats=True, version=version)
    assert y is out
    ref, ref_mean, ref_rstd = norms.layer_norm_ref(x_h, w_h, b_h, 1e-5)
    assert_close(y, ref, dtype, name="y")
    assert mean.dtype == F32 and rstd.dtype == F32
    assert_close(mean, ref_mean, F32, name="mean")
    assert_close(rstd, ref_rstd, F32, name="rstd")
    # no affine parameters, no statistics
    assert_close(rf.layer_norm(x, version=version), norms.layer_norm_ref(x_h)[0], dtype, name="y plain")


@pytest.mark.parametrize("version", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize(("rows", "cols"), list(_grid()))
def test_gpu_rms_norm_forward(cp, rng, rows, cols, dtype, version):
    x_h = _data(rng, (rows, cols), dtype)
    w_h = _data(rng, cols, dtype, offset=1.0, scale=0.5)
    x, w = cp.asarray(x_h), cp.asarray(w_h)
    if version is not None and rows and not _fits(norms.forward_max_cols, version, cols, dtype, x):
        with pytest.raises(ValueError, match=f"version={version}"):
            rf.rms_norm(x, w, version=version)
        return
    out = poison(cp, (rows, cols), dtype)
    y, rstd = rf.rms_norm(x, w, eps=1e-6, out=out, return_stats=True, version=version)
    ref, ref_rstd = norms.rms_norm_ref(x_h, w_h, 1e-6)
    assert_close(y, ref, dtype, name="y")
    assert_close(rstd, ref_rstd, F32, name="rstd")


@pytest.mark.parametrize("version", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize(("rows", "cols"), list(_grid()))
def test_gpu_add_norms(cp, rng, rows, cols, dtype, version):
    x_h, r_h = _data(rng, (rows, cols), dtype), _data(rng, (rows, cols), dtype, offset=-0.3)
    w_h, b_h = _data(rng, cols, dtype, offset=1.0, scale=0.5), _data(rng, cols, dtype, offset=0.0, scale=0.5)
    x, r, w, b = (cp.asarray(a) for a in (x_h, r_h, w_h, b_h))
    if version is not None and rows and not _fits(norms.forward_max_cols, version, cols, dtype, x):
        return
    h_ref = (x_h.astype(np.float64) + r_h.astype(np.float64)).astype(dtype)  # h is rounded first
    y, h, mean, rstd = rf.add_layer_norm(x, r, w, b, return_stats=True, version=version)
    np.testing.assert_array_equal(cp.asnumpy(h), h_ref)
    ref, ref_mean, ref_rstd = norms.layer_norm_ref(h_ref, w_h, b_h)
    assert_close(y, ref, dtype, name="y")
    assert_close(mean, ref_mean, F32, name="mean")
    assert_close(rstd, ref_rstd, F32, name="rstd")
    y, h = rf.add_rms_norm(x, r, w, version=version)
    np.testing.assert_array_equal(cp.asnumpy(h), h_ref)
    assert_close(y, norms.rms_norm_ref(h_ref, w_h)[0], dtype, name="y rms")


def _gpu_backward_case(cp, rng, rows, cols, dtype, version, rms):
    x_h, dy_h = _data(rng, (rows, cols), dtype), _data(rng, (rows, cols), dtype, offset=0.1, scale=1.0)
    w_h = _data(rng, cols, dtype, offset=1.0, scale=0.5)
    x, dy, w = cp.asarray(x_h), cp.asarray(dy_h), cp.asarray(w_h)
    if version is not None and rows and not _fits(norms.backward_max_cols, version, cols, dtype, x):
        with pytest.raises(ValueError, match=f"version={version}"):
            if rms:
                rf.rms_norm_backward(dy, x, w, cp.ones(rows, F32), version=version)
            else:
                rf.layer_norm_backward(dy, x, w, cp.zeros(rows, F32), cp.ones(rows, F32), version=version)
        return
    # the statistics the kernel gets: the float64 ones rounded to float32, the reference uses the same
    if rms:
        rstd_h = norms.rms_norm_ref(x_h, eps=1e-6)[1].astype(F32)
        mean_h = None
    else:
        _, mean_h, rstd_h = norms.layer_norm_ref(x_h, eps=1e-5)
        mean_h, rstd_h = mean_h.astype(F32), rstd_h.astype(F32)
    n = rows * cols * dtype.itemsize
    _poison_pool(cp, n, cols * dtype.itemsize)
    if rms:
        dx, dw = rf.rms_norm_backward(dy, x, w, cp.asarray(rstd_h), version=version)
        rdx, rdw = norms.rms_norm_backward_ref(dy_h, x_h, w_h, rstd_h)
        results = [(dx, rdx, "dx"), (dw, rdw, "dweight")]
    else:
        dx, dw, db = rf.layer_norm_backward(dy, x, w, cp.asarray(mean_h), cp.asarray(rstd_h), version=version)
        rdx, rdw, rdb = norms.layer_norm_backward_ref(dy_h, x_h, w_h, mean_h, rstd_h)
        results = [(dx, rdx, "dx"), (dw, rdw, "dweight"), (db, rdb, "dbias")]
    # dx = rstd * (dy w - mean(dy w) - xhat mean(dy w xhat)) cancels (to 0 exactly for one column): its
    # rounding error is relative to the size of those terms, not to dx
    terms = float(np.max(np.abs(rstd_h[:, None] * dy_h * w_h.astype(np.float64)), initial=0.0))
    for got, ref, name in results:
        assert got.dtype == dtype
        assert_close(got, ref, dtype, name=name, scale=terms if name == "dx" else None)
    # without a weight: dx only (and dbias on request)
    terms = float(np.max(np.abs(rstd_h[:, None] * dy_h.astype(np.float64)), initial=0.0))
    if rms:
        dx, dw = rf.rms_norm_backward(dy, x, None, cp.asarray(rstd_h), version=version)
        assert dw is None
        rdx = norms.rms_norm_backward_ref(dy_h, x_h, None, rstd_h)[0]
        assert_close(dx, rdx, dtype, name="dx, no weight", scale=terms)
    else:
        m, s = cp.asarray(mean_h), cp.asarray(rstd_h)
        dx, dw, db = rf.layer_norm_backward(dy, x, None, m, s, has_bias=True, version=version)
        rdx, _, rdb = norms.layer_norm_backward_ref(dy_h, x_h, None, mean_h, rstd_h)
        assert dw is None
        assert_close(dx, rdx, dtype, name="dx, no weight", scale=terms)
        assert_close(db, rdb, dtype, name="dbias, no weight")


@pytest.mark.parametrize("version", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize(("rows", "cols"), list(_grid()))
def test_gpu_layer_norm_backward(cp, rng, rows, cols, dtype, version):
    _gpu_backward_case(cp, rng, rows, cols, dtype, version, rms=False)


@pytest.mark.parametrize("version", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize(("rows", "cols"), list(_grid()))
def test_gpu_rms_norm_backward(cp, rng, rows, cols, dtype, version):
    _gpu_backward_case(cp, rng, rows, cols, dtype, version, rms=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
def test_gpu_backward_many_rows_accumulates(cp, rng, dtype):
    """dweight / dbias summed over many more rows than blocks (every version's partials and reduction)."""
    for cols in (64, 768, 4096, 20000):
        for version in (1, 2, 3, 4):
            if not _fits(norms.backward_max_cols, version, cols, dtype, cp.empty(16, dtype)):
                continue
            rng_case = np.random.default_rng(cols + version)
            x_h = _data(rng_case, (3001, cols), dtype)
            dy_h = _data(rng_case, (3001, cols), dtype, offset=0.2, scale=1.0)
            w_h = _data(rng_case, cols, dtype, offset=1.0, scale=0.5)
            _, mean_h, rstd_h = norms.layer_norm_ref(x_h)
            mean_h, rstd_h = mean_h.astype(F32), rstd_h.astype(F32)
            dx, dw, db = rf.layer_norm_backward(
                cp.asarray(dy_h),
                cp.asarray(x_h),
                cp.asarray(w_h),
                cp.asarray(mean_h),
                cp.asarray(rstd_h),
                version=version,
            )
            rdx, rdw, rdb = norms.layer_norm_backward_ref(dy_h, x_h, w_h, mean_h, rstd_h)
            assert_close(dx, rdx, dtype, name=f"dx v{version} cols {cols}")
            assert_close(dw, rdw, dtype, name=f"dweight v{version} cols {cols}")
            assert_close(db, rdb, dtype, name=f"dbias v{version} cols {cols}")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(cp, rng):
    x = cp.asarray(_data(rng, (4099, 512), F32))
    dy = cp.asarray(_data(rng, (4099, 512), F32))
    w = cp.asarray(_data(rng, 512, F32))
    _, mean, rstd = rf.layer_norm(x, w, return_stats=True)
    for version in (2, 3, 4):
        first = rf.layer_norm_backward(dy, x, w, mean, rstd, version=version)
        again = rf.layer_norm_backward(dy, x, w, mean, rstd, version=version)
        for a, b in zip(first, again, strict=True):
            assert cp.array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
def test_gpu_layouts_in_place_and_misaligned(cp, rng, dtype):
    w_h = _data(rng, 96, dtype)
    w = cp.asarray(w_h)
    # non-contiguous views: strided rows and a transposed matrix
    big = cp.asarray(_data(rng, (40, 192), dtype))
    for view in (big[::2, ::2], big[:, :96].T[:96].T, big.reshape(40, 2, 96)[:, 1]):
        assert not view.flags.c_contiguous
        assert_close(rf.layer_norm(view, w), norms.layer_norm_ref(view, w_h)[0], dtype, name="strided")
        assert_close(rf.rms_norm(view, w), norms.rms_norm_ref(view, w_h)[0], dtype, name="strided rms")
    # a contiguous input that starts 2 bytes off a 16-byte boundary: the scalar path
    buf = cp.asarray(_data(rng, 40 * 96 + 1, dtype))
    x = buf[1:].reshape(40, 96)
    for version in (None, 2, 3, 4):
        assert_close(
            rf.layer_norm(x, w, version=version), norms.layer_norm_ref(x, w_h)[0], dtype, name="misaligned"
        )
        dy = cp.asarray(_data(rng, (40, 96), dtype))
        _, mean, rstd = rf.layer_norm(x, w, return_stats=True)
        dx, dw, db = rf.layer_norm_backward(dy, x, w, mean, rstd, version=version)
        rdx, rdw, rdb = norms.layer_norm_backward_ref(dy, x, w_h, mean, rstd)
        assert_close(dx, rdx, dtype, name="dx misaligned")
        assert_close(dw, rdw, dtype, name="dw misaligned")
    # in place: out is x
    x = cp.asarray(_data(rng, (33, 96), dtype))
    ref = norms.rms_norm_ref(x, w_h)[0]
    y = rf.rms_norm(x, w, out=x)
    assert y is x
    assert_close(x, ref, dtype, name="in place")
    # a non-contiguous out: written through a copy
    out = poison(cp, (96, 33), dtype).T
    x = cp.asarray(_data(rng, (33, 96), dtype))
    assert rf.layer_norm(x, w, out=out) is out
    assert_close(out, norms.layer_norm_ref(x, w_h)[0], dtype, name="strided out")
    # a leading batch shape and empty inputs
    x = cp.asarray(_data(rng, (2, 3, 5, 96), dtype))
    y, mean, rstd = rf.layer_norm(x, w, return_stats=True)
    assert y.shape == x.shape and mean.shape == (2, 3, 5)
    y, mean, rstd = rf.layer_norm(cp.zeros((4, 0), dtype), return_stats=True)
    assert y.shape == (4, 0) and bool(cp.isnan(mean).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize("cols", [1, 19, 97, 1024, 1025, 4097, 32000])
def test_gpu_numba_path(cp, rng, dtype, cols):
    rows = 37
    x_h, r_h = _data(rng, (rows, cols), dtype), _data(rng, (rows, cols), dtype, offset=-0.3)
    dy_h = _data(rng, (rows, cols), dtype, offset=0.0, scale=1.0)
    w_h, b_h = _data(rng, cols, dtype, offset=1.0, scale=0.5), _data(rng, cols, dtype, offset=0.0, scale=0.5)
    x, r, dy, w, b = (cp.asarray(a) for a in (x_h, r_h, dy_h, w_h, b_h))
    y, mean, rstd = rf.layer_norm(x, w, b, return_stats=True, impl="numba")
    ref, ref_mean, ref_rstd = norms.layer_norm_ref(x_h, w_h, b_h)
    assert_close(y, ref, dtype, name="y")
    assert_close(mean, ref_mean, F32, name="mean")
    assert_close(rstd, ref_rstd, F32, name="rstd")
    y, rstd = rf.rms_norm(x, w, return_stats=True, impl="numba")
    assert_close(y, norms.rms_norm_ref(x_h, w_h)[0], dtype, name="y rms")
    h_ref = (x_h.astype(np.float64) + r_h.astype(np.float64)).astype(dtype)
    y, h = rf.add_layer_norm(x, r, w, b, impl="numba")
    np.testing.assert_array_equal(cp.asnumpy(h), h_ref)
    assert_close(y, norms.layer_norm_ref(h_ref, w_h, b_h)[0], dtype, name="y add")
    y, h = rf.add_rms_norm(x, r, w, impl="numba")
    np.testing.assert_array_equal(cp.asnumpy(h), h_ref)
    assert_close(y, norms.rms_norm_ref(h_ref, w_h)[0], dtype, name="y add rms")
    _, mean_h, rstd_h = norms.layer_norm_ref(x_h)
    mean_h, rstd_h = mean_h.astype(F32), rstd_h.astype(F32)
    dx, dw, db = rf.layer_norm_backward(dy, x, w, cp.asarray(mean_h), cp.asarray(rstd_h), impl="numba")
    rdx, rdw, rdb = norms.layer_norm_backward_ref(dy_h, x_h, w_h, mean_h, rstd_h)
    terms = float(np.max(np.abs(rstd_h[:, None] * dy_h * w_h.astype(np.float64))))  # dx cancels: see above
    assert_close(dx, rdx, dtype, name="dx", scale=terms)
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
    rstd_h = norms.rms_norm_ref(x_h)[1].astype(F32)
    dx, dw = rf.rms_norm_backward(dy, x, w, cp.asarray(rstd_h), impl="numba")
    rdx, rdw = norms.rms_norm_backward_ref(dy_h, x_h, w_h, rstd_h)
    terms = float(np.max(np.abs(rstd_h[:, None] * dy_h * w_h.astype(np.float64))))
    assert_close(dx, rdx, dtype, name="dx rms", scale=terms)
    assert_close(dw, rdw, dtype, name="dweight rms")
