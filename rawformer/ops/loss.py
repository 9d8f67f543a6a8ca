"""Fused cross-entropy: per-row loss and log-sum-exp, and the logits' gradient written in the same pass.

Formulas, per row n of logits x (N, V) with target t_n:

    lse_n  = log sum_j exp(x_nj)
    loss_n = lse_n - x_n,t_n                        (0 where t_n == ignore_index)
    dx_nj  = grad_scale * (exp(x_nj - lse_n) - [j == t_n])   (a zero row where t_n == ignore_index)

dx is d(grad_scale * sum_n loss_n) / dx: a mean loss over the M counted rows passes grad_scale = 1 / M
(times the loss scale in mixed precision). A target outside [0, V) that is not ignore_index is an error: a
ValueError on the CPU; on the GPU (no host sync to check it) its loss is NaN and its gradient row the plain
softmax, so the error cannot pass unnoticed. NaN in a row gives NaN loss, lse and gradient for that row.

Arrays run where they live: NumPy inputs run the float64 reference `cross_entropy_ref`; CuPy inputs run
`cuda_src/loss.cu`. The GPU kernels never hold a full-vocab softmax: one block per row keeps an online
(max, sum) per thread while reading the row once, merges them with warp shuffles and shared memory, and, when
dlogits is asked for, reads the row a second time (mostly from L2) to write the gradient. Versions:
    v1  block per row, scalar loads (any layout; the reference kernel)
    v2  block per row, 16-byte vector loads between a scalar head and tail per row (rows of any length and
        alignment, e.g. V = 50257; needs logits and dlogits at the same offset modulo 16 bytes)
    v3  block per row, the row held in registers (16 vectors of 16 bytes per thread: V <= 65536 float16,
        32768 float32), so the logits are read once: exact max, sum, gradient from registers; layout
        rule of v2
Default: v2 where it applies, else v1 (v3 reads a third less; make it the default for V <= its limit once
bench/train_kernels.py has measured it: impl "rf-v3").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version

__all__ = ["cross_entropy", "cross_entropy_ref"]

_FAMILY = "loss"
VERSIONS = (1, 2, 3)
LOG2E = 1.4426950408889634
_THREADS = 512  # threads per row block: 50257 fp16 logits are ~12 vectors of 8 per thread
_V3_VECS = 16  # v3: 16-byte vectors per thread held in registers (64 registers of data)
_NULL = np.uintp(0)


# ---- float64 reference -----------------------------------------------------------------------------------


def cross_entropy_ref(
    logits: Any, targets: Any, *, ignore_index: int = -100, grad_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (loss (N,), lse (N,), dlogits (N, V)) by the formulas in the module docstring.

    Targets must be ignore_index or in [0, V) (checked by the caller)."""
    x = _checks.f64(logits)
    t = np.asarray(backend.to_numpy(targets)).astype(np.int64)
    n, vocab = x.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=1, keepdims=True) if vocab else np.zeros((n, 1))
        m = np.where(np.isfinite(m), m, 0.0)  # a row of -inf gives lse -inf; +inf / NaN propagate below
        lse = (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True)))[:, 0]
        keep = t != ignore_index
        rows = np.arange(n)
        picked = x[rows, np.where(keep, t, 0)] if vocab else np.zeros(n)
        loss = np.where(keep, lse - picked, 0.0)
        grad = np.exp(x - lse[:, None])
        grad[rows[keep], t[keep]] -= 1.0
        grad = np.where(keep[:, None], grad * float(grad_scale), 0.0)
    return loss, lse, grad


# ---- kernel plans ----------------------------------------------------------------------------------------


def _expr(version: int, dtype: Any) -> str:
    if version == 3:
        return f"cross_entropy_v3<{cuda_type(dtype)}, {_THREADS}, {_V3_VECS}>"
    return f"cross_entropy_v{version}<{cuda_type(dtype)}, {_THREADS}>"


def v3_max_vocab(dtype: Any) -> int:
    """The longest row version 3 holds in registers (65536 float16, 32768 float32)."""
    return _THREADS * _V3_VECS * 16 // np.dtype(dtype).itemsize


