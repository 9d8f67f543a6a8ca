"""Which array library runs the work: CuPy on a GPU, or NumPy on the CPU.

This is the one place that imports CuPy and the one place that decides. Ops do not ask it which backend is
active: they run where their input lives (a CuPy array runs the CUDA kernels, a NumPy array runs the NumPy
reference). The active backend decides where new arrays are allocated (`xp()`), which models and the
runtime use.

`RAWFORMER_BACKEND=cpu|gpu` forces a backend; forcing `gpu` on a machine without a usable GPU is an error.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from typing import Any

import numpy as np

_ENV = "RAWFORMER_BACKEND"


@functools.cache
def cupy_module() -> types.ModuleType | None:
    """CuPy if it imports and a CUDA device answers, else None. Cached for the process."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # no driver, no device
        return None
    return cupy


def require_cupy() -> types.ModuleType:
    """CuPy, or a RuntimeError that says how to get it."""
    cp = cupy_module()
    if cp is None:
        raise RuntimeError(
            "no usable CUDA GPU: CuPy did not import or found no device. Install the GPU extra "
            "(pip install 'rawformer[cuda13]' or 'rawformer[cuda12]') on a machine with an NVIDIA GPU."
        )
    return cp


def name() -> str:
    """The active backend, 'gpu' or 'cpu' (`RAWFORMER_BACKEND` overrides the automatic choice)."""
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "cpu", "gpu"):
        raise ValueError(f"{_ENV} must be 'cpu' or 'gpu', got {forced!r}")
    if forced == "cpu":
        return "cpu"
    if forced == "gpu":
        require_cupy()
        return "gpu"
    return "gpu" if cupy_module() is not None else "cpu"


def xp() -> types.ModuleType:
    """The array module of the active backend (cupy or numpy), for allocating new arrays."""
    return require_cupy() if name() == "gpu" else np


def is_cupy(a: Any) -> bool:
    """True for a cupy.ndarray, without importing CuPy when it is not loaded already."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def array_module(a: Any) -> types.ModuleType:
    """numpy or cupy, whichever owns `a`."""
    return sys.modules["cupy"] if is_cupy(a) else np


def to_numpy(a: Any) -> np.ndarray:
    """A host copy of a NumPy or CuPy array (NumPy arrays are returned as they are)."""
    return a.get() if is_cupy(a) else np.asarray(a)


def device_info() -> dict[str, Any]:
    """Name, compute capability, memory and SM count of the current CUDA device, or {} without one."""
    cp = cupy_module()
    if cp is None:
        return {}
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    free, total = cp.cuda.runtime.memGetInfo()
    return {
        "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": f"{props['major']}.{props['minor']}",
        "multiprocessors": props["multiProcessorCount"],
        "l2_bytes": props["l2CacheSize"],
        "memory_total": total,
        "memory_free": free,
    }
