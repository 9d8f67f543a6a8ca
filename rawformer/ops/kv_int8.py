"""An INT8 KV cache: `kv_write_int8` quantizes new K / V into it, `paged_attention_int8` decodes from it.

Layouts (cuda_src/paged_attention_int8.cu):

    k_cache, v_cache   int8     (num_blocks, block_size, kv_heads, head_dim)   the fp16 cache's layout
    k_scale, v_scale   float16  (num_blocks, block_size, kv_heads)             one scale per token and head
    cached value       x~ = q * s,  s = fp16(max_d |x[d]| / 127),  q = rint(x / s) (float32 division)

Half the bytes of an fp16 cache (plus 2 bytes per head_dim), so twice the tokens in the same memory and half
the bytes a decode step reads. A scale per token and head rather than per block: blocks fill one token at a
time, and a block-wide scale fixed by its first token would clip later, larger ones.

NumPy inputs run the references (`kv_write_int8_ref` writes NumPy caches in place bit-exactly like the
kernel; `paged_attention_int8_ref` is paged_attention_ref over the dequantized caches, in float64); CuPy
inputs run the kernels. head_dim must be 64, 96, 128 or 256 on the GPU (32 lanes x 2, 3, 4, 8 elements).
`dequantize_kv(cache, scale)` gives the float cache (for the gather path of a step after a cached prefix).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rawformer import backend
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import debug_enabled, i32
from rawformer.ops import _checks
from rawformer.ops.paged_attention import paged_attention_ref

__all__ = [
    "alloc_int8_cache",
    "dequantize_kv",
    "fake_quantize_kv",
    "kv_write_int8",
    "kv_write_int8_ref",
    "paged_attention_int8",
    "paged_attention_int8_ref",
]

_FAMILY = "paged_attention_int8"
_THREADS = 128
_WARPS = _THREADS // 32
_EPLS = (2, 3, 4, 8)  # head_dim / 32 the kernels are instantiated for
QMAX = 127


def _epl(head_dim: int) -> int:
    if head_dim % 32 or head_dim // 32 not in _EPLS:
        dims = ", ".join(str(32 * e) for e in _EPLS)
        raise ValueError(f"the INT8 KV kernels take head_dim {dims}, got {head_dim}")
    return head_dim // 32


def _instantiations() -> list[str]:
    out = []
    for dtype in _checks.GPU_DTYPES:
        for e in _EPLS:
            out += [
                f"kv_write_int8<{cuda_type(dtype)}, {e}>",
                f"paged_attention_int8_v1<{cuda_type(dtype)}, {e}>",
            ]
    return out


register_family(_FAMILY, _instantiations)


def alloc_int8_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, xp: Any = np
) -> tuple[Any, Any]:
    """(cache int8 (num_blocks, block_size, kv_heads, head_dim) zeros, scale float16 (num_blocks,
    block_size, kv_heads) zeros) for one of K / V of one layer."""
    return (
        xp.zeros((num_blocks, block_size, kv_heads, head_dim), dtype=np.int8),
        xp.zeros((num_blocks, block_size, kv_heads), dtype=np.float16),
    )


def dequantize_kv(cache: Any, scale: Any, dtype: Any = None) -> Any:
    """cache * scale[..., None] as `dtype` (default float64 on NumPy, float16 on CuPy), where they live."""
    xp = backend.array_module(cache)
    dtype = np.dtype(dtype if dtype is not None else (np.float16 if xp is not np else np.float64))
    calc = np.float64 if dtype == np.float64 else np.float32
    return (cache.astype(calc) * scale.astype(calc)[..., None]).astype(dtype)


def _quantize_rows(x: Any) -> tuple[Any, Any]:
    """(q int8, s float16) of float32 rows (..., D), NumPy or CuPy: the kernel's arithmetic, bit for bit."""
    xp = backend.array_module(x)
    amax = xp.max(xp.abs(x), axis=-1)
    s16 = (amax / np.float32(QMAX)).astype(np.float16)
    s = s16.astype(np.float32)[..., None]
    safe = xp.where(s > 0, s, np.float32(1))
    q = xp.where(s > 0, xp.clip(xp.rint(x / safe), -QMAX, QMAX), 0)
    return q.astype(np.int8), s16


