"""Activations: GELU (tanh or erf form, optional fused bias), SiLU and SwiGLU, forward and backward.

Formulas (u = x + bias, the bias of shape (cols,) broadcast along the leading axes):

    gelu, approximate="tanh":  0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
    gelu, approximate="none":  0.5 u (1 + erf(u / sqrt(2)))
    silu(x)          = x sigmoid(x)
    swiglu(gate, up) = silu(gate) * up

Arrays run where they live: NumPy inputs run the float64 references below (`*_ref`, vectorised) and are
cast back to the input dtype; CuPy inputs run the kernels of `cuda_src/activations.cu` (impl="cuda", the
default) or the Numba ones (impl="numba"). The references evaluate the functions in forms without
cancellation, 1 + tanh(z) = 2 sigmoid(2z) and 1 + erf(v) = erfc(-v), with sigmoid(z) from exp(-|z|), so
small outputs at negative arguments keep their relative accuracy. The CUDA kernels use the sigmoid form for
tanh too, but 1 + erff(v) for the erf form (erfcf costs twice the instructions and would make fp16 GELU
compute-bound): there the error at u < -2 is small relative to the largest outputs, not to itself.

Kernel selection (see the header of activations.cu for the versions):
  forward ops, swiglu_backward, gelu_backward without a bias:
      v2 (16-byte vectors) when every pointer is 16-byte aligned and, with a bias, cols % (16 / itemsize)
      == 0; else v1 (scalar). `version=2` on an input v2 cannot take runs v1.
  gelu_backward with a bias:
      v3 (one pass: dx and fp32 column sums per chunk of rows, then an ordered reduction over chunks), with
      16-byte vectors when the same rule allows, else one element per thread. `version=1|2` run the dx
      kernel of that version, then a separate column-sum pass over dx.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.kernels.occupancy import device_limits, resident_blocks
from rawformer.kernels.specialize import cpp_bool, full_vector_width, vector_width
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64, finish

__all__ = [
    "gelu",
    "gelu_backward",
    "gelu_backward_ref",
    "gelu_ref",
    "silu",
    "silu_ref",
    "swiglu",
    "swiglu_backward",
    "swiglu_backward_ref",
    "swiglu_ref",
]

_FAMILY = "activations"
APPROXIMATIONS = ("tanh", "none")
FORWARD_VERSIONS = (1, 2)  # gelu, silu, swiglu
GELU_BACKWARD_VERSIONS = (1, 2, 3)
SWIGLU_BACKWARD_VERSIONS = (1, 2)

_THREADS = 256  # threads per block of every kernel but column_reduce
_UNROLL = 4  # kUnroll in activations.cu: vectors (v2) or rows (v3) per thread per step; sizes the grid
_MAX_BLOCKS = 1 << 20  # v1/v2 loop grid-stride beyond this many blocks
_NULL = np.uintp(0)  # a null device pointer, passed by value like any 8-byte scalar
_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715


# ---- float64 references ---------------------------------------------------------------------------------
#
# erf / erfc without SciPy, vectorised.
#   |x| < 1.5:  erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (2n+1)!!, a series of positive terms (no
#               cancellation).
#   |x| >= 1.5: erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), a continued
#               fraction evaluated from the bottom up; exp(-x^2) is split as exp(-hi^2) exp(-(2 hi + lo) lo),
#               hi = x rounded to 12 fraction bits, so hi^2 is exact and the rounding of x^2 does not reach
#               the result.
# Both are cut off by bands of |x|: the number of series terms / fraction levels below was measured to reach
# the float64 noise floor over each band (the slowest band, [1.5, 2), needs 100 levels).
# Measured against math.erf / math.erfc on 600k points in [-30, 30] (and in tests/test_activations.py): erf
# within 1.1e-15 relative everywhere; erfc within 1e-15 relative for x >= 1.5 and x < 0, and within 2.4e-14
# on [0, 1.5), where it is 1 - erf(x) (erfc(1.5) = 0.034: the subtraction costs 1.5 digits). Denormal
# results (erfc(x), x > 26.5) keep only their absolute accuracy.

_ERF_SPLIT = 1.5
_ERF_SERIES_BANDS = ((0.5, 12), (1.0, 20), (1.5, 30))  # (upper end of |x|, terms)
_ERFC_CF_BANDS = ((2.0, 100), (3.0, 56), (5.0, 32), (math.inf, 18))  # (upper end of x, levels)


def _by_band(a: np.ndarray, bands: tuple[tuple[float, int], ...], f: Any) -> np.ndarray:
    """f(a[band], n) over each band of |a| (a band's lower end is the previous band's upper end)."""
    out = np.empty_like(a)
    mag = np.abs(a)
    lower = 0.0
    for upper, n in bands:
        sel = (mag >= lower) & (mag < upper) if upper < math.inf else mag >= lower
        if sel.any():
            out[sel] = f(a[sel], n)
        lower = upper
    return out


def _erf_series(x: np.ndarray, terms: int) -> np.ndarray:
    term = x.copy()
    total = x.copy()
    two_x2 = 2.0 * x * x
    for n in range(1, terms):
        term *= two_x2
        term *= 1.0 / (2 * n + 1)
        total += term
    return (2.0 / math.sqrt(math.pi)) * np.exp(-x * x) * total


def _erfc_cf(x: np.ndarray, levels: int) -> np.ndarray:
    """erfc(x) for x >= _ERF_SPLIT (inf included)."""
    k = np.zeros_like(x)
    for n in range(levels, 0, -1):  # k <- (n/2) / (x + k), in place
        k += x
        np.divide(0.5 * n, k, out=k)
    finite = np.where(np.isinf(x), 0.0, x)  # erfc(inf) = 0 below; keeps inf - inf out of the split
    hi = np.round(finite * 4096.0) / 4096.0
    lo = finite - hi
    tail = np.exp(-hi * hi) * np.exp(-(2.0 * hi + lo) * lo) / (math.sqrt(math.pi) * (x + k))
    return np.where(np.isinf(x), 0.0, tail)


def _erf(x: Any) -> np.ndarray:
    """erf(x) in float64, vectorised (accuracy: see the comment above)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full_like(x, np.nan)  # NaN stays NaN
    small = np.abs(x) < _ERF_SPLIT
    out[small] = _by_band(x[small], _ERF_SERIES_BANDS, _erf_series)
    big = np.abs(x) >= _ERF_SPLIT
    out[big] = np.copysign(1.0 - _by_band(np.abs(x[big]), _ERFC_CF_BANDS, _erfc_cf), x[big])
    return out


