"""Projections: `rf.linear` = x @ w + bias, and `rf.linear_swiglu` = silu(x @ wg + bg) * (x @ wu + bu).

    y = rf.linear(x, w, b)             x (..., K), w (K, N), b (N,) or None  ->  y (..., N)
    y = rf.linear_swiglu(x, wg, wu)    the gate and up projections of a Llama MLP and the SwiGLU between

On CuPy arrays, one-row inputs (a batch-1 decode step; GEMV_MAX_ROWS says why only those) whose weight is
the transposed view of a C-contiguous (N, K) matrix (the (out, in) layout of nn.Linear weights, which the
models keep, and the lm head `wte.T`) run gemv_nk of cuda_src/gemv.cu: every output's weights are one
contiguous row streamed with many 16-byte loads in flight, launched with programmatic dependent launch so
that a decode step's chain of kernels overlaps. Everything else goes to cuBLAS
(rawformer.kernels.gemm.matmul, capturable in CUDA graphs), which computes the same product. NumPy arrays
run the float64 reference (result in x's dtype).

gemv_nk needs K and the row pitch to be multiples of the vector width (8 halves / 4 floats), 16-byte
aligned W and x rows. Rows per warp and loads in flight are chosen by N (`_nk_config`, measured).
Its twin gemv_nk_norm (the RMSNorm and residual add of the input in the prologue) is launched from here too,
for rf.add_rms_norm_linear (rawformer/ops/norm_linear.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional

__all__ = ["GEMV_MAX_ROWS", "linear", "linear_ref", "linear_swiglu", "linear_swiglu_ref"]

_FAMILY = "gemv"
# Rows up to which the GEMV beats cuBLAS (bench/decode_profile.py --nk-sweep, H100, fp16, weights in HBM,
# results in bench/results/h100/gemv_sweep.json): at 1 row 1.1-2.0x faster on every decoder shape; at 2 rows
# slower on the 1B decoder's qkv / gate / down shapes; at 4-8 rows up to 3.6x slower (x is re-read per row).
GEMV_MAX_ROWS = 1
_ROW_TILES = (1, 2, 4, 8)  # compiled row counts: the sweep raises GEMV_MAX_ROWS to time 2-8 rows
# gemv_nk: (output columns per warp, 16-byte loads in flight per lane and column), chosen by K;
# bench/decode_profile.py --nk-sweep measures the alternatives
NK_SHAPES = ((2, 4), (1, 8))
NK_CONFIG: tuple[int, int] | None = None  # force one (the sweep); None: _nk_config(n)
_THREADS = 256
_WARPS = 8
_NULL = np.uint64(0)


def _vw(dtype: Any) -> int:
    return 16 // np.dtype(dtype).itemsize


def _instantiations() -> list[str]:
    out = []
    for kernel in ("gemv_nk", "gemv_nk_norm"):  # gemv_nk_norm: rf.add_rms_norm_linear (ops/norm_linear.py)
        for t in ("__half", "float"):
            for m in _ROW_TILES:
                for rows, unroll in NK_SHAPES:
                    for dual in ("false", "true"):
                        out.append(f"gemv::{kernel}<{t}, {m}, {rows}, {unroll}, {dual}>")
    return out


register_family(_FAMILY, _instantiations)


# ---- NumPy references -------------------------------------------------------------------------------------


def linear_ref(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """float64 x @ w (+ bias)."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64)
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def linear_swiglu_ref(x: Any, w_gate: Any, w_up: Any, b_gate: Any = None, b_up: Any = None) -> np.ndarray:
    """float64 silu(x @ w_gate + b_gate) * (x @ w_up + b_up)."""
    g = linear_ref(x, w_gate, b_gate)
    return g / (1.0 + np.exp(-g)) * linear_ref(x, w_up, b_up)


# ---- argument checks --------------------------------------------------------------------------------------


