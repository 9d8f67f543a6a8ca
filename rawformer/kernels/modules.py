"""Compiling kernel families: one `.cu` file per family, one template instantiation per module.

A launcher asks for `get_function("softmax", "softmax_warp<__half, 8, 4>")`; the first call on a device
compiles `cuda_src/softmax.cu` with that name expression through NVRTC (CuPy's RawModule, cached on disk by
CuPy), later calls get the memoized kernel. Compiling per instantiation keeps first-call latency at one
small compile instead of every variant of the family.

Each family also registers the complete list of instantiations its launcher can ask for, so the CI can
compile all of them with nvcc on a machine without a GPU (tests/test_cuda_compile.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rawformer import backend

# NVRTC flags; the nvcc compile check in tests uses the same standard.
COMPILE_OPTIONS = ("-std=c++17",)

_CUDA_TYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_FAMILIES: dict[str, Callable[[], Iterable[str]]] = {}


def cuda_type(dtype: Any) -> str:
    """The CUDA C++ spelling of a NumPy dtype (float16 -> __half)."""
    try:
        return _CUDA_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no CUDA kernels for dtype {np.dtype(dtype)}") from None


def source_dir() -> Path:
    """The folder holding the .cu/.cuh sources (package data of rawformer.cuda_src)."""
    return Path(str(resources.files("rawformer.cuda_src")))


def register_family(family: str, instantiations: Callable[[], Iterable[str]]) -> None:
    """Declare a kernel family (`cuda_src/<family>.cu`) and every name expression its launcher may request."""
    if not (source_dir() / f"{family}.cu").is_file():
        raise FileNotFoundError(f"kernel family {family!r} has no source {source_dir() / (family + '.cu')}")
    _FAMILIES[family] = instantiations


def registered_families() -> dict[str, list[str]]:
    """{family: [name expressions]} for every family registered so far (import rawformer.ops first)."""
    return {family: list(make()) for family, make in _FAMILIES.items()}


@functools.cache
def _source(family: str) -> str:
    return (source_dir() / f"{family}.cu").read_text()


@functools.cache
def _module(device_id: int, family: str, expression: str) -> Any:
    cp = backend.require_cupy()
    options = (*COMPILE_OPTIONS, f"-I{source_dir()}")
    module = cp.RawModule(code=_source(family), options=options, name_expressions=(expression,))
    try:
        module.compile()
    except Exception as exc:  # NVRTC errors carry the log; name what was being built
        raise RuntimeError(f"compiling {family}.cu for {expression} failed:\n{exc}") from exc
    return module


@functools.cache
def _function(device_id: int, family: str, expression: str) -> Any:
    return _module(device_id, family, expression).get_function(expression)


def get_function(family: str, expression: str) -> Any:
    """The compiled kernel `expression` (e.g. "softmax_warp<float, 4>") of `family` on the current device."""
    cp = backend.require_cupy()
    if family not in _FAMILIES:
        raise KeyError(f"kernel family {family!r} is not registered")
    return _function(cp.cuda.Device().id, family, expression)