def _erfc(x: Any) -> np.ndarray:
    """erfc(x) = 1 - erf(x) in float64, vectorised, accurate relative to itself for large x."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full_like(x, np.nan)
    small = np.abs(x) < _ERF_SPLIT
    out[small] = 1.0 - _by_band(x[small], _ERF_SERIES_BANDS, _erf_series)
    big = np.abs(x) >= _ERF_SPLIT
    tail = _by_band(np.abs(x[big]), _ERFC_CF_BANDS, _erfc_cf)
    out[big] = np.where(x[big] > 0, tail, 2.0 - tail)
    return out


def _sigmoid_pair(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid(z), 1 - sigmoid(z)) from exp(-|z|): no overflow, no cancellation."""
    e = np.exp(-np.abs(z))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = z >= 0
    return np.where(pos, big, small), np.where(pos, small, big)


def _tanh_arg(u: np.ndarray) -> np.ndarray:
    """2 z = 2 sqrt(2/pi) (u + 0.044715 u^3), so that 0.5 (1 + tanh(z)) = sigmoid(2 z); +-inf past 1e102."""
    with np.errstate(over="ignore"):
        return 2.0 * _K0 * (u + _K1 * u**3)


def _biased(x: Any, bias: Any) -> np.ndarray:
    u = f64(x)
    return u if bias is None else u + f64(bias)


def gelu_ref(x: Any, bias: Any = None, approximate: str = "tanh") -> np.ndarray:
    """float64 gelu(x + bias); see the module docstring for the formulas. x: (..., cols), bias: (cols,)."""
    tanh = _check_approximate(approximate)
    u = _biased(x, bias)
    if tanh:
        s, _ = _sigmoid_pair(_tanh_arg(u))
        return u * s
    return 0.5 * u * _erfc(-u / math.sqrt(2.0))  # 1 + erf(v) = erfc(-v)