def _instantiations() -> list[str]:
    return [_expr(v, dt) for dt in _checks.GPU_DTYPES for v in VERSIONS]


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _check_args(
    logits: Any, targets: Any, dlogits: Any, ignore_index: Any, grad_scale: Any
) -> tuple[int, float]:
    _checks.check_float(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must have shape (N, V), got {tuple(logits.shape)}")
    if backend.is_cupy(targets) != backend.is_cupy(logits):
        raise ValueError("cross_entropy: targets must live where logits do (both NumPy or both CuPy)")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be an integer array, got dtype {targets.dtype}")
    if tuple(targets.shape) != (logits.shape[0],):
        raise ValueError(
            f"cross_entropy: targets has shape {tuple(targets.shape)}, expected ({logits.shape[0]},)"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    scale = _checks.check_scalar(grad_scale, "grad_scale")
    if dlogits is not None:
        _checks.check_same_place(logits, "logits", dlogits=dlogits)
        _checks.check_shape(dlogits, "dlogits", tuple(logits.shape))
        if backend.is_cupy(dlogits) and not dlogits.flags.c_contiguous:
            raise ValueError("cross_entropy: dlogits must be C-contiguous (it is written in place)")
        if not backend.is_cupy(dlogits) and not dlogits.flags.writeable:
            raise ValueError("cross_entropy: dlogits is read-only")
    return int(ignore_index), scale


def _check_targets_host(t: np.ndarray, vocab: int, ignore_index: int) -> None:
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(
            f"cross_entropy: targets[{i}] = {int(t[i])} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


# ---- public op -------------------------------------------------------------------------------------------


def cross_entropy(
    logits: Any,
    targets: Any,
    *,
    ignore_index: int = -100,
    dlogits: Any = None,
    grad_scale: float = 1.0,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, Any]:
    """Per-row softmax cross-entropy, optionally writing the logits' gradient in the same pass.

        lse_n  = log sum_j exp(logits_nj)
        loss_n = lse_n - logits_n,targets_n                       (0 for ignored rows)
        dlogits_nj = grad_scale * (softmax(logits_n)_j - [j == targets_n])   (0 rows for ignored rows)

    Parameters
    ----------
    logits : (N, V) float16 / float32 (float64 on the CPU); on the GPU a row-strided view is copied once
    targets : (N,) integer array on logits' device; each ignore_index or in [0, V)
    ignore_index : rows with this target get loss 0 and a zero gradient row (their lse is still computed)
    dlogits : optional (N, V) array of logits' dtype and device (C-contiguous on the GPU) to write the
        gradient into; may be `logits` itself (in place: each element is read before it is overwritten)
    grad_scale : multiplies the gradient: 1 / (counted rows) for a mean loss, times the loss scale
    impl : None / "cuda" for GPU arrays
    version : CUDA kernel 1 (scalar), 2 (vectorised) or 3 (row in registers); default 2 where the layout
        allows

    Returns
    -------
    (loss, lse) : (N,) float32 each (float64 for float64 logits), on logits' device.
    """
    logits, give_back = adopt(logits, "logits")
    targets = adopt(targets, "targets")[0]
    dl = adopt_optional(dlogits, "dlogits")
    ignore, scale = _check_args(logits, targets, dl, ignore_index, grad_scale)
    which = _checks.check_impl(impl, logits)
    if which == "numba":
        raise ValueError("cross_entropy: there is no Numba kernel; use impl='cuda'")
    check_version(version, VERSIONS, which)
    n, vocab = logits.shape
    out_dtype = np.float64 if logits.dtype == np.float64 else np.float32

    if which == "numpy":
        t = np.asarray(targets)
        _check_targets_host(t, vocab, ignore)
        loss, lse, grad = cross_entropy_ref(logits, t, ignore_index=ignore, grad_scale=scale)
        if dl is not None:
            dl[...] = grad.astype(dl.dtype)
        return give_back(loss.astype(out_dtype)), give_back(lse.astype(out_dtype))

    cp = backend.require_cupy()
    loss = cp.empty((n,), dtype=cp.float32)
    lse = cp.empty((n,), dtype=cp.float32)
    if n == 0:
        return give_back(loss), give_back(lse)
    if vocab == 0:
        raise ValueError("cross_entropy: logits has V = 0 columns; a target cannot exist")
    in_place = dl is not None and dl.data.ptr == logits.data.ptr and logits.flags.c_contiguous
    x = logits
    if x.strides[-1] != x.itemsize or x.strides[0] % x.itemsize:
        x = cp.ascontiguousarray(x)
    if dl is not None and not in_place and cp.may_share_memory(dl, x):
        raise ValueError("cross_entropy: dlogits overlaps logits without being logits itself")
    t64 = cp.ascontiguousarray(targets, dtype=cp.int64)
    x_stride = x.strides[0] // x.itemsize
    aligned = dl is None or (x.data.ptr - dl.data.ptr) % 16 == 0 and (x_stride - vocab) * x.itemsize % 16 == 0
    chosen = version if version is not None else (2 if aligned else 1)
    if chosen == 3 and vocab > v3_max_vocab(x.dtype):
        raise ValueError(
            f"cross_entropy: version=3 takes rows of at most {v3_max_vocab(x.dtype)} logits, got {vocab}"
        )
    if chosen >= 2 and not aligned:
        raise ValueError(
            f"cross_entropy: version={chosen} needs logits and dlogits at the same offset modulo 16 bytes "
            "with the same row stride; use version=1"
        )
    args = (
        x, t64, dl if dl is not None else _NULL, loss, lse,
        i32(n), i32(vocab), np.int64(x_stride), np.float32(scale), np.int64(ignore),
    )  # fmt: skip
    moved = x.nbytes * (1 if dl is None else 3) + 16 * n
    launch(get_function(_FAMILY, _expr(chosen, x.dtype)), (n,), (_THREADS,), args, bytes_moved=moved)
    return give_back(loss), give_back(lse)
