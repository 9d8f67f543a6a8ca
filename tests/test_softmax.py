"""softmax / log_softmax and their backward: the float64 references against independent formulas (a
per-row loop with the math module, explicit Jacobians), masks, causal masking, NaN / inf rules, axes,
layouts, argument errors and kernel selection (CPU); every CUDA kernel version and the Numba path against
the references (GPU)."""

from __future__ import annotations

import importlib
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from foreign import DLPackOnly
from tolerances import assert_close, poison

import rawformer as rf
from rawformer.kernels import modules

sm = importlib.import_module("rawformer.ops.softmax")  # rawformer.ops.softmax is also the function's name

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


# ---- independent formulas ------------------------------------------------------------------------------


def literal_softmax_rows(z: np.ndarray, log: bool) -> np.ndarray:
    """Row by row with the math module (z: 2-D float64, finite or -inf entries, at least one finite)."""
    out = np.empty_like(z)
    for r, row in enumerate(z):
        top = max(v for v in row)
        exps = [math.exp(v - top) for v in row]
        total = math.fsum(exps)
        out[r] = [v - top - math.log(total) for v in row] if log else [e / total for e in exps]
    return out


def jacobian_backward(dy: np.ndarray, y: np.ndarray, scale: float, log: bool) -> np.ndarray:
    """dx = J^T dy row by row, with the Jacobian written out: softmax J_ij = scale y_i (d_ij - y_j);
    log_softmax J_ij = scale (d_ij - p_j), p = exp(y)."""
    dx = np.empty_like(dy)
    for r in range(dy.shape[0]):
        p = np.exp(y[r]) if log else y[r]
        eye = np.eye(len(p))
        jac = scale * (eye - p[None, :]) if log else scale * y[r][:, None] * (eye - p[None, :])
        dx[r] = jac.T @ dy[r]
    return dx