def gelu_backward_ref(
    dy: Any, x: Any, bias: Any = None, approximate: str = "tanh"
) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 (dx, dbias): dx = dy * gelu'(x + bias), dbias = dx summed over all leading axes (None
    without a bias).

    gelu_tanh'(u) = s + 2 u s (1 - s) k0 (1 + 3 k1 u^2), s = sigmoid(2 k0 (u + k1 u^3))
    gelu_erf'(u)  = 0.5 erfc(-u / sqrt 2) + u exp(-u^2 / 2) / sqrt(2 pi)
    """
    tanh = _check_approximate(approximate)
    u = _biased(x, bias)
    if tanh:
        s, one_minus_s = _sigmoid_pair(_tanh_arg(u))
        t = s * one_minus_s  # 0 for large |u|, where u^3 may overflow: keep 0 * inf = NaN out
        with np.errstate(over="ignore", invalid="ignore"):
            grad = s + np.where(t == 0.0, 0.0, 2.0 * u * t * _K0 * (1.0 + 3.0 * _K1 * u * u))
    else:
        grad = 0.5 * _erfc(-u / math.sqrt(2.0)) + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    dx = f64(dy) * grad
    dbias = None if bias is None else dx.sum(axis=tuple(range(dx.ndim - 1)))
    return dx, dbias


def silu_ref(x: Any) -> np.ndarray:
    """float64 silu(x) = x sigmoid(x)."""
    g = f64(x)
    return g * _sigmoid_pair(g)[0]


def swiglu_ref(gate: Any, up: Any) -> np.ndarray:
    """float64 silu(gate) * up."""
    return silu_ref(gate) * f64(up)


def swiglu_backward_ref(dy: Any, gate: Any, up: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 (dgate, dup): dgate = dy up s (1 + gate (1 - s)), dup = dy gate s, with s = sigmoid(gate)."""
    g, d = f64(gate), f64(dy)
    s, one_minus_s = _sigmoid_pair(g)
    return d * f64(up) * s * (1.0 + g * one_minus_s), d * g * s


# ---- argument checks -----------------------------------------------------------------------------------


def _check_approximate(approximate: Any) -> bool:
    """True for the tanh form, False for the erf form."""
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return approximate == "tanh"


def _check_bias(bias: Any, x: Any) -> None:
    if x.ndim == 0:
        raise ValueError("bias needs x with at least one dimension (bias is broadcast along x's last axis)")
    _checks.check_shape(bias, "bias", (x.shape[-1],))


# ---- kernel selection ------------------------------------------------------------------------------------


def _elementwise_expr(kernel: str, dtype: Any, version: int, vw: int, flags: tuple[bool, ...] = ()) -> str:
    """The name expression of `kernel`_v1 / _v2; v2 falls back to v1 where it cannot vectorise (vw == 1)."""
    t = cuda_type(dtype)
    rest = "".join(f", {cpp_bool(f)}" for f in flags)
    if version == 1 or vw == 1:
        return f"{kernel}_v1<{t}{rest}>"
    return f"{kernel}_v2<{t}, {vw}{rest}>"


def _gelu_backward_v3_expr(dtype: Any, vw: int, tanh: bool) -> str:
    return f"gelu_backward_v3<{cuda_type(dtype)}, {vw}, {cpp_bool(tanh)}>"


def _column_partial_sums_expr(dtype: Any, vw: int) -> str:
    return f"column_partial_sums<{cuda_type(dtype)}, {vw}>"


def _column_reduce_expr(dtype: Any) -> str:
    return f"column_reduce<{cuda_type(dtype)}>"


def _instantiations() -> list[str]:
    """Every name expression the launchers below can request (built by the same functions they use)."""
    exprs: list[str] = []
    for dtype in _checks.GPU_DTYPES:
        widths = (1, full_vector_width(dtype))
        for version in FORWARD_VERSIONS:
            vw = widths[version - 1]
            for tanh in (True, False):
                for has_bias in (True, False):
                    exprs.append(_elementwise_expr("gelu_forward", dtype, version, vw, (tanh, has_bias)))
                    exprs.append(_elementwise_expr("gelu_backward", dtype, version, vw, (tanh, has_bias)))
            exprs.append(_elementwise_expr("silu_forward", dtype, version, vw))
            exprs.append(_elementwise_expr("swiglu_forward", dtype, version, vw))
            exprs.append(_elementwise_expr("swiglu_backward", dtype, version, vw))
        for vw in widths:
            for tanh in (True, False):
                exprs.append(_gelu_backward_v3_expr(dtype, vw, tanh))
            exprs.append(_column_partial_sums_expr(dtype, vw))
        exprs.append(_column_reduce_expr(dtype))
    return exprs


