"""Softmax and log_softmax along one axis, with scale, additive mask and causal masking; their backward.

Formulas (along `axis`; z = scale * x + mask, with -inf where causally masked):

    softmax(x)             y = exp(z - max z) / sum exp(z - max z)
    log_softmax(x)         y = z - max z - log(sum exp(z - max z))
    softmax_backward       dx = scale * y * (dy - sum(dy * y))
    log_softmax_backward   dx = scale * (dy - exp(y) * sum(dy))

`mask` is an additive array of x's dtype broadcastable to x: (cols,), (S_q, S_k) under x (B, H, S_q, S_k),
a (B, 1, 1, S_k) padding mask, ... `causal=True` (axis last, x.ndim >= 2, S_q = x.shape[-2], S_k =
x.shape[-1]) masks entry j of query i when j > i + (S_k - S_q), the bottom-right aligned rule of a KV cache.

Special values. Without mask and causal, softmax follows NumPy's exp(z - max) / sum: a NaN or +inf in a row
makes that row NaN, a row of only -inf is NaN, a single -inf entry gives 0. With a mask or causal=True, a row
whose every entry is -inf after masking gives zeros, not NaN: the attention convention for a query that may
attend to nothing. log_softmax gives zeros there too (not the -inf of log 0), so no -inf reaches a loss. NaN
and +inf still make their row NaN.

Arrays run where they live: NumPy inputs run the float64 references (`*_ref`) and are cast back to the
input dtype; CuPy inputs run the kernels of `cuda_src/softmax.cu` (impl="cuda", the default) or the Numba
ones (impl="numba"). DLPack / CUDA-array-interface inputs are viewed as one of the two.

Kernel selection (the header of softmax.cu describes the versions). VW = 16 / itemsize when cols is a
multiple of it and every pointer is 16-byte aligned, else 1. Forward, by row length (E = 32 elements per
thread in registers):
    cols <= 256            v2, warp per row, 8 elements per lane
    cols <= 1024           v2, warp per row, 32 elements per lane
    cols <= 32768          v3, block per row, THREADS = the power of two >= cols / 32 (64 ... 1024; with a
                           mask up to 512, i.e. 16384 columns)
    cols <= 256k (sm_90)   v5, a cluster of 2, 4 or 8 blocks of 512 threads per row (8 x 1024 past 128k;
                           masked rows stop at 128k)
    longer                 v4, online (max, sum) pass + write pass
Backward (dy and y held as raw storage: E = 32 elements per thread for fp16 16-byte vectors, else 16):
    cols <= 32 * E         v2 (a smaller instantiation for cols <= 8 * E)
    cols <= 1024 * E       v3, THREADS = the power of two >= cols / E (64 ... 1024)
    longer                 v4, a sum pass + a write pass
These defaults follow the design argument in softmax.cu; re-check them against `version=` timings.
`version=` forces a version where it applies (ValueError where it cannot take the row length).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.kernels.occupancy import limits_of
from rawformer.kernels.specialize import cpp_bool, full_vector_width, next_pow2, vector_width
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64, finish

__all__ = [
    "log_softmax",
    "log_softmax_backward",
    "log_softmax_backward_ref",
    "log_softmax_ref",
    "softmax",
    "softmax_backward",
    "softmax_backward_ref",
    "softmax_ref",
]

_FAMILY = "softmax"
FORWARD_VERSIONS = (1, 2, 3, 4, 5)
BACKWARD_VERSIONS = (1, 2, 3, 4)
LOG2E = 1.4426950408889634

# Kernel shapes; every constant below also appears in softmax.cu's template arguments through the
# expressions built from it (the kernels take them as template parameters, nothing is hard-coded there).
_WARP = 32
_WARP_ROWS = 4  # kWarpRows in softmax.cu: v2 rows per 128-thread block
_SIMPLE_THREADS = 256  # v1
_LOOP_THREADS = 512  # v4
_FWD_E = 32  # forward: fp32 t-values per thread in registers (v2 large, v3, v5)
_FWD_E_SMALL = 8  # forward v2 small rows
_BLOCK_THREADS = (64, 128, 256, 512, 1024)  # v3
_MASKED_MAX_THREADS = 512  # v3 with a mask: the mask's registers do not fit 1024 threads x 64 registers
_CLUSTERS = ((512, 2), (512, 4), (512, 8), (1024, 8))  # v5 (threads per block, blocks per cluster)
_MASKED_CLUSTERS = _CLUSTERS[:3]
# On sm_90, rows longer than this go to v5 by default. Measured on the H100 (bench/versions.py, 2026-11-24,
# fp16): 4096x32000 v3 2728 GB/s vs v5 2188; 1024x131072 v5 2011 vs v4 1941.
_CLUSTER_ABOVE = 32768


# ---- float64 references ---------------------------------------------------------------------------------


def _scale_value(scale: Any) -> float:
    return 1.0 if scale is None else _checks.check_scalar(scale, "scale")


def _causal_keep(s_q: int, s_k: int) -> np.ndarray:
    """(S_q, S_k) bool: True where query i may see key j, i.e. j <= i + (S_k - S_q)."""
    return np.arange(s_k)[None, :] <= np.arange(s_q)[:, None] + (s_k - s_q)


def _logits(x: Any, axis: int, scale: Any, mask: Any, causal: bool) -> np.ndarray:
    """float64 z = scale * x + mask, -inf where causally masked (causal needs axis = last)."""
    z = f64(x) * _scale_value(scale)
    if mask is not None:
        z = z + f64(mask)
    if causal:
        z = np.where(_causal_keep(z.shape[-2], z.shape[-1]), z, -np.inf)
    return z


def _ref_forward(x: Any, axis: int, scale: Any, mask: Any, causal: bool, log: bool) -> np.ndarray:
    xa = np.asarray(backend.to_numpy(x))
    axis = _checks.normalize_axis(axis, xa.ndim)
    if xa.size == 0:
        return np.zeros(xa.shape, dtype=np.float64)
    z = _logits(xa, axis, scale, mask, causal)
    masked = mask is not None or causal
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(z, axis=axis, keepdims=True)  # NaN propagates, as in NumPy's own formula
        if masked:  # a fully masked row subtracts 0, sums to 0, and divides by 1: zeros (log too)
            m = np.where(m == -np.inf, 0.0, m)
        e = np.exp(z - m)
        s = np.sum(e, axis=axis, keepdims=True)
        empty = (s == 0) if masked else np.zeros_like(s, dtype=bool)
        if log:
            return np.where(empty, 0.0, (z - m) - np.log(np.where(empty, 1.0, s)))
        return e / np.where(empty, 1.0, s)


def softmax_ref(
    x: Any, axis: int = -1, *, scale: Any = None, mask: Any = None, causal: bool = False
) -> np.ndarray:
    """float64 softmax(scale * x + mask) along `axis` (see the module docstring for masking and NaN rules)."""
    return _ref_forward(x, axis, scale, mask, causal, log=False)


def log_softmax_ref(
    x: Any, axis: int = -1, *, scale: Any = None, mask: Any = None, causal: bool = False
) -> np.ndarray:
    """float64 log_softmax(scale * x + mask) along `axis`."""
    return _ref_forward(x, axis, scale, mask, causal, log=True)


def softmax_backward_ref(dy: Any, y: Any, axis: int = -1, *, scale: Any = None) -> np.ndarray:
    """float64 dx = scale * y * (dy - sum(dy * y)) along `axis` (y = softmax(scale * x + mask))."""
    g, p = f64(dy), f64(y)
    axis = _checks.normalize_axis(axis, g.ndim)
    return _scale_value(scale) * p * (g - np.sum(g * p, axis=axis, keepdims=True))


def log_softmax_backward_ref(dy: Any, y: Any, axis: int = -1, *, scale: Any = None) -> np.ndarray:
    """float64 dx = scale * (dy - exp(y) * sum(dy)) along `axis` (y = log_softmax(scale * x + mask))."""
    g, p = f64(dy), f64(y)
    axis = _checks.normalize_axis(axis, g.ndim)
    with np.errstate(invalid="ignore"):
        return _scale_value(scale) * (g - np.exp(p) * np.sum(g, axis=axis, keepdims=True))


# ---- kernel selection ------------------------------------------------------------------------------------


def _bwd_vecs(dtype: Any, vw: int) -> tuple[int, int]:
    """Backward register kernels: (small, large) vectors per thread; dy and y take 32 registers at large.

    fp16 16-byte vectors: 4 vectors = 32 elements; fp32: 4 vectors = 16 elements; scalar: 16 elements."""
    return (1, 4) if vw > 1 else (4, 16)


def _fwd_v3_threads(cols: int, masked: bool) -> int | None:
    """v3's block size for a row: the smallest listed power of two with threads * 32 >= cols."""
    limit = _MASKED_MAX_THREADS if masked else _BLOCK_THREADS[-1]
    threads = max(_BLOCK_THREADS[0], next_pow2(-(-cols // _FWD_E)))
    return threads if threads <= limit else None


def _fwd_v5_config(cols: int, masked: bool) -> tuple[int, int] | None:
    for threads, cluster in _MASKED_CLUSTERS if masked else _CLUSTERS:
        if cols <= threads * cluster * _FWD_E:
            return threads, cluster
    return None


def _bwd_threads(cols: int, per_thread: int) -> int | None:
    threads = max(_BLOCK_THREADS[0], next_pow2(-(-cols // per_thread)))
    return threads if threads <= _BLOCK_THREADS[-1] else None


class _Plan:
    """One launch: the name expression, grid and block."""

    __slots__ = ("expr", "grid", "block")

    def __init__(self, expr: str, grid: int, block: int) -> None:
        self.expr, self.grid, self.block = expr, grid, block


def _forward_plan(version: int, dtype: Any, vw: int, cols: int, rows: int, masked: bool) -> _Plan | None:
    """The launch of forward `version` for this row shape, or None when that version cannot take it."""
    t, m = cuda_type(dtype), cpp_bool(masked)
    if version == 1:
        return _Plan(f"softmax_forward_v1<{t}, {_SIMPLE_THREADS}, {m}>", rows, _SIMPLE_THREADS)
    if version == 2:
        if cols > _WARP * _FWD_E:
            return None
        e = _FWD_E_SMALL if cols <= _WARP * _FWD_E_SMALL else _FWD_E
        grid = -(-rows // _WARP_ROWS)
        return _Plan(f"softmax_forward_v2<{t}, {vw}, {e // vw}, {m}>", grid, _WARP_ROWS * _WARP)
    if version == 3:
        threads = _fwd_v3_threads(cols, masked)
        if threads is None:
            return None
        return _Plan(f"softmax_forward_v3<{t}, {vw}, {_FWD_E // vw}, {threads}, {m}>", rows, threads)
    if version == 4:
        return _Plan(f"softmax_forward_v4<{t}, {vw}, {_LOOP_THREADS}, {m}>", rows, _LOOP_THREADS)
    if version == 5:
        config = _fwd_v5_config(cols, masked)
        if config is None:
            return None
        threads, cluster = config
        expr = f"softmax_forward_v5<{t}, {vw}, {_FWD_E // vw}, {threads}, {cluster}, {m}>"
        return _Plan(expr, rows * cluster, threads)
    raise ValueError(f"no forward version {version}")


def _default_forward_version(cols: int, masked: bool, clusters: bool) -> int:
    if cols <= _WARP * _FWD_E:
        return 2
    if _fwd_v3_threads(cols, masked) is not None and (cols <= _CLUSTER_ABOVE or not clusters):
        return 3
    if clusters and _fwd_v5_config(cols, masked) is not None:
        return 5
    return 4


def _backward_plan(version: int, dtype: Any, vw: int, cols: int, rows: int) -> _Plan | None:
    t = cuda_type(dtype)
    small, large = _bwd_vecs(dtype, vw)
    if version == 1:
        return _Plan(f"softmax_backward_v1<{t}, {_SIMPLE_THREADS}>", rows, _SIMPLE_THREADS)
    if version == 2:
        if cols > _WARP * large * vw:
            return None
        vecs = small if cols <= _WARP * small * vw else large
        return _Plan(f"softmax_backward_v2<{t}, {vw}, {vecs}>", -(-rows // _WARP_ROWS), _WARP_ROWS * _WARP)
    if version == 3:
        threads = _bwd_threads(cols, large * vw)
        if threads is None:
            return None
        return _Plan(f"softmax_backward_v3<{t}, {vw}, {large}, {threads}>", rows, threads)
    if version == 4:
        return _Plan(f"softmax_backward_v4<{t}, {vw}, {_LOOP_THREADS}>", rows, _LOOP_THREADS)
    raise ValueError(f"no backward version {version}")


def _default_backward_version(dtype: Any, vw: int, cols: int) -> int:
    large = _bwd_vecs(dtype, vw)[1] * vw
    if cols <= _WARP * large:
        return 2
    if _bwd_threads(cols, large) is not None:
        return 3
    return 4


def max_cols(
    version: int, dtype: Any, vw: int, *, backward: bool = False, masked: bool = False
) -> int | None:
    """The longest row `version` takes (None: any length). For tests and benchmarks."""
    if backward:
        large = _bwd_vecs(dtype, vw)[1] * vw
        return {1: None, 2: _WARP * large, 3: _BLOCK_THREADS[-1] * large, 4: None}[version]
    if version == 3:
        return (_MASKED_MAX_THREADS if masked else _BLOCK_THREADS[-1]) * _FWD_E
    if version == 5:
        threads, cluster = (_MASKED_CLUSTERS if masked else _CLUSTERS)[-1]
        return threads * cluster * _FWD_E
    return {1: None, 2: _WARP * _FWD_E, 4: None}[version]


def _instantiations() -> list[str]:
    """Every name expression the launchers can request, built by the same plan functions they use."""
    exprs: list[str] = []
    for dtype in _checks.GPU_DTYPES:
        for vw in (1, full_vector_width(dtype)):
            for masked in (False, True):
                sizes = [1, _WARP * _FWD_E_SMALL, _WARP * _FWD_E]  # v1, v2 small / large, v4
                sizes += [threads * _FWD_E for threads in _BLOCK_THREADS]  # v3
                sizes += [threads * cluster * _FWD_E for threads, cluster in _CLUSTERS]  # v5
                for version in FORWARD_VERSIONS:
                    for cols in sizes:
                        plan = _forward_plan(version, dtype, vw, cols, 1, masked)
                        if plan is not None:
                            exprs.append(plan.expr)
            small, large = _bwd_vecs(dtype, vw)
            sizes = [1, _WARP * small * vw, _WARP * large * vw]
            sizes += [threads * large * vw for threads in _BLOCK_THREADS]
            for version in BACKWARD_VERSIONS:
                for cols in sizes:
                    plan = _backward_plan(version, dtype, vw, cols, 1)
                    if plan is not None:
                        exprs.append(plan.expr)
    return list(dict.fromkeys(exprs))  # unique, in order


register_family(_FAMILY, _instantiations)


def _has_clusters(device_id: int) -> bool:
    """Thread-block clusters (v5) need compute capability 9.0 or newer."""
    return limits_of(device_id).compute_capability >= 90


# ---- argument checks and plumbing -------------------------------------------------------------------------


def _check_causal(causal: Any, x: Any, axis: int) -> bool:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if causal and (x.ndim < 2 or axis != x.ndim - 1):
        raise ValueError(
            "causal=True needs x of at least 2 dimensions (..., S_q, S_k) and axis = -1 (the key axis); "
            f"got x of shape {tuple(x.shape)} and axis={axis}"
        )
    return bool(causal)


def _check_mask(mask: Any, x: Any) -> None:
    _checks.check_same_place(x, "x", mask=mask)
    try:
        shape = np.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        )


def _mask_rows(mask: Any, shape: tuple[int, ...], axis: int) -> tuple[Any, int, int]:
    """The mask as the kernels read it: (base, div, mod) such that row r of x (as (rows, cols)) adds row
    (r // div) % mod of the C-contiguous (mask_rows, cols) matrix starting at `base`.

    Broadcasting (stride-0) axes outside one C-contiguous block of mask axes become div and mod without a
    copy; any other layout is materialised once as a contiguous (rows, cols) array."""
    xp = backend.array_module(mask)
    view = xp.broadcast_to(mask, shape)
    if axis != len(shape) - 1:
        view = xp.moveaxis(view, axis, -1)
    cols = view.shape[-1]
    rows = math.prod(view.shape[:-1])
    item = view.itemsize
    if cols == 1 or view.strides[-1] == item:
        dims = [(n, st) for n, st in zip(view.shape[:-1], view.strides[:-1], strict=True) if n != 1]
        used = [i for i, (_, st) in enumerate(dims) if st != 0]
        if not used:
            return view, 1, 1
        contiguous = used == list(range(used[0], used[-1] + 1))
        expected = cols * item
        for i in reversed(used):
            contiguous = contiguous and dims[i][1] == expected
            expected *= dims[i][0]
        if contiguous:
            mod = math.prod(dims[i][0] for i in used)
            div = math.prod(n for n, _ in dims[used[-1] + 1 :])
            return view, div, mod
    return xp.ascontiguousarray(view).reshape(rows, cols), 1, rows


def _output_rows(
    out_arr: Any, axis: int, ndim: int, rows: int, cols: int, inputs: list[Any], like: Any
) -> Any:
    """Where the kernel writes its (rows, cols) result: `out` itself when it is C-contiguous with the axis
    last and each input is either that very buffer (in place is safe: see softmax.cu) or shares no memory
    with it; else a fresh array (copied into `out` afterwards)."""
    cp = backend.require_cupy()
    if out_arr is None or axis != ndim - 1 or not out_arr.flags.c_contiguous:
        return cp.empty((rows, cols), dtype=like.dtype)
    for a in inputs:
        if a is None:
            continue
        alias = a.data.ptr == out_arr.data.ptr and a.flags.c_contiguous and a.size == out_arr.size
        if not alias and cp.may_share_memory(out_arr, a):
            return cp.empty((rows, cols), dtype=like.dtype)
    return out_arr.reshape(rows, cols)


def _numba_softmax() -> Any:
    # Imported on first use: Numba is an optional extra and slow to import.
    from rawformer.kernels.numba import softmax as numba_softmax

    return numba_softmax


def _unsupported(version: int, cols: int, limit: int | None, masked: bool, what: str) -> ValueError:
    if limit is None:
        return ValueError(f"{what} version={version} needs thread-block clusters (compute capability >= 9.0)")
    extra = " with a mask" if masked else ""
    return ValueError(f"{what} version={version} takes rows of at most {limit} columns{extra}, got {cols}")


# ---- forward --------------------------------------------------------------------------------------------


def _forward(
    x: Any,
    axis: int,
    scale: Any,
    mask: Any,
    causal: Any,
    out: Any,
    impl: str | None,
    version: int | None,
    log: bool,
) -> Any:
    x, give_back = adopt(x, "x")
    mask_arr = adopt_optional(mask, "mask")
    out_arr = adopt_optional(out, "out")
    _checks.check_float(x, "x")
    axis = _checks.normalize_axis(axis, x.ndim)
    scale_v = _scale_value(scale)
    causal = _check_causal(causal, x, axis)
    if mask_arr is not None:
        _check_mask(mask_arr, x)
    _checks.check_out(out_arr, "out", x)
    which = _checks.check_impl(impl, x)
    check_version(version, FORWARD_VERSIONS, which)
    shape = tuple(x.shape)

    if which == "numpy":
        y = _ref_forward(x, axis, scale, mask_arr, causal, log).astype(x.dtype)
        return finish(y, out_arr, out, give_back)
    cp = backend.require_cupy()
    if x.size == 0:
        return finish(cp.empty(shape, dtype=x.dtype), out_arr, out, give_back)

    x2 = _checks.as_rows(x, axis)  # (rows, cols), C-contiguous
    rows, cols = x2.shape
    masked = mask_arr is not None
    causal_rows, causal_offset = (shape[-2], shape[-1] - shape[-2]) if causal else (0, 0)
    if masked:
        mask_base, mask_div, mask_mod = _mask_rows(mask_arr, shape, axis)
    else:
        mask_base, mask_div, mask_mod = None, 1, 1

    if which == "numba":
        y2 = cp.empty_like(x2)
        m2 = _mask_full(mask_base, mask_div, mask_mod, rows, cols) if masked else None
        _numba_softmax().softmax_forward(x2, y2, scale_v, log, m2, causal_rows, causal_offset)
        return finish(_checks.from_rows(y2, shape, axis), out_arr, out, give_back)

    y2 = _output_rows(out_arr, axis, x.ndim, rows, cols, [x2, mask_base], x)
    vw = vector_width(x.dtype, [x2, y2, mask_base], cols)
    clusters = _has_clusters(cp.cuda.Device().id)
    chosen = version if version is not None else _default_forward_version(cols, masked, clusters)
    plan = None if (chosen == 5 and not clusters) else _forward_plan(chosen, x.dtype, vw, cols, rows, masked)
    if plan is None:
        limit = max_cols(chosen, x.dtype, vw, masked=masked) if (chosen != 5 or clusters) else None
        raise _unsupported(chosen, cols, limit, masked, "softmax forward")
    launch(
        get_function(_FAMILY, plan.expr),
        (plan.grid,),
        (plan.block,),
        (
            x2,
            y2,
            x2 if mask_base is None else mask_base,  # never read without a mask
            i32(rows),
            i32(cols),
            np.float32(scale_v * LOG2E),
            i32(mask_div),
            i32(mask_mod),
            i32(causal_rows),
            i32(causal_offset),
            i32(int(log)),
        ),
        bytes_moved=2 * x2.nbytes,
    )
    return finish(_checks.from_rows(y2, shape, axis), out_arr, out, give_back)


def _mask_full(base: Any, div: int, mod: int, rows: int, cols: int) -> Any:
    """The contiguous (rows, cols) mask the Numba kernels take: row r is base row (r // div) % mod, where
    the `mod` rows of `cols` elements lie contiguous from `base`'s first element (see _mask_rows)."""
    xp = backend.array_module(base)
    if div == 1 and mod == rows and base.shape == (rows, cols) and base.flags.c_contiguous:
        return base
    table = xp.lib.stride_tricks.as_strided(
        base, shape=(mod, cols), strides=(cols * base.itemsize, base.itemsize)
    )
    return xp.ascontiguousarray(table[(xp.arange(rows) // div) % mod])


def softmax(
    x: Any,
    axis: int = -1,
    *,
    scale: Any = None,
    mask: Any = None,
    causal: bool = False,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Softmax of scale * x + mask along `axis`.

        z = scale * x + mask   (-inf where causally masked)
        y = exp(z - max z) / sum exp(z - max z)

    Parameters
    ----------
    x : array (..., cols, ...), float16 / float32 (float64 on the CPU)
    axis : the axis the softmax runs along (default: the last)
    scale : optional finite real multiplying x (default 1), e.g. 1 / sqrt(head_dim)
    mask : optional additive array of x's dtype, broadcastable to x (e.g. (cols,), (S_q, S_k) under
        (B, H, S_q, S_k), or a (B, 1, 1, S_k) padding mask; -inf removes an entry)
    causal : mask entry j of query i when j > i + (S_k - S_q); needs axis = -1 and x (..., S_q, S_k)
    out : optional array of x's shape, dtype and device to write into (may be x itself)
    impl : None / "cuda" (CUDA kernel) or "numba", for GPU arrays
    version : CUDA kernel version 1-5 (see softmax.cu); default: picked by row length (module docstring)

    Returns
    -------
    y : array like x (`out` when given)

    Notes
    -----
    Without mask and causal, NaN and inf follow NumPy's exp(z - max) / sum: a NaN or +inf in a row gives a
    row of NaN, a row of only -inf gives NaN. With a mask or causal=True, a row whose every entry is -inf
    after masking gives zeros (the attention convention); NaN and +inf still give NaN.
    """
    return _forward(x, axis, scale, mask, causal, out, impl, version, log=False)


def log_softmax(
    x: Any,
    axis: int = -1,
    *,
    scale: Any = None,
    mask: Any = None,
    causal: bool = False,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Log-softmax of scale * x + mask along `axis`: y = z - max z - log(sum exp(z - max z)).

    Parameters and NaN / inf rules as `softmax`; a fully masked row (with a mask or causal=True) gives
    zeros, as in softmax (not the -inf of log 0), so no -inf reaches a loss.

    Returns
    -------
    y : array like x (`out` when given)
    """
    return _forward(x, axis, scale, mask, causal, out, impl, version, log=True)


# ---- backward -------------------------------------------------------------------------------------------


def _backward(
    dy: Any, y: Any, axis: int, scale: Any, out: Any, impl: str | None, version: int | None, log: bool
) -> Any:
    dy, give_back = adopt(dy, "dy")
    y = adopt(y, "y")[0]
    out_arr = adopt_optional(out, "out")
    _checks.check_float(dy, "dy")
    _checks.check_same_place(dy, "dy", y=y)
    _checks.check_shape(y, "y", tuple(dy.shape))
    axis = _checks.normalize_axis(axis, dy.ndim)
    scale_v = _scale_value(scale)
    _checks.check_out(out_arr, "out", dy)
    which = _checks.check_impl(impl, dy)
    check_version(version, BACKWARD_VERSIONS, which)
    shape = tuple(dy.shape)

    if which == "numpy":
        ref = log_softmax_backward_ref if log else softmax_backward_ref
        return finish(ref(dy, y, axis, scale=scale_v).astype(dy.dtype), out_arr, out, give_back)
    cp = backend.require_cupy()
    if dy.size == 0:
        return finish(cp.empty(shape, dtype=dy.dtype), out_arr, out, give_back)

    dy2, y2 = _checks.as_rows(dy, axis), _checks.as_rows(y, axis)
    rows, cols = dy2.shape
    if which == "numba":
        dx2 = cp.empty_like(dy2)
        _numba_softmax().softmax_backward(dy2, y2, dx2, scale_v, log)
        return finish(_checks.from_rows(dx2, shape, axis), out_arr, out, give_back)

    dx2 = _output_rows(out_arr, axis, dy.ndim, rows, cols, [dy2, y2], dy)
    vw = vector_width(dy.dtype, [dy2, y2, dx2], cols)
    chosen = version if version is not None else _default_backward_version(dy.dtype, vw, cols)
    plan = _backward_plan(chosen, dy.dtype, vw, cols, rows)
    if plan is None:
        raise _unsupported(
            chosen, cols, max_cols(chosen, dy.dtype, vw, backward=True), False, "softmax backward"
        )
    launch(
        get_function(_FAMILY, plan.expr),
        (plan.grid,),
        (plan.block,),
        (dy2, y2, dx2, i32(rows), i32(cols), np.float32(scale_v), i32(int(log))),
        bytes_moved=3 * dy2.nbytes,
    )
    return finish(_checks.from_rows(dx2, shape, axis), out_arr, out, give_back)


def softmax_backward(
    dy: Any,
    y: Any,
    axis: int = -1,
    *,
    scale: Any = None,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Gradient of y = softmax(scale * x + mask) with respect to x.

        dx = scale * y * (dy - sum(dy * y))   (sum along `axis`)

    Parameters
    ----------
    dy : array, the gradient of the loss with respect to y; float16 / float32 (float64 on the CPU)
    y : array of dy's shape, dtype and device: the forward output
    axis : the softmax axis (default: the last)
    scale : the forward's scale (default 1)
    out : optional array of dy's shape, dtype and device to write dx into (may be dy itself)
    impl : None / "cuda" (CUDA kernel) or "numba", for GPU arrays
    version : CUDA kernel version 1-4 (see softmax.cu); default: picked by row length (module docstring)

    Returns
    -------
    dx : array like dy (`out` when given)
    """
    return _backward(dy, y, axis, scale, out, impl, version, log=False)


def log_softmax_backward(
    dy: Any,
    y: Any,
    axis: int = -1,
    *,
    scale: Any = None,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Gradient of y = log_softmax(scale * x + mask) with respect to x.

        dx = scale * (dy - exp(y) * sum(dy))   (sum along `axis`)

    Parameters, returns: as `softmax_backward`, with y the log_softmax output.
    """
    return _backward(dy, y, axis, scale, out, impl, version, log=True)