def naive_numpy_softmax(z: np.ndarray) -> np.ndarray:
    """The textbook NumPy formula, the behaviour plain softmax follows for NaN and inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


# ---- references ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True])
def test_ref_matches_literal_formula(rng, log):
    z = rng.standard_normal((7, 13)) * 4
    z[2, 5] = -np.inf
    ref = sm.log_softmax_ref if log else sm.softmax_ref
    np.testing.assert_allclose(ref(z), literal_softmax_rows(z, log), rtol=1e-13, atol=1e-15)


def test_ref_known_values():
    got = sm.softmax_ref(np.array([[0.0, math.log(3.0)], [1e4, 1e4]]))
    np.testing.assert_allclose(got, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-15)
    np.testing.assert_allclose(sm.log_softmax_ref(np.array([0.0, 0.0, 0.0, 0.0])), [-math.log(4.0)] * 4)


@pytest.mark.parametrize("log", [False, True])
def test_ref_scale_and_mask(rng, log):
    x = rng.standard_normal((2, 3, 4, 6))
    mask = rng.standard_normal((4, 6))
    ref = sm.log_softmax_ref if log else sm.softmax_ref
    want = literal_softmax_rows((0.37 * x + mask).reshape(-1, 6), log).reshape(x.shape)
    np.testing.assert_allclose(ref(x, scale=0.37, mask=mask), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_backward_ref_matches_jacobian(rng, log, scale):
    x = rng.standard_normal((5, 9))
    y = (sm.log_softmax_ref if log else sm.softmax_ref)(x, scale=scale)
    dy = rng.standard_normal((5, 9))
    ref = sm.log_softmax_backward_ref if log else sm.softmax_backward_ref
    np.testing.assert_allclose(ref(dy, y, scale=scale), jacobian_backward(dy, y, scale, log), atol=1e-14)


def test_backward_ref_matches_finite_differences(rng):
    x = rng.standard_normal((3, 6))
    dy = rng.standard_normal((3, 6))
    h = 1e-6
    pairs = {
        False: (sm.softmax_ref, sm.softmax_backward_ref),
        True: (sm.log_softmax_ref, sm.log_softmax_backward_ref),
    }
    for log, (fwd, bwd) in pairs.items():
        dx = bwd(dy, fwd(x, scale=1.5), scale=1.5)
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            fd[idx] = np.sum(dy * (fwd(x + e, scale=1.5) - fwd(x - e, scale=1.5))) / (2 * h)
        np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8, err_msg=f"log={log}")


def test_causal_rule_bottom_right_aligned():
    s_q, s_k = 3, 5
    y = sm.softmax_ref(np.zeros((2, s_q, s_k)), causal=True)
    for i in range(s_q):
        kept = i + (s_k - s_q) + 1  # keys 0 .. i + (S_k - S_q)
        np.testing.assert_allclose(y[1, i], [1.0 / kept] * kept + [0.0] * (s_k - kept))


@pytest.mark.parametrize("log", [False, True])
def test_fully_masked_rows_give_zeros(log):
    fn = rf.log_softmax if log else rf.softmax
    # causal with S_q > S_k: the first S_q - S_k queries see nothing
    y = fn(np.ones((2, 5, 3)), causal=True)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[:, :2], 0.0)
    m = np.array([0.0, -np.inf, -np.inf, 0.0])
    y = fn(np.ones((3, 4)), mask=np.stack([m, np.full(4, -np.inf), m]))
    np.testing.assert_array_equal(y[1], 0.0)
    assert np.all(np.isfinite(y[[0, 2]][:, [0, 3]]))
    if not log:
        np.testing.assert_allclose(y[0], [0.5, 0.0, 0.0, 0.5])


def test_plain_softmax_follows_numpy_on_nan_and_inf():
    z = np.array(
        [
            [1.0, np.nan, 2.0, 0.5],  # NaN -> NaN row
            [np.inf, 1.0, 2.0, 0.5],  # +inf -> NaN row (inf - inf)
            [-np.inf] * 4,  # all -inf -> NaN row
            [-np.inf, 0.0, 1.0, 2.0],  # one -inf -> 0 there
            [np.inf, np.inf, 0.0, 0.0],
        ]
    )
    want = naive_numpy_softmax(z)
    assert np.isnan(want[:3]).all() and want[3, 0] == 0.0 and np.isnan(want[4]).all()
    for dtype in (F16, F32, F64):
        got = rf.softmax(z.astype(dtype))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[3].astype(np.float64), want[3], rtol=1e-3)
    # log_softmax: NaN rows alike, -inf where softmax gives 0
    got = rf.log_softmax(z)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert got[3, 0] == -np.inf


def test_masked_softmax_still_propagates_nan():
    x = np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]])
    y = rf.softmax(x, mask=np.zeros(3))
    assert np.isnan(y[0]).all() and not np.isnan(y[1]).any()


# ---- the NumPy path: axes, layouts, dtypes, out=, DLPack ------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
def test_axis(rng, axis):
    x = rng.standard_normal((4, 5, 6))
    for fn, ref in ((rf.softmax, sm.softmax_ref), (rf.log_softmax, sm.log_softmax_ref)):
        y = fn(x, axis=axis)
        moved = np.moveaxis(x, axis, -1)
        want = np.moveaxis(literal_softmax_rows(moved.reshape(-1, moved.shape[-1]), ref is sm.log_softmax_ref)
                           .reshape(moved.shape), -1, axis)  # fmt: skip
        np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_dtype_kept_and_close(rng, dtype):
    x = (rng.standard_normal((6, 33)) * 3).astype(dtype)
    for fn, ref in ((rf.softmax, sm.softmax_ref), (rf.log_softmax, sm.log_softmax_ref)):
        y = fn(x, scale=0.8)
        assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
        assert_close(y, ref(x, scale=0.8), dtype)


def test_non_contiguous_inputs(rng):
    base = rng.standard_normal((6, 10, 8))
    for x in (base[:, ::2, :], base.transpose(2, 0, 1), base[::-1, :, 1:]):
        np.testing.assert_allclose(rf.softmax(x), sm.softmax_ref(np.ascontiguousarray(x)), rtol=1e-15)
        dy = np.ones_like(x)
        np.testing.assert_allclose(rf.softmax_backward(dy, x, axis=0), sm.softmax_backward_ref(dy, x, 0))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,), (2, 0, 4)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    for fn in (rf.softmax, rf.log_softmax):
        y = fn(x)
        assert y.shape == shape and y.dtype == np.float32
    assert rf.softmax_backward(x, x).shape == shape
    assert rf.softmax(np.zeros((0, 4, 4)), causal=True).shape == (0, 4, 4)


def test_out_is_written_and_returned(rng):
    x = rng.standard_normal((4, 7)).astype(np.float32)
    out = poison(np, x.shape, np.float32)
    assert rf.softmax(x, out=out) is out
    assert_close(out, sm.softmax_ref(x), F32)
    out_t = poison(np, (7, 4), np.float32).T  # a non-contiguous out
    assert rf.log_softmax(x, out=out_t) is out_t
    assert_close(out_t, sm.log_softmax_ref(x), F32)
    dx = poison(np, x.shape, np.float32)
    assert rf.softmax_backward(x, out, out=dx) is dx
    assert_close(dx, sm.softmax_backward_ref(x, out), F32)
    y = x.copy()
    rf.softmax(y, out=y)  # in place
    assert_close(y, sm.softmax_ref(x), F32)


def test_dlpack_input():
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    y = rf.softmax(DLPackOnly(x), mask=DLPackOnly(np.zeros(8, np.float32)))
    assert isinstance(y, np.ndarray)
    assert_close(y, sm.softmax_ref(x), F32)
    dx = rf.log_softmax_backward(DLPackOnly(x), DLPackOnly(np.log(y)))
    assert_close(dx, sm.log_softmax_backward_ref(x, np.log(y)), F32)


# ---- argument errors -------------------------------------------------------------------------------------


def test_argument_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="x has dtype int64"):
        rf.softmax(np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match="x must be an array"):
        rf.softmax([[1.0, 2.0]])
    with pytest.raises(ValueError, match="axis=2"):
        rf.softmax(x, axis=2)
    with pytest.raises(TypeError, match="axis"):
        rf.softmax(x, axis=1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        rf.softmax(np.ones((), np.float32))
    for bad in (np.inf, np.nan, -np.inf):
        with pytest.raises(ValueError, match="scale"):
            rf.softmax(x, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            rf.softmax_backward(x, x, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        rf.log_softmax(x, scale=[2.0])
    with pytest.raises(TypeError, match="mask has dtype float64"):
        rf.softmax(x, mask=np.zeros(4))
    with pytest.raises(TypeError, match="mask has dtype bool"):
        rf.softmax(x, mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\)"):
        rf.softmax(x, mask=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="mask of shape"):
        rf.softmax(x, mask=np.zeros((2, 3, 4), np.float32))  # broadcasts, but to a bigger shape
    with pytest.raises(ValueError, match="causal"):
        rf.softmax(np.zeros(4, np.float32), causal=True)
    with pytest.raises(ValueError, match="causal"):
        rf.softmax(x, axis=0, causal=True)
    with pytest.raises(TypeError, match="causal"):
        rf.softmax(x, causal=1)
    with pytest.raises(ValueError, match="out has shape"):
        rf.softmax(x, out=np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        rf.softmax(x, out=np.zeros((3, 4), np.float64))
    with pytest.raises(ValueError, match="impl='cuda' runs on a GPU"):
        rf.softmax(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        rf.softmax(x, impl="triton")
    with pytest.raises(ValueError, match="version"):
        rf.softmax(x, version=2)  # CPU input: no CUDA kernel to pick
    with pytest.raises(ValueError, match="version must be one of"):
        rf.softmax(x, version=9)
    with pytest.raises(TypeError, match="version must be an int"):
        rf.softmax(x, version="2")
    with pytest.raises(ValueError, match="version must be one of"):
        rf.softmax_backward(x, x, version=5)
    with pytest.raises(ValueError, match="y has shape"):
        rf.softmax_backward(x, np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="y has dtype"):
        rf.log_softmax_backward(x, np.zeros((3, 4), np.float16))
    with pytest.raises(TypeError, match="dy has dtype"):
        rf.softmax_backward(np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32))


# ---- kernel selection and the mask layout (pure Python) ------------------------------------------------


def _vw(dtype, cols):
    w = 16 // np.dtype(dtype).itemsize
    return w if cols % w == 0 else 1


SELECTION_COLS = sorted(
    {1, 2, 7, 8, 19, 97, 111, 256, 257, 989, 1000, 1024, 1025, 2048, 2049, 4096, 4097, 8192, 16384, 16385}
    | {32000, 32768, 32769, 50257, 65536, 131072, 131073, 262144, 262145, 1 << 20}
)


def test_every_selectable_expression_is_registered():
    registered = set(modules.registered_families()["softmax"])
    for dtype in (F16, F32):
        for cols in SELECTION_COLS:
            for vw in {1, _vw(dtype, cols)}:
                for masked in (False, True):
                    for clusters in (False, True):
                        default = sm._default_forward_version(cols, masked, clusters)
                        assert default != 5 or clusters
                        plan = sm._forward_plan(default, dtype, vw, cols, 3, masked)
                        assert plan is not None and plan.expr in registered, (
                            dtype,
                            cols,
                            vw,
                            masked,
                            default,
                        )
                        for version in sm.FORWARD_VERSIONS:
                            plan = sm._forward_plan(version, dtype, vw, cols, 3, masked)
                            limit = sm.max_cols(version, dtype, vw, masked=masked)
                            assert (plan is not None) == (limit is None or cols <= limit), (version, cols)
                            assert plan is None or plan.expr in registered, plan.expr
                default = sm._default_backward_version(dtype, vw, cols)
                assert sm._backward_plan(default, dtype, vw, cols, 3).expr in registered
                for version in sm.BACKWARD_VERSIONS:
                    plan = sm._backward_plan(version, dtype, vw, cols, 3)
                    limit = sm.max_cols(version, dtype, vw, backward=True)
                    assert (plan is not None) == (limit is None or cols <= limit), (version, cols)
                    assert plan is None or plan.expr in registered, plan.expr


@pytest.mark.parametrize(
    "dtype, cols, clusters, version, expr",
    [
        (F16, 1024, True, 2, "softmax_forward_v2<__half, 8, 4, false>"),
        (F16, 4096, True, 3, "softmax_forward_v3<__half, 8, 4, 128, false>"),
        (F16, 32000, True, 3, "softmax_forward_v3<__half, 8, 4, 1024, false>"),  # measured faster than v5
        (F16, 131072, True, 5, "softmax_forward_v5<__half, 8, 4, 512, 8, false>"),
        (F32, 8192, True, 3, "softmax_forward_v3<float, 4, 8, 256, false>"),
        (F16, 32000, False, 3, "softmax_forward_v3<__half, 8, 4, 1024, false>"),
        (F16, 131072, False, 4, "softmax_forward_v4<__half, 8, 512, false>"),
        (F16, 1 << 20, True, 4, "softmax_forward_v4<__half, 8, 512, false>"),
    ],
)
def test_default_selection_for_the_benchmark_shapes(dtype, cols, clusters, version, expr):
    assert sm._default_forward_version(cols, False, clusters) == version
    assert sm._forward_plan(version, dtype, 16 // dtype.itemsize, cols, 64, False).expr == expr


def test_v5_grid_is_rows_times_cluster():
    plan = sm._forward_plan(5, F16, 8, 131072, 1024, False)
    assert (plan.grid, plan.block) == (1024 * 8, 512)
    plan = sm._forward_plan(2, F32, 4, 100, 9, True)
    assert (plan.grid, plan.block) == (3, 128)  # 4 rows (warps) per block


def _mask_cases():
    return [
        ((2, 3, 4, 6), (6,), -1, (1, 1)),  # one row for all
        ((2, 3, 4, 6), (4, 6), -1, (1, 4)),  # (S_q, S_k) under (B, H, S_q, S_k)
        ((2, 3, 4, 6), (2, 1, 1, 6), -1, (12, 2)),  # (B, 1, 1, S_k) padding
        ((2, 3, 4, 6), (3, 4, 6), -1, (1, 12)),
        ((2, 3, 4, 6), (2, 3, 4, 6), -1, (1, 24)),
        ((2, 3, 4, 6), (2, 1, 4, 6), -1, None),  # two blocks of mask axes: materialised
        ((2, 3, 4, 6), (4, 1), -1, None),  # constant along the row: materialised
        ((5, 7), (5, 1), 0, (1, 1)),  # softmax along axis 0: a (5,) column of the mask per row
        ((5, 7), (5, 7), 0, None),  # axis 0 of a full mask: transposed, materialised
    ]


@pytest.mark.parametrize("shape, mask_shape, axis, expected", _mask_cases())
def test_mask_rows_layout(rng, shape, mask_shape, axis, expected):
    mask = rng.standard_normal(mask_shape)
    base, div, mod = sm._mask_rows(mask, shape, axis)
    if expected is not None:
        assert (div, mod) == expected
        assert np.shares_memory(base, mask)  # no copy
    want = np.moveaxis(np.broadcast_to(mask, shape), axis, -1).reshape(-1, shape[axis])
    rows, cols = want.shape
    full = sm._mask_full(base, div, mod, rows, cols)
    np.testing.assert_array_equal(full, want)


# ---- the kernels compile without spills within their register budget (nvcc, no GPU needed) ---------------

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_hot_kernels_fit_their_register_budget(tmp_path):
    """The default kernels of the benchmark shapes compile for sm_90 without spills and keep the occupancy
    they were sized for: forward <= 64 registers (8+ blocks of 128 threads, or 2 of 512, per SM); backward
    <= 72 at 128 threads (7 blocks: 28 warps with 128 bytes each in flight per thread)."""
    budget = {
        sm._forward_plan(2, F16, 8, 1024, 1, False).expr: 64,
        sm._forward_plan(3, F16, 8, 4096, 1, False).expr: 64,
        sm._forward_plan(5, F16, 8, 32000, 1, False).expr: 64,
        sm._forward_plan(5, F16, 8, 131072, 1, False).expr: 64,
        sm._forward_plan(3, F32, 4, 8192, 1, False).expr: 64,
        sm._backward_plan(2, F16, 8, 1024, 1).expr: 72,
        sm._backward_plan(3, F16, 8, 4096, 1).expr: 72,
        sm._backward_plan(3, F16, 8, 32768, 1).expr: 64,
    }
    source = tmp_path / "hot.cu"
    lines = ['#include "softmax.cu"', "void* const hot[] = {", *[f"    (void*)&{e}," for e in budget], "};"]
    source.write_text("\n".join(lines) + "\n")
    cmd = [NVCC, *modules.COMPILE_OPTIONS, "-arch=sm_90", f"-I{modules.source_dir()}", "-Xptxas=-v"]
    proc = subprocess.run(
        [*cmd, "-c", str(source), "-o", str(tmp_path / "hot.o")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # ptxas reports per mangled entry: "Compiling entry function '_Z..'", then spills, then "Used N registers"
    used: dict[str, tuple[int, int]] = {}
    entry = None
    for line in proc.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            entry, spill = m.group(1), 0
        elif (m := re.search(r"(\d+) bytes spill stores", line)) and entry:
            spill = int(m.group(1))
        elif (m := re.search(r"Used (\d+) registers", line)) and entry:
            used[entry[: entry.index("Ev") + 1]] = (int(m.group(1)), spill)
    assert len(used) == len(budget), proc.stderr[-4000:]
    for expr, limit in budget.items():
        regs, spill = used[_mangled(expr)]
        assert spill == 0 and regs <= limit, (
            f"{expr}: {regs} registers, {spill} bytes spilled (budget {limit})"
        )


def _mangled(expr: str) -> str:
    """The Itanium-mangled name of a kernel instantiation `name<T, ints..., bools...>` (void, its
    parameters after the template arguments, which identify it already, are cut off)."""
    name, args = expr[:-1].split("<")
    parts = [a.strip() for a in args.split(",")]
    code = {"__half": "6__half", "float": "f"}[parts[0]]
    for a in parts[1:]:
        code += {"true": "Lb1E", "false": "Lb0E"}.get(a, f"Li{a}E")
    return f"_Z{len(name)}{name}I{code}E"


# ---- GPU: every kernel version against the reference -----------------------------------------------------

GPU_COLS = (1, 19, 97, 111, 989, 1000, 1025, 4097, 32000, 131073)
FULL_COLS = (8, 256, 1024, 2048, 8192, 16384, 16385, 32768, 65536, 131072, 262144)


def _applies(cp, version: int, dtype, cols: int, *, masked=False, backward=False, vw=None) -> bool:
    if version == 5 and not backward and not sm._has_clusters(cp.cuda.Device().id):
        return False
    limit = sm.max_cols(
        version, dtype, _vw(dtype, cols) if vw is None else vw, backward=backward, masked=masked
    )
    return limit is None or cols <= limit


def _rows_for(cols: int) -> tuple[int, ...]:
    return (1, 3, 1000) if cols <= 4097 else (1, 3)


def _forward_case(cp, rng, rows, cols, dtype, version, log, **kw):
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    xd = cp.asarray(x)
    out = poison(cp, x.shape, dtype)
    fn = rf.log_softmax if log else rf.softmax
    got = fn(xd, out=out, version=version, **{k: (cp.asarray(v) if isinstance(v, np.ndarray) else v)
                                              for k, v in kw.items()})  # fmt: skip
    assert got is out
    ref = (sm.log_softmax_ref if log else sm.softmax_ref)(x, **kw)
    # log_softmax = z - max z - log sum: its rounding error is relative to the logits z, not to the result
    # (which is exactly 0 for a single column)
    logits = float(np.max(np.abs(x.astype(np.float64)), initial=0.0)) * abs(kw.get("scale") or 1.0)
    name = f"v{version} {rows}x{cols} {dtype} log={log}"
    assert_close(out, ref, dtype, name=name, scale=logits if log else None)


def _grid(cols_list):
    return [(rows, cols) for cols in cols_list for rows in _rows_for(cols)]


@pytest.mark.gpu
@pytest.mark.parametrize("version", sm.FORWARD_VERSIONS)
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("rows, cols", _grid(GPU_COLS))
def test_gpu_forward_versions(cp, rng, rows, cols, dtype, version):
    if not _applies(cp, version, dtype, cols):
        pytest.skip(f"version {version} does not take {cols} columns")
    for log in (False, True):
        _forward_case(cp, rng, rows, cols, dtype, version, log, scale=0.7)


@pytest.mark.gpu
@pytest.mark.full
@pytest.mark.parametrize("version", sm.FORWARD_VERSIONS)
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("rows, cols", _grid(FULL_COLS))
def test_gpu_forward_versions_full(cp, rng, rows, cols, dtype, version):
    if not _applies(cp, version, dtype, cols):
        pytest.skip(f"version {version} does not take {cols} columns")
    for log in (False, True):
        _forward_case(cp, rng, rows, cols, dtype, version, log)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, *sm.FORWARD_VERSIONS])
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("cols", [1, 24, 97, 1000, 4097, 32000, 40000])
def test_gpu_forward_masks_and_causal(cp, rng, cols, dtype, version):
    if not _applies(cp, version or 1, dtype, cols, masked=True):
        pytest.skip(f"version {version} does not take {cols} masked columns")
    b, h, s_q = 2, 2, 3
    x = (rng.standard_normal((b, h, s_q, cols)) * 2).astype(dtype)
    pad = np.zeros((b, 1, 1, cols), dtype)
    pad[1, ..., cols // 2 :] = -np.inf  # padding of the second sequence
    pad[0, ..., :] = -np.inf if cols == 1 else 0  # cols == 1: a fully masked sequence
    masks = [
        None,
        (rng.standard_normal(cols) * 2).astype(dtype),  # (S_k,)
        (rng.standard_normal((s_q, cols)) * 2).astype(dtype),  # (S_q, S_k)
        pad,  # (B, 1, 1, S_k)
        (rng.standard_normal((b, 1, s_q, 1)) * 2).astype(dtype),  # materialised by the launcher
    ]
    for mask in masks:
        for causal in (False, True):
            if mask is None and not causal:
                continue
            for log in (False, True):
                fn = rf.log_softmax if log else rf.softmax
                out = poison(cp, x.shape, dtype)
                md = None if mask is None else cp.asarray(mask)
                fn(cp.asarray(x), scale=0.5, mask=md, causal=causal, out=out, version=version)
                ref = (sm.log_softmax_ref if log else sm.softmax_ref)(x, scale=0.5, mask=mask, causal=causal)
                name = f"v{version} cols={cols} mask={None if mask is None else mask.shape} causal={causal}"
                finite = np.abs(
                    x.astype(np.float64) * 0.5 + (0 if mask is None else np.where(np.isinf(mask), 0, mask))
                )
                assert_close(out, ref, dtype, name=name, scale=float(finite.max()) if log else None)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, *sm.FORWARD_VERSIONS])
def test_gpu_causal_more_queries_than_keys(cp, rng, version):
    """S_q > S_k: the first S_q - S_k query rows see nothing and give zeros (log_softmax too)."""
    if not _applies(cp, version or 1, F32, 5, masked=True):
        pytest.skip("version does not apply")
    x = rng.standard_normal((2, 9, 5)).astype(np.float32)
    for log in (False, True):
        fn = rf.log_softmax if log else rf.softmax
        y = fn(cp.asarray(x), causal=True, version=version).get()
        assert not np.isnan(y).any()
        np.testing.assert_array_equal(y[:, :4], 0.0)
        assert_close(y, (sm.log_softmax_ref if log else sm.softmax_ref)(x, causal=True), F32)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, *sm.FORWARD_VERSIONS])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_nan_and_inf_follow_the_reference(cp, version, dtype):
    for cols in (16, 1000, 40000):
        if not _applies(cp, version or 1, dtype, cols, masked=True):
            continue
        x = np.random.default_rng(5).standard_normal((6, cols)).astype(dtype)
        x[0, 3] = np.nan
        x[1, 5] = np.inf
        x[2, :] = -np.inf
        x[3, 7] = -np.inf
        x[4, :3] = -np.inf
        mask = np.zeros(cols, dtype)
        for kw in ({}, {"mask": mask}):
            for log in (False, True):
                fn = rf.log_softmax if log else rf.softmax
                kwd = {k: cp.asarray(v) for k, v in kw.items()}
                got = fn(cp.asarray(x), version=version, **kwd)
                ref = (sm.log_softmax_ref if log else sm.softmax_ref)(x, **kw)
                assert_close(got, ref, dtype, name=f"v{version} cols={cols} {kw.keys()} log={log}")
        # plain: rows 0-2 NaN like NumPy; masked: row 2 (all -inf) gives zeros
        assert np.isnan(rf.softmax(cp.asarray(x), version=version).get()[:3]).all()
        masked = rf.softmax(cp.asarray(x), mask=cp.asarray(mask), version=version).get()
        assert np.isnan(masked[:2]).all() and (masked[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("version", sm.FORWARD_VERSIONS)
def test_gpu_misaligned_input_takes_the_scalar_path(cp, rng, version):
    rows, cols = 5, 1024
    if not _applies(cp, version, F16, cols, vw=1):
        pytest.skip("version does not apply")
    buf = cp.asarray(rng.standard_normal(rows * cols + 1).astype(np.float16))
    x = buf[1:].reshape(rows, cols)  # 2 bytes past a 16-byte boundary
    assert x.data.ptr % 16 != 0
    assert_close(rf.softmax(x, version=version), sm.softmax_ref(x.get()), F16)


@pytest.mark.gpu
def test_gpu_in_place_axis_and_layouts(cp, rng):
    x = rng.standard_normal((4, 6, 40)).astype(np.float32)
    xd = cp.asarray(x)
    assert rf.softmax(xd, out=xd) is xd  # in place
    assert_close(xd, sm.softmax_ref(x), F32)
    for axis in (0, 1, -1):
        assert_close(rf.log_softmax(cp.asarray(x), axis=axis), sm.log_softmax_ref(x, axis), F32)
    view = cp.asarray(x)[:, ::2, 3:]
    assert_close(rf.softmax(view), sm.softmax_ref(x[:, ::2, 3:]), F32)
    out = poison(cp, (40, 6, 4), np.float32).transpose(2, 1, 0)  # non-contiguous out
    assert rf.softmax(cp.asarray(x), out=out) is out
    assert_close(out, sm.softmax_ref(x), F32)
    for shape in ((0, 7), (3, 0)):
        z = cp.zeros(shape, cp.float16)
        assert rf.softmax(z).shape == shape and rf.softmax_backward(z, z).shape == shape


@pytest.mark.gpu
def test_gpu_mixed_devices_and_dlpack(cp):
    x = cp.ones((3, 8), cp.float32)
    with pytest.raises(ValueError, match="mask is a CPU array"):
        rf.softmax(x, mask=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="y is a CPU array"):
        rf.softmax_backward(x, np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="out is a CPU array"):
        rf.softmax(x, out=np.zeros((3, 8), np.float32))
    with pytest.raises(TypeError, match="x has dtype float64"):
        rf.softmax(cp.ones((3, 8)))
    with pytest.raises(ValueError, match="version=2 takes rows of at most"):
        rf.softmax(cp.ones((2, 5000), cp.float32), version=2)
    y = rf.softmax(DLPackOnly(x))
    assert_close(y, np.full((3, 8), 1 / 8), F32)


@pytest.mark.gpu
@pytest.mark.parametrize("version", sm.BACKWARD_VERSIONS)
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("rows, cols", _grid(GPU_COLS))
def test_gpu_backward_versions(cp, rng, rows, cols, dtype, version):
    if not _applies(cp, version, dtype, cols, backward=True):
        pytest.skip(f"version {version} does not take {cols} columns")
    x = rng.standard_normal((rows, cols))
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    for log in (False, True):
        y = (sm.log_softmax_ref if log else sm.softmax_ref)(x).astype(dtype)
        out = poison(cp, (rows, cols), dtype)
        fn = rf.log_softmax_backward if log else rf.softmax_backward
        assert fn(cp.asarray(dy), cp.asarray(y), scale=1.3, out=out, version=version) is out
        ref = (sm.log_softmax_backward_ref if log else sm.softmax_backward_ref)(dy, y, scale=1.3)
        assert_close(out, ref, dtype, name=f"backward v{version} {rows}x{cols} log={log}")


@pytest.mark.gpu
def test_gpu_backward_in_place_and_axis(cp, rng):
    x = rng.standard_normal((5, 7, 33)).astype(np.float32)
    y = sm.softmax_ref(x, axis=1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert_close(
        rf.softmax_backward(cp.asarray(dy), cp.asarray(y), axis=1), sm.softmax_backward_ref(dy, y, 1), F32
    )
    dyd = cp.asarray(dy)
    rf.softmax_backward(dyd, cp.asarray(y), axis=-1, out=dyd)  # dx over dy
    assert_close(dyd, sm.softmax_backward_ref(dy, y), F32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, cols", [(F16, 1000), (F32, 19), (F32, 4097), (F16, 32000)])
def test_gpu_numba_path(cp, rng, dtype, cols):
    """The Numba kernels through the public ops (their own tests cover their variants)."""
    x = (rng.standard_normal((2, 3, cols)) * 2).astype(dtype)
    mask = (rng.standard_normal((3, cols))).astype(dtype)
    for log in (False, True):
        fn = rf.log_softmax if log else rf.softmax
        ref = sm.log_softmax_ref if log else sm.softmax_ref
        assert_close(fn(cp.asarray(x), scale=0.9, impl="numba"), ref(x, scale=0.9), dtype)
        got = fn(cp.asarray(x), mask=cp.asarray(mask), causal=True, impl="numba")
        assert_close(got, ref(x, mask=mask, causal=True), dtype)
        y = ref(x).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        bwd = rf.log_softmax_backward if log else rf.softmax_backward
        bref = sm.log_softmax_backward_ref if log else sm.softmax_backward_ref
        assert_close(
            bwd(cp.asarray(dy), cp.asarray(y), scale=2.0, impl="numba"), bref(dy, y, scale=2.0), dtype
        )
    with pytest.raises(ValueError, match="does not apply to the numba path"):
        rf.softmax(cp.asarray(x), impl="numba", version=2)