register_family(_FAMILY, _instantiations)


def _elementwise_grid(n: int, vw: int) -> tuple[int, ...]:
    per_block = _THREADS * (_UNROLL if vw > 1 else 1)
    return (max(1, min(-(-(n // vw) // per_block), _MAX_BLOCKS)),)


_REDUCE_BLOCK = (32, 8)  # column_reduce's block: (kReduceX, kReduceY) in activations.cu
_STRIP_WAVES = 2  # column-strip grids are sized to this many full waves of resident blocks


def _strip_plan(rows: int, cols: int, vw: int, wave: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Launch shape of a column-strip kernel: (grid, block, rows_per_chunk).

    Block (bx, by) = 256 threads, bx column-vectors wide (at most 32, so a warp reads 32 consecutive vectors
    of a row; fewer when the matrix is narrower, so the block still fills). The rows are cut into equal
    chunks so that the grid is at most `wave` blocks (_STRIP_WAVES full waves of resident blocks: no
    partial last wave), each thread getting at least one row; each chunk writes one fp32 row of partial
    sums that column_reduce adds up.
    """
    vcols = cols // vw
    bx = min(32, 1 << (vcols - 1).bit_length())
    by = _THREADS // bx
    grid_x = -(-vcols // bx)
    chunks = max(1, min(wave // grid_x, -(-rows // by), 65535))
    rows_per_chunk = -(-rows // chunks)
    chunks = -(-rows // rows_per_chunk)
    return (grid_x, chunks), (bx, by), rows_per_chunk


def _column_sums(
    kernel_expr: str, head: tuple[Any, ...], rows: int, cols: int, vw: int, dbias: Any, bytes_moved: int
) -> None:
    """Launch a column-strip kernel (`head`: its arguments before `partial`) and reduce its chunks."""
    cp = backend.require_cupy()
    kernel = get_function(_FAMILY, kernel_expr)
    shared_mem = _THREADS * vw * 4  # one fp32 partial sum per thread and vector lane
    limits = device_limits()
    wave = limits.sms * resident_blocks(kernel, _THREADS, shared_mem, limits) * _STRIP_WAVES
    grid, block, rows_per_chunk = _strip_plan(rows, cols, vw, wave)
    partial = cp.empty((grid[1], cols), dtype=np.float32)
    launch(
        kernel,
        grid,
        block,
        (*head, partial, i32(rows), i32(cols), i32(rows_per_chunk)),
        shared_mem=shared_mem,
        bytes_moved=bytes_moved,
    )
    launch(
        get_function(_FAMILY, _column_reduce_expr(dbias.dtype)),
        (-(-cols // _REDUCE_BLOCK[0]),),
        _REDUCE_BLOCK,
        (partial, dbias, i32(grid[1]), i32(cols)),
        bytes_moved=partial.nbytes + dbias.nbytes,
    )


# ---- launcher plumbing -----------------------------------------------------------------------------------


def _contiguous_flat(a: Any) -> Any:
    """A C-contiguous 1-D view of `a` (one copy when `a` is not laid out that way)."""
    xp = backend.array_module(a)
    return xp.ascontiguousarray(a).reshape(-1)


def _rows(a: Any) -> Any:
    """`a` as a C-contiguous (rows, cols) matrix, cols = a.shape[-1] (a 0-d array is 1 x 1)."""
    xp = backend.array_module(a)
    a = xp.ascontiguousarray(a)
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


def _output(out: Any, inputs: list[Any]) -> Any:
    """A C-contiguous flat buffer for a result: `out` itself when the kernel may write it directly (it is
    contiguous, and each input is either the very same buffer, which elementwise kernels may update in place,
    or does not overlap it), else a fresh array (copied into `out` afterwards)."""
    cp = backend.require_cupy()
    like = inputs[0]
    if out is not None and out.flags.c_contiguous:
        if all(a.data.ptr == out.data.ptr or not cp.may_share_memory(a, out) for a in inputs):
            return out.reshape(-1)
    return cp.empty(like.size, dtype=like.dtype)


def _arg(a: Any) -> Any:
    """A kernel pointer argument: the array, or a NULL pointer for an absent optional one."""
    return _NULL if a is None else a


def _run_elementwise(
    kernel: str,
    version: int,
    flags: tuple[bool, ...],
    inputs: list[Any],
    bias: Any,
    outputs: list[Any],
    cols: int | None,
) -> int:
    """Launch `kernel`_v1/_v2 over flat contiguous CuPy arrays; returns the vector width used.

    cols is None for kernels without a bias argument (silu, swiglu); else the row length (1 without bias).
    """
    dtype = inputs[0].dtype
    n = inputs[0].size
    has_bias = bias is not None
    vw = vector_width(dtype, (*inputs, *outputs, bias), cols if has_bias else None)
    vw = 1 if version == 1 else vw  # v1 is scalar: size its grid for one element per thread
    expr = _elementwise_expr(kernel, dtype, version, vw, flags)
    if cols is None:
        args = (*inputs, *outputs, np.int64(n))
    else:
        args = (*inputs, _arg(bias), *outputs, np.int64(n), i32(cols))
    launch(
        get_function(_FAMILY, expr),
        _elementwise_grid(n, vw),
        (_THREADS,),
        args,
        bytes_moved=(len(inputs) + len(outputs)) * n * dtype.itemsize,
    )
    return vw


def _numba_activations() -> Any:
    # Imported on first use: Numba is an optional extra and slow to import.
    from rawformer.kernels.numba import activations

    return activations


# ---- public ops ----------------------------------------------------------------------------------------


def gelu(
    x: Any,
    bias: Any = None,
    *,
    approximate: str = "tanh",
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """GELU of x + bias.

    Parameters
    ----------
    x : array (..., cols), float16 / float32 (float64 on the CPU)
    bias : None or array (cols,) of x's dtype, added to every row before the activation
    approximate : "tanh": y = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)));
        "none": y = 0.5 u (1 + erf(u / sqrt 2)); u = x + bias
    out : optional array of x's shape, dtype and device to write into (may be x itself)
    impl : None / "cuda" (CUDA kernel) or "numba", for GPU arrays
    version : CUDA kernel version, 1 (scalar) or 2 (16-byte vectors); default: the fastest that applies

    Returns
    -------
    y : array like x (`out` when given)
    """
    tanh = _check_approximate(approximate)
    x, give_back = adopt(x, "x")
    bias = adopt_optional(bias, "bias")
    out_arr = adopt_optional(out, "out")
    _checks.check_float(x, "x")
    _checks.check_same_place(x, "x", bias=bias)
    if bias is not None:
        _check_bias(bias, x)
    _checks.check_out(out_arr, "out", x)
    which = _checks.check_impl(impl, x)
    check_version(version, FORWARD_VERSIONS, which)
    shape = tuple(x.shape)

    if which == "numpy":
        return finish(gelu_ref(x, bias, approximate).astype(x.dtype), out_arr, out, give_back, shape)
    cp = backend.require_cupy()
    if x.size == 0:
        return finish(cp.empty(shape, dtype=x.dtype), out_arr, out, give_back, shape)
    bias_c = None if bias is None else cp.ascontiguousarray(bias)
    if which == "numba":
        x2 = _rows(x)
        y2 = cp.empty_like(x2)
        _numba_activations().gelu_forward(x2, bias_c, y2, approximate)
        return finish(y2, out_arr, out, give_back, shape)

    xf = _contiguous_flat(x)
    y = _output(out_arr, [xf])
    cols = shape[-1] if bias is not None else 1
    flags = (tanh, bias is not None)
    _run_elementwise("gelu_forward", version or 2, flags, [xf], bias_c, [y], cols)
    return finish(y, out_arr, out, give_back, shape)


def gelu_backward(
    dy: Any,
    x: Any,
    bias: Any = None,
    *,
    approximate: str = "tanh",
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, Any]:
    """Gradients of y = gelu(x + bias).

    Parameters
    ----------
    dy : array (..., cols), the gradient of y
    x : array (..., cols), the forward input (float16 / float32; float64 on the CPU)
    bias : None or array (cols,), the forward bias
    approximate : "tanh" or "none", as in the forward
    impl : None / "cuda" or "numba", for GPU arrays
    version : CUDA kernel version: 1 (scalar) or 2 (16-byte vectors) write dx, then sum dbias in a second
        pass over dx; 3 (default with a bias) writes dx and sums dbias in one pass. Without a bias 3 is 2.

    Returns
    -------
    dx : array like x, dy * gelu'(x + bias)
    dbias : array (cols,) of bias's dtype, dx summed over every leading axis (accumulated in fp32 on the
        GPU, float64 on the CPU); None when bias is None
    """
    tanh = _check_approximate(approximate)
    x, give_back = adopt(x, "x")
    dy = adopt(dy, "dy")[0]
    bias = adopt_optional(bias, "bias")
    _checks.check_float(x, "x")
    _checks.check_same_place(x, "x", dy=dy, bias=bias)
    _checks.check_shape(dy, "dy", tuple(x.shape))
    if bias is not None:
        _check_bias(bias, x)
    which = _checks.check_impl(impl, x)
    check_version(version, GELU_BACKWARD_VERSIONS, which)
    shape = tuple(x.shape)

    def hand_back(dx: Any, dbias: Any) -> tuple[Any, Any]:
        return give_back(dx.reshape(shape)), None if dbias is None else give_back(dbias)

    if which == "numpy":
        dx, dbias = gelu_backward_ref(dy, x, bias, approximate)
        return hand_back(dx.astype(x.dtype), None if dbias is None else dbias.astype(bias.dtype))
    cp = backend.require_cupy()
    if x.size == 0:
        return hand_back(cp.empty(shape, dtype=x.dtype), None if bias is None else cp.zeros_like(bias))
    bias_c = None if bias is None else cp.ascontiguousarray(bias)
    if which == "numba":
        dy2, x2 = _rows(dy), _rows(x)
        dx2 = cp.empty_like(x2)
        _numba_activations().gelu_backward(dy2, x2, bias_c, dx2, approximate)
        dbias = None if bias is None else dx2.sum(axis=0, dtype=np.float32).astype(bias.dtype)
        return hand_back(dx2, dbias)

    dyf, xf = _contiguous_flat(dy), _contiguous_flat(x)
    dx = cp.empty(xf.size, dtype=x.dtype)
    if bias is None:
        _run_elementwise("gelu_backward", min(version or 2, 2), (tanh, False), [dyf, xf], None, [dx], 1)
        return hand_back(dx, None)

    cols = shape[-1]
    rows = xf.size // cols
    dbias = cp.empty(cols, dtype=bias.dtype)
    version = version or 3
    if version == 3:
        vw = vector_width(x.dtype, (dyf, xf, bias_c, dx), cols)
        head = (dyf, xf, bias_c, dx)
        _column_sums(_gelu_backward_v3_expr(x.dtype, vw, tanh), head, rows, cols, vw, dbias, 3 * dx.nbytes)
    else:
        vw = _run_elementwise("gelu_backward", version, (tanh, True), [dyf, xf], bias_c, [dx], cols)
        vw = 1 if version == 1 else vw  # v1 stays scalar throughout
        _column_sums(_column_partial_sums_expr(x.dtype, vw), (dx,), rows, cols, vw, dbias, dx.nbytes)
    return hand_back(dx, dbias)


def silu(x: Any, *, out: Any = None, impl: str | None = None) -> Any:
    """SiLU (swish): y = x * sigmoid(x) = x / (1 + exp(-x)).

    Parameters
    ----------
    x : array of any shape, float16 / float32 (float64 on the CPU)
    out : optional array of x's shape, dtype and device to write into (may be x itself)
    impl : None / "cuda" or "numba", for GPU arrays (Numba has no SiLU of its own: it runs its SwiGLU
        kernel with up = 1)

    Returns
    -------
    y : array like x (`out` when given)
    """
    x, give_back = adopt(x, "x")
    out_arr = adopt_optional(out, "out")
    _checks.check_float(x, "x")
    _checks.check_out(out_arr, "out", x)
    which = _checks.check_impl(impl, x)
    shape = tuple(x.shape)

    if which == "numpy":
        return finish(silu_ref(x).astype(x.dtype), out_arr, out, give_back, shape)
    cp = backend.require_cupy()
    if x.size == 0:
        return finish(cp.empty(shape, dtype=x.dtype), out_arr, out, give_back, shape)
    if which == "numba":
        x2 = _rows(x)
        y2 = cp.empty_like(x2)
        _numba_activations().swiglu_forward(x2, cp.ones_like(x2), y2)
        return finish(y2, out_arr, out, give_back, shape)

    xf = _contiguous_flat(x)
    y = _output(out_arr, [xf])
    _run_elementwise("silu_forward", 2, (), [xf], None, [y], None)
    return finish(y, out_arr, out, give_back, shape)


def swiglu(
    gate: Any, up: Any, *, out: Any = None, impl: str | None = None, version: int | None = None
) -> Any:
    """SwiGLU gating: y = silu(gate) * up = gate * sigmoid(gate) * up.

    Parameters
    ----------
    gate, up : arrays of one shape (..., hidden), float16 / float32 (float64 on the CPU)
    out : optional array of that shape, dtype and device to write into (may be gate or up itself)
    impl : None / "cuda" or "numba", for GPU arrays
    version : CUDA kernel version, 1 (scalar) or 2 (16-byte vectors); default: the fastest that applies

    Returns
    -------
    y : array like gate (`out` when given)
    """
    gate, give_back = adopt(gate, "gate")
    up = adopt(up, "up")[0]
    out_arr = adopt_optional(out, "out")
    _checks.check_float(gate, "gate")
    _checks.check_same_place(gate, "gate", up=up)
    _checks.check_shape(up, "up", tuple(gate.shape))
    _checks.check_out(out_arr, "out", gate)
    which = _checks.check_impl(impl, gate)
    check_version(version, FORWARD_VERSIONS, which)
    shape = tuple(gate.shape)

    if which == "numpy":
        return finish(swiglu_ref(gate, up).astype(gate.dtype), out_arr, out, give_back, shape)
    cp = backend.require_cupy()
    if gate.size == 0:
        return finish(cp.empty(shape, dtype=gate.dtype), out_arr, out, give_back, shape)
    if which == "numba":
        g2, u2 = _rows(gate), _rows(up)
        y2 = cp.empty_like(g2)
        _numba_activations().swiglu_forward(g2, u2, y2)
        return finish(y2, out_arr, out, give_back, shape)

    gf, uf = _contiguous_flat(gate), _contiguous_flat(up)
    y = _output(out_arr, [gf, uf])
    _run_elementwise("swiglu_forward", version or 2, (), [gf, uf], None, [y], None)
    return finish(y, out_arr, out, give_back, shape)


def swiglu_backward(
    dy: Any, gate: Any, up: Any, *, impl: str | None = None, version: int | None = None
) -> tuple[Any, Any]:
    """Gradients of y = silu(gate) * up.

    Parameters
    ----------
    dy, gate, up : arrays of one shape, float16 / float32 (float64 on the CPU)
    impl : None / "cuda" or "numba", for GPU arrays
    version : CUDA kernel version, 1 (scalar) or 2 (16-byte vectors); default: the fastest that applies

    Returns
    -------
    dgate : dy * up * s * (1 + gate * (1 - s)), s = sigmoid(gate)
    dup : dy * silu(gate)
    """
    gate, give_back = adopt(gate, "gate")
    dy = adopt(dy, "dy")[0]
    up = adopt(up, "up")[0]
    _checks.check_float(gate, "gate")
    _checks.check_same_place(gate, "gate", dy=dy, up=up)
    _checks.check_shape(dy, "dy", tuple(gate.shape))
    _checks.check_shape(up, "up", tuple(gate.shape))
    which = _checks.check_impl(impl, gate)
    check_version(version, SWIGLU_BACKWARD_VERSIONS, which)
    shape = tuple(gate.shape)

    if which == "numpy":
        dgate, dup = swiglu_backward_ref(dy, gate, up)
        return give_back(dgate.astype(gate.dtype)), give_back(dup.astype(gate.dtype))
    cp = backend.require_cupy()
    if gate.size == 0:
        return give_back(cp.empty(shape, dtype=gate.dtype)), give_back(cp.empty(shape, dtype=gate.dtype))
    if which == "numba":
        d2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
        dgate, dup = cp.empty_like(g2), cp.empty_like(g2)
        _numba_activations().swiglu_backward(d2, g2, u2, dgate, dup)
    else:
        dyf, gf, uf = _contiguous_flat(dy), _contiguous_flat(gate), _contiguous_flat(up)
        dgate, dup = cp.empty(gf.size, dtype=gate.dtype), cp.empty(gf.size, dtype=gate.dtype)
        _run_elementwise("swiglu_backward", version or 2, (), [dyf, gf, uf], None, [dgate, dup], None)
    return give_back(dgate.reshape(shape)), give_back(dup.reshape(shape))