def fake_quantize_kv(x: Any) -> Any:
    """What an INT8 cache gives back for rows x (..., head_dim): q * s per row, in x's dtype (fp16 rounds
    the product once more). The reference for what the Int8KVArena path stores (tests/test_quant.py)."""
    q, s = _quantize_rows(x.astype(np.float32))
    return (q.astype(np.float32) * s.astype(np.float32)[..., None]).astype(x.dtype)


def _check_caches(caches: tuple[Any, ...], kv_heads: int, head_dim: int, like: Any) -> tuple[int, int]:
    """(num_blocks, block_size) of C-contiguous int8 caches and float16 scales where `like` lives."""
    k_cache = caches[0]
    if getattr(k_cache, "ndim", None) != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, kv_heads, head_dim), got {k_cache!r:.80}")
    nb, bs = int(k_cache.shape[0]), int(k_cache.shape[1])
    wants = ((np.int8, (nb, bs, kv_heads, head_dim)),) * 2 + ((np.float16, (nb, bs, kv_heads)),) * 2
    for name, c, (dtype, shape) in zip(
        ("k_cache", "v_cache", "k_scale", "v_scale"), caches, wants, strict=True
    ):
        if backend.is_cupy(c) != backend.is_cupy(like):
            raise ValueError(f"{name} must live where the queries / new tokens do (both NumPy or both CuPy)")
        if c.dtype != dtype or tuple(c.shape) != shape or not c.flags.c_contiguous:
            raise ValueError(
                f"{name} must be C-contiguous {np.dtype(dtype)} {shape}, got {c.dtype} {tuple(c.shape)}"
            )
    return nb, bs


def _check_kv(k: Any, v: Any, slots: Any) -> tuple[int, int, int]:
    if getattr(k, "ndim", None) != 3 or getattr(v, "shape", None) != k.shape:
        raise ValueError(
            f"k and v must be (tokens, kv_heads, head_dim) of one shape, got {getattr(k, 'shape', k)}, "
            f"{getattr(v, 'shape', v)}"
        )
    tokens = int(k.shape[0])
    if (
        getattr(slots, "ndim", None) != 1
        or slots.shape[0] != tokens
        or not np.issubdtype(slots.dtype, np.integer)
    ):
        raise ValueError(f"slot_mapping must be an integer array ({tokens},)")
    return tokens, int(k.shape[1]), int(k.shape[2])


def kv_write_int8_ref(
    k: Any, v: Any, slot_mapping: Any, k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any
) -> None:
    """Quantize token t of k, v into slot slot_mapping[t] of NumPy caches, in place (slots < 0 skipped)."""
    slots = np.asarray(backend.to_numpy(slot_mapping)).astype(np.int64)
    keep = slots >= 0
    bs = k_cache.shape[1]
    blk, off = slots[keep] // bs, slots[keep] % bs
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        q, s = _quantize_rows(np.asarray(backend.to_numpy(x), dtype=np.float32)[keep])
        cache[blk, off] = q
        scale[blk, off] = s


