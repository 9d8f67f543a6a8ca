"""Launching a compiled kernel: argument packing, errors that name the kernel, and debug timing.

`RAWFORMER_DEBUG=1` synchronises around every launch and prints the kernel, grid, time and achieved GB/s
(from the bytes the launcher says the kernel must move). Off by default: it serialises the stream.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.kernels import pdl as _pdl

_DEFAULT_SMEM_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory


def debug_enabled() -> bool:
    return os.environ.get("RAWFORMER_DEBUG", "") not in ("", "0")


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
    *,
    shared_mem: int = 0,
    bytes_moved: int | None = None,
    pdl: bool = False,
) -> None:
    """Launch `kernel` on CuPy's current stream.

    Python ints and floats in `args` must already be typed (np.int32 / np.int64 / np.float32): CuPy passes
    them by their NumPy type, and a mismatch with the kernel signature would be silent garbage.
    `pdl=True` (for kernels that call rf::pdl_wait before touching what earlier kernels write) launches
    with programmatic stream serialization where the device supports it, while a CUDA graph is being
    captured (rawformer.kernels.pdl: replays are where the overlap pays; an eager launch through ctypes
    would cost more host time than it saves).
    """
    for a in args:
        if isinstance(a, (bool, int, float)):
            raise TypeError(f"{kernel.name}: pass scalars as NumPy scalars (np.int32, ...), got {a!r}")
    if grid[0] == 0:
        return
    if shared_mem > _DEFAULT_SMEM_LIMIT and kernel.max_dynamic_shared_size_bytes < shared_mem:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    cp = backend.require_cupy()
    if not debug_enabled():
        try:
            if pdl and _pdl.enabled() and _pdl.capturing():
                _pdl.launch_pdl(kernel, grid, block, args, shared_mem)
                return
            kernel(grid, block, args, shared_mem=shared_mem)
        except Exception as exc:
            raise RuntimeError(f"launching {kernel.name} grid={grid} block={block} failed: {exc}") from exc
        return
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    try:
        kernel(grid, block, args, shared_mem=shared_mem)
        stop.record()
        stop.synchronize()
        cp.cuda.runtime.deviceSynchronize()
    except Exception as exc:
        raise RuntimeError(f"kernel {kernel.name} grid={grid} block={block} failed: {exc}") from exc
    ms = cp.cuda.get_elapsed_time(start, stop)
    rate = f"{bytes_moved / ms / 1e6:8.1f} GB/s" if bytes_moved else ""
    print(f"[rawformer] {kernel.name:<48} grid={grid} block={block} {ms:8.4f} ms {rate}", file=sys.stderr)


def i32(v: int) -> np.int32:
    """A kernel int argument, refusing values that would wrap."""
    if not -(2**31) <= v < 2**31:
        raise OverflowError(f"{v} does not fit a 32-bit kernel argument")
    return np.int32(v)
