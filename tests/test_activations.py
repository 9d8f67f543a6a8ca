"""GELU / SiLU / SwiGLU: the float64 references against independent formulas and finite differences, the
argument checks and the NumPy path (CPU); every CUDA kernel version and the Numba path against the
references (GPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from foreign import DLPackOnly
from tolerances import assert_close, poison

import rawformer as rf
from rawformer import backend
from rawformer.ops import activations as act

APPROX = ("tanh", "none")


def literal_gelu(u: float, approximate: str) -> float:
    """The textbook formulas, one value at a time, with the math module."""
    if approximate == "tanh":
        return 0.5 * u * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
    return 0.5 * u * (1.0 + math.erf(u / math.sqrt(2.0)))


def literal_silu(g: float) -> float:
    return g / (1.0 + math.exp(-g))


# ---- erf / erfc used by the references ----------------------------------------------------------------


def test_erf_matches_math_erf():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.linspace(-8.0, 8.0, 20001),
            rng.uniform(-30.0, 30.0, 10000),
            rng.standard_normal(5000) * 1e-3,
            [0.0, -0.0, 1.5, -1.5, np.nextafter(1.5, 0.0), np.nextafter(1.5, 2.0), 1e-300, 27.0],
        ]
    )
    want = np.array([math.erf(v) for v in x])
    got = act._erf(x)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert rel.max() < 2e-15, f"erf: max relative error {rel.max():.2e} at x={x[np.argmax(rel)]!r}"


def test_erfc_matches_math_erfc():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(-8.0, 26.0, 20001), rng.uniform(-30.0, 26.0, 10000), [0.0, 1.5, -1.5]])
    want = np.array([math.erfc(v) for v in x])
    got = act._erfc(x)
    rel = np.abs(got - want) / np.abs(want)
    # 1 - erf(x) on [0, 1.5) costs up to 1.5 digits (erfc(1.5) = 0.034); elsewhere full precision
    inner = (x >= 0) & (x < 1.5)
    assert rel[inner].max() < 5e-14
    assert rel[~inner].max() < 2e-15, f"erfc: max relative error {rel[~inner].max():.2e}"


def test_erf_special_values():
    got = act._erf(np.array([np.nan, np.inf, -np.inf, 40.0, -40.0]))
    assert np.isnan(got[0]) and list(got[1:]) == [1.0, -1.0, 1.0, -1.0]
    got = act._erfc(np.array([np.nan, np.inf, -np.inf, 40.0]))
    assert np.isnan(got[0]) and list(got[1:]) == [0.0, 2.0, 0.0]


# ---- references against independent formulas ---------------------------------------------------------


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_ref_matches_literal_formula(approximate):
    u = np.concatenate([np.linspace(-6.0, 6.0, 2001), np.random.default_rng(2).standard_normal(500) * 3])
    want = np.array([literal_gelu(v, approximate) for v in u])
    # the literal 1 + tanh / 1 + erf cancels at negative u: compare within its own accuracy
    np.testing.assert_allclose(act.gelu_ref(u, approximate=approximate), want, rtol=1e-12, atol=1e-15)


def test_gelu_ref_known_values():
    # gelu_erf(u) = u * Phi(u): Phi(1) = 0.8413447460685429, Phi(-1) = 0.15865525393145707
    got = act.gelu_ref(np.array([0.0, 1.0, -1.0, 40.0, -40.0, -1e4]), approximate="none")
    np.testing.assert_allclose(got[:3], [0.0, 0.8413447460685429, -0.15865525393145707], rtol=1e-15)
    assert got[3] == 40.0 and got[4] <= 0.0 and got[4] > -1e-300 and got[5] == 0.0
    got = act.gelu_ref(np.array([0.0, 40.0, -40.0, -1e4, np.nan]), approximate="tanh")
    assert got[0] == 0.0 and got[1] == 40.0 and -1e-300 < got[2] <= 0.0 and got[3] == 0.0 and np.isnan(got[4])
    # tail accuracy where the textbook formula cancels: gelu_erf(-10) = -10 * Phi(-10)
    phi = 0.5 * math.erfc(10.0 / math.sqrt(2.0))
    assert act.gelu_ref(np.array([-10.0]), approximate="none")[0] == pytest.approx(-10.0 * phi, rel=1e-14)


def test_gelu_ref_adds_the_bias_along_rows(rng):
    x = rng.standard_normal((4, 3, 5))
    b = rng.standard_normal(5)
    for approximate in APPROX:
        np.testing.assert_array_equal(act.gelu_ref(x, b, approximate), act.gelu_ref(x + b, None, approximate))


def test_silu_and_swiglu_ref_match_literal_formula(rng):
    g = np.concatenate([np.linspace(-30.0, 30.0, 1201), rng.standard_normal(300) * 4])
    up = rng.standard_normal(g.shape)
    want = np.array([literal_silu(v) for v in g])
    np.testing.assert_allclose(act.silu_ref(g), want, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(act.swiglu_ref(g, up), want * up, rtol=1e-14, atol=1e-300)
    assert act.silu_ref(np.array([-1e4]))[0] == 0.0 and act.silu_ref(np.array([1e4]))[0] == 1e4


# ---- backward references against finite differences ------------------------------------------------------


def central_difference(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_backward_ref_matches_finite_differences(approximate, rng):
    x = rng.standard_normal((6, 7)) * 3
    b = rng.standard_normal(7)
    dy = rng.standard_normal((6, 7))
    dx, dbias = act.gelu_backward_ref(dy, x, b, approximate)
    h = 1e-5
    fd = dy * central_difference(lambda v: act.gelu_ref(v, b, approximate), x, h)
    np.testing.assert_allclose(dx, fd, rtol=1e-7, atol=1e-9)
    # dbias: d/db_j of sum(dy * gelu(x + b)), perturbing one bias entry at a time
    fd_bias = np.empty(7)
    for j in range(7):
        e = np.zeros(7)
        e[j] = h
        loss = lambda bb: float(np.sum(dy * act.gelu_ref(x, bb, approximate)))
        fd_bias[j] = (loss(b + e) - loss(b - e)) / (2 * h)
    np.testing.assert_allclose(dbias, fd_bias, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dbias, dx.sum(axis=0), rtol=1e-15)
    dx_nb, db_nb = act.gelu_backward_ref(dy, x + b, None, approximate)
    assert db_nb is None
    np.testing.assert_allclose(dx_nb, dx, rtol=1e-15, atol=1e-300)


def test_gelu_backward_ref_dbias_sums_every_leading_axis(rng):
    x = rng.standard_normal((2, 3, 4))
    b = rng.standard_normal(4)
    dy = rng.standard_normal((2, 3, 4))
    dx, dbias = act.gelu_backward_ref(dy, x, b)
    assert dbias.shape == (4,)
    np.testing.assert_allclose(dbias, dx.reshape(-1, 4).sum(axis=0), rtol=1e-14)


def test_swiglu_backward_ref_matches_finite_differences(rng):
    g = rng.standard_normal((5, 9)) * 4
    up = rng.standard_normal((5, 9))
    dy = rng.standard_normal((5, 9))
    dgate, dup = act.swiglu_backward_ref(dy, g, up)
    h = 1e-5
    np.testing.assert_allclose(
        dgate, dy * central_difference(lambda v: act.swiglu_ref(v, up), g, h), rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(dup, dy * act.silu_ref(g), rtol=1e-15)


# ---- the public ops on NumPy arrays ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_path_keeps_dtype_and_matches_reference(dtype, rng):
    x = (rng.standard_normal((3, 11)) * 2).astype(dtype)
    b = rng.standard_normal(11).astype(dtype)
    up = rng.standard_normal((3, 11)).astype(dtype)
    dy = rng.standard_normal((3, 11)).astype(dtype)
    for approximate in APPROX:
        y = rf.gelu(x, b, approximate=approximate)
        assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, act.gelu_ref(x, b, approximate).astype(dtype))
        dx, dbias = rf.gelu_backward(dy, x, b, approximate=approximate)
        ref_dx, ref_db = act.gelu_backward_ref(dy, x, b, approximate)
        assert dx.dtype == dtype and dbias.dtype == dtype and dbias.shape == (11,)
        np.testing.assert_array_equal(dx, ref_dx.astype(dtype))
        np.testing.assert_array_equal(dbias, ref_db.astype(dtype))
        dx, dbias = rf.gelu_backward(dy, x, approximate=approximate)
        assert dbias is None
    np.testing.assert_array_equal(rf.silu(x), act.silu_ref(x).astype(dtype))
    np.testing.assert_array_equal(rf.swiglu(x, up), act.swiglu_ref(x, up).astype(dtype))
    dgate, dup = rf.swiglu_backward(dy, x, up)
    ref_g, ref_u = act.swiglu_backward_ref(dy, x, up)
    np.testing.assert_array_equal(dgate, ref_g.astype(dtype))
    np.testing.assert_array_equal(dup, ref_u.astype(dtype))


def test_numpy_out_is_written_and_returned(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    out = np.full_like(x, np.nan)
    y = rf.gelu(x, out=out)
    assert y is out
    np.testing.assert_array_equal(out, act.gelu_ref(x).astype(np.float32))
    # in place, and into a non-contiguous view
    x2 = x.copy()
    assert rf.silu(x2, out=x2) is x2
    np.testing.assert_array_equal(x2, act.silu_ref(x).astype(np.float32))
    big = np.full((4, 12), np.nan, np.float32)
    view = big[:, ::2]
    assert rf.swiglu(x, x, out=view) is view
    np.testing.assert_array_equal(view, act.swiglu_ref(x, x).astype(np.float32))
    assert np.isnan(big[:, 1::2]).all()


def test_numpy_non_contiguous_inputs(rng):
    base = rng.standard_normal((8, 10))
    x = base[:, ::2]  # (8, 5), strided
    xt = base.T  # (10, 8), transposed
    b = rng.standard_normal(5)
    np.testing.assert_array_equal(rf.gelu(x, b), act.gelu_ref(np.ascontiguousarray(x), b))
    np.testing.assert_array_equal(rf.silu(xt), act.silu_ref(np.ascontiguousarray(xt)))
    dx, db = rf.gelu_backward(x, x, b, approximate="none")
    rdx, rdb = act.gelu_backward_ref(np.ascontiguousarray(x), np.ascontiguousarray(x), b, "none")
    np.testing.assert_array_equal(dx, rdx)
    np.testing.assert_array_equal(db, rdb)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    b = np.zeros(shape[-1], np.float32)
    for y in (rf.gelu(x), rf.gelu(x, b), rf.silu(x), rf.swiglu(x, x)):
        assert y.shape == shape and y.dtype == np.float32
    dx, db = rf.gelu_backward(x, x, b)
    assert dx.shape == shape and db.shape == (shape[-1],) and not db.any()
    dg, du = rf.swiglu_backward(x, x, x)
    assert dg.shape == du.shape == shape


def test_zero_dimensional_input():
    x = np.array(1.0, np.float32)
    y = rf.gelu(x, approximate="none")
    assert y.shape == () and y == np.float32(0.8413447460685429)
    assert rf.silu(x).shape == ()
    with pytest.raises(ValueError, match="bias"):
        rf.gelu(x, np.ones(1, np.float32))


def test_dlpack_input(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y = rf.gelu(DLPackOnly(x), DLPackOnly(b))
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, act.gelu_ref(x, b).astype(np.float32))
    dx, db = rf.gelu_backward(DLPackOnly(x), DLPackOnly(x), DLPackOnly(b))
    np.testing.assert_array_equal(db, act.gelu_backward_ref(x, x, b)[1].astype(np.float32))
    np.testing.assert_array_equal(
        rf.swiglu(DLPackOnly(x), DLPackOnly(x)), act.swiglu_ref(x, x).astype(np.float32)
    )


# ---- argument errors ---------------------------------------------------------------------------------------


def test_bad_approximate_is_named():
    x = np.ones((2, 3), np.float32)
    for bad in ("erf", "TANH", None, 1):
        with pytest.raises(ValueError, match=rf"approximate .*{bad!r}"):
            rf.gelu(x, approximate=bad)
        with pytest.raises(ValueError, match="approximate"):
            rf.gelu_backward(x, x, approximate=bad)
        with pytest.raises(ValueError, match="approximate"):
            act.gelu_ref(x, approximate=bad)


def test_argument_errors():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="x"):
        rf.gelu(np.ones((2, 3), np.int32))
    with pytest.raises(TypeError, match="x"):
        rf.gelu([1.0, 2.0])
    with pytest.raises(ValueError, match="bias"):
        rf.gelu(x, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="bias"):
        rf.gelu(x, np.ones((1, 3), np.float32))
    with pytest.raises(TypeError, match="bias"):
        rf.gelu(x, np.ones(3, np.float64))
    with pytest.raises(ValueError, match="out"):
        rf.gelu(x, out=np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match="out"):
        rf.silu(x, out=np.ones((2, 3), np.float16))
    with pytest.raises(ValueError, match="impl"):
        rf.gelu(x, impl="cuda")  # a CPU array cannot run a GPU implementation
    with pytest.raises(ValueError, match="impl"):
        rf.silu(x, impl="triton")
    with pytest.raises(ValueError, match="version"):
        rf.gelu(x, version=2)  # versions pick CUDA kernels
    with pytest.raises(ValueError, match="version"):
        rf.gelu_backward(x, x, version=4)
    with pytest.raises(TypeError, match="version"):
        rf.swiglu(x, x, version="2")
    with pytest.raises(TypeError, match="version"):
        rf.swiglu_backward(x, x, x, version=True)
    with pytest.raises(ValueError, match="dy"):
        rf.gelu_backward(np.ones((3, 2), np.float32), x)
    with pytest.raises(TypeError, match="dy"):
        rf.gelu_backward(np.ones((2, 3), np.float16), x)
    with pytest.raises(ValueError, match="up"):
        rf.swiglu(x, np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="up"):
        rf.swiglu(x, np.ones((2, 3), np.float64))
    with pytest.raises(ValueError, match="up"):
        rf.swiglu_backward(x, x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="dy"):
        rf.swiglu_backward(np.ones(6, np.float32), x, x)


# ---- kernel selection (pure functions, checked without a GPU) ------------------------------------------


def test_every_expression_is_registered_once():
    from rawformer.kernels import modules

    exprs = modules.registered_families()["activations"]
    assert len(exprs) == len(set(exprs))
    assert "gelu_forward_v2<__half, 8, true, true>" in exprs
    assert "gelu_backward_v3<float, 1, false>" in exprs
    assert "column_reduce<__half>" in exprs


@pytest.mark.parametrize(
    "rows,cols,vw",
    [(1, 1, 1), (1000, 19, 1), (1000, 8, 8), (3, 4097, 1), (16384, 11008, 8), (4096, 32000, 8)],
)
@pytest.mark.parametrize("wave", [1, 132, 792])
def test_strip_plan_covers_the_matrix(rows, cols, vw, wave):
    (gx, chunks), (bx, by), rows_per_chunk = act._strip_plan(rows, cols, vw, wave)
    assert bx * by == act._THREADS and bx <= 32 and (bx & (bx - 1)) == 0
    assert gx * bx * vw >= cols > (gx - 1) * bx * vw  # every column, no empty strip
    assert chunks * rows_per_chunk >= rows > (chunks - 1) * rows_per_chunk  # every row, no empty chunk
    assert chunks <= 65535
    assert gx * chunks <= max(wave, gx)  # no partial extra wave


# ---- GPU: every kernel version against the float64 reference -------------------------------------------

ROWS = (0, 1, 3, 1000)
COLS = (1, 19, 97, 111, 989, 1025, 4097, 8, 24, 1024, 4096)  # odd sizes, and whole 16-byte vectors
GPU_DTYPES = (np.float16, np.float32)


def gpu_cases():
    for rows in ROWS:
        for cols in COLS:
            marks = [pytest.mark.full] if rows * cols > 1_100_000 else []
            yield pytest.param(rows, cols, marks=marks, id=f"{rows}x{cols}")


def check(out, ref, dtype, name="output", floor=None):
    """assert_close, granting what the storage type or the kernel's formula cannot resolve.

    - Values below the dtype's smallest normal number (fp16: 6.1e-5, where subnormals are 6e-8 apart;
      fp32: 1.2e-38, where expf underflows): an element whose reference is that small passes when it is
      within that absolute distance.
    - `floor` (an array like ref, or None): an element passes when its error is at most its floor (the erf
      form's absolute error, see `erf_floor`).
    Everything else goes through the tolerance table.
    """
    out = np.asarray(backend.to_numpy(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"{name}: shape {out.shape} != reference {ref.shape}"
    tiny = np.finfo(dtype).tiny
    err = np.abs(out - ref)
    resolved = (np.abs(ref) < tiny) & (err <= tiny)
    if floor is not None:
        resolved |= err <= floor
    assert_close(np.where(resolved, ref, out), ref, dtype, name=name)


# The erf-form kernels compute 1 + erff(u / sqrt 2) (activations.cu says why not erfcf): erff's error of a few
# ulp near -1 is absolute, so at u < -2 the error of gelu(u) is ~1e-7 |u| however small gelu(u) is, and that
# of gelu'(u) ~1e-7. Relative to a tensor's largest outputs this is far inside the fp32 tolerance; only a
# tensor of nothing but large negative inputs (a 1 x 1 test) sees it.
ERF_FLOOR = 2.0**-21


def erf_floor(approximate, scale):
    """The absolute error the erf form may have: ERF_FLOOR * scale (|u| for gelu, |dy| for dx, the column
    sums of |dy| for dbias); None for the tanh form."""
    return None if approximate == "tanh" else ERF_FLOOR * np.abs(scale)


def make_inputs(cp, rng, shape, dtype, scale=3.0):
    """A host float64 copy of the values (already rounded to dtype) and the device array."""
    host = (rng.standard_normal(shape) * scale).astype(dtype)
    return host.astype(np.float64), cp.asarray(host)


def poison_pool(cp, shape, dtype, count=2):
    """Leave NaN-filled blocks of this size in CuPy's memory pool, so that the outputs the op allocates
    next most likely start as NaN and an element the kernel never writes fails the comparison."""
    blocks = [poison(cp, shape, dtype) for _ in range(count)]
    del blocks


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", list(gpu_cases()))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("approximate", APPROX)
def test_gpu_gelu_forward(cp, rng, rows, cols, dtype, with_bias, approximate):
    x64, x = make_inputs(cp, rng, (rows, cols), dtype)
    b64, b = make_inputs(cp, rng, (cols,), dtype, 1.0) if with_bias else (None, None)
    ref = act.gelu_ref(x64, b64, approximate)
    floor = erf_floor(approximate, x64 if b64 is None else x64 + b64)
    for version in act.FORWARD_VERSIONS:
        out = poison(cp, (rows, cols), dtype)
        y = rf.gelu(x, b, approximate=approximate, out=out, version=version)
        assert y is out
        check(y, ref, dtype, name=f"gelu v{version}", floor=floor)
        poison_pool(cp, (rows, cols), dtype)
        y = rf.gelu(x, b, approximate=approximate, version=version)
        assert isinstance(y, cp.ndarray) and y.dtype == dtype
        check(y, ref, dtype, name=f"gelu v{version} (allocated)", floor=floor)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", list(gpu_cases()))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("approximate", APPROX)
def test_gpu_gelu_backward(cp, rng, rows, cols, dtype, with_bias, approximate):
    x64, x = make_inputs(cp, rng, (rows, cols), dtype)
    dy64, dy = make_inputs(cp, rng, (rows, cols), dtype, 1.0)
    b64, b = make_inputs(cp, rng, (cols,), dtype, 1.0) if with_bias else (None, None)
    ref_dx, ref_db = act.gelu_backward_ref(dy64, x64, b64, approximate)
    for version in act.GELU_BACKWARD_VERSIONS:
        poison_pool(cp, (rows, cols), dtype)
        poison_pool(cp, (cols,), dtype)
        dx, db = rf.gelu_backward(dy, x, b, approximate=approximate, version=version)
        check(dx, ref_dx, dtype, name=f"gelu_backward v{version} dx", floor=erf_floor(approximate, dy64))
        if with_bias:
            assert db.shape == (cols,) and db.dtype == dtype
            db_floor = erf_floor(approximate, np.abs(dy64).sum(axis=0))
            check(db, ref_db, dtype, name=f"gelu_backward v{version} dbias", floor=db_floor)
        else:
            assert db is None
        del dx, db


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", list(gpu_cases()))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_silu_swiglu(cp, rng, rows, cols, dtype):
    g64, g = make_inputs(cp, rng, (rows, cols), dtype)
    u64, u = make_inputs(cp, rng, (rows, cols), dtype, 1.0)
    dy64, dy = make_inputs(cp, rng, (rows, cols), dtype, 1.0)
    out = poison(cp, (rows, cols), dtype)
    assert rf.silu(g, out=out) is out
    check(out, act.silu_ref(g64), dtype, name="silu")
    ref = act.swiglu_ref(g64, u64)
    ref_dg, ref_du = act.swiglu_backward_ref(dy64, g64, u64)
    for version in act.FORWARD_VERSIONS:
        out = poison(cp, (rows, cols), dtype)
        assert rf.swiglu(g, u, out=out, version=version) is out
        check(out, ref, dtype, name=f"swiglu v{version}")
    for version in act.SWIGLU_BACKWARD_VERSIONS:
        poison_pool(cp, (rows, cols), dtype, count=3)
        dg, du = rf.swiglu_backward(dy, g, u, version=version)
        check(dg, ref_dg, dtype, name=f"swiglu_backward v{version} dgate")
        check(du, ref_du, dtype, name=f"swiglu_backward v{version} dup")
        del dg, du


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_special_values(cp, dtype):
    big = 6e4 if dtype == np.float16 else 1e30  # fp32: u^2 and u^3 overflow inside the kernel
    vals = np.array([-big, -100.0, -20.0, -9.0, -5.0, -1e-3, -0.0, 0.0, 1e-3, 5.0, 20.0, 100.0, big, np.nan])
    host = vals.astype(dtype)
    x = cp.asarray(host)
    x64 = host.astype(np.float64)
    ones, ones64 = cp.ones_like(x), np.ones_like(x64)
    for approximate in APPROX:
        ref = act.gelu_ref(x64, None, approximate)
        ref_dx = act.gelu_backward_ref(ones64, x64, None, approximate)[0]
        for version in act.FORWARD_VERSIONS:
            y = rf.gelu(x, approximate=approximate, version=version)
            check(y, ref, dtype, name="gelu", floor=erf_floor(approximate, x64))
        for version in act.GELU_BACKWARD_VERSIONS:
            dx, _ = rf.gelu_backward(ones, x, approximate=approximate, version=version)
            check(dx, ref_dx, dtype, name=f"gelu_backward v{version}", floor=erf_floor(approximate, ones64))
    check(rf.silu(x), act.silu_ref(x64), dtype, name="silu")
    for version in act.SWIGLU_BACKWARD_VERSIONS:
        dg, du = rf.swiglu_backward(ones, x, ones, version=version)
        rdg, rdu = act.swiglu_backward_ref(ones64, x64, ones64)
        check(dg, rdg, dtype, name="swiglu_backward dgate")
        check(du, rdu, dtype, name="swiglu_backward dup")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_misaligned_and_non_contiguous(cp, rng, dtype):
    rows, cols = 37, 64
    host = (rng.standard_normal(rows * cols + 8) * 3).astype(dtype)
    buf = cp.asarray(host)
    x = buf[1 : 1 + rows * cols].reshape(rows, cols)  # one element off 16-byte alignment
    x64 = host[1 : 1 + rows * cols].reshape(rows, cols).astype(np.float64)
    b64, b = make_inputs(cp, rng, (cols,), dtype, 1.0)
    for version in act.FORWARD_VERSIONS:
        check(rf.gelu(x, b, version=version), act.gelu_ref(x64, b64), dtype)
        out_buf = poison(cp, rows * cols + 8, dtype)
        out = out_buf[3 : 3 + rows * cols].reshape(rows, cols)
        assert rf.swiglu(x, x, out=out, version=version) is out
        check(out, act.swiglu_ref(x64, x64), dtype)
        assert cp.isnan(out_buf[:3]).all() and cp.isnan(out_buf[3 + rows * cols :]).all()
    for version in act.GELU_BACKWARD_VERSIONS:
        dx, db = rf.gelu_backward(x, x, b, version=version)
        rdx, rdb = act.gelu_backward_ref(x64, x64, b64)
        check(dx, rdx, dtype)
        check(db, rdb, dtype)
    # strided and transposed views
    wide64, wide = make_inputs(cp, rng, (rows, 2 * cols), dtype)
    xs, xs64 = wide[:, ::2], wide64[:, ::2]
    ref = act.gelu_ref(xs64, b64, "none")
    check(rf.gelu(xs, b, approximate="none"), ref, dtype, floor=erf_floor("none", xs64 + b64))
    check(rf.silu(wide.T), act.silu_ref(wide64.T), dtype)
    dx, db = rf.gelu_backward(xs, xs, b)
    rdx, rdb = act.gelu_backward_ref(xs64, xs64, b64)
    check(dx, rdx, dtype)
    check(db, rdb, dtype)
    # a non-contiguous out= is filled through a copy, leaving the gaps alone
    big = poison(cp, (rows, 2 * cols), dtype)
    odd = big[:, 1::2]
    assert rf.gelu(x, out=odd) is odd
    check(odd, act.gelu_ref(x64), dtype)
    assert cp.isnan(big[:, ::2]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(97, 111), (300, 24), (5, 4097), (64, 1024)])
def test_gpu_grid_stride_loops(cp, rng, monkeypatch, dtype, shape):
    # a capped grid makes v1 / v2 threads loop, carrying the bias column from step to step
    monkeypatch.setattr(act, "_MAX_BLOCKS", 3)
    x64, x = make_inputs(cp, rng, shape, dtype)
    dy64, dy = make_inputs(cp, rng, shape, dtype, 1.0)
    b64, b = make_inputs(cp, rng, shape[-1:], dtype, 1.0)
    ref = act.gelu_ref(x64, b64)
    rdx, rdb = act.gelu_backward_ref(dy64, x64, b64)
    for version in act.FORWARD_VERSIONS:
        check(rf.gelu(x, b, version=version), ref, dtype, name=f"gelu v{version}")
        check(rf.swiglu(x, dy, version=version), act.swiglu_ref(x64, dy64), dtype, name=f"swiglu v{version}")
        dx, db = rf.gelu_backward(dy, x, b, version=version)
        check(dx, rdx, dtype, name=f"gelu_backward v{version} dx")
        check(db, rdb, dtype, name=f"gelu_backward v{version} dbias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_in_place(cp, rng, dtype):
    x64, x = make_inputs(cp, rng, (33, 40), dtype)
    u64, u = make_inputs(cp, rng, (33, 40), dtype, 1.0)
    for version in act.FORWARD_VERSIONS:
        y = x.copy()
        assert rf.gelu(y, out=y, version=version) is y
        check(y, act.gelu_ref(x64), dtype)
        up = u.copy()
        assert rf.swiglu(x, up, out=up, version=version) is up
        check(up, act.swiglu_ref(x64, u64), dtype)
    y = x.copy()
    rf.silu(y, out=y)
    check(y, act.silu_ref(x64), dtype)
    # an out= that overlaps an input at an offset must not race: it goes through a scratch buffer
    buf = cp.concatenate([x.reshape(-1), x.reshape(-1)[:40]])
    src = buf[:-40].reshape(33, 40)
    dst = buf[40:].reshape(33, 40)
    rf.gelu(src, out=dst)
    check(dst, act.gelu_ref(x64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_leading_axes_and_zero_size(cp, rng, dtype):
    x64, x = make_inputs(cp, rng, (2, 5, 24), dtype)
    b64, b = make_inputs(cp, rng, (24,), dtype, 1.0)
    check(rf.gelu(x, b), act.gelu_ref(x64, b64), dtype)
    dx, db = rf.gelu_backward(x, x, b)
    rdx, rdb = act.gelu_backward_ref(x64, x64, b64)
    assert dx.shape == (2, 5, 24) and db.shape == (24,)
    check(dx, rdx, dtype)
    check(db, rdb, dtype)
    z = cp.zeros((0, 7), dtype)
    assert rf.gelu(z, cp.ones(7, dtype)).shape == (0, 7)
    dx, db = rf.gelu_backward(z, z, cp.ones(7, dtype))
    assert dx.shape == (0, 7) and db.shape == (7,) and not db.any()
    for impl in ("cuda", "numba"):
        assert rf.swiglu(z, z, impl=impl).shape == (0, 7)
        assert rf.silu(cp.zeros((3, 0), dtype), impl=impl).shape == (3, 0)
    s = cp.asarray(np.array(0.5, dtype))
    check(rf.gelu(s), act.gelu_ref(np.array(0.5, dtype).astype(np.float64)), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 19), (1000, 97), (7, 1024)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_numba(cp, rng, rows, cols, dtype):
    x64, x = make_inputs(cp, rng, (rows, cols), dtype)
    dy64, dy = make_inputs(cp, rng, (rows, cols), dtype, 1.0)
    u64, u = make_inputs(cp, rng, (rows, cols), dtype, 1.0)
    b64, b = make_inputs(cp, rng, (cols,), dtype, 1.0)
    for approximate in APPROX:
        for bias, bias64 in ((None, None), (b, b64)):
            out = poison(cp, (rows, cols), dtype)
            assert rf.gelu(x, bias, approximate=approximate, out=out, impl="numba") is out
            arg64 = x64 if bias64 is None else x64 + bias64
            ref = act.gelu_ref(x64, bias64, approximate)
            # the Numba kernels keep the textbook 1 + tanh / 1 + erf: both forms cancel like the erf form
            check(out, ref, dtype, name="numba gelu", floor=erf_floor("none", arg64))
            dx, db = rf.gelu_backward(dy, x, bias, approximate=approximate, impl="numba")
            rdx, rdb = act.gelu_backward_ref(dy64, x64, bias64, approximate)
            check(dx, rdx, dtype, name="numba gelu_backward dx", floor=erf_floor("none", dy64))
            if bias is None:
                assert db is None
            else:
                db_floor = erf_floor("none", np.abs(dy64).sum(axis=0))
                check(db, rdb, dtype, name="numba gelu_backward dbias", floor=db_floor)
    check(rf.silu(x, impl="numba"), act.silu_ref(x64), dtype, name="numba silu")
    check(rf.swiglu(x, u, impl="numba"), act.swiglu_ref(x64, u64), dtype, name="numba swiglu")
    dg, du = rf.swiglu_backward(dy, x, u, impl="numba")
    rdg, rdu = act.swiglu_backward_ref(dy64, x64, u64)
    check(dg, rdg, dtype, name="numba swiglu_backward dgate")
    check(du, rdu, dtype, name="numba swiglu_backward dup")
    with pytest.raises(ValueError, match="version"):
        rf.gelu(x, impl="numba", version=1)


@pytest.mark.gpu
def test_gpu_argument_errors(cp):
    x = cp.ones((2, 8), cp.float32)
    with pytest.raises(ValueError, match="bias"):
        rf.gelu(x, np.ones(8, np.float32))  # a host bias for a device x
    with pytest.raises(TypeError, match="x"):
        rf.gelu(cp.ones((2, 8), cp.float64))  # float64 runs on the CPU only
    with pytest.raises(ValueError, match="out"):
        rf.gelu(x, out=np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="up"):
        rf.swiglu(x, np.ones((2, 8), np.float32))


@pytest.mark.gpu
def test_gpu_dlpack_inputs_come_back_in_kind(cp, rng):
    x64, x = make_inputs(cp, rng, (4, 16), np.float32)
    y = rf.gelu(DLPackOnly(x))  # an unknown library: the result stays a CuPy array
    assert isinstance(y, cp.ndarray)
    check(y, act.gelu_ref(x64), np.float32)
    torch = pytest.importorskip("torch")
    t = torch.from_dlpack(x)
    tb = torch.zeros(16, device="cuda")
    yt = rf.gelu(t, tb, approximate="none")
    assert isinstance(yt, torch.Tensor) and yt.is_cuda
    torch.testing.assert_close(yt, torch.nn.functional.gelu(t, approximate="none"), rtol=1e-5, atol=1e-6)
    dx, db = rf.gelu_backward(torch.ones_like(t), t, tb)
    assert isinstance(dx, torch.Tensor) and isinstance(db, torch.Tensor)


@pytest.mark.gpu
def test_gpu_requested_expressions_are_registered(cp, rng, monkeypatch):
    from rawformer.kernels import modules

    registered = set(modules.registered_families()["activations"])
    requested = []
    real = act.get_function

    def recording(family, expr):
        requested.append(expr)
        return real(family, expr)

    monkeypatch.setattr(act, "get_function", recording)
    for dtype in GPU_DTYPES:
        for cols in (19, 24, 64):
            _, x = make_inputs(cp, rng, (5, cols), dtype)
            b = x[0].copy()
            for approximate in APPROX:
                for version in act.FORWARD_VERSIONS:
                    rf.gelu(x, b, approximate=approximate, version=version)
                    rf.gelu(x, approximate=approximate, version=version)
                    rf.swiglu(x, x, version=version)
                    rf.swiglu_backward(x, x, x, version=version)
                for version in act.GELU_BACKWARD_VERSIONS:
                    rf.gelu_backward(x, x, b, approximate=approximate, version=version)
                    rf.gelu_backward(x, x, approximate=approximate, version=version)
            rf.silu(x)
    assert requested and set(requested) <= registered, sorted(set(requested) - registered)
