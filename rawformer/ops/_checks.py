"""Argument checks and row views shared by the op launchers.

Every launcher validates at the boundary and names the argument at fault; nothing below this layer
re-checks. Row ops see their input as a C-contiguous (rows, cols) matrix: `as_rows` moves `axis` last and
copies once when the input is not already laid out that way, `from_rows` undoes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
GPU_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
IMPLS = (None, "cuda", "numba")


def check_float(a: Any, name: str) -> None:
    """`a` is a floating array of a dtype rawformer computes in (float16, float32; float64 on the CPU)."""
    allowed = GPU_DTYPES if backend.is_cupy(a) else FLOAT_DTYPES
    if a.dtype not in allowed:
        kinds = ", ".join(str(d) for d in allowed)
        where = "a GPU" if backend.is_cupy(a) else "the CPU"
        raise TypeError(f"{name} has dtype {a.dtype}; on {where} rawformer takes {kinds}")


def check_same_place(ref: Any, ref_name: str, **others: Any) -> None:
    """Every array in `others` (None allowed) lives where `ref` does and has its dtype."""
    for name, a in others.items():
        if a is None:
            continue
        if backend.is_cupy(a) != backend.is_cupy(ref):
            raise ValueError(
                f"{name} is a {'GPU' if backend.is_cupy(a) else 'CPU'} array but {ref_name} is a "
                f"{'GPU' if backend.is_cupy(ref) else 'CPU'} array; move both to one device"
            )
        if backend.is_cupy(a) and a.device != ref.device:
            raise ValueError(f"{name} is on {a.device} but {ref_name} is on {ref.device}")
        if a.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_shape(a: Any, name: str, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def check_eps(eps: Any) -> float:
    """A finite, non-negative epsilon as a Python float."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_scalar(value: Any, name: str) -> float:
    """A finite real number as a Python float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_impl(impl: str | None, x: Any) -> str:
    """The implementation to run: 'numpy' for host arrays, else 'cuda' (default) or 'numba'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not backend.is_cupy(x):
        if impl is not None:
            raise ValueError(f"impl={impl!r} runs on a GPU, but the input is a CPU (NumPy) array")
        return "numpy"
    return impl or "cuda"


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError("input must have at least one dimension")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim


def as_rows(x: Any, axis: int = -1) -> Any:
    """`x` with `axis` moved last, as a C-contiguous (rows, cols) matrix (a copy only when needed)."""
    xp = backend.array_module(x)
    axis = normalize_axis(axis, x.ndim)
    moved = xp.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x
    rows = math.prod(moved.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous for empty rows
    return xp.ascontiguousarray(moved).reshape(rows, moved.shape[-1])


def from_rows(y2d: Any, shape: tuple[int, ...], axis: int) -> Any:
    """Undo `as_rows`: reshape to `x`'s shape with the row axis moved back to `axis`."""
    xp = backend.array_module(y2d)
    axis = normalize_axis(axis, len(shape))
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    y = y2d.reshape(moved_shape)
    return xp.moveaxis(y, -1, axis) if axis != len(shape) - 1 else y


def check_out(out: Any, name: str, like: Any, shape: tuple[int, ...] | None = None) -> None:
    """`out` is an array of `like`'s kind, device and dtype, with `shape` (default `like.shape`)."""
    if out is None:
        return
    check_same_place(like, "x", **{name: out})
    check_shape(out, name, tuple(like.shape) if shape is None else shape)


def write_out(result: Any, out: Any) -> Any:
    """Copy `result` into `out` when one was given; return what the op should return."""
    if out is None:
        return result
    if out is not result:
        out[...] = result
    return out


def adopt_optional(a: Any, name: str) -> Any:
    """`adopt` for an optional array argument: None stays None, else the NumPy/CuPy view of `a`."""
    return None if a is None else adopt(a, name)[0]


def check_version(version: Any, allowed: tuple[int, ...], impl: str) -> None:
    """`version` is None or one of the kernel variants `allowed`, and only used on the CUDA path."""
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise TypeError(f"version must be an int, got {version!r}")
    if version not in allowed:
        raise ValueError(f"version must be one of {allowed}, got {version}")
    if impl != "cuda":
        raise ValueError(f"version={version} picks a CUDA kernel; it does not apply to the {impl} path")


def f64(a: Any) -> np.ndarray:
    """A float64 NumPy copy of any array: what the references compute in."""
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def finish(
    result: Any, out_arr: Any, out: Any, give_back: Callable[[Any], Any], shape: tuple[int, ...] | None = None
) -> Any:
    """The op's return value: `result` (reshaped to `shape`) in the caller's kind, or, when `out` was given,
    `out` itself after copying `result` into it (no copy when the kernel already wrote `out` in place)."""
    if shape is not None:
        result = result.reshape(shape)
    if out is None:
        return give_back(result)
    in_place = (
        backend.is_cupy(out_arr)
        and out_arr.size
        and out_arr.flags.c_contiguous
        and result.data.ptr == out_arr.data.ptr
    )
    if not in_place:  # a scratch buffer, or the NumPy path: copy over
        write_out(result, out_arr)
    return out
