"""Rotary position embedding (RoPE), fused with writing the new keys and values into a paged KV cache.

Formulas (one head row x of head_dim D, R = rotary_dim even <= D, pairs p < R/2, position t):

    inv_freq[p] = base ** (-2p / R)            (or the caller's float32 inv_freq, e.g. Llama 3 scaling)
    theta       = float32(t) * inv_freq[p]     (a float32 product, as every fp32 RoPE computes it)
    neox:  (x[p], x[p + R/2]) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    gptj:  (x[2p], x[2p + 1]) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    dims R .. D-1 pass through unchanged.

The references compute the angle as the kernels do: inv_freq rounded to float32 (the contract's dtype) and
theta = float32(position) * inv_freq in float32; cos, sin and the rotation in float64. At position 10^5 a
float32 angle is off the exact one by ~4e-3 radians, an error every fp32 RoPE shares; taking it into the
reference keeps the GPU comparison at the fp32 tolerance (the kernel's sincosf adds <= 2 ulp).

KV-cache layout (section 2 of the attention contract): k_cache, v_cache (num_blocks, block_size, kv_heads,
head_dim), token-major blocks; slot s = block * block_size + offset writes [s // block_size, s % block_size];
s < 0 marks a padding token (nothing written). The caches are written in place.

Arrays run where they live: NumPy inputs run the float64 references (cast back to the input dtype), CuPy
inputs the `rope_kv_v1` kernel of cuda_src/rope.cu (a single version; `version=1` selects it).

Launch shape (the kernel is memory-bound: a copy with a rotation). kThreads = 128 threads per CTA; an item is
one 16-byte output vector (neox: a pair of them, at p and p + R/2). I = items per token. A CTA takes
TOK = max(1, min(512 // I, tokens // (4 * SMs), 2048 // (R/2))) tokens: about 4 items per thread, but never
fewer than 4 CTAs per SM when the tokens allow it, and cos/sin of its tokens within 16 KB of shared memory.
When tokens < 4 * SMs (decode), each token's I items are split over gridDim.y = min(ceil(I / 128),
ceil(4 * SMs / tokens)) CTAs, so a batch of 8 decode tokens still fills the GPU.

Bytes per call (s = itemsize, Hq / Hk heads, n tokens, w tokens with a slot >= 0):
    rope            2 n Hq D s                                  (+ positions, inv_freq)
    rope_kv_write   n D s (2 Hq + 2 Hk) + w D s 3 Hk            (read q, k, v(w); write q_rot, k_rot, caches)
    kv_write        4 w Hk D s                                  (+ slot_mapping)
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import debug_enabled, i32
from rawformer.kernels.occupancy import limits_of
from rawformer.kernels.specialize import full_vector_width
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64

__all__ = ["kv_write", "kv_write_ref", "rope", "rope_kv_write", "rope_ref"]

_FAMILY = "rope"
VERSIONS = (1,)
STYLES = ("neox", "gptj")
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_MODE_ROPE, _MODE_ROPE_KV, _MODE_KV = 0, 1, 2

_THREADS = 128  # kRopeThreads in rope.cu
_ITEMS_PER_CTA = 512  # ~4 items (16-byte vectors or neox vector pairs) per thread
_CTAS_PER_SM = 4  # the fewest CTAs per SM the shape rule aims for when there are enough tokens
_SMEM_PAIRS = 2048  # cos/sin pairs (float2) per CTA: 16 KB of shared memory
_MAX_ROTARY_DIM = 2 * _SMEM_PAIRS  # one token's cos/sin must fit the CTA's shared memory


# ---- float64 references ---------------------------------------------------------------------------------


def default_inv_freq(base: float, rotary_dim: int) -> np.ndarray:
    """float32 (rotary_dim/2,) inv_freq[p] = base ** (-2p / rotary_dim), computed in float64, rounded once."""
    p = np.arange(rotary_dim // 2, dtype=np.float64)
    return (base ** (-2.0 * p / rotary_dim)).astype(np.float32)


def _angles(positions: Any, inv_freq32: np.ndarray) -> np.ndarray:
    """float64 (tokens, R/2) of the float32 angles float32(pos) * inv_freq (see the module docstring)."""
    pos32 = np.asarray(backend.to_numpy(positions)).astype(np.float32)
    return (pos32[:, None] * inv_freq32[None, :]).astype(np.float64)


def rope_ref(
    x: Any,
    positions: Any,
    *,
    base: float = 10000.0,
    style: str = "neox",
    rotary_dim: int | None = None,
    inv_freq: Any = None,
) -> np.ndarray:
    """float64 RoPE of x (tokens, heads, head_dim) at `positions` (tokens,); the formula of the module
    docstring. inv_freq, when given, is rounded to float32 as the kernels take it."""
    xa = f64(x)
    rot = xa.shape[-1] if rotary_dim is None else int(rotary_dim)
    half = rot // 2
    inv = (
        default_inv_freq(base, rot)
        if inv_freq is None
        else np.asarray(backend.to_numpy(inv_freq), np.float32)
    )
    theta = _angles(positions, inv)  # (tokens, half)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # (tokens, 1, half)
    y = xa.copy()
    if style == "neox":
        x1, x2 = xa[..., :half], xa[..., half:rot]
    else:
        x1, x2 = xa[..., 0:rot:2], xa[..., 1:rot:2]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if style == "neox":
        y[..., :half], y[..., half:rot] = y1, y2
    else:
        y[..., 0:rot:2], y[..., 1:rot:2] = y1, y2
    return y


def kv_write_ref(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any
) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of (k_cache, v_cache) with token t of k, v (tokens, kv_heads, head_dim) written at slot
    slot_mapping[t] ([s // block_size, s % block_size]); slots < 0 are skipped. The inputs are not changed."""
    kc, vc = f64(k_cache).copy(), f64(v_cache).copy()  # f64 returns a float64 input itself
    slots = np.asarray(backend.to_numpy(slot_mapping)).astype(np.int64)
    keep = slots >= 0
    block_size = kc.shape[1]
    blk, off = slots[keep] // block_size, slots[keep] % block_size
    kc[blk, off] = f64(k)[keep]
    vc[blk, off] = f64(v)[keep]
    return kc, vc


