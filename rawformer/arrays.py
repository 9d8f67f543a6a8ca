"""Taking in arrays of any kind and handing results back in the caller's kind.

Ops accept NumPy arrays, CuPy arrays, and any object that speaks DLPack (`__dlpack__`, e.g. a PyTorch or
JAX tensor) or the CUDA array interface (`__cuda_array_interface__`, e.g. a Numba device array). Foreign
arrays are viewed zero-copy as NumPy (host) or CuPy (device) arrays; results go back through the foreign
library's own `from_dlpack` (or Numba's `as_cuda_array`), so the caller gets its own kind on its own device.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from rawformer import backend

_DLPACK_CPU = 1  # kDLCPU in the DLPack device-type enum
_DLPACK_CUDA = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


def _identity(a: Any) -> Any:
    return a


def _foreign_converter(x: Any) -> Callable[[Any], Any]:
    """The function that turns our NumPy/CuPy result into the kind of `x` (a foreign array)."""
    root = type(x).__module__.split(".")[0]
    if root == "numba":
        from numba import cuda  # numba is already imported: the caller handed us its array

        return cuda.as_cuda_array
    for module_name in (root, f"{root}.numpy", f"{root}.dlpack"):  # torch, jax.numpy, tensorflow...
        try:
            convert = getattr(importlib.import_module(module_name), "from_dlpack", None)
        except ImportError:
            convert = None
        if callable(convert):
            return convert
    return _identity  # no way back: hand out our own array


def adopt(x: Any, name: str) -> tuple[Any, Callable[[Any], Any]]:
    """View `x` as a NumPy or CuPy array.

    Returns
    -------
    (array, give_back): `array` is a numpy.ndarray or cupy.ndarray sharing memory with `x` when `x` is an
    array of another library; `give_back(result)` converts a result to the kind `x` came as.
    """
    if isinstance(x, np.ndarray) or backend.is_cupy(x):
        return x, _identity
    if isinstance(x, (list, tuple, int, float, np.generic)):
        raise TypeError(f"{name} must be an array (NumPy, CuPy, or DLPack-capable), got {type(x).__name__}")
    if hasattr(x, "__dlpack_device__"):
        dev_type, _ = x.__dlpack_device__()
        if dev_type == _DLPACK_CPU:
            return np.from_dlpack(x), _foreign_converter(x)
        if dev_type in _DLPACK_CUDA:
            cp = backend.require_cupy()
            return cp.from_dlpack(x), _foreign_converter(x)
        raise TypeError(f"{name} lives on DLPack device type {dev_type}; rawformer runs on CPU and CUDA only")
    if hasattr(x, "__cuda_array_interface__"):
        cp = backend.require_cupy()
        return cp.asarray(x), _foreign_converter(x)
    if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
        return np.asarray(x), _identity
    raise TypeError(f"{name} must be an array (NumPy, CuPy, or DLPack-capable), got {type(x).__name__}")