def _check_args(x: Any, w: Any, bias: Any, wname: str, bname: str) -> tuple[Any, Any, Any]:
    x, _ = adopt(x, "x")
    w, _ = adopt(w, wname)
    bias = adopt_optional(bias, bname)
    _checks.check_float(x, "x")
    if w.ndim != 2:
        raise ValueError(f"{wname} must be 2-D (K, N), got shape {tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and {wname} {tuple(w.shape)} do not chain (x.shape[-1] != K)")
    _checks.check_same_place(x, "x", **{wname: w, bname: bias})
    if bias is not None:
        _checks.check_shape(bias, bname, (w.shape[1],))
    return x, w, bias


# ---- layouts ----------------------------------------------------------------------------------------------


def _aligned(a: Any) -> bool:
    return int(a.data.ptr) % 16 == 0


def _nk_pitch(x2: Any, w: Any) -> int | None:
    """Row pitch (elements) of the (N, K) matrix w is a transposed view of, when gemv_nk can read it."""
    item, vw = w.itemsize, _vw(w.dtype)
    s0, s1 = w.strides
    if s0 != item or s1 % item or w.shape[0] % vw or not _aligned(w):
        return None
    pitch = s1 // item
    if pitch % vw or x2.strides[1] != item or x2.strides[0] % 16 or not _aligned(x2):
        return None
    return pitch


def _row_tile(rows: int) -> int:
    return next(m for m in _ROW_TILES if m >= rows)  # the compiled row count M of gemv_nk


def _nk_config(n: int) -> tuple[int, int]:
    """(rows per warp, loads in flight) measured on the H100 at batch 1 (gemv_sweep.json): one column per
    warp with 8 loads in flight is 0.5-0.6 us faster up to N = 2560 (more warps); two columns with 4 loads
    1.9 us faster at N = 5632; equal within 1% on the 32000-column lm head."""
    return (1, 8) if n <= 4096 else (2, 4)


