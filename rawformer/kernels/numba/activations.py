"""Numba CUDA GELU (tanh and erf forms, optional bias) and SwiGLU, forward and backward.

Formulas (elementwise, float32 arithmetic; u = x + bias with bias broadcast along rows):
    gelu tanh   y = 0.5 u (1 + tanh z) = u sigmoid(2z),  z = k (u + c u^3), k = sqrt(2/pi), c = 0.044715
                y' = s + 2 u s (1 - s) k (1 + 3 c u^2),  s = sigmoid(2z)
    gelu erf    y = 0.5 u (1 + erf(u / sqrt 2)) = 0.5 u erfc(-u / sqrt 2),
                y' = 0.5 erfc(-u / sqrt 2) + u exp(-u^2 / 2) / sqrt(2 pi)
    (the sigmoid / erfc spellings keep full relative accuracy at negative u, where 1 + tanh, 1 + erf cancel)
    gelu_backward  dx = dy * y'(u)  (the caller sums dx over rows for dbias)
    swiglu      y = silu(g) * up,  silu(g) = g * sigmoid(g)
    backward    dgate = dy * up * sigmoid(g) * (1 + g (1 - sigmoid(g))),  dup = dy * silu(g)
sigmoid(g) is computed from exp(-|g|), so it neither overflows nor loses the small side.

Kernel: grid-stride over vectors of `vec` elements of the flattened arrays (16-byte loads and stores when
the pointers, and with a bias the row length, allow), the last n % vec elements one per thread after the
loop. About 32 blocks of 256 threads per SM, each thread several vectors: enough bytes in flight per SM to
cover HBM latency. Memory traffic equals the CuPy CUDA kernels'.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from rawformer.kernels.numba._numba import (
    cuda,
    current_stream,
    flat,
    float32,
    int64,
    jit_kernel,
    launch,
    load_vec,
    sm_count,
    store_vec,
    vec_width,
)

BLOCK = 256
BLOCKS_PER_SM = 32
HALF = np.float32(0.5)
ONE = np.float32(1.0)
TWO = np.float32(2.0)
K_TANH = np.float32(0.7978845608)  # sqrt(2 / pi)
C_TANH = np.float32(0.044715)
C3_TANH = np.float32(3 * 0.044715)
INV_SQRT2 = np.float32(1 / np.sqrt(2.0))
INV_SQRT_2PI = np.float32(1 / np.sqrt(2 * np.pi))


@cuda.jit(device=True)
def _gelu(u, tanh_form):
    # 0.5 (1 + tanh z) = sigmoid(2 z) and 0.5 (1 + erf v) = 0.5 erfc(-v): no cancellation at negative u,
    # where the textbook forms lose every digit of the (tiny) result
    if tanh_form:
        return u / (ONE + math.exp(-TWO * K_TANH * (u + C_TANH * u * u * u)))
    return HALF * u * math.erfc(-u * INV_SQRT2)


@cuda.jit(device=True)
def _gelu_grad(u, tanh_form):
    if tanh_form:
        z2 = TWO * K_TANH * (u + C_TANH * u * u * u)
        s = ONE / (ONE + math.exp(-z2))  # sigmoid(2z) = 0.5 (1 + tanh z)
        sc = ONE / (ONE + math.exp(z2))  # 1 - sigmoid(2z), computed without cancellation
        # 0.5 u (1 - tanh^2 z) k (1 + 3c u^2) with 1 - tanh^2 z = 4 s (1 - s)
        return s + TWO * u * s * sc * K_TANH * (ONE + C3_TANH * u * u)
    return HALF * math.erfc(-u * INV_SQRT2) + u * math.exp(-HALF * u * u) * INV_SQRT_2PI


@cuda.jit(device=True)
def _sigmoid(g):
    e = math.exp(-abs(g))
    return ONE / (ONE + e) if g >= 0 else e / (ONE + e)


def _grid(n_items: int, a: Any) -> int:
    return max(1, min(-(-n_items // BLOCK), sm_count(a) * BLOCKS_PER_SM))


# ----------------------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _gelu_forward(vec: int, has_bias: bool, tanh_form: bool):
    @jit_kernel(BLOCK)
    def gelu_forward_kernel(x, bias, y, n, cols):
        v = cuda.local.array(vec, float32)
        bv = cuda.local.array(vec, float32)
        nvec = n // vec
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < nvec:
            e = int64(i) * vec
            load_vec(x, e, v, 0, vec)
            if has_bias:
                load_vec(bias, e % cols, bv, 0, vec)  # vec divides cols: one row, aligned
            for k in range(vec):
                u = v[k] + bv[k] if has_bias else v[k]
                v[k] = _gelu(u, tanh_form)
            store_vec(y, e, v, 0, vec)
            i += stride
        j = int64(nvec) * vec + cuda.grid(1)  # the n % vec tail
        if j < n:
            load_vec(x, j, v, 0, 1)
            if has_bias:
                load_vec(bias, j % cols, bv, 0, 1)
            u = v[0] + bv[0] if has_bias else v[0]
            v[0] = _gelu(u, tanh_form)
            store_vec(y, j, v, 0, 1)

    return gelu_forward_kernel


@functools.cache
def _gelu_backward(vec: int, has_bias: bool, tanh_form: bool):
    @jit_kernel(BLOCK)
    def gelu_backward_kernel(dy, x, bias, dx, n, cols):
        g = cuda.local.array(vec, float32)
        v = cuda.local.array(vec, float32)
        bv = cuda.local.array(vec, float32)
        nvec = n // vec
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < nvec:
            e = int64(i) * vec
            load_vec(dy, e, g, 0, vec)
            load_vec(x, e, v, 0, vec)
            if has_bias:
                load_vec(bias, e % cols, bv, 0, vec)
            for k in range(vec):
                u = v[k] + bv[k] if has_bias else v[k]
                g[k] = g[k] * _gelu_grad(u, tanh_form)
            store_vec(dx, e, g, 0, vec)
            i += stride
        j = int64(nvec) * vec + cuda.grid(1)
        if j < n:
            load_vec(dy, j, g, 0, 1)
            load_vec(x, j, v, 0, 1)
            if has_bias:
                load_vec(bias, j % cols, bv, 0, 1)
            u = v[0] + bv[0] if has_bias else v[0]
            g[0] = g[0] * _gelu_grad(u, tanh_form)
            store_vec(dx, j, g, 0, 1)

    return gelu_backward_kernel


def _tanh_form(approximate: str) -> bool:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return approximate == "tanh"


def gelu_forward(x, bias, y, approximate, vec: int | None = None) -> None:
    """y = gelu(x + bias).

    Parameters
    ----------
    x, y : C-contiguous float16/float32 device arrays of one shape, (rows, cols) (any shape without bias).
    bias : None or (cols,) array, added along the last axis.
    approximate : "tanh" or "none" (the erf form).
    vec : elements per access; None picks the widest the arrays allow (tests force narrower ones).
    """
    tanh_form = _tanh_form(approximate)
    n = x.size
    if n == 0:
        return
    cols = x.shape[-1]
    has_bias = bias is not None
    if vec is None:
        vec = vec_width((cols,) if has_bias else (), x, bias, y)
    args = (flat(x), flat(bias if has_bias else x), flat(y), n, cols)
    launch(_gelu_forward(vec, has_bias, tanh_form), _grid(-(-n // vec), x), BLOCK, current_stream(x), *args)


def gelu_backward(dy, x, bias, dx, approximate, vec: int | None = None) -> None:
    """dx = dy * gelu'(x + bias); shapes as `gelu_forward`, dy and dx like x."""
    tanh_form = _tanh_form(approximate)
    n = x.size
    if n == 0:
        return
    cols = x.shape[-1]
    has_bias = bias is not None
    if vec is None:
        vec = vec_width((cols,) if has_bias else (), dy, x, bias, dx)
    args = (flat(dy), flat(x), flat(bias if has_bias else x), flat(dx), n, cols)
    launch(_gelu_backward(vec, has_bias, tanh_form), _grid(-(-n // vec), x), BLOCK, current_stream(x), *args)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _swiglu_forward(vec: int):
    @jit_kernel(BLOCK)
    def swiglu_forward_kernel(gate, up, y, n):
        gv = cuda.local.array(vec, float32)
        uv = cuda.local.array(vec, float32)
        nvec = n // vec
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < nvec:
            e = int64(i) * vec
            load_vec(gate, e, gv, 0, vec)
            load_vec(up, e, uv, 0, vec)
            for k in range(vec):
                gv[k] = gv[k] * _sigmoid(gv[k]) * uv[k]
            store_vec(y, e, gv, 0, vec)
            i += stride
        j = int64(nvec) * vec + cuda.grid(1)
        if j < n:
            load_vec(gate, j, gv, 0, 1)
            load_vec(up, j, uv, 0, 1)
            gv[0] = gv[0] * _sigmoid(gv[0]) * uv[0]
            store_vec(y, j, gv, 0, 1)

    return swiglu_forward_kernel


@functools.cache
def _swiglu_backward(vec: int):
    @jit_kernel(BLOCK)
    def swiglu_backward_kernel(dy, gate, up, dgate, dup, n):
        dv = cuda.local.array(vec, float32)
        gv = cuda.local.array(vec, float32)
        uv = cuda.local.array(vec, float32)
        nvec = n // vec
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < nvec:
            e = int64(i) * vec
            load_vec(dy, e, dv, 0, vec)
            load_vec(gate, e, gv, 0, vec)
            load_vec(up, e, uv, 0, vec)
            for k in range(vec):
                g = gv[k]
                s = _sigmoid(g)
                gv[k] = dv[k] * uv[k] * s * (ONE + g * (ONE - s))
                uv[k] = dv[k] * g * s
            store_vec(dgate, e, gv, 0, vec)
            store_vec(dup, e, uv, 0, vec)
            i += stride
        j = int64(nvec) * vec + cuda.grid(1)
        if j < n:
            load_vec(dy, j, dv, 0, 1)
            load_vec(gate, j, gv, 0, 1)
            load_vec(up, j, uv, 0, 1)
            g = gv[0]
            s = _sigmoid(g)
            gv[0] = dv[0] * uv[0] * s * (ONE + g * (ONE - s))
            uv[0] = dv[0] * g * s
            store_vec(dgate, j, gv, 0, 1)
            store_vec(dup, j, uv, 0, 1)

    return swiglu_backward_kernel


def swiglu_forward(gate, up, y, vec: int | None = None) -> None:
    """y = silu(gate) * up, elementwise; C-contiguous float16/float32 device arrays of one shape."""
    n = gate.size
    if n == 0:
        return
    if vec is None:
        vec = vec_width((), gate, up, y)
    launch(
        _swiglu_forward(vec),
        _grid(-(-n // vec), gate),
        BLOCK,
        current_stream(gate),
        flat(gate),
        flat(up),
        flat(y),
        n,
    )


def swiglu_backward(dy, gate, up, dgate, dup, vec: int | None = None) -> None:
    """dgate = dy * up * silu'(gate), dup = dy * silu(gate); arrays of one shape, dgate and dup written."""
    n = gate.size
    if n == 0:
        return
    if vec is None:
        vec = vec_width((), dy, gate, up, dgate, dup)
    args = (flat(dy), flat(gate), flat(up), flat(dgate), flat(dup), n)
    launch(_swiglu_backward(vec), _grid(-(-n // vec), gate), BLOCK, current_stream(gate), *args)
