"""`rf.add_rms_norm_linear`: a pre-norm block's residual add and RMSNorm fused into the projection after it.

    y, s = rf.add_rms_norm_linear(a, x, ln_w, eps, w, bias)              y = linear(h, w, bias)
    y, s = rf.add_rms_norm_linear(a, x, ln_w, eps, w, bias, w2=w2, b2=b2)  y = swiglu(h@w + bias, h@w2 + b2)

        s = x + a                      (rounded to x's dtype; a None: s = x, returned as is)
        h = s / sqrt(mean(s^2) + eps) * ln_w   (rounded to x's dtype)

exactly what `h, s = rf.add_rms_norm(a, x, ln_w, eps)` (or `rf.rms_norm(x, ...)` without a) followed by
`rf.linear(h, w, bias)` / `rf.linear_swiglu(h, w, w2, bias, b2)` computes, rounding included: the maths of a
Llama decoder between two projections. x (..., K) is the residual stream, a (..., K) the branch output to add
to it (None: layer 0's input norm), w / w2 (K, N), bias / b2 (N,).

On CuPy arrays with at most GEMV_MAX_ROWS rows (a batch-1 decode step) in the layout rf.linear's GEMV reads
(w, w2 transposed views of C-contiguous (N, K) matrices, K a multiple of 16 bytes, 16-byte aligned rows)
one launch of gemv_nk_norm (cuda_src/gemv.cu) does it all: every CTA normalises the rows itself into
shared memory and CTA 0 writes s, which saves the add_rms_norm launch (~2-3 us in a CUDA graph, two per
layer). Anything else runs the unfused composition above (the same result). NumPy arrays run the float64
reference with the same rounding points.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, f64
from rawformer.ops.norms import rms_norm_ref

# the module (rf.ops.linear is the function): its GEMV launcher, layout checks and GEMV_MAX_ROWS, read at
# call time (the sweep and the tests change it)
_lin = importlib.import_module("rawformer.ops.linear")

__all__ = ["NORM_SMEM_LIMIT", "add_rms_norm_linear", "add_rms_norm_linear_ref"]

# Bytes of h the fused kernel may stage in shared memory per CTA (rows * K * itemsize): within the default
# dynamic shared memory of every GPU, so no opt-in attribute and several CTAs per SM.
NORM_SMEM_LIMIT = 48 * 1024


def add_rms_norm_linear_ref(
    a: Any, x: Any, ln_w: Any, eps: float, w: Any, bias: Any = None, w2: Any = None, b2: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(y, s) in float64 with the unfused ops' rounding points: s = x + a and h = rms_norm(s) * ln_w are
    rounded to x's dtype (they are arrays of it there), y is not (the caller casts it)."""
    s, h = norm_ref(a, x, ln_w, eps)
    if w2 is None:
        return _lin.linear_ref(h, w, bias), f64(s)
    return _lin.linear_swiglu_ref(h, w, w2, bias, b2), f64(s)


