"""Layer norm and RMS norm over the last axis, forward and backward, with the fused residual add of pre-norm
transformer blocks.

Formulas, per row of n = x.shape[-1] values (eps > 0 keeps rstd finite):

    layer_norm:  mean = sum(x) / n,  rstd = 1 / sqrt(sum((x - mean)^2) / n + eps)   (biased variance)
                 y = (x - mean) * rstd * weight + bias
    rms_norm:    rstd = 1 / sqrt(sum(x^2) / n + eps),  y = x * rstd * weight
    add_*:       h = x + residual, rounded to x's dtype, and y = norm(h) computed from the rounded h, exactly
                 what an unfused add followed by the norm computes; (y, h) are returned.
    backward:    xhat = (x - mean) * rstd (rms: mean = 0), g = dy * weight
                 layer: dx = rstd * (g - mean(g) - xhat * mean(g * xhat));   rms: without the mean(g) term
                 dweight = sum over rows of dy * xhat, dbias = sum over rows of dy (float32 accumulation on
                 the GPU, returned in x's dtype)

Statistics (`return_stats=True`): mean and rstd of shape x.shape[:-1], float32 (float64 for float64 inputs
on the CPU); they are what the backward takes. An empty last axis gives NaN statistics.

Missing weight / bias mean weight = 1 / bias = 0. The backward returns dweight = None when weight is None,
and dbias = None when the forward had no bias: `has_bias` says so, and defaults to `weight is not None`
(layer norms are affine in both or in neither).

Arrays run where they live: NumPy inputs run the float64 references below (`*_ref`, vectorised) and are cast
back to the input dtype; CuPy inputs run the kernels of `cuda_src/norms.cu` (impl="cuda", the default) or
the Numba ones (impl="numba").

Kernel selection (the header of norms.cu describes every version). VW = 16 / itemsize when the row is a
whole number of 16-byte vectors and every pointer is 16-byte aligned, else 1 (scalar accesses). Row lengths
below are for float16 vectors / float32 vectors / scalar accesses (`forward_max_cols`, `backward_max_cols`).
  forward:  cols <= 2048 / 1024 / 512: v2 (a tile of 4..32 lanes per row, the row in registers);
            cols <= 32768 / 16384 / 8192: v3 (a block of 128..512 threads per row, the row in registers);
            longer: v4 (a block per row, the row cached in shared memory).
  backward: cols <= 1024 / 1024 / 512: v2 (fused dx + dweight/dbias, a tile per row);
            cols <= 8192: v3 (the same with a block per row);
            longer: v4 (row constants, then a column-slab pass).
  Inside a version the instantiation is picked by row-length bucket (a power-of-two count of vectors per
  thread, or of threads per row). `version=` forces a version; v2 and v3 refuse rows longer than they hold
  (ValueError). The defaults are the design's choice and await the H100 benchmark.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.kernels.occupancy import device_limits, resident_blocks
from rawformer.kernels.specialize import cpp_bool, next_pow2, vector_width
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64, finish

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_backward_ref",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_backward_ref",
    "rms_norm_ref",
]

_FAMILY = "norms"
FORWARD_VERSIONS = (1, 2, 3, 4)
BACKWARD_VERSIONS = (1, 2, 3, 4)

# Launch constants; the ones marked (.cu) must match norms.cu.
_FWD_TILE_BLOCK = 128  # kTileBlock (.cu)
_BWD_TILE_BLOCK = 256  # kTileBlockBwd (.cu)
_COL_THREADS = 256  # kColThreads (.cu)
_REDUCE_ROWS = 32  # kReduceRows (.cu)
_V1_THREADS = 256  # block of the naive v1 kernels
_FWD_V4_THREADS = 1024  # block of the shared-memory forward kernel
_BWD_STATS_THREADS = 512  # block of norm_backward_stats_v4
# Vectors per thread held in registers, by vector width (8: float16 vectors, 4: float32 vectors, 1: scalar).
# The forward keeps the row in its storage type: 64 halves or 32 floats are 32 registers (scalar rows: 16
# values, one register each). The backward keeps x, dy and two float accumulators per value: up to 32 values
# per thread in v2 (16 scalar), 16 in v3 (more threads per row). norms.cu caps the registers to match.
_FWD_VECS = {8: 8, 4: 8, 1: 16}
_BWD_TILE_VECS = {8: 4, 4: 8, 1: 16}
_BWD_BLOCK_VECS = {8: 2, 4: 4, 1: 16}
_TILE_LANES = (4, 8, 16, 32)
# Threads per row of the block kernels (v3), by vector width. 1024-thread blocks (a 64-register cap) would
# spill with 32 registers of row data; scalar rows (32 separate loads, plus their hoisted weight / bias loads)
# spill from 512 threads (nvcc 13.0 -Xptxas -v, sm_80 and sm_90). Longer rows go to v4.
_FWD_BLOCK_THREADS = {8: (128, 256, 512), 4: (128, 256, 512), 1: (128, 256, 512)}
_BWD_BLOCK_THREADS = {8: (128, 256, 512), 4: (128, 256, 512), 1: (128, 256, 512)}
_STATIC_SMEM = 256  # scratch of float2[32] in the v4 forward kernel
_SMEM_SLACK = 1024  # kept free below the opt-in shared-memory limit
_NULL = np.uintp(0)  # a null device pointer, passed by value like any 8-byte scalar


# ---- float64 references ---------------------------------------------------------------------------------


def layer_norm_ref(
    x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 layer norm over the last axis: (y, mean, rstd), y of x's shape, mean / rstd x.shape[:-1].

    mean = sum(x) / n, rstd = 1 / sqrt(sum((x - mean)^2) / n + eps), y = (x - mean) * rstd * weight + bias.
    """
    x = f64(x)
    n = x.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):  # n == 0 gives NaN statistics
        mean = x.sum(axis=-1) / n
        centred = x - mean[..., None]
        rstd = 1.0 / np.sqrt((centred * centred).sum(axis=-1) / n + eps)
    y = centred * rstd[..., None]
    if weight is not None:
        y = y * f64(weight)
    if bias is not None:
        y = y + f64(bias)
    return y, mean, rstd


