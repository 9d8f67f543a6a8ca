"""`rf.int8_add_rms_norm_linear`: residual add and RMSNorm fused into a weight-only INT8 projection.

    y, s = rf.int8_add_rms_norm_linear(a, x, ln_w, eps, qw, bias)          y = h @ W~ + bias
    y, s = rf.int8_add_rms_norm_linear(a, x, ln_w, eps, qw, bias, up=qu, b_up=bu)
                                                             y = silu(h @ W~ + bias) * (h @ U~ + b_up)

        s = x + a                                   (rounded to x's dtype; a None: s = x, returned as is)
        h = s / sqrt(mean(s^2) + eps) * ln_w        (rounded to x's dtype)

the INT8 twin of `rf.add_rms_norm_linear` (ops/norm_linear.py): exactly `rf.add_rms_norm` (or `rf.rms_norm`
without a) followed by `rf.int8_linear` / `rf.int8_linear_swiglu`, rounding included. For a batch-1 decode
step on the GPU (one row, K a multiple of 16, 16-byte aligned rows) it is one int8_gemv_norm launch
(cuda_src/int8_gemv.cu with the prologue of cuda_src/norm_prologue.cuh): every CTA normalises the row into
shared memory and CTA 0 writes s, saving the norm's launch (two per Llama layer). Anything else runs the
unfused composition (the same result). NumPy arrays run the float64 reference with the same rounding points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rawformer import backend
from rawformer.ops import quant
from rawformer.ops._checks import f64
from rawformer.ops.norm_linear import NORM_SMEM_LIMIT, check_norm_inputs, norm_ref, unfused_norm

__all__ = ["int8_add_rms_norm_linear", "int8_add_rms_norm_linear_ref"]


def int8_add_rms_norm_linear_ref(
    a: Any, x: Any, ln_w: Any, eps: float, qw: Any, bias: Any = None, up: Any = None, b_up: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(y, s) in float64 with the unfused ops' rounding points (s and h rounded to x's dtype; y is not)."""
    s, h = norm_ref(a, x, ln_w, eps)
    if up is None:
        return quant.int8_linear_ref(h, qw, bias), f64(s)
    return quant.int8_linear_swiglu_ref(h, qw, up, bias, b_up), f64(s)


def _aligned_rows(v: Any) -> bool:
    """Contiguous 16-byte aligned rows (the prologue's vector loads)."""
    rows_ok = v.ndim < 2 or v.strides[0] % 16 == 0
    return v.strides[-1] == v.itemsize and int(v.data.ptr) % 16 == 0 and rows_ok


def _fusable(a2: Any, x2: Any, ln_w: Any, qw: Any) -> bool:
    rows, k = x2.shape
    return (
        1 <= rows <= quant.NORM_MAX_TOKENS
        and k == qw.q.shape[1]  # no padding columns: the prologue normalises exactly K values
        and rows * k * x2.itemsize <= NORM_SMEM_LIMIT
        and all(v is None or _aligned_rows(v) for v in (x2, a2, ln_w))
    )


def int8_add_rms_norm_linear(
    a: Any, x: Any, ln_w: Any, eps: float, qweight: Any, bias: Any = None, *, up: Any = None, b_up: Any = None
) -> tuple[Any, Any]:
    """Residual add, RMSNorm and the INT8 projection after it: (y, s).

    Parameters
    ----------
    a : (..., K) or None, x's dtype: the branch output added to the residual stream (None: no add)
    x : (..., K) float16 / float32 CuPy, or NumPy (the float64 reference): the residual stream
    ln_w : (K,) or None (scale 1): the RMSNorm weight
    eps : finite, >= 0
    qweight : QuantizedWeight of K inputs, N outputs (quantize_int8), on x's device
    bias : (N,) or None
    up, b_up : optional second QuantizedWeight (qweight's shape and grouping) and bias: y = silu(h W~ + bias)
        * (h U~ + b_up)

    Returns
    -------
    y : (..., N) of x's dtype
    s : (..., K) x + a of x's dtype, the updated residual stream (x itself when a is None)
    """
    a, x, ln_w, eps = check_norm_inputs(a, x, ln_w, eps)
    quant._check_weight_for(x, qweight, "qweight")
    n = qweight.out_features
    bias = quant._check_bias(x, bias, "bias", n)
    if up is not None:
        quant._check_weight_for(x, up, "up")
        if up.shape != qweight.shape or up.group_size != qweight.group_size:
            raise ValueError(f"up {up!r} must have qweight's shape and grouping ({qweight!r})")
        b_up = quant._check_bias(x, b_up, "b_up", n)
    elif b_up is not None:
        raise ValueError("b_up is given without up")
    lead = tuple(x.shape[:-1])
    if not backend.is_cupy(x):
        y, s = int8_add_rms_norm_linear_ref(a, x, ln_w, eps, qweight, bias, up, b_up)
        return y.astype(x.dtype).reshape(*lead, n), (x if a is None else s.astype(x.dtype))
    cp = backend.require_cupy()
    x2 = quant._rows(x, qweight.in_features)
    a2 = None if a is None else quant._rows(a, qweight.in_features)
    if not _fusable(a2, x2, ln_w, qweight):  # prefill, several rows, padded K: the unfused composition
        h, s = unfused_norm(a, x, ln_w, eps)
        if up is None:
            return quant.int8_linear(h, qweight, bias), s
        return quant.int8_linear_swiglu(h, qweight, up, bias, b_up), s
    # s goes to a buffer of its own: CTA 0 writes it while the other CTAs still read x
    s_out = None if a is None else cp.empty(x2.shape, dtype=x.dtype)
    y = quant._gemv_cupy(x2, qweight, bias, None, up, b_up, norm=(a2, ln_w, s_out, eps))
    return y.reshape(*lead, n), (x if a is None else s_out.reshape(x.shape))