# ---- argument checks ------------------------------------------------------------------------------------


def _check_rows(a: Any, name: str, tokens: int | None = None, head_dim: int | None = None) -> None:
    """`a` is a float (tokens, heads, head_dim) array."""
    _checks.check_float(a, name)
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (tokens, heads, head_dim), got {tuple(a.shape)}")
    if tokens is not None and a.shape[0] != tokens:
        raise ValueError(f"{name} has {a.shape[0]} tokens, expected {tokens} (as q)")
    if head_dim is not None and a.shape[2] != head_dim:
        raise ValueError(f"{name} has head_dim {a.shape[2]}, expected {head_dim}")


def _check_index(a: Any, name: str, like: Any, tokens: int) -> None:
    """`a` is an int32/int64 (tokens,) array living where `like` does."""
    if backend.is_cupy(a) != backend.is_cupy(like):
        raise ValueError(f"{name} must live on the same device kind as the inputs (GPU or CPU)")
    if backend.is_cupy(a) and a.device != like.device:
        raise ValueError(f"{name} is on {a.device} but the inputs are on {like.device}")
    if a.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {a.dtype}")
    if tuple(a.shape) != (tokens,):
        raise ValueError(f"{name} must have shape ({tokens},) (one per token), got {tuple(a.shape)}")


def _check_rope_args(base: Any, style: Any, rotary_dim: Any, head_dim: int) -> tuple[float, int]:
    base_v = _checks.check_scalar(base, "base")
    if base_v <= 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if rotary_dim is None:
        rot = head_dim
    else:
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
            raise TypeError(f"rotary_dim must be an int, got {rotary_dim!r}")
        rot = int(rotary_dim)
    if rot <= 0 or rot % 2 or rot > head_dim:
        raise ValueError(f"rotary_dim must be even, > 0 and <= head_dim ({head_dim}), got {rot}")
    if rot > _MAX_ROTARY_DIM:
        raise ValueError(f"rotary_dim must be <= {_MAX_ROTARY_DIM}, got {rot}")
    return base_v, rot