def norm_ref(a: Any, x: Any, ln_w: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The norm half of the fused ops' references: s = x + a (x when a is None) and h = rms_norm(s) * ln_w,
    computed in float64 and each rounded to x's dtype, as the unfused ops store them."""
    dt = np.asarray(x).dtype
    s = np.asarray(x) if a is None else (f64(x) + f64(a)).astype(dt)
    return s, rms_norm_ref(s, ln_w, eps)[0].astype(dt)


def unfused_norm(a: Any, x: Any, ln_w: Any, eps: float) -> tuple[Any, Any]:
    """(h, s) by the unfused ops: rf.rms_norm of x (s = x) or rf.add_rms_norm (s = x + a). The fused ops'
    fallback for what their kernels do not take, and the models' CPU path."""
    from rawformer.ops.norms import add_rms_norm, rms_norm

    return (rms_norm(x, ln_w, eps), x) if a is None else add_rms_norm(a, x, ln_w, eps)


def check_norm_inputs(a: Any, x: Any, ln_w: Any, eps: Any) -> tuple[Any, Any, Any, float]:
    """(a, x, ln_w, eps) adopted and checked: the norm half of a fused op's arguments (this module's and
    rf.int8_add_rms_norm_linear's). x float (..., K); a None or x's shape; ln_w None or (K,); eps >= 0."""
    x, _ = adopt(x, "x")
    a = adopt_optional(a, "a")
    ln_w = adopt_optional(ln_w, "ln_w")
    _checks.check_float(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (..., K)")
    _checks.check_same_place(x, "x", a=a, ln_w=ln_w)
    if a is not None:
        _checks.check_shape(a, "a", tuple(x.shape))
    if ln_w is not None:
        _checks.check_shape(ln_w, "ln_w", (x.shape[-1],))
    return a, x, ln_w, _checks.check_eps(eps)


def _check_args(a: Any, x: Any, ln_w: Any, eps: Any, w: Any, bias: Any, w2: Any, b2: Any) -> tuple[Any, ...]:
    a, x, ln_w, eps = check_norm_inputs(a, x, ln_w, eps)
    x, w, bias = _lin._check_args(x, w, bias, "w", "bias")
    if w2 is not None:
        _, w2, b2 = _lin._check_args(x, w2, b2, "w2", "b2")
        if w2.shape != w.shape:
            raise ValueError(f"w2 {tuple(w2.shape)} must have w's shape {tuple(w.shape)}")
    elif b2 is not None:
        raise ValueError("b2 is given without w2")
    return a, x, ln_w, eps, w, bias, w2, b2


def _fused_layout(a2: Any, x2: Any, ln_w: Any, w: Any, w2: Any) -> int | None:
    """The weight pitch when gemv_nk_norm can run these (rows, K) arrays, else None."""
    rows, k = x2.shape
    if rows == 0 or rows > _lin.GEMV_MAX_ROWS or k == 0 or w.shape[1] == 0:
        return None
    if rows * k * x2.itemsize > NORM_SMEM_LIMIT:
        return None
    pitch = _lin._nk_pitch(x2, w)  # K a vector multiple, x rows and w aligned, w an (N, K) transposed view
    if pitch is None or (w2 is not None and _lin._nk_pitch(x2, w2) != pitch):
        return None
    if ln_w is not None and not _lin._aligned(ln_w):
        return None
    if a2 is not None and (a2.strides[1] != a2.itemsize or a2.strides[0] % 16 or not _lin._aligned(a2)):
        return None
    return pitch


def add_rms_norm_linear(
    a: Any, x: Any, ln_w: Any, eps: float, w: Any, bias: Any = None, *, w2: Any = None, b2: Any = None
) -> tuple[Any, Any]:
    """Residual add, RMSNorm and the projection after it: (y, s).

    Parameters
    ----------
    a : (..., K) or None, x's dtype: the branch output added to the residual stream (None: no add)
    x : (..., K) float16 / float32 (float64 on the CPU), NumPy or CuPy: the residual stream
    ln_w : (K,) or None (scale 1): the RMSNorm weight
    eps : finite, >= 0
    w : (K, N) of x's dtype: C-contiguous or a transposed view (the fast layout: `W.T` of a C-contiguous
        (N, K) W, as the models keep their weights)
    bias : (N,) or None
    w2, b2 : optional second matrix (K, N) and bias (N,): y = silu(h @ w + bias) * (h @ w2 + b2)

    Returns
    -------
    y : (..., N) of x's dtype
    s : (..., K) x + a of x's dtype, the updated residual stream (x itself when a is None)
    """
    a, x, ln_w, eps, w, bias, w2, b2 = _check_args(a, x, ln_w, eps, w, bias, w2, b2)
    lead, n = x.shape[:-1], w.shape[1]
    if not backend.is_cupy(x):
        y, s = add_rms_norm_linear_ref(a, x, ln_w, eps, w, bias, w2, b2)
        return y.astype(x.dtype).reshape(*lead, n), (x if a is None else s.astype(x.dtype))
    cp = backend.require_cupy()
    x2 = _lin._rows(x)
    a2 = None if a is None else _lin._rows(a)
    # the kernel indexes the vectors densely (no-ops for the contiguous ones the models pass)
    ln_w, bias, b2 = (None if v is None else cp.ascontiguousarray(v) for v in (ln_w, bias, b2))
    pitch = _fused_layout(a2, x2, ln_w, w, w2)
    if pitch is None:  # the unfused composition (prefill, odd layouts): the same result
        h, s = unfused_norm(a, x, ln_w, eps)
        y = _lin.linear(h, w, bias) if w2 is None else _lin.linear_swiglu(h, w, w2, bias, b2)
        return y, s
    rows, k = x2.shape
    out = cp.empty((rows, n), dtype=x.dtype)
    # s goes to a buffer of its own: CTA 0 writes it while the other CTAs still read x
    s_out = None if a is None else cp.empty((rows, k), dtype=x.dtype)
    _lin._gemv_nk(x2, w, w2, pitch, bias, b2, out, norm=(a2, ln_w, s_out, eps))
    return out.reshape(*lead, n), (x if a is None else s_out.reshape(x.shape))
