"""The KV arena: one array per model, allocated once, carved into fixed-size blocks.

Layout (fixed by the issue-4 contract)::

    data: (layers, 2, num_blocks, block_size, kv_heads, head_dim), model dtype, C-contiguous
    k(L) = data[L, 0], v(L) = data[L, 1]      each (num_blocks, block_size, kv_heads, head_dim)
    slot = block * block_size + offset          the same block id names the same slots in every layer

which is exactly what rf.paged_attention, rf.rope_kv_write and rf.kv_write take. Seen as bytes, the arena is
2*layers rows of num_blocks*block_bytes_per_row each; block b is the same column range in every row. So one
block in all layers (copy-on-write, swap) is one strided 2-D copy: cudaMemcpy2DAsync with height 2*layers on
the GPU (no kernel, no temporary, nothing allocated), a slice assignment in NumPy. A run of consecutive blocks
is still one 2-D copy (a wider column range).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rawformer import backend

FLOAT_DTYPES = ("float16", "float32", "float64")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"KVArena: {name} must be a positive int, got {value!r}")
    return int(value)


def host_available_bytes() -> int:
    """Physical memory available now on this host (the CPU backend's budget_fraction base)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest 4 GiB
        return 4 << 30


def runs(src: Sequence[int], dst: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Group index pairs (src[i], dst[i]) into runs where both go up by one: yields (src0, dst0, length)."""
    n = len(src)
    i = 0
    while i < n:
        j = i + 1
        while j < n and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        yield int(src[i]), int(dst[i]), j - i
        i = j


class KVArena:
    """The paged K/V cache of one model: ONE array, allocated (and zeroed) once, sized from a budget.

    Parameters
    ----------
    layers, kv_heads, head_dim : int
        Model geometry.
    dtype : float16 | float32 (float64 on NumPy only)
        The cache dtype (the model's).
    block_size : int
        Tokens per block (16 by default; rf.paged_attention takes 8, 16, 32, 64, 128).
    num_blocks, budget_bytes, budget_fraction
        Exactly one: the block count; or a byte budget (floor(budget / block_bytes) blocks); or a fraction
        in (0, 1] of the free device memory (cudaMemGetInfo) on the GPU, of the available host memory on the
        CPU.
    xp : numpy | cupy module, optional
        Where the arena lives (default: the active backend).

    Attributes
    ----------
    data : array (layers, 2, num_blocks, block_size, kv_heads, head_dim)
    block_bytes : int
        Bytes of one block in all layers, K and V (the unit of accounting).
    token_bytes : int
        Bytes of one token's K and V in all layers (block_bytes / block_size).
    """

    _kind = "KVArena"  # the name errors start with

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any,
        block_size: int = 16,
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        xp: types.ModuleType | None = None,
    ):
        self._set_geometry(layers, kv_heads, head_dim, dtype, block_size, xp)
        self.token_bytes = 2 * self.layers * self.kv_heads * self._head_bytes()
        self.block_bytes = self.token_bytes * self.block_size
        self.num_blocks = self._size(num_blocks, budget_bytes, budget_fraction)
        self._max_pitch: int | None = None
        self._allocate()

    def _head_bytes(self) -> int:
        """Bytes of one token's K (or V) for one head (a subclass with another storage says its own)."""
        return self.head_dim * self.dtype.itemsize

    def _allocate(self) -> None:
        """The storage for num_blocks blocks, and the byte geometry of its 2-D copies."""
        shape = (self.layers, 2, self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        # zeroed once: unused slots hold finite values, so a kernel that reads past a sequence's end (masked)
        # never meets NaN garbage
        self.data = self.xp.zeros(shape, dtype=self.dtype)
        # 2*layers rows, each row is every block of one (layer, K|V)
        self.block_row_bytes = self.block_size * self.kv_heads * self.head_dim * self.dtype.itemsize
        self.row_pitch = self.num_blocks * self.block_row_bytes

    def _set_geometry(
        self, layers: Any, kv_heads: Any, head_dim: Any, dtype: Any, block_size: Any, xp: Any
    ) -> np.dtype:
        """Check and set layers, kv_heads, head_dim, block_size, xp, is_gpu and dtype (the model's float
        dtype); returns it. Subclasses with another storage (Int8KVArena) share it."""
        name = self._kind
        self.layers = _positive_int(layers, "layers")
        self.kv_heads = _positive_int(kv_heads, "kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.block_size = _positive_int(block_size, "block_size")
        xp = backend.xp() if xp is None else xp
        if xp is not np and getattr(xp, "__name__", "") != "cupy":
            raise TypeError(f"{name}: xp must be the numpy or cupy module, got {xp!r}")
        self.xp = xp
        self.is_gpu = xp is not np
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(
                f"{name}: dtype must be float16 or float32 (float64 on NumPy), got {dtype!r}"
            ) from None
        if dt.name not in FLOAT_DTYPES or (self.is_gpu and dt.name == "float64"):
            raise TypeError(
                f"{name}: dtype must be float16 or float32{'' if self.is_gpu else ' or float64'}, "
                f"got {dt.name}"
            )
        self.dtype = dt
        return dt

    def _size(self, num_blocks: Any, budget_bytes: Any, budget_fraction: Any) -> int:
        given = [x is not None for x in (num_blocks, budget_bytes, budget_fraction)]
        if sum(given) != 1:
            raise ValueError("KVArena: give exactly one of num_blocks, budget_bytes, budget_fraction")
        if num_blocks is not None:
            return _positive_int(num_blocks, "num_blocks")
        if budget_bytes is not None:
            if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
                raise ValueError(f"KVArena: budget_bytes must be an int, got {budget_bytes!r}")
            budget = int(budget_bytes)
            what = f"budget_bytes={budget}"
        else:
            f = budget_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"KVArena: budget_fraction must be in (0, 1], got {f!r}")
            free = self.xp.cuda.runtime.memGetInfo()[0] if self.is_gpu else host_available_bytes()
            budget = int(f * free)
            what = f"budget_fraction={f} of {free} free bytes"
        n = budget // self.block_bytes
        if n < 1:
            raise ValueError(f"KVArena: {what} holds no block of {self.block_bytes} bytes")
        return int(n)

    # ---- views -------------------------------------------------------------------------------------------

    def k(self, layer: int) -> Any:
        """Layer `layer`'s key cache, (num_blocks, block_size, kv_heads, head_dim), a view."""
        return self.data[layer, 0]

    def v(self, layer: int) -> Any:
        """Layer `layer`'s value cache, (num_blocks, block_size, kv_heads, head_dim), a view."""
        return self.data[layer, 1]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    # ---- block copies (all layers, K and V) --------------------------------------------------------------

    @property
    def max_pitch(self) -> int:
        """The largest row pitch cudaMemcpy2D accepts on this device (cudaDevAttrMaxPitch, 2^31 - 1 on the
        GPUs we know). An arena row (one layer's K or V, every block) can be longer: 72 GB of GPT-2 cache is
        24 rows of 3 GB. Then a copy goes row by row (2*layers cudaMemcpyAsync calls) instead."""
        if self._max_pitch is None:
            try:
                self._max_pitch = int(self.xp.cuda.Device().attributes.get("MaxPitch", 2**31 - 1))
            except Exception:  # an older CuPy without the attribute table
                self._max_pitch = 2**31 - 1
        return self._max_pitch

    def _base(self) -> int:
        """The arena's address (device pointer on the GPU)."""
        return self.data.data.ptr if self.is_gpu else self.data.ctypes.data

    def _memcpy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int) -> None:
        """Copy `width` bytes from each of the 2*layers rows (pitches in bytes), on the current stream."""
        rt = self.xp.cuda.runtime
        stream = self.xp.cuda.get_current_stream().ptr
        rows = 2 * self.layers
        if max(dpitch, spitch) <= self.max_pitch:
            rt.memcpy2DAsync(dst, dpitch, src, spitch, width, rows, rt.memcpyDefault, stream)
        else:
            for r in range(rows):
                rt.memcpyAsync(dst + r * dpitch, src + r * spitch, width, rt.memcpyDefault, stream)

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """data[:, :, dst[i]] = data[:, :, src[i]] for every i (every layer, K and V): copy-on-write.

        On the GPU: one cudaMemcpy2DAsync per run of consecutive pairs, on the current stream, nothing
        allocated."""
        if len(src) != len(dst):
            raise ValueError("copy_blocks: src and dst differ in length")
        for s, d, n in runs(src, dst):
            if self.is_gpu:
                base = self._base()
                w = self.block_row_bytes
                self._memcpy2d(base + d * w, self.row_pitch, base + s * w, self.row_pitch, n * w)
            else:
                self.data[:, :, d : d + n] = self.data[:, :, s : s + n]

    def host_buffer(self, n: int) -> np.ndarray:
        """A host array (layers, 2, n, block_size, kv_heads, head_dim) for n blocks: page-locked (pinned,
        cupy.cuda.alloc_pinned_memory) on the GPU so copies are asynchronous DMA; plain NumPy on the CPU."""
        shape = (self.layers, 2, n, self.block_size, self.kv_heads, self.head_dim)
        if not self.is_gpu or n == 0:
            return np.empty(shape, dtype=self.dtype)
        mem = self.xp.cuda.alloc_pinned_memory(int(np.prod(shape)) * self.dtype.itemsize)
        return np.ndarray(shape, dtype=self.dtype, buffer=mem)  # keeps `mem` alive (as cupyx.empty_pinned)

    def to_host(self, blocks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Copy blocks (all layers) into a host buffer: out[:, :, i] = data[:, :, blocks[i]].

        On the GPU the copy is queued on the current stream (asynchronous): synchronize before reading
        `out` on the host (the pool's later device work on the same stream is ordered after it)."""
        out = self.host_buffer(len(blocks)) if out is None else out
        n = len(blocks)
        if self.is_gpu:
            w = self.block_row_bytes
            host = out.ctypes.data
            for b, i, r in runs(blocks, range(n)):
                self._memcpy2d(host + i * w, n * w, self._base() + b * w, self.row_pitch, r * w)
        else:
            for b, i, r in runs(blocks, range(n)):
                out[:, :, i : i + r] = self.data[:, :, b : b + r]
        return out

    def from_host(
        self, host: np.ndarray, blocks: Sequence[int], indices: Sequence[int] | None = None
    ) -> None:
        """Copy host blocks back: data[:, :, blocks[j]] = host[:, :, indices[j]] (indices default 0..n-1).

        Asynchronous on the GPU (current stream): keep `host` alive until the stream has passed the copy."""
        n = host.shape[2]
        indices = range(len(blocks)) if indices is None else indices
        if self.is_gpu:
            w = self.block_row_bytes
            src = host.ctypes.data
            for i, b, r in runs(indices, blocks):
                self._memcpy2d(self._base() + b * w, self.row_pitch, src + i * w, n * w, r * w)
        else:
            for i, b, r in runs(indices, blocks):
                self.data[:, :, b : b + r] = host[:, :, i : i + r]

    def __repr__(self) -> str:
        where = "cupy" if self.is_gpu else "numpy"
        return (
            f"KVArena(layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"dtype={self.dtype.name}, block_size={self.block_size}, num_blocks={self.num_blocks}, "
            f"{self.nbytes / 2**20:.1f} MiB on {where})"
        )