def _check_inv_freq(inv_freq: Any, like: Any, rot: int) -> Any:
    """The caller's inv_freq as a float32 (rot/2,) array where `like` lives (None stays None)."""
    if inv_freq is None:
        return None
    arr = adopt(inv_freq, "inv_freq")[0]
    if backend.is_cupy(arr) != backend.is_cupy(like):
        raise ValueError("inv_freq must live on the same device kind as the inputs (GPU or CPU)")
    if arr.dtype.kind != "f":
        raise TypeError(f"inv_freq must be a float array (float32), got {arr.dtype}")
    if tuple(arr.shape) != (rot // 2,):
        raise ValueError(f"inv_freq must have shape ({rot // 2},) (rotary_dim / 2), got {tuple(arr.shape)}")
    xp = backend.array_module(arr)
    return xp.ascontiguousarray(arr, dtype=np.float32)


def _check_cache(k_cache: Any, v_cache: Any, k: Any) -> tuple[int, int]:
    """k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) of k's dtype and device, last dim
    contiguous (written in place, so never copied). Returns (num_blocks, block_size)."""
    _checks.check_same_place(k, "k", k_cache=k_cache, v_cache=v_cache)
    kv_heads, head_dim = k.shape[1], k.shape[2]
    for a, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if a.ndim != 4 or tuple(a.shape[2:]) != (kv_heads, head_dim):
            raise ValueError(
                f"{name} must have shape (num_blocks, block_size, {kv_heads}, {head_dim}) "
                f"(kv_heads, head_dim of k), got {tuple(a.shape)}"
            )
        if a.shape[1] < 1:
            raise ValueError(f"{name} has block_size {a.shape[1]}; it must be >= 1")
        if head_dim > 1 and a.strides[3] != a.itemsize:
            raise ValueError(f"{name} must have a contiguous last dim (it is written in place, not copied)")
        if not backend.is_cupy(a) and not a.flags.writeable:
            raise ValueError(f"{name} is read-only; the cache is written in place")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    return int(k_cache.shape[0]), int(k_cache.shape[1])


def _check_slots_range(slots: Any, num_blocks: int, block_size: int) -> None:
    """Every slot < num_blocks * block_size (one device->host copy on the GPU; debug mode only there)."""
    host = np.asarray(backend.to_numpy(slots))
    limit = num_blocks * block_size
    bad = np.flatnonzero(host >= limit)
    if bad.size:
        t = int(bad[0])
        raise ValueError(
            f"slot_mapping[{t}] = {int(host[t])} is out of range: the cache holds {num_blocks} blocks x "
            f"{block_size} = {limit} slots"
        )


# ---- kernel selection and launch --------------------------------------------------------------------------


def _index_type(dtype: Any) -> str:
    return "int" if np.dtype(dtype) == np.int32 else "long long"


def _expr(dtype: Any, vw: int, style: str, mode: int, pos_dtype: Any, slot_dtype: Any) -> str:
    neox = "true" if (style == "neox" or mode == _MODE_KV) else "false"
    p = _index_type(pos_dtype) if mode != _MODE_KV else "int"
    s = _index_type(slot_dtype) if mode != _MODE_ROPE else "int"
    return f"rf::rope_kv_v1<{cuda_type(dtype)}, {vw}, {neox}, {mode}, {p}, {s}>"


def _widths(dtype: Any) -> list[int]:
    """Vector widths from one 16-byte access down to a scalar: 8, 4, 2, 1 (fp16) or 4, 2, 1 (fp32)."""
    w, out = full_vector_width(dtype), []
    while w >= 1:
        out.append(w)
        w //= 2
    return out


def _instantiations() -> list[str]:
    exprs: list[str] = []
    for dtype in _checks.GPU_DTYPES:
        for vw in _widths(dtype):
            for style in STYLES:
                for pos in INDEX_DTYPES:
                    exprs.append(_expr(dtype, vw, style, _MODE_ROPE, pos, np.int32))
                    for slot in INDEX_DTYPES:
                        exprs.append(_expr(dtype, vw, style, _MODE_ROPE_KV, pos, slot))
            for slot in INDEX_DTYPES:
                exprs.append(_expr(dtype, vw, "neox", _MODE_KV, np.int32, slot))
    return list(dict.fromkeys(exprs))


register_family(_FAMILY, _instantiations)


def _vector_width(
    dtype: Any, head_dim: int, rot: int, style: str, mode: int, arrays: list[Any], strides: list[int]
) -> int:
    """The widest access every row start allows: head_dim, the rotary split (neox: R/2; gptj: R), each
    row stride (elements) and each pointer must be whole vectors."""
    item = np.dtype(dtype).itemsize
    for w in _widths(dtype):
        if head_dim % w:
            continue
        if mode != _MODE_KV and w > 1 and (rot // 2 if style == "neox" else rot) % w:
            continue
        if any(st % w for st in strides):
            continue
        if any(a.data.ptr % (w * item) for a in arrays if a is not None):
            continue
        return w
    return 1


def _launch_shape(tokens: int, items: int, half: int, sms: int) -> tuple[int, int, int, int]:
    """(tokens per CTA, items per slice, grid x, grid y): the rule of the module docstring."""
    tok = max(1, min(_ITEMS_PER_CTA // max(items, 1), tokens // (_CTAS_PER_SM * sms)))
    if half:
        tok = max(1, min(tok, _SMEM_PAIRS // half))
    slices = 1
    if tok == 1 and tokens < _CTAS_PER_SM * sms:
        slices = max(1, min(-(-items // _THREADS), -(-_CTAS_PER_SM * sms // tokens)))
    per_slice = -(-items // slices)
    slices = -(-items // per_slice)
    return tok, per_slice, -(-tokens // tok), slices


def _elem_strides(a: Any) -> tuple[int, int]:
    """(token, head) strides in elements of a (tokens, heads, head_dim) array."""
    return a.strides[0] // a.itemsize, a.strides[1] // a.itemsize


def _rows_view(a: Any) -> Any:
    """`a` itself when its last dim is contiguous and its strides are whole elements, else one copy."""
    xp = backend.array_module(a)
    item = a.itemsize
    if (a.shape[-1] <= 1 or a.strides[-1] == item) and all(st % item == 0 for st in a.strides):
        return a
    return xp.ascontiguousarray(a)


def _same_view(a: Any, b: Any) -> bool:
    return a.data.ptr == b.data.ptr and a.strides == b.strides and a.shape == b.shape


def _target(out: Any, like: Any, inputs: list[Any]) -> Any:
    """Where the kernel writes a rotated output: `out` when it is `like` itself (in place) or a usable
    layout sharing no memory with the inputs; else a fresh contiguous array (copied into `out` after)."""
    cp = backend.require_cupy()
    if out is None:
        return cp.empty(like.shape, dtype=like.dtype)
    if _rows_view(out) is not out:
        return cp.empty(like.shape, dtype=like.dtype)
    if _same_view(out, like):
        return out
    if any(a is not None and cp.may_share_memory(out, a) for a in inputs):
        return cp.empty(like.shape, dtype=like.dtype)
    return out


def _run_kernel(
    mode: int,
    q: Any,
    k: Any,
    v: Any,
    q_out: Any,
    k_out: Any,
    k_cache: Any,
    v_cache: Any,
    positions: Any,
    slots: Any,
    inv_freq: Any,
    style: str,
    rot: int,
    version: int | None,
) -> None:
    """Launch rope_kv_v1 in `mode` (arrays already checked; strided views with a contiguous last dim)."""
    del version  # one version so far
    cp = backend.require_cupy()
    first = q if mode != _MODE_KV else k
    tokens, head_dim, dtype = first.shape[0], first.shape[2], first.dtype
    if tokens == 0:
        return
    q_heads = q.shape[1] if q is not None else 0
    kv_heads = k.shape[1] if k is not None else 0
    if q_heads + kv_heads == 0 or head_dim == 0:
        return
    half = rot // 2 if mode != _MODE_KV else 0
    qs = _elem_strides(q) if q is not None else (0, 0)
    qos = _elem_strides(q_out) if q_out is not None else (0, 0)
    ks = _elem_strides(k) if k is not None else (0, 0)
    kos = _elem_strides(k_out) if k_out is not None else (0, 0)
    vs = _elem_strides(v) if v is not None else (0, 0)
    item = np.dtype(dtype).itemsize
    kcs = tuple(st // item for st in k_cache.strides[:3]) if k_cache is not None else (0, 0, 0)
    vcs = tuple(st // item for st in v_cache.strides[:3]) if v_cache is not None else (0, 0, 0)
    block_size = k_cache.shape[1] if k_cache is not None else 1
    arrays = [q, k, v, q_out, k_out, k_cache, v_cache]
    strides = [*qs, *qos, *ks, *kos, *vs, *kcs, *vcs]
    vw = _vector_width(dtype, head_dim, rot, style, mode, arrays, strides)

    nv = head_dim // vw
    pair_units = style == "neox" or vw == 1
    rot_items = nv - (half // vw) if pair_units else nv
    rot_rows = {_MODE_ROPE: q_heads, _MODE_ROPE_KV: q_heads + kv_heads, _MODE_KV: 0}[mode]
    copy_rows = {_MODE_ROPE: 0, _MODE_ROPE_KV: kv_heads, _MODE_KV: 2 * kv_heads}[mode]
    items = rot_rows * rot_items + copy_rows * nv
    sms = limits_of(cp.cuda.Device().id).sms
    tok, per_slice, gx, gy = _launch_shape(tokens, items, half, sms)

    pos_dtype = positions.dtype if positions is not None else np.int32
    slot_dtype = slots.dtype if slots is not None else np.int32
    expr = _expr(dtype, vw, style, mode, pos_dtype, slot_dtype)
    dummy = first  # never dereferenced: the mode's template removes every use of an absent pointer
    if mode == _MODE_ROPE:
        moved = 2 * tokens * q_heads * head_dim * item
    elif mode == _MODE_ROPE_KV:
        moved = (
            tokens * head_dim * item * (2 * q_heads + 2 * kv_heads) + tokens * head_dim * item * 3 * kv_heads
        )
    else:
        moved = 4 * tokens * kv_heads * head_dim * item
    ll = np.int64
    launch(
        get_function(_FAMILY, expr),
        (gx, gy),
        (_THREADS,),
        (
            q if q is not None else dummy,
            k if k is not None else dummy,
            v if v is not None else dummy,
            q_out if q_out is not None else dummy,
            k_out if k_out is not None else dummy,
            k_cache if k_cache is not None else dummy,
            v_cache if v_cache is not None else dummy,
            positions if positions is not None else dummy,
            slots if slots is not None else dummy,
            inv_freq if inv_freq is not None else dummy,
            i32(tokens),
            i32(q_heads),
            i32(kv_heads),
            i32(head_dim),
            i32(rot),
            *(ll(s) for s in (*qs, *ks, *vs, *qos, *kos, *kcs, *vcs)),
            i32(block_size),
            i32(tok),
            i32(per_slice),
        ),
        shared_mem=tok * half * 8 + (16 * tok if mode != _MODE_ROPE else 0),  # cos/sin + cache rows
        bytes_moved=moved,
        pdl=True,  # rope.cu waits (rf::pdl_wait) before its first access
    )


@functools.cache
def _device_inv_freq(device_id: int, base: float, rot: int) -> Any:
    """The default inv_freq on a device, built once per (device, base, rotary_dim)."""
    cp = backend.require_cupy()
    with cp.cuda.Device(device_id):
        return cp.asarray(default_inv_freq(base, rot))


def _gpu_inv_freq(inv_freq: Any, base: float, rot: int) -> Any:
    if inv_freq is not None:
        return inv_freq
    return _device_inv_freq(backend.require_cupy().cuda.Device().id, base, rot)


def _contiguous_index(a: Any) -> Any:
    return backend.array_module(a).ascontiguousarray(a)


# ---- public ops ----------------------------------------------------------------------------------------


def rope(
    x: Any,
    positions: Any,
    *,
    base: float = 10000.0,
    style: str = "neox",
    rotary_dim: int | None = None,
    inv_freq: Any = None,
    out: Any = None,
    version: int | None = None,
) -> Any:
    """Rotary position embedding of x at per-token positions.

        theta[t, p] = float32(positions[t]) * inv_freq[p],  inv_freq[p] = base ** (-2p / rotary_dim)
        neox: (x[p], x[p + R/2]) -> (x1 cos - x2 sin, x2 cos + x1 sin);  gptj: pairs (x[2p], x[2p + 1])

    Parameters
    ----------
    x : (tokens, heads, head_dim) float16 / float32 (float64 on the CPU); any strides with a contiguous
        last dim (e.g. a view of a packed qkv buffer), else copied once
    positions : (tokens,) int32 / int64, where x lives
    base : rotary base (default 10000), > 0; unused when inv_freq is given
    style : "neox" (halves: pairs (p, p + R/2)) or "gptj" (interleaved: pairs (2p, 2p + 1))
    rotary_dim : R, even, <= head_dim (default head_dim); dims R.. pass through unchanged
    inv_freq : optional (R/2,) float32 frequencies (scaled RoPE such as Llama 3's), where x lives
    out : optional array of x's shape, dtype and device (may be x itself: in place)
    version : CUDA kernel version (1)

    Returns
    -------
    y : (tokens, heads, head_dim) like x (`out` when given)
    """
    x, give_back = adopt(x, "x")
    pos = adopt(positions, "positions")[0]
    out_arr = adopt_optional(out, "out")
    _check_rows(x, "x")
    tokens, _, head_dim = x.shape
    _check_index(pos, "positions", x, tokens)
    base_v, rot = _check_rope_args(base, style, rotary_dim, head_dim)
    inv = _check_inv_freq(inv_freq, x, rot)
    _checks.check_out(out_arr, "out", x)
    which = _checks.check_impl(None, x)
    check_version(version, VERSIONS, which)

    if which == "numpy":
        y = rope_ref(x, pos, base=base_v, style=style, rotary_dim=rot, inv_freq=inv).astype(x.dtype)
        return _checks.finish(y, out_arr, out, give_back)
    xv = _rows_view(x)
    target = _target(out_arr, xv, [xv])
    _run_kernel(
        _MODE_ROPE, xv, None, None, target, None, None, None, _contiguous_index(pos), None,
        _gpu_inv_freq(inv, base_v, rot), style, rot, version,
    )  # fmt: skip
    return _finish_out(target, out_arr, out, give_back)


def _finish_out(result: Any, out_arr: Any, out: Any, give_back: Any) -> Any:
    if out is None:
        return give_back(result)
    if result is not out_arr:
        out_arr[...] = result
    return out


def rope_kv_write(
    q: Any,
    k: Any,
    v: Any,
    positions: Any,
    k_cache: Any,
    v_cache: Any,
    slot_mapping: Any,
    *,
    base: float = 10000.0,
    style: str = "neox",
    rotary_dim: int | None = None,
    inv_freq: Any = None,
    out_q: Any = None,
    out_k: Any = None,
    version: int | None = None,
) -> tuple[Any, Any]:
    """RoPE of q and k (as `rope`), and the rotated k and the v of each token written into the paged cache.

        q_rot = rope(q), k_rot = rope(k)
        k_cache[s // bs, s % bs] = k_rot[t],  v_cache[s // bs, s % bs] = v[t]   for s = slot_mapping[t] >= 0

    Parameters
    ----------
    q : (tokens, q_heads, head_dim); k, v : (tokens, kv_heads, head_dim); one dtype (float16 / float32;
        float64 on the CPU); strided views with a contiguous last dim work without a copy (packed qkv)
    positions : (tokens,) int32 / int64
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim) of q's dtype, last dim contiguous; written
        in place
    slot_mapping : (tokens,) int32 / int64; slot = block * block_size + offset, < 0: padding, not written.
        Slots >= num_blocks * block_size raise ValueError on the CPU (on the GPU only with RAWFORMER_DEBUG=1).
    base, style, rotary_dim, inv_freq : as `rope`
    out_q, out_k : optional outputs like q / k (out_q=q, out_k=k: in place)
    version : CUDA kernel version (1)

    Returns
    -------
    (q_rot, k_rot) : like q and k (out_q / out_k when given)
    """
    q, give_back = adopt(q, "q")
    k, v = adopt(k, "k")[0], adopt(v, "v")[0]
    pos, slots = adopt(positions, "positions")[0], adopt(slot_mapping, "slot_mapping")[0]
    kc, vc = adopt(k_cache, "k_cache")[0], adopt(v_cache, "v_cache")[0]
    oq, ok = adopt_optional(out_q, "out_q"), adopt_optional(out_k, "out_k")
    _check_rows(q, "q")
    tokens, q_heads, head_dim = q.shape
    _checks.check_same_place(q, "q", k=k, v=v)
    _check_rows(k, "k", tokens, head_dim)
    _check_rows(v, "v", tokens, head_dim)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    _check_index(pos, "positions", q, tokens)
    _check_index(slots, "slot_mapping", q, tokens)
    num_blocks, block_size = _check_cache(kc, vc, k)
    base_v, rot = _check_rope_args(base, style, rotary_dim, head_dim)
    inv = _check_inv_freq(inv_freq, q, rot)
    _checks.check_out(oq, "out_q", q)
    _checks.check_out(ok, "out_k", k)
    which = _checks.check_impl(None, q)
    check_version(version, VERSIONS, which)
    if which == "numpy" or debug_enabled():
        _check_slots_range(slots, num_blocks, block_size)

    if which == "numpy":
        kw = {"base": base_v, "style": style, "rotary_dim": rot, "inv_freq": inv}
        q_rot = rope_ref(q, pos, **kw).astype(q.dtype)
        k_rot = rope_ref(k, pos, **kw).astype(k.dtype)
        _write_cache_numpy(k_rot, v, kc, vc, slots)
        return (
            _checks.finish(q_rot, oq, out_q, give_back),
            _checks.finish(k_rot, ok, out_k, give_back),
        )
    qv, kv_, vv = _rows_view(q), _rows_view(k), _rows_view(v)
    inputs = [qv, kv_, vv, kc, vc]
    tq = _target(oq, qv, inputs)
    tk = _target(ok, kv_, inputs)
    _run_kernel(
        _MODE_ROPE_KV, qv, kv_, vv, tq, tk, kc, vc, _contiguous_index(pos), _contiguous_index(slots),
        _gpu_inv_freq(inv, base_v, rot), style, rot, version,
    )  # fmt: skip
    return _finish_out(tq, oq, out_q, give_back), _finish_out(tk, ok, out_k, give_back)


def _write_cache_numpy(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: Any
) -> None:
    """The NumPy path's in-place cache write (values already in the cache dtype: an exact copy)."""
    s = np.asarray(slots).astype(np.int64)
    keep = s >= 0
    block_size = k_cache.shape[1]
    blk, off = s[keep] // block_size, s[keep] % block_size
    k_cache[blk, off] = k[keep]
    v_cache[blk, off] = v[keep]


def kv_write(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, version: int | None = None
) -> None:
    """Write token t of k and v into the paged cache at slot slot_mapping[t] (no rotation).

        k_cache[s // bs, s % bs] = k[t],  v_cache[s // bs, s % bs] = v[t]   for s = slot_mapping[t] >= 0

    Parameters
    ----------
    k, v : (tokens, kv_heads, head_dim), one dtype; strided views with a contiguous last dim work as they are
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim) of k's dtype, last dim contiguous
    slot_mapping : (tokens,) int32 / int64; < 0: padding, not written; >= num_blocks * block_size:
        ValueError on the CPU (on the GPU only with RAWFORMER_DEBUG=1)
    version : CUDA kernel version (1)

    Returns
    -------
    None (the caches are written in place, bit for bit)
    """
    k = adopt(k, "k")[0]
    v = adopt(v, "v")[0]
    slots = adopt(slot_mapping, "slot_mapping")[0]
    kc, vc = adopt(k_cache, "k_cache")[0], adopt(v_cache, "v_cache")[0]
    _check_rows(k, "k")
    tokens, _, head_dim = k.shape
    _checks.check_same_place(k, "k", v=v)
    _check_rows(v, "v", tokens, head_dim)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    _check_index(slots, "slot_mapping", k, tokens)
    num_blocks, block_size = _check_cache(kc, vc, k)
    which = _checks.check_impl(None, k)
    check_version(version, VERSIONS, which)
    if which == "numpy" or debug_enabled():
        _check_slots_range(slots, num_blocks, block_size)
    if which == "numpy":
        _write_cache_numpy(k, v, kc, vc, slots)
        return None
    _run_kernel(
        _MODE_KV, None, _rows_view(k), _rows_view(v), None, None, kc, vc, None, _contiguous_index(slots),
        None, "neox", 2, version,
    )  # fmt: skip
    return None