def kv_write_int8(
    k: Any, v: Any, slot_mapping: Any, k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any
) -> None:
    """Write the new tokens' K and V (tokens, kv_heads, head_dim; already rotated) into an INT8 cache.

    Token t goes to slot s = slot_mapping[t] (block s // block_size, offset s % block_size) of k_cache /
    v_cache (int8) with its per-head scales in k_scale / v_scale (float16); s < 0 writes nothing. Strided
    views of k and v (e.g. slices of a fused qkv) are read in place when the head_dim axis is unit-strided."""
    caches = (k_cache, v_cache, k_scale, v_scale)
    tokens, kv_heads, head_dim = _check_kv(k, v, slot_mapping)
    nb, bs = _check_caches(caches, kv_heads, head_dim, k)
    host_slots = (
        np.asarray(backend.to_numpy(slot_mapping)) if not backend.is_cupy(k) or debug_enabled() else None
    )
    if host_slots is not None and host_slots.size and int(host_slots.max()) >= nb * bs:
        raise ValueError(f"slot_mapping has slot {int(host_slots.max())}; the cache holds {nb * bs} slots")
    if not backend.is_cupy(k):
        kv_write_int8_ref(k, v, slot_mapping, *caches)
        return
    cp = backend.require_cupy()
    _checks.check_float(k, "k")
    _checks.check_same_place(k, "k", v=v)
    epl = _epl(head_dim)
    if tokens == 0:
        return
    k, v = (a if a.strides[2] == a.itemsize else cp.ascontiguousarray(a) for a in (k, v))
    slots = cp.ascontiguousarray(slot_mapping, dtype=cp.int32)
    it = k.itemsize
    kernel = get_function(_FAMILY, f"kv_write_int8<{cuda_type(k.dtype)}, {epl}>")
    grid = (-(-tokens * kv_heads // _WARPS),)
    launch(
        kernel, grid, (_THREADS,),
        (k, v, slots, k_cache, v_cache, k_scale, v_scale, i32(tokens), i32(kv_heads),
         np.int64(k.strides[0] // it), np.int64(k.strides[1] // it), np.int64(v.strides[0] // it),
         np.int64(v.strides[1] // it)),
        bytes_moved=2 * tokens * kv_heads * head_dim * (it + 1),
    )  # fmt: skip


def paged_attention_int8_ref(
    q: Any, k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any, block_tables: Any, context_lens: Any,
    scale: Any = None,
) -> np.ndarray:  # fmt: skip
    """float64 decode attention over the dequantized caches (rf.paged_attention's formula)."""
    k = dequantize_kv(backend.to_numpy(k_cache), backend.to_numpy(k_scale), np.float64)
    v = dequantize_kv(backend.to_numpy(v_cache), backend.to_numpy(v_scale), np.float64)
    return paged_attention_ref(q, k, v, block_tables, context_lens, scale)


def paged_attention_int8(
    q: Any, k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any, block_tables: Any, context_lens: Any,
    *, scale: float | None = None,
) -> Any:  # fmt: skip
    """Decode attention of q (num_seqs, q_len, q_heads, head_dim) over an INT8 paged cache.

    Same contract as rf.paged_attention (causal among the q_len new tokens, GQA by q_heads // kv_heads,
    context_lens including the new tokens, scale default 1 / sqrt(head_dim)), with the cache as int8 values
    and float16 per-token-per-head scales. Returns an array like q."""
    if q.ndim != 4:
        raise ValueError(f"q must be (num_seqs, q_len, q_heads, head_dim), got shape {tuple(q.shape)}")
    num_seqs, q_len, q_heads, head_dim = (int(d) for d in q.shape)
    if getattr(k_cache, "ndim", None) != 4:
        raise ValueError("k_cache must be (num_blocks, block_size, kv_heads, head_dim)")
    bs, kv_heads = int(k_cache.shape[1]), int(k_cache.shape[2])
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}")
    _check_caches((k_cache, v_cache, k_scale, v_scale), kv_heads, head_dim, q)
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError("block_tables must be (num_seqs, max_blocks) and context_lens (num_seqs,)")
    scale_v = 1.0 / float(np.sqrt(head_dim)) if scale is None else _checks.check_scalar(scale, "scale")
    if not backend.is_cupy(q):
        out = paged_attention_int8_ref(
            q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale_v
        )
        return out.astype(q.dtype)
    cp = backend.require_cupy()
    _checks.check_float(q, "q")
    epl = _epl(head_dim)
    q = cp.ascontiguousarray(q)
    tables = cp.ascontiguousarray(block_tables, dtype=cp.int32)
    ctx = cp.ascontiguousarray(context_lens, dtype=cp.int32)
    out = cp.empty_like(q)
    if q.size == 0:
        return out
    kernel = get_function(_FAMILY, f"paged_attention_int8_v1<{cuda_type(q.dtype)}, {epl}>")
    launch(
        kernel, (num_seqs * q_len, q_heads), (_THREADS,),
        (q, k_cache, v_cache, k_scale, v_scale, tables, ctx, out, i32(q_len), i32(q_heads), i32(kv_heads),
         i32(bs), i32(int(tables.shape[1])), np.float32(scale_v)),
    )  # fmt: skip
    return out
