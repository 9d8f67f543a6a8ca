"""Programmatic dependent launch (sm_90+): `launch_pdl(kernel, grid, block, args, shared_mem)`.

A kernel launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may begin while the kernel
before it on the stream is still running (once all of that kernel's CTAs have called
griddepcontrol.launch_dependents or exited); it calls `rf::pdl_wait()` (cuda_src/common.cuh) before it
reads what the earlier kernel writes, or writes anything. In a decode step, a chain of ~200 short kernels,
each one's launch, scheduling and first weight loads then overlap the tail of the one before. Stream
capture records the dependency as a programmatic graph edge, so CUDA graphs keep the overlap.

CuPy's RawKernel launch takes no launch attributes, so this calls the driver's cuLaunchKernelEx through
ctypes with the CUfunction of CuPy's compiled kernel. Used only where the device is sm_90 or newer and
RAWFORMER_PDL is not "0" (`enabled()`); launch.launch falls back to the ordinary launch otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

from rawformer import backend

__all__ = ["capturing", "enabled", "launch_pdl"]

_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _AttrValue(ctypes.Union):
    _fields_ = [("programmatic", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
        ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint),
    ]  # fmt: skip


_SCALARS = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}


@functools.cache
def _driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return fn


@functools.cache
def _device_ok(device_id: int) -> bool:
    cp = backend.require_cupy()
    major = cp.cuda.Device(device_id).compute_capability[0]
    if int(major) < 9:
        return False
    try:
        _driver()
    except (OSError, AttributeError):
        return False
    return True


def enabled() -> bool:
    """Whether launches asking for PDL get it here (sm_90+, libcuda found, RAWFORMER_PDL != "0")."""
    if os.environ.get("RAWFORMER_PDL", "1") == "0":
        return False
    return _device_ok(backend.require_cupy().cuda.Device().id)


def capturing() -> bool:
    """Whether CuPy's current stream is capturing a CUDA graph (PDL is used only then: see launch.py)."""
    cp = backend.require_cupy()
    ptr = cp.cuda.get_current_stream().ptr
    return bool(ptr) and bool(cp.cuda.runtime.streamIsCapturing(ptr))


def _arg(a: Any) -> ctypes._SimpleCData:
    if a is None:  # an absent optional pointer (CuPy passes None as NULL too)
        return ctypes.c_void_p(0)
    data = getattr(a, "data", None)
    if data is not None and hasattr(data, "ptr"):  # a CuPy array
        return ctypes.c_void_p(int(data.ptr))
    if hasattr(a, "ptr") and not isinstance(a, np.generic):  # a CuPy MemoryPointer
        return ctypes.c_void_p(int(a.ptr))
    if isinstance(a, np.generic) and a.dtype in _SCALARS:
        return _SCALARS[a.dtype](a.item())
    raise TypeError(f"launch_pdl: cannot pass {type(a).__name__} {a!r} as a kernel argument")


def launch_pdl(kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
               shared_mem: int = 0) -> None:  # fmt: skip
    """Launch `kernel` (a CuPy Function) on CuPy's current stream with programmatic stream serialization."""
    cp = backend.require_cupy()
    g = (*grid, 1, 1)[:3]
    b = (*block, 1, 1)[:3]
    attr = _Attr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmatic = 1
    cfg = _Config(
        *g, *b, shared_mem, ctypes.c_void_p(cp.cuda.get_current_stream().ptr), ctypes.pointer(attr), 1
    )
    values = [_arg(a) for a in args]
    params = (ctypes.c_void_p * len(values))(
        *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
    )
    func = getattr(kernel, "kernel", kernel)  # a RawKernel's compiled cupy.cuda.Function holds the CUfunction
    err = _driver()(ctypes.byref(cfg), ctypes.c_void_p(int(func.ptr)), params, None)
    if err != 0:
        raise RuntimeError(
            f"cuLaunchKernelEx({kernel.name}, grid={grid}, block={block}) failed: CUresult {err}"
        )
