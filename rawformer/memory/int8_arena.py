"""An INT8 paged KV cache for KVPool: int8 K / V plus one float16 scale per token and head (rf.kv_write_int8,
rf.paged_attention_int8), in about half the bytes of a float16 arena: twice the tokens in the same memory.

Layout (two arrays, allocated and zeroed once; the same block id names the same slots in both):

    data    int8     (layers, 2, num_blocks, block_size, kv_heads, head_dim)   KVArena's layout, 1 byte
    scales  float16  (layers, 2, num_blocks, block_size, kv_heads)             s = fp16(max_d |x[d]| / 127)
    k(L), v(L)             = data[L, 0], data[L, 1]        int8 (num_blocks, block_size, kv_heads, head_dim)
    k_scale(L), v_scale(L) = scales[L, 0], scales[L, 1]    float16 (num_blocks, block_size, kv_heads)

Int8KVArena subclasses KVArena, so KVPool runs over it unchanged (prefix sharing, copy-on-write, fork,
swap, accounting in blocks of block_bytes): every block operation moves the int8 values AND the scales.
A swapped-out sequence is one host byte buffer (layers, 2, n (bq + bs)) per (layer, K|V) row: the n blocks'
int8 bytes (bq = block_size kv_heads head_dim each) followed by their scale bytes (bs = 2 block_size
kv_heads each), so that a run of consecutive blocks is one 2-D copy of each part on the GPU.

`kv_int8 = True` tells a model's forward to write with kv_write_int8 and read with paged_attention_int8
(decode) or dequantize_kv (gather): see models/int8_kv.py. `dtype` is the models' compute dtype (what the
dequantized K / V come back as); the cache itself is int8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rawformer.memory.arena import KVArena, runs

__all__ = ["Int8KVArena"]

SCALE_BYTES = 2  # float16


class Int8KVArena(KVArena):
    """The paged K/V cache of one model in INT8 with per-token-per-head float16 scales.

    Parameters
    ----------
    layers, kv_heads, head_dim : int
        Model geometry (head_dim 64, 96, 128 or 256 for the GPU kernels).
    dtype : float16 | float32 (float64 on NumPy only)
        The model's compute dtype: the attention inputs and outputs; not the cache's.
    block_size : int
        Tokens per block (16 by default).
    num_blocks, budget_bytes, budget_fraction
        Exactly one (as KVArena); a byte budget counts the int8 values and the scales.
    xp : numpy | cupy module, optional

    Attributes
    ----------
    data : int8 (layers, 2, num_blocks, block_size, kv_heads, head_dim)
    scales : float16 (layers, 2, num_blocks, block_size, kv_heads)
    token_bytes : int
        2 * layers * kv_heads * (head_dim + 2): one token's K and V in all layers, scales included.
    block_bytes : int
        token_bytes * block_size (the unit of the pool's accounting).
    """

    kv_int8 = True
    _kind = "Int8KVArena"

    def _head_bytes(self) -> int:
        if self.is_gpu:  # the kernels' head_dim list, said now rather than at the first step
            from rawformer.ops.kv_int8 import _epl

            try:
                _epl(self.head_dim)
            except ValueError as e:
                raise ValueError(f"Int8KVArena: {e}") from None
        return self.head_dim + SCALE_BYTES  # int8 values + the fp16 scale

    def _allocate(self) -> None:
        nb, bs, kvh, d = self.num_blocks, self.block_size, self.kv_heads, self.head_dim
        self.data = self.xp.zeros((self.layers, 2, nb, bs, kvh, d), dtype=np.int8)
        # zero scales: an unwritten slot dequantizes to 0, finite, whatever a masked read meets
        self.scales = self.xp.zeros((self.layers, 2, nb, bs, kvh), dtype=np.float16)
        self.block_row_bytes = bs * kvh * d  # one block of one (layer, K|V) row: its int8 values
        self.s_block_bytes = bs * kvh * SCALE_BYTES  # ... and its scales
        self.row_pitch = nb * self.block_row_bytes
        self.scale_row_pitch = nb * self.s_block_bytes

    # ---- views -------------------------------------------------------------------------------------------

    def k_scale(self, layer: int) -> Any:
        """Layer `layer`'s key scales, float16 (num_blocks, block_size, kv_heads), a view."""
        return self.scales[layer, 0]

    def v_scale(self, layer: int) -> Any:
        """Layer `layer`'s value scales, float16 (num_blocks, block_size, kv_heads), a view."""
        return self.scales[layer, 1]

    def layer(self, layer: int) -> tuple[Any, Any, Any, Any]:
        """(k, v, k_scale, v_scale) of one layer: the argument order of rf.kv_write_int8 and
        rf.paged_attention_int8."""
        return self.data[layer, 0], self.data[layer, 1], self.scales[layer, 0], self.scales[layer, 1]

    # ---- block copies: the int8 values and the scales ---------------------------------------------------

    def _scale_base(self) -> int:
        return self.scales.data.ptr if self.is_gpu else self.scales.ctypes.data

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Blocks dst[i] = blocks src[i] in every layer, K and V, values and scales (copy-on-write).
        On the GPU: two cudaMemcpy2DAsync per run of consecutive pairs, on the current stream."""
        if len(src) != len(dst):
            raise ValueError("copy_blocks: src and dst differ in length")
        for s, d, n in runs(src, dst):
            if self.is_gpu:
                for base, pitch, w in self._parts():
                    self._memcpy2d(base + d * w, pitch, base + s * w, pitch, n * w)
            else:
                self.data[:, :, d : d + n] = self.data[:, :, s : s + n]
                self.scales[:, :, d : d + n] = self.scales[:, :, s : s + n]

    def _parts(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(device address, row pitch, bytes per block) of the int8 values and of the scales."""
        return (
            (self._base(), self.row_pitch, self.block_row_bytes),
            (self._scale_base(), self.scale_row_pitch, self.s_block_bytes),
        )

    def host_buffer(self, n: int) -> np.ndarray:
        """A host byte buffer (layers, 2, n (bq + bs)) for n blocks (see the module docstring); pinned on the
        GPU so the copies are asynchronous DMA."""
        shape = (self.layers, 2, n * (self.block_row_bytes + self.s_block_bytes))
        if not self.is_gpu or n == 0:
            return np.zeros(shape, dtype=np.uint8)
        mem = self.xp.cuda.alloc_pinned_memory(int(np.prod(shape)))
        return np.ndarray(shape, dtype=np.uint8, buffer=mem)

    def host_views(self, host: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int8 (layers, 2, n, block_size, kv_heads, head_dim), float16 (layers, 2, n, block_size,
        kv_heads)) views of a host buffer of n blocks."""
        n = self._host_blocks(host)
        bs, kvh, d = self.block_size, self.kv_heads, self.head_dim
        q = host[:, :, : n * self.block_row_bytes].view(np.int8).reshape(self.layers, 2, n, bs, kvh, d)
        s = host[:, :, n * self.block_row_bytes :].view(np.float16).reshape(self.layers, 2, n, bs, kvh)
        return q, s

    def _host_blocks(self, host: np.ndarray) -> int:
        per = self.block_row_bytes + self.s_block_bytes
        if (
            host.dtype != np.uint8
            or host.ndim != 3
            or host.shape[:2] != (self.layers, 2)
            or host.shape[2] % per
        ):
            raise ValueError(f"Int8KVArena: not a host buffer of this arena: {host.dtype} {host.shape}")
        return host.shape[2] // per

    def to_host(self, blocks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Copy blocks (all layers, values and scales) into a host buffer: block i of it = blocks[i].
        Asynchronous on the GPU (current stream): synchronize before reading `out`."""
        n = len(blocks)
        out = self.host_buffer(n) if out is None else out
        if self._host_blocks(out) != n:
            raise ValueError(f"to_host: the buffer holds {self._host_blocks(out)} blocks, {n} asked")
        if self.is_gpu:
            host, pitch = out.ctypes.data, out.shape[2]
            offsets = (0, n * self.block_row_bytes)
            for (base, row_pitch, w), off in zip(self._parts(), offsets, strict=True):
                for b, i, r in runs(blocks, range(n)):
                    self._memcpy2d(host + off + i * w, pitch, base + b * w, row_pitch, r * w)
        else:
            hq, hs = self.host_views(out)
            for b, i, r in runs(blocks, range(n)):
                hq[:, :, i : i + r] = self.data[:, :, b : b + r]
                hs[:, :, i : i + r] = self.scales[:, :, b : b + r]
        return out

    def from_host(
        self, host: np.ndarray, blocks: Sequence[int], indices: Sequence[int] | None = None
    ) -> None:
        """Copy host blocks back: block blocks[j] = block indices[j] of `host` (indices default 0..n-1),
        values and scales. Asynchronous on the GPU: keep `host` alive until the stream has passed it."""
        n = self._host_blocks(host)
        indices = range(len(blocks)) if indices is None else indices
        if self.is_gpu:
            src, pitch = host.ctypes.data, host.shape[2]
            offsets = (0, n * self.block_row_bytes)
            for (base, row_pitch, w), off in zip(self._parts(), offsets, strict=True):
                for i, b, r in runs(indices, blocks):
                    self._memcpy2d(base + b * w, row_pitch, src + off + i * w, pitch, r * w)
        else:
            hq, hs = self.host_views(host)
            for i, b, r in runs(indices, blocks):
                self.data[:, :, b : b + r] = hq[:, :, i : i + r]
                self.scales[:, :, b : b + r] = hs[:, :, i : i + r]

    def dequantized(self, layer: int) -> tuple[Any, Any]:
        """(k, v) of one layer as the compute dtype, (num_blocks, block_size, kv_heads, head_dim): what
        the cache stands for (tests, the gather path)."""
        from rawformer.ops.kv_int8 import dequantize_kv

        k, v, ks, vs = self.layer(layer)
        return dequantize_kv(k, ks, self.dtype), dequantize_kv(v, vs, self.dtype)

    def __repr__(self) -> str:
        where = "cupy" if self.is_gpu else "numpy"
        return (
            f"Int8KVArena(layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"compute {self.dtype.name}, block_size={self.block_size}, num_blocks={self.num_blocks}, "
            f"{self.nbytes / 2**20:.1f} MiB int8 + scales on {where})"
        )