def _gemv_nk(
    x2: Any, w: Any, w2: Any, pitch: int, b: Any, b2: Any, out: Any, norm: tuple[Any, ...] | None = None
) -> None:
    """Launch gemv_nk over the (rows, K) x2 into out (rows, N). With `norm` = (a2, ln_w, s_out, eps):
    gemv_nk_norm, x2 being the residual stream and the input h = rms_norm(x2 + a2) * ln_w computed in the
    kernel (a2 / ln_w / s_out None or (rows, K) / (K,) / (rows, K); the caller checked alignment and that
    rows * K * itemsize fits NORM_SMEM_LIMIT)."""
    rows, k = x2.shape
    n = w.shape[1]
    m = _row_tile(rows)
    dual = w2 is not None
    rows_per_warp, unroll = NK_CONFIG or _nk_config(n)
    name = "gemv_nk" if norm is None else "gemv_nk_norm"
    expr = (
        f"gemv::{name}<{cuda_type(w.dtype)}, {m}, {rows_per_warp}, {unroll}, {'true' if dual else 'false'}>"
    )
    kernel = get_function(_FAMILY, expr)
    grid = -(-n // (_WARPS * rows_per_warp))
    args = (
        x2, i32(x2.strides[0] // x2.itemsize), w, w2 if dual else _NULL, i32(pitch),
        b if b is not None else _NULL, b2 if b2 is not None else _NULL,
        out, i32(out.strides[0] // out.itemsize), i32(rows), i32(k), i32(n),
    )  # fmt: skip
    smem = 0
    if norm is not None:
        a2, ln_w, s_out, eps = norm
        args += (
            _NULL if a2 is None else a2, i32(0 if a2 is None else a2.strides[0] // a2.itemsize),
            _NULL if ln_w is None else ln_w, _NULL if s_out is None else s_out,
            i32(0 if s_out is None else s_out.strides[0] // s_out.itemsize), np.float32(eps),
        )  # fmt: skip
        smem = rows * k * x2.itemsize  # h staged in shared memory
    launch(
        kernel, (grid,), (_THREADS,), args, shared_mem=smem,
        bytes_moved=(2 if dual else 1) * w.nbytes, pdl=True,
    )  # fmt: skip


def _rows(x: Any) -> Any:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.strides[1] != x2.itemsize:
        x2 = x2.copy()
    return x2


# ---- public ops -------------------------------------------------------------------------------------------


def linear(x: Any, w: Any, bias: Any = None) -> Any:
    """y = x @ w + bias.

    Parameters
    ----------
    x : (..., K) float16 / float32 (float64 on the CPU) NumPy or CuPy array
    w : (K, N) of x's dtype, where x lives: C-contiguous, or a transposed view (e.g. `wte.T`)
    bias : (N,) or None

    Returns
    -------
    (..., N) of x's dtype. CuPy: one row by the GEMV kernel (when w's layout allows), more by cuBLAS;
    fp32 accumulation.
    """
    x, w, bias = _check_args(x, w, bias, "w", "bias")
    lead = x.shape[:-1]
    if not backend.is_cupy(x):
        return linear_ref(x, w, bias).astype(x.dtype).reshape(*lead, w.shape[1])
    cp = backend.require_cupy()
    x2 = _rows(x)
    rows, n = x2.shape[0], w.shape[1]
    if rows == 0 or n == 0:
        return cp.zeros((*lead, n), dtype=x.dtype)
    if rows <= GEMV_MAX_ROWS:  # (CuPy arrays are float16 / float32: _check_args)
        pitch = _nk_pitch(x2, w)
        if pitch is not None:
            out = cp.empty((rows, n), dtype=x.dtype)
            _gemv_nk(x2, w, None, pitch, bias, None, out)
            return out.reshape(*lead, n)
    from rawformer.kernels import gemm

    y = gemm.matmul(x2, w)
    if bias is not None:
        y += bias
    return y.reshape(*lead, n)


def linear_swiglu(x: Any, w_gate: Any, w_up: Any, b_gate: Any = None, b_up: Any = None) -> Any:
    """silu(x @ w_gate + b_gate) * (x @ w_up + b_up) (the gate / up half of a Llama MLP).

    Parameters
    ----------
    x : (..., K); w_gate, w_up : (K, I) of x's dtype; b_gate, b_up : (I,) or None

    Returns
    -------
    (..., I) of x's dtype. CuPy with one row (and transposed-view weights): one GEMV launch reads both
    matrices and applies SwiGLU to the float32 sums (no (rows, 2 I) intermediate); more rows: two cuBLAS
    GEMMs and rf.swiglu.
    """
    x, w_gate, b_gate = _check_args(x, w_gate, b_gate, "w_gate", "b_gate")
    _, w_up, b_up = _check_args(x, w_up, b_up, "w_up", "b_up")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up {tuple(w_up.shape)} must have w_gate's shape {tuple(w_gate.shape)}")
    lead, n = x.shape[:-1], w_gate.shape[1]
    if not backend.is_cupy(x):
        return linear_swiglu_ref(x, w_gate, w_up, b_gate, b_up).astype(x.dtype).reshape(*lead, n)
    cp = backend.require_cupy()
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0 or n == 0:
        return cp.zeros((*lead, n), dtype=x.dtype)
    if rows <= GEMV_MAX_ROWS:  # (CuPy arrays are float16 / float32: _check_args)
        pitch = _nk_pitch(x2, w_gate)
        if pitch is not None and _nk_pitch(x2, w_up) == pitch:
            out = cp.empty((rows, n), dtype=x.dtype)
            _gemv_nk(x2, w_gate, w_up, pitch, b_gate, b_up, out)
            return out.reshape(*lead, n)
    from rawformer.ops.activations import swiglu

    return swiglu(linear(x, w_gate, b_gate), linear(x, w_up, b_up))
