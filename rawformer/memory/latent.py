"""The paged latent cache of Multi-head Latent Attention (DeepSeek-V2): per token only the compressed KV
latent (kv_lora_rank) and the decoupled RoPE key (qk_rope_head_dim), shared by every head.

Layout (one array, allocated once, as KVArena's with one plane instead of K and V)::

    data: (layers, 1, num_blocks, block_size, 1, kv_lora_rank + rope_dim), model dtype, C-contiguous
    latent(L) = data[L, 0, :, :, 0, :kv_lora_rank]   (num_blocks, block_size, kv_lora_rank), a strided view
    rope(L)   = data[L, 0, :, :, 0, kv_lora_rank:]   (num_blocks, block_size, rope_dim), a strided view
    slot = block * block_size + offset               the same block id names the same slots in every layer

A token's latent and rope key are neighbours in memory (one 1152-byte row at DeepSeek-V2's 512 + 64 fp16),
so the decode kernel streams one contiguous row per token. LatentArena subclasses KVArena: KVPool runs over it
unchanged (prefix sharing, copy-on-write, fork, swap, accounting in blocks of block_bytes), since the pool
uses only the arena's geometry and its block copies, which work on any (layers, planes, num_blocks, ...)
array: the 2-D copies have layers x 1 rows here instead of layers x 2.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.memory.arena import FLOAT_DTYPES, KVArena, _positive_int

__all__ = ["LatentArena"]


class LatentArena(KVArena):
    """The paged latent cache of an MLA model: ONE array, allocated (zeroed) once, sized from a budget.

    Parameters
    ----------
    layers : int
    kv_lora_rank : int
        Latent width R cached per token and layer.
    rope_dim : int
        Width of the shared RoPE key cached per token and layer (qk_rope_head_dim).
    dtype : float16 | float32 (float64 on NumPy only)
    block_size : int
        Tokens per block (64 by default: the MLA decode kernel's tile).
    num_blocks, budget_bytes, budget_fraction
        Exactly one (as KVArena).
    xp : numpy | cupy module, optional

    Attributes
    ----------
    data : array (layers, 1, num_blocks, block_size, 1, kv_lora_rank + rope_dim)
    token_bytes : int
        Bytes of one token in all layers: layers * (kv_lora_rank + rope_dim) * itemsize.
    block_bytes : int
        token_bytes * block_size (the unit of the pool's accounting).
    """

    planes = 1  # KVArena has 2 (K and V)

    def __init__(
        self,
        layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: Any,
        block_size: int = 64,
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        xp: types.ModuleType | None = None,
    ):
        # KVArena.__init__ is not called: it would allocate K and V planes. The attributes it sets are set
        # here with the latent geometry (kv_heads = 1, head_dim = R + rope_dim).
        self.layers = _positive_int(layers, "layers")
        self.kv_lora_rank = _positive_int(kv_lora_rank, "kv_lora_rank")
        self.rope_dim = _positive_int(rope_dim, "rope_dim")
        self.kv_heads = 1
        self.head_dim = self.kv_lora_rank + self.rope_dim
        self.block_size = _positive_int(block_size, "block_size")
        xp = backend.xp() if xp is None else xp
        if xp is not np and getattr(xp, "__name__", "") != "cupy":
            raise TypeError(f"LatentArena: xp must be the numpy or cupy module, got {xp!r}")
        self.xp = xp
        self.is_gpu = xp is not np
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"LatentArena: dtype must be float16 or float32, got {dtype!r}") from None
        if dt.name not in FLOAT_DTYPES or (self.is_gpu and dt.name == "float64"):
            raise TypeError(
                f"LatentArena: dtype must be float16 or float32{'' if self.is_gpu else ' or float64'}, "
                f"got {dt.name}"
            )
        self.dtype = dt
        self.token_bytes = self.layers * self.head_dim * dt.itemsize
        self.block_bytes = self.token_bytes * self.block_size
        self.num_blocks = self._size(num_blocks, budget_bytes, budget_fraction)
        self._max_pitch: int | None = None
        shape = (self.layers, 1, self.num_blocks, self.block_size, 1, self.head_dim)
        self.data = xp.zeros(shape, dtype=dt)  # zeroed once: unread slots hold finite values
        self.row_pitch = self.num_blocks * self.block_size * self.head_dim * dt.itemsize
        self.block_row_bytes = self.block_size * self.head_dim * dt.itemsize

    # ---- views -------------------------------------------------------------------------------------------

    def latent(self, layer: int) -> Any:
        """Layer `layer`'s latent cache (num_blocks, block_size, kv_lora_rank), a strided view."""
        return self.data[layer, 0, :, :, 0, : self.kv_lora_rank]

    def rope(self, layer: int) -> Any:
        """Layer `layer`'s RoPE-key cache (num_blocks, block_size, rope_dim), a strided view."""
        return self.data[layer, 0, :, :, 0, self.kv_lora_rank :]

    def rows(self, layer: int) -> Any:
        """Layer `layer`'s cache as (num_slots, kv_lora_rank + rope_dim) rows, slot-indexed (a view)."""
        return self.data[layer, 0].reshape(-1, self.head_dim)

    def k(self, layer: int) -> Any:
        raise TypeError("LatentArena holds MLA latents, not K/V: use latent(layer) and rope(layer)")

    def v(self, layer: int) -> Any:
        raise TypeError("LatentArena holds MLA latents, not K/V: use latent(layer) and rope(layer)")

    # ---- block copies: one row per layer ---------------------------------------------------------------

    def _memcpy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int) -> None:
        """Copy `width` bytes from each of the `layers` rows (KVArena's copy with one plane per layer)."""
        rt = self.xp.cuda.runtime
        stream = self.xp.cuda.get_current_stream().ptr
        if max(dpitch, spitch) <= self.max_pitch:
            rt.memcpy2DAsync(dst, dpitch, src, spitch, width, self.layers, rt.memcpyDefault, stream)
        else:
            for r in range(self.layers):
                rt.memcpyAsync(dst + r * dpitch, src + r * spitch, width, rt.memcpyDefault, stream)

    def host_buffer(self, n: int) -> np.ndarray:
        """A host array (layers, 1, n, block_size, 1, R + rope_dim) for n blocks (pinned on the GPU)."""
        shape = (self.layers, 1, n, self.block_size, 1, self.head_dim)
        if not self.is_gpu or n == 0:
            return np.empty(shape, dtype=self.dtype)
        mem = self.xp.cuda.alloc_pinned_memory(int(np.prod(shape)) * self.dtype.itemsize)
        return np.ndarray(shape, dtype=self.dtype, buffer=mem)

    def __repr__(self) -> str:
        where = "cupy" if self.is_gpu else "numpy"
        return (
            f"LatentArena(layers={self.layers}, kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, "
            f"dtype={self.dtype.name}, block_size={self.block_size}, num_blocks={self.num_blocks}, "
            f"{self.nbytes / 2**20:.1f} MiB on {where})"
        )