def rms_norm_ref(x: Any, weight: Any = None, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """float64 RMS norm over the last axis: (y, rstd); rstd = 1 / sqrt(sum(x^2) / n + eps), y = x rstd w."""
    x = f64(x)
    n = x.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        rstd = 1.0 / np.sqrt((x * x).sum(axis=-1) / n + eps)
    y = x * rstd[..., None]
    if weight is not None:
        y = y * f64(weight)
    return y, rstd


def _backward_ref(
    dy: Any, x: Any, weight: Any, mean: Any, rstd: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dy, x = f64(dy), f64(x)
    n = x.shape[-1]
    rstd = f64(rstd)[..., None]
    xhat = (x if mean is None else x - f64(mean)[..., None]) * rstd
    g = dy if weight is None else dy * f64(weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        c2 = (g * xhat).sum(axis=-1, keepdims=True) / n
        c1 = 0.0 if mean is None else g.sum(axis=-1, keepdims=True) / n
    dx = rstd * (g - c1 - xhat * c2)
    dweight = (dy * xhat).reshape(-1, n).sum(axis=0)
    dbias = dy.reshape(-1, n).sum(axis=0)
    return dx, dweight, dbias


def layer_norm_backward_ref(
    dy: Any, x: Any, weight: Any, mean: Any, rstd: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 gradients of layer norm: (dx, dweight, dbias), computed whether or not there is a weight.

    xhat = (x - mean) * rstd, g = dy * weight, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
    dweight = sum over rows of dy * xhat, dbias = sum over rows of dy. mean / rstd: x.shape[:-1].
    """
    return _backward_ref(dy, x, weight, mean, rstd)


def rms_norm_backward_ref(dy: Any, x: Any, weight: Any, rstd: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 gradients of RMS norm: (dx, dweight); xhat = x * rstd, g = dy * weight,
    dx = rstd * (g - xhat * mean(g * xhat)), dweight = sum over rows of dy * xhat."""
    dx, dweight, _ = _backward_ref(dy, x, weight, None, rstd)
    return dx, dweight


# ---- kernel selection ------------------------------------------------------------------------------------
#
# Pure functions of (dtype, vector width, cols): the launchers and the list of instantiations handed to
# register_family are built from the same ones, so every expression a launcher asks for is registered.


class _Plan(NamedTuple):
    expr: str  # name expression of the main kernel
    block: int  # threads per block
    per_block: int  # rows per block (forward v2); 1 otherwise


def _tile_shape(nvec: int, vecs_max: int) -> tuple[int, int]:
    """(LANES, VECS) of a tile holding nvec vectors: 4..32 lanes of one vector for short rows, else 32 lanes
    of a power-of-two number of vectors (at most vecs_max)."""
    if nvec <= 32:
        return max(4, next_pow2(nvec)), 1
    return 32, next_pow2(-(-nvec // 32))


def _tile_shapes(vecs_max: int) -> list[tuple[int, int]]:
    shapes = [(lanes, 1) for lanes in _TILE_LANES]
    vecs = 2
    while vecs <= vecs_max:
        shapes.append((32, vecs))
        vecs *= 2
    return shapes


def _block_threads(nvec: int, vecs: int, choices: tuple[int, ...]) -> int:
    return min(max(choices[0], next_pow2(-(-nvec // vecs))), choices[-1])


def _width(dtype: Any, vectorised: bool) -> int:
    return 16 // np.dtype(dtype).itemsize if vectorised else 1


def forward_max_cols(version: int, dtype: Any, vectorised: bool = True) -> int | None:
    """The longest row forward `version` holds for `dtype` (None: any length); `vectorised`: whether 16-byte
    accesses apply (rows of whole 16-byte vectors, aligned arrays)."""
    vw = _width(dtype, vectorised)
    if version == 2:
        return 32 * _FWD_VECS[vw] * vw
    if version == 3:
        return _FWD_BLOCK_THREADS[vw][-1] * _FWD_VECS[vw] * vw
    return None


def backward_max_cols(version: int, dtype: Any, vectorised: bool = True) -> int | None:
    """The longest row backward `version` holds for `dtype` (None: any length)."""
    vw = _width(dtype, vectorised)
    if version == 2:
        return 32 * _BWD_TILE_VECS[vw] * vw
    if version == 3:
        return _BWD_BLOCK_THREADS[vw][-1] * _BWD_BLOCK_VECS[vw] * vw
    return None


def _check_fits(version: int, cols: int, limit: int | None, what: str) -> None:
    if limit is not None and cols > limit:
        raise ValueError(
            f"version={version} of the {what} kernel holds rows of at most {limit} values (with these "
            f"dtype and alignments), got {cols}; use version=None (picked from the row length)"
        )


def _forward_plan(version: int, dtype: Any, vw: int, cols: int, rms: bool) -> _Plan:
    _check_fits(version, cols, forward_max_cols(version, dtype, vw > 1), "forward")
    t = cuda_type(dtype)
    nvec = cols // vw
    if version == 1:
        return _Plan(f"norms::norm_forward_v1<{t}, {_V1_THREADS}, {cpp_bool(rms)}>", _V1_THREADS, 1)
    if version == 2:
        lanes, vecs = _tile_shape(nvec, _FWD_VECS[vw])
        expr = f"norms::norm_forward_v2<{t}, {vw}, {vecs}, {lanes}, {cpp_bool(rms)}>"
        return _Plan(expr, _FWD_TILE_BLOCK, _FWD_TILE_BLOCK // lanes)
    if version == 3:
        vecs = _FWD_VECS[vw]
        threads = _block_threads(nvec, vecs, _FWD_BLOCK_THREADS[vw])
        return _Plan(f"norms::norm_forward_v3<{t}, {vw}, {vecs}, {threads}, {cpp_bool(rms)}>", threads, 1)
    return _Plan(f"norms::norm_forward_v4<{t}, {vw}, {_FWD_V4_THREADS}, {cpp_bool(rms)}>", _FWD_V4_THREADS, 1)


def _backward_plan(version: int, dtype: Any, vw: int, cols: int, rms: bool) -> _Plan:
    """The main kernel of a backward version (v1: the dx kernel; v4: the column-slab kernel)."""
    _check_fits(version, cols, backward_max_cols(version, dtype, vw > 1), "backward")
    t = cuda_type(dtype)
    nvec = cols // vw
    if version == 1:
        return _Plan(f"norms::norm_backward_dx_v1<{t}, {_V1_THREADS}, {cpp_bool(rms)}>", _V1_THREADS, 1)
    if version == 2:
        lanes, vecs = _tile_shape(nvec, _BWD_TILE_VECS[vw])
        expr = f"norms::norm_backward_v2<{t}, {vw}, {vecs}, {lanes}, {cpp_bool(rms)}>"
        return _Plan(expr, _BWD_TILE_BLOCK, _BWD_TILE_BLOCK // lanes)
    if version == 3:
        vecs = _BWD_BLOCK_VECS[vw]
        threads = _block_threads(nvec, vecs, _BWD_BLOCK_THREADS[vw])
        return _Plan(f"norms::norm_backward_v3<{t}, {vw}, {vecs}, {threads}, {cpp_bool(rms)}>", threads, 1)
    return _Plan(f"norms::norm_backward_cols_v4<{t}, {vw}, {cpp_bool(rms)}>", _COL_THREADS, 1)


def _dwdb_v1_expr(t: str, rms: bool) -> str:
    return f"norms::norm_backward_dwdb_v1<{t}, {cpp_bool(rms)}>"


def _stats_v4_expr(t: str, vw: int, rms: bool) -> str:
    return f"norms::norm_backward_stats_v4<{t}, {vw}, {_BWD_STATS_THREADS}, {cpp_bool(rms)}>"


def _reduce_expr(t: str) -> str:
    return f"norms::norm_backward_reduce<{t}>"


def _instantiations() -> list[str]:
    """Every name expression the launchers can request: per dtype, vector width and norm kind, each version
    at every row-length bucket."""
    exprs: list[str] = []
    for dtype in _checks.GPU_DTYPES:
        t = cuda_type(dtype)
        for rms in (False, True):
            exprs.append(_forward_plan(1, dtype, 1, 1, rms).expr)
            exprs.append(_backward_plan(1, dtype, 1, 1, rms).expr)
            exprs.append(_dwdb_v1_expr(t, rms))
            for vw in sorted({1, 16 // dtype.itemsize}):
                for lanes, vecs in _tile_shapes(_FWD_VECS[vw]):
                    exprs.append(f"norms::norm_forward_v2<{t}, {vw}, {vecs}, {lanes}, {cpp_bool(rms)}>")
                for lanes, vecs in _tile_shapes(_BWD_TILE_VECS[vw]):
                    exprs.append(f"norms::norm_backward_v2<{t}, {vw}, {vecs}, {lanes}, {cpp_bool(rms)}>")
                for threads in _FWD_BLOCK_THREADS[vw]:
                    exprs.append(
                        f"norms::norm_forward_v3<{t}, {vw}, {_FWD_VECS[vw]}, {threads}, {cpp_bool(rms)}>"
                    )
                for threads in _BWD_BLOCK_THREADS[vw]:
                    r = cpp_bool(rms)
                    exprs.append(f"norms::norm_backward_v3<{t}, {vw}, {_BWD_BLOCK_VECS[vw]}, {threads}, {r}>")
                exprs.append(_forward_plan(4, dtype, vw, 1, rms).expr)
                exprs.append(_backward_plan(4, dtype, vw, 1, rms).expr)
                exprs.append(_stats_v4_expr(t, vw, rms))
        exprs.append(_reduce_expr(t))
    return exprs


register_family(_FAMILY, _instantiations)


def default_forward_version(cols: int, dtype: Any, vectorised: bool = True) -> int:
    """The forward version the launcher runs for rows of `cols` values."""
    for version in (2, 3):
        if cols <= forward_max_cols(version, dtype, vectorised):
            return version
    return 4


def default_backward_version(cols: int, dtype: Any, vectorised: bool = True) -> int:
    """The backward version the launcher runs for rows of `cols` values."""
    for version in (2, 3):
        if cols <= backward_max_cols(version, dtype, vectorised):
            return version
    return 4


# ---- argument checks -------------------------------------------------------------------------------------


def _check_x(x: Any) -> int:
    _checks.check_float(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (the normalised last axis)")
    return int(x.shape[-1])


def _check_params(x: Any, cols: int, **params: Any) -> None:
    """weight / bias: (cols,) arrays of x's dtype and place; residual / dy: x's shape."""
    _checks.check_same_place(x, "x", **params)
    for name, a in params.items():
        if a is None:
            continue
        if name in ("weight", "bias"):
            _checks.check_shape(a, name, (cols,))
        else:
            _checks.check_shape(a, name, tuple(x.shape))


def _check_stats(x: Any, **stats: Any) -> None:
    """mean / rstd: arrays of shape x.shape[:-1] on x's side; float32 on the GPU, float32/64 on the CPU."""
    for name, a in stats.items():
        if a is None:
            raise TypeError(f"{name} is required (the statistic returned by the forward with return_stats)")
        if backend.is_cupy(a) != backend.is_cupy(x):
            raise ValueError(
                f"{name} is a {'GPU' if backend.is_cupy(a) else 'CPU'} array but x is a "
                f"{'GPU' if backend.is_cupy(x) else 'CPU'} array; move both to one device"
            )
        if backend.is_cupy(a) and a.device != x.device:
            raise ValueError(f"{name} is on {a.device} but x is on {x.device}")
        allowed = (
            (np.dtype(np.float32),) if backend.is_cupy(a) else (np.dtype(np.float32), np.dtype(np.float64))
        )
        if a.dtype not in allowed:
            raise TypeError(f"{name} has dtype {a.dtype}; expected {' or '.join(str(d) for d in allowed)}")
        _checks.check_shape(a, name, tuple(x.shape[:-1]))


def _stats_dtype(dtype: Any) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ---- launcher plumbing -----------------------------------------------------------------------------------


def _rows2d(a: Any, cols: int) -> Any:
    """`a` as a C-contiguous (rows, cols) matrix (one copy when it is not laid out that way)."""
    xp = backend.array_module(a)
    return xp.ascontiguousarray(a).reshape(-1, cols)


def _flat(a: Any) -> Any:
    return None if a is None else backend.array_module(a).ascontiguousarray(a).reshape(-1)


def _arg(a: Any) -> Any:
    """A kernel pointer argument: the array, or a NULL pointer for an absent optional one."""
    return _NULL if a is None else a


def _output_buffer(out: Any, shape2d: tuple[int, int], like: Any, inputs: list[Any]) -> Any:
    """A (rows, cols) buffer for y: `out` itself when the kernel may write it directly (C-contiguous, and each
    input is the very same buffer, which every kernel may overwrite in place, or does not overlap it), else a
    fresh array that is copied into `out` afterwards."""
    cp = backend.require_cupy()
    if out is not None and out.flags.c_contiguous and out.size:
        if all(a is None or a.data.ptr == out.data.ptr or not cp.may_share_memory(a, out) for a in inputs):
            return out.reshape(shape2d)
    return cp.empty(shape2d, dtype=like.dtype)


def _numba_norms() -> Any:
    # Imported on first use: Numba is an optional extra and slow to import.
    from rawformer.kernels.numba import norms

    return norms


def _launch_forward(
    rms: bool,
    version: int | None,
    x2: Any,
    r2: Any,
    w: Any,
    b: Any,
    y2: Any,
    h2: Any,
    mean: Any,
    rstd: Any,
    eps: float,
) -> None:
    """Run the forward kernel over (rows, cols) CuPy arrays; optional ones may be None."""
    rows, cols = x2.shape
    vw = vector_width(x2.dtype, (x2, r2, w, b, y2, h2), cols)
    version = version or default_forward_version(cols, x2.dtype, vw > 1)
    plan = _forward_plan(version, x2.dtype, vw, cols, rms)
    kernel = get_function(_FAMILY, plan.expr)
    args = [
        x2,
        _arg(r2),
        _arg(w),
        _arg(b),
        y2,
        _arg(h2),
        _arg(mean),
        _arg(rstd),
        i32(rows),
        i32(cols),
        np.float32(eps),
    ]
    smem = 0
    if version == 4:
        dev = device_limits()
        vec_bytes = vw * x2.dtype.itemsize
        cached = min(cols // vw, (dev.smem_per_block_optin - _STATIC_SMEM - _SMEM_SLACK) // vec_bytes)
        smem = cached * vec_bytes
        args.append(i32(cached))
    n_arrays = 2 + (2 if r2 is not None else 0)
    launch(
        kernel,
        (-(-rows // plan.per_block),),
        (plan.block,),
        tuple(args),
        shared_mem=smem,
        bytes_moved=n_arrays * x2.nbytes,
        pdl=True,  # norms.cu waits (rf::pdl_wait) before its first access
    )


def _forward(
    rms: bool,
    x: Any,
    residual: Any,
    weight: Any,
    bias: Any,
    eps: Any,
    out: Any,
    stats: bool,
    impl: str | None,
    version: Any,
) -> tuple[Any, Any, Any, Any]:
    """The forward of every public norm: (y, h, mean, rstd) in the caller's array kind (h None without a
    residual; mean None for rms norm; on the GPU mean / rstd None unless `stats`)."""
    x, give_back = adopt(x, "x")
    residual = adopt_optional(residual, "residual")
    weight = adopt_optional(weight, "weight")
    bias = adopt_optional(bias, "bias")
    out_arr = adopt_optional(out, "out")
    cols = _check_x(x)
    _check_params(x, cols, residual=residual, weight=weight, bias=bias)
    eps = _checks.check_eps(eps)
    _checks.check_out(out_arr, "out", x)
    which = _checks.check_impl(impl, x)
    check_version(version, FORWARD_VERSIONS, which)
    shape = tuple(x.shape)
    stats_shape = shape[:-1]

    def hand_back(a: Any) -> Any:
        return None if a is None else give_back(a)

    if which == "numpy":
        if residual is None:
            h = None
            src = x
        else:  # rounded to x's dtype, the norm is taken of the rounded sum
            h = (f64(x) + f64(residual)).astype(x.dtype)
            src = h
        if rms:
            y, rstd = rms_norm_ref(src, weight, eps)
            mean = None
        else:
            y, mean, rstd = layer_norm_ref(src, weight, bias, eps)
        sd = _stats_dtype(x.dtype)
        y_out = finish(y.astype(x.dtype), out_arr, out, give_back, shape)
        mean = None if mean is None else np.asarray(mean, dtype=sd).reshape(stats_shape)
        return (
            y_out,
            hand_back(h),
            hand_back(mean),
            give_back(np.asarray(rstd, dtype=sd).reshape(stats_shape)),
        )

    cp = backend.require_cupy()
    rows = math.prod(stats_shape)
    y_shape = (rows, cols)
    # The Numba contract always writes the statistics; the CUDA kernels skip them unless asked (nullptr).
    stats = stats or which == "numba"
    mean = cp.empty(rows, dtype=np.float32) if stats and not rms else None
    rstd = cp.empty(rows, dtype=np.float32) if stats else None
    if rows == 0 or cols == 0:
        y = cp.empty(shape, dtype=x.dtype)
        h = None if residual is None else cp.empty(shape, dtype=x.dtype)
        for s in (mean, rstd):
            if s is not None:
                s.fill(np.nan)  # statistics of an empty row
        y_out = finish(y, out_arr, out, give_back, shape)
        return (
            y_out,
            hand_back(h),
            hand_back(_reshape(mean, stats_shape)),
            hand_back(_reshape(rstd, stats_shape)),
        )

    x2 = _rows2d(x, cols)
    r2 = None if residual is None else _rows2d(residual, cols)
    w = _flat(weight)
    b = None if rms else _flat(bias)
    h2 = None if residual is None else cp.empty(y_shape, dtype=x.dtype)
    if which == "numba":
        y2 = cp.empty(y_shape, dtype=x.dtype)
        nb = _numba_norms()
        w_nb = w if w is not None else cp.ones(cols, dtype=x.dtype)
        if rms:
            nb.rms_norm_forward(x2, r2, w_nb, y2, h2, rstd, eps)
        else:
            b_nb = b if b is not None else cp.zeros(cols, dtype=x.dtype)
            nb.layer_norm_forward(x2, r2, w_nb, b_nb, y2, h2, mean, rstd, eps)
    else:
        y2 = _output_buffer(out_arr, y_shape, x2, [x2, r2, w, b])
        _launch_forward(rms, version, x2, r2, w, b, y2, h2, mean, rstd, eps)
    y_out = finish(y2, out_arr, out, give_back, shape)
    h_out = None if h2 is None else give_back(h2.reshape(shape))
    return y_out, h_out, hand_back(_reshape(mean, stats_shape)), hand_back(_reshape(rstd, stats_shape))


def _reshape(a: Any, shape: tuple[int, ...]) -> Any:
    return None if a is None else a.reshape(shape)


def _partials(cp: Any, parts: int, cols: int, dw: Any, db: Any) -> tuple[Any, Any]:
    """float32 [parts, cols] buffers of per-block partial sums for dweight / dbias (None where not wanted)."""
    wanted = [a is not None for a in (dw, db)]
    if not any(wanted):
        return None, None
    buf = cp.empty((sum(wanted), parts, cols), dtype=np.float32)
    it = iter(buf)
    return tuple(next(it) if w else None for w in wanted)


def _launch_backward(
    rms: bool,
    version: int | None,
    dy2: Any,
    x2: Any,
    w: Any,
    mean: Any,
    rstd: Any,
    dx2: Any,
    dw: Any,
    db: Any,
) -> None:
    """Run the backward kernels over (rows, cols) CuPy arrays: dx always, dw / db when given ((cols,) of x's
    dtype)."""
    cp = backend.require_cupy()
    rows, cols = x2.shape
    t = cuda_type(x2.dtype)
    vw = vector_width(x2.dtype, (dy2, x2, w, dx2), cols)
    version = version or default_backward_version(cols, x2.dtype, vw > 1)
    plan = _backward_plan(version, x2.dtype, vw, cols, rms)
    kernel = get_function(_FAMILY, plan.expr)
    dev = device_limits()
    need = dw is not None or db is not None
    row_bytes = 3 * x2.nbytes
    head = (dy2, x2, _arg(w), _arg(mean), rstd)

    if version == 1:
        launch(kernel, (rows,), (plan.block,), (*head, dx2, i32(rows), i32(cols)), bytes_moved=row_bytes)
        if need:
            launch(
                get_function(_FAMILY, _dwdb_v1_expr(t, rms)),
                (-(-cols // _V1_THREADS),),
                (_V1_THREADS,),
                (dy2, x2, _arg(mean), rstd, _arg(dw), _arg(db), i32(rows), i32(cols)),
                bytes_moved=2 * x2.nbytes,
            )
        return

    if version in (2, 3):
        smem = (1 if rms else 2) * cols * 4 if (version == 2 and need) else 0
        units = -(-rows // plan.per_block)  # blocks that would each get a row (v2: a row per tile)
        parts = min(units, dev.sms * resident_blocks(kernel, plan.block, smem, dev))
        dw_part, db_part = _partials(cp, parts, cols, dw, db)
        launch(
            kernel,
            (parts,),
            (plan.block,),
            (*head, dx2, _arg(dw_part), _arg(db_part), i32(rows), i32(cols)),
            shared_mem=smem,
            bytes_moved=row_bytes,
        )
    else:
        consts = cp.empty((rows, 2), dtype=np.float32)  # (c1, c2) per row, read as float2
        launch(
            get_function(_FAMILY, _stats_v4_expr(t, vw, rms)),
            (rows,),
            (_BWD_STATS_THREADS,),
            (*head, consts, i32(rows), i32(cols)),
            bytes_moved=2 * x2.nbytes,
        )
        grid_x = -(-(cols // vw) // _COL_THREADS)
        # One wave: as many row slabs as fit beside grid_x column blocks on the SMs at once (a second,
        # partial wave would leave most SMs idle while it runs).
        slots = dev.sms * resident_blocks(kernel, _COL_THREADS, 0, dev)
        parts = max(1, min(rows, slots // grid_x, 65535))
        rows_per_part = -(-rows // parts)
        parts = -(-rows // rows_per_part)
        dw_part, db_part = _partials(cp, parts, cols, dw, db)
        launch(
            kernel,
            (grid_x, parts),
            (_COL_THREADS,),
            (*head, consts, dx2, _arg(dw_part), _arg(db_part), i32(rows), i32(cols), i32(rows_per_part)),
            bytes_moved=row_bytes,
        )
    if need:
        launch(
            get_function(_FAMILY, _reduce_expr(t)),
            (-(-cols // 32),),
            (32, _REDUCE_ROWS),
            (_arg(dw_part), _arg(db_part), i32(parts), i32(cols), _arg(dw), _arg(db)),
            bytes_moved=(2 if db is not None and dw is not None else 1) * parts * cols * 4,
        )


def _backward(
    rms: bool,
    dy: Any,
    x: Any,
    weight: Any,
    mean: Any,
    rstd: Any,
    has_bias: bool,
    impl: str | None,
    version: Any,
) -> tuple[Any, Any, Any]:
    """(dx, dweight, dbias) in the caller's kind; dweight None without weight, dbias None without bias."""
    x, give_back = adopt(x, "x")
    dy = adopt(dy, "dy")[0]
    weight = adopt_optional(weight, "weight")
    mean = adopt_optional(mean, "mean")
    rstd = adopt_optional(rstd, "rstd")
    cols = _check_x(x)
    _check_params(x, cols, dy=dy, weight=weight)
    _check_stats(x, **({"rstd": rstd} if rms else {"mean": mean, "rstd": rstd}))
    which = _checks.check_impl(impl, x)
    check_version(version, FORWARD_VERSIONS, which)
    shape = tuple(x.shape)
    need_dw, need_db = weight is not None, has_bias and not rms

    if which == "numpy":
        dx, dweight, dbias = _backward_ref(dy, x, weight, None if rms else mean, rstd)
        return (
            give_back(dx.astype(x.dtype)),
            give_back(dweight.astype(x.dtype)) if need_dw else None,
            give_back(dbias.astype(x.dtype)) if need_db else None,
        )

    cp = backend.require_cupy()
    rows = math.prod(shape[:-1])
    alloc = cp.zeros if rows == 0 else cp.empty  # zeros: the sum over no rows
    dw = alloc(cols, dtype=x.dtype) if need_dw else None
    db = alloc(cols, dtype=x.dtype) if need_db else None
    if rows == 0 or cols == 0:
        dx = cp.empty(shape, dtype=x.dtype)
    else:
        x2, dy2 = _rows2d(x, cols), _rows2d(dy, cols)
        w = _flat(weight)
        mean1 = None if rms else _flat(mean)
        rstd1 = _flat(rstd)
        dx2 = cp.empty((rows, cols), dtype=x.dtype)
        if which == "numba":
            nb = _numba_norms()
            w_nb = w if w is not None else cp.ones(cols, dtype=x.dtype)
            dw32 = cp.empty(cols, dtype=np.float32)
            if rms:
                nb.rms_norm_backward(dy2, x2, w_nb, rstd1, dx2, dw32)
            else:
                db32 = cp.empty(cols, dtype=np.float32)
                nb.layer_norm_backward(dy2, x2, w_nb, mean1, rstd1, dx2, dw32, db32)
                if db is not None:
                    db[...] = db32
            if dw is not None:
                dw[...] = dw32
        else:
            _launch_backward(rms, version, dy2, x2, w, mean1, rstd1, dx2, dw, db)
        dx = dx2.reshape(shape)
    return (
        give_back(dx),
        None if dw is None else give_back(dw),
        None if db is None else give_back(db),
    )


# ---- public ops ----------------------------------------------------------------------------------------


def layer_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    out: Any = None,
    return_stats: bool = False,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Layer norm over the last axis: y = (x - mean) * rstd * weight + bias.

    Parameters
    ----------
    x : array (..., cols), float16 / float32 (float64 on the CPU)
    weight, bias : None or arrays (cols,) of x's dtype (None: weight = 1, bias = 0)
    eps : added to the biased variance; finite, >= 0
    out : optional array of x's shape, dtype and device to write y into (may be x itself)
    return_stats : also return mean and rstd = 1 / sqrt(var + eps), for layer_norm_backward
    impl : None / "cuda" (CUDA kernel) or "numba", for GPU arrays
    version : CUDA kernel version (1..4, see norms.cu); default: picked from the row length

    Returns
    -------
    y : array like x (`out` when given); with return_stats (y, mean, rstd), mean / rstd of shape
        x.shape[:-1], float32 (float64 for float64 inputs)
    """
    y, _, mean, rstd = _forward(False, x, None, weight, bias, eps, out, return_stats, impl, version)
    return (y, mean, rstd) if return_stats else y


def rms_norm(
    x: Any,
    weight: Any = None,
    eps: float = 1e-6,
    *,
    out: Any = None,
    return_stats: bool = False,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """RMS norm over the last axis: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps).

    Parameters
    ----------
    x : array (..., cols), float16 / float32 (float64 on the CPU)
    weight : None or array (cols,) of x's dtype (None: weight = 1)
    eps : finite, >= 0
    out : optional array of x's shape, dtype and device to write y into (may be x itself)
    return_stats : also return rstd, for rms_norm_backward
    impl : None / "cuda" (CUDA kernel) or "numba", for GPU arrays
    version : CUDA kernel version (1..4, see norms.cu); default: picked from the row length

    Returns
    -------
    y : array like x (`out` when given); with return_stats (y, rstd), rstd of shape x.shape[:-1], float32
        (float64 for float64 inputs)
    """
    y, _, _, rstd = _forward(True, x, None, weight, None, eps, out, return_stats, impl, version)
    return (y, rstd) if return_stats else y


def add_layer_norm(
    x: Any,
    residual: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    return_stats: bool = False,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, ...]:
    """Residual add fused with layer norm (pre-norm transformer blocks): h = x + residual, y = layer_norm(h).

    h is rounded to x's dtype and written by the same kernel; y is the layer norm of the rounded h (what the
    unfused add then norm computes). The backward of y with respect to h is layer_norm_backward(dy, h, ...).

    Parameters
    ----------
    x, residual : arrays (..., cols) of one dtype (float16 / float32; float64 on the CPU) and shape
    weight, bias, eps, impl, version : as in layer_norm

    Returns
    -------
    (y, h), both like x; with return_stats (y, h, mean, rstd), mean / rstd of shape x.shape[:-1]
    """
    y, h, mean, rstd = _forward(
        False, x, _required(residual), weight, bias, eps, None, return_stats, impl, version
    )
    return (y, h, mean, rstd) if return_stats else (y, h)


def add_rms_norm(
    x: Any,
    residual: Any,
    weight: Any = None,
    eps: float = 1e-6,
    *,
    return_stats: bool = False,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, ...]:
    """Residual add fused with RMS norm: h = x + residual (rounded to x's dtype), y = rms_norm(h).

    Parameters
    ----------
    x, residual : arrays (..., cols) of one dtype and shape
    weight, eps, impl, version : as in rms_norm

    Returns
    -------
    (y, h), both like x; with return_stats (y, h, rstd), rstd of shape x.shape[:-1]
    """
    y, h, _, rstd = _forward(
        True, x, _required(residual), weight, None, eps, None, return_stats, impl, version
    )
    return (y, h, rstd) if return_stats else (y, h)


def _required(residual: Any) -> Any:
    if residual is None:
        raise TypeError("residual is required (use layer_norm / rms_norm without one)")
    return residual


def layer_norm_backward(
    dy: Any,
    x: Any,
    weight: Any,
    mean: Any,
    rstd: Any,
    *,
    has_bias: bool | None = None,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients of y = layer_norm(x, weight, bias).

    xhat = (x - mean) * rstd, g = dy * weight:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dweight = sum_rows dy * xhat, dbias = sum_rows dy.

    Parameters
    ----------
    dy : array (..., cols), the gradient of y, x's dtype
    x : array (..., cols), the forward input (for add_layer_norm: h)
    weight : None or array (cols,), the forward weight
    mean, rstd : arrays x.shape[:-1] from the forward's return_stats (float32 on the GPU)
    has_bias : whether the forward had a bias (then dbias is returned); default: weight is not None
    impl, version : as in layer_norm (backward versions 1..4, see norms.cu)

    Returns
    -------
    (dx, dweight, dbias): dx like x; dweight / dbias (cols,) of x's dtype, summed in float32 on the GPU;
    dweight is None when weight is None, dbias None when has_bias is false
    """
    has_bias = weight is not None if has_bias is None else bool(has_bias)
    return _backward(False, dy, x, weight, mean, rstd, has_bias, impl, version)


def rms_norm_backward(
    dy: Any,
    x: Any,
    weight: Any,
    rstd: Any,
    *,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, Any]:
    """Gradients of y = rms_norm(x, weight).

    xhat = x * rstd, g = dy * weight: dx = rstd * (g - xhat * mean(g * xhat)), dweight = sum_rows dy * xhat.

    Parameters
    ----------
    dy : array (..., cols), the gradient of y, x's dtype
    x : array (..., cols), the forward input (for add_rms_norm: h)
    weight : None or array (cols,), the forward weight
    rstd : array x.shape[:-1] from the forward's return_stats (float32 on the GPU)
    impl, version : as in rms_norm

    Returns
    -------
    (dx, dweight): dx like x; dweight (cols,) of x's dtype (None when weight is None)
    """
    dx, dweight, _ = _backward(True, dy, x, weight, None, rstd, False, impl, version)
    return dx, dweight
