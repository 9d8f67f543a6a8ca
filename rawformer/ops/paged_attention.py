"""Decode attention over a paged KV cache (flash-decoding), with split-KV and a log-sum-exp combine.

Layouts (issue 3 contract, section 2):

    q             (num_seqs, q_len, q_heads, head_dim)           q_len >= 1 new tokens per sequence
    k_cache       (num_blocks, block_size, kv_heads, head_dim)   token-major blocks; v_cache alike
    block_tables  int32 (num_seqs, max_blocks_per_seq)           block ids of each sequence, in order
    context_lens  int32 (num_seqs,)                              cached tokens, INCLUDING the q_len new ones
    out           like q

Formula. Token p of sequence s lives at k_cache[block_tables[s, p // block_size], p % block_size]. Query
token t of sequence s sits at position P = context_lens[s] - q_len + t and attends to positions 0..P (causal
among the new tokens); q head h reads kv head h // (q_heads // kv_heads) (GQA / MQA):

    out[s, t, h] = sum_{p <= P} softmax_p(scale * q[s, t, h] . k_p) v_p,   scale default 1 / sqrt(head_dim)

A query that sees no position (context_lens[s] == 0, or P < 0) gives zeros.

NumPy inputs run the float64 reference `paged_attention_ref` (cast back to q's dtype); CuPy inputs run the
kernels of cuda_src/paged_attention.cu (impl="cuda") or the Numba kernel (impl="numba"). DLPack / CUDA
array interface inputs are viewed as one of the two.

Kernel selection (impl="cuda"; the header of paged_attention.cu describes the versions):
    float16, head_dim <= 128       v3 (tensor cores, a cp.async pipeline per warp; head dim bucket
                                   64 / 96 / 128, zero-padded). v2 (tensor cores, one pipeline per CTA)
                                   takes the same inputs with version=2; v4 (v3's math fed by sm_90 TMA
                                   bulk copies + mbarriers; compute capability >= 9.0 only, else
                                   ValueError) with version=4.
    otherwise                      v1 (SIMT; head dim bucket 32 / 64 / 96 / 128 / 192 / 256)
Query rows per CTA: v2 / v3 / v4 16 (group heads x q_len, padded), v1 the smallest of 1 / 4 / 8 / 16 / 32
that holds them; larger groups are cut into row chunks (extra CTAs, each reading the K/V again, mostly from
L2).

Split-KV. num_splits=None picks a count from the grid: with C = num_seqs x kv_heads x row chunks CTAs, S
streaming multiprocessors and k CTAs per SM (v3 / v4: as many as are resident, from its registers and shared
memory: 2 at head dim 128, where 109 KB of shared memory per CTA decides, 3 at 64; v1 / v2: 2, the value
they were measured with), no split when C >= S (every SM already streams: one resident CTA of v3 keeps
4 warps x 3 tiles of 8 KB in flight at head dim 128); else floor(k S / C) splits
(about k CTAs per SM, one wave), at most max_tokens / 256 so that each split keeps at least 256
positions. max_tokens = max_blocks_per_seq x block_size (the table's width: known on the host without
reading context_lens). A requested num_splits is capped at 1024. Splits cover fixed position ranges
[i T, (i + 1) T) with T = ceil(max_tokens / splits) rounded up to the kernel's split granule (64
positions for v2 / v3 / v4, the tile for v1), so the count actually launched is ceil(max_tokens / T). More
than one split writes float32 partial outputs + base-2 log-sum-exps and runs the combine kernel.

Debug (debug=True, default from RAWFORMER_DEBUG=1): before the attention kernel a check kernel verifies
every block id in use (block_tables[s, :ceil(context_lens[s] / block_size)]) is in [0, num_blocks), that
context_lens[s] is in [0, max_blocks_per_seq * block_size] and, when block_owners (int32 (num_blocks,): the
owning sequence, -1 = shared / free) is given, that each block belongs to s or is shared; a failure raises
ValueError naming the sequence, the table slot and the block id. The NumPy path always checks ranges (a
negative id would silently wrap in NumPy) and checks owners when debug is on.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import debug_enabled, i32
from rawformer.kernels.occupancy import limits_of, resident_blocks
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64, finish

__all__ = ["choose_num_splits", "paged_attention", "paged_attention_ref"]

_FAMILY = "paged_attention"
VERSIONS = (1, 2, 3, 4)
BLOCK_SIZES = (8, 16, 32, 64, 128)
LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1

# Compile-time shapes; the same constants appear in paged_attention.cu's template arguments.
_THREADS = 128  # kThreads: every attention kernel and the combine kernel
_VECTOR_BYTES = 16
_V1_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
_V1_ROWS = (1, 4, 8, 16, 32)
_V1_TILE_BYTES = 8192  # bytes of K per v1 tile: 4 + 4 16-byte loads in flight per thread
_V2_HEAD_DIMS = (64, 96, 128)
_V2_ROWS = 16  # kMmaRows
_V2_TILE = 64  # kTile: tokens per pipeline stage
_V2_STAGES = 3
_V2_WARPS = 4
# v3's per-warp pipeline depth (tiles of 16 tokens). 3: 109 KB of shared memory at head dim 128, 2 CTAs per
# SM, 24 tiles (192 KB) in flight per SM. 2: 75 KB, Q re-read from shared memory, launch bound of 3 CTAs
# per SM (168 registers), also 24 tiles in flight, finer waves. Both are compiled; set this to compare.
_V3_STAGES = 2  # H100 sweep: 2 stages (3 CTAs per SM) 0.3-2.6% faster than 3 on the four decode shapes
_V3_STAGE_CHOICES = (2, 3)
_V3_WARP_TILE = 16  # kWarpTile
# v4's per-warp pipeline depth per head dim bucket (tiles of 16 tokens, one mbarrier per stage). The defaults
# keep about 192 KB of K/V in flight per H100 SM with the most CTAs: head dim 64, 4 stages: 76,800 bytes, 3
# CTAs per SM; 96, 4 stages: 110,592 bytes, 2 CTAs; 128, 2 stages: 74,688 bytes, 3 CTAs (160 registers under
# the 168 of the launch bound; v3 measured 2 stages x 3 CTAs best). Every (bucket, choice) is compiled; set
# this to compare (6 stages at 128: 214,080 bytes, 1 CTA per SM, 4 warps).
_V4_STAGES = {64: 4, 96: 4, 128: 2}
_V4_STAGE_CHOICES = (2, 3, 4, 6)
_V4_MIN_CC = 90  # cp.async.bulk and mbarrier expect_tx: sm_90 and newer
_V3_SPLIT_GRANULE = 64  # split ranges are multiples of this: tiles never straddle a split
_V3_MAX_TOKEN_STRIDE = 2**27  # v3 computes in-block token offsets in 32 bits
_MAX_GRID_X = 2**31 - 1
_CTAS_PER_SM = 2  # resident CTAs per SM of every version at the shapes that matter (see the docstring)
_MAX_HEAD_DIM = 256
_MIN_SPLIT_TOKENS = 256  # auto split: every split keeps at least this many positions
_MAX_GRID_YZ = 65535
_MAX_SPLITS = 1024  # the combine kernel keeps one weight per split in shared memory
_CHECK_THREADS = 256
_NULL = None  # CuPy passes None as a null pointer argument


# ---- float64 reference -----------------------------------------------------------------------------------


def paged_attention_ref(
    q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any, scale: Any = None
) -> np.ndarray:
    """float64 decode attention through the block tables (see the module docstring for the formula).

    Parameters
    ----------
    q : (num_seqs, q_len, q_heads, head_dim)
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim)
    block_tables : integer (num_seqs, max_blocks_per_seq); context_lens : integer (num_seqs,)
    scale : multiplier of q . k (default 1 / sqrt(head_dim))

    Returns
    -------
    out : float64 NumPy array (num_seqs, q_len, q_heads, head_dim)

    Block ids are not range-checked here (the launcher does that); each sequence's K and V are gathered
    with one fancy index, and only its first context_lens[s] positions are read as valid.
    """
    qf = f64(q)
    kc, vc = backend.to_numpy(k_cache), backend.to_numpy(v_cache)
    tables = np.asarray(backend.to_numpy(block_tables)).astype(np.int64, copy=False)
    ctx = np.asarray(backend.to_numpy(context_lens)).astype(np.int64, copy=False)
    num_seqs, q_len, q_heads, head_dim = qf.shape
    block_size, kv_heads = kc.shape[1], kc.shape[2]
    group = q_heads // kv_heads if kv_heads else 0
    scale_v = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = np.zeros(qf.shape, dtype=np.float64)
    if qf.size == 0:
        return out
    for s in range(num_seqs):  # ragged contexts: one vectorised pass per sequence
        n = int(ctx[s])
        if n <= 0:
            continue
        nb = -(-n // block_size)
        blocks = tables[s, :nb]
        k = np.asarray(kc[blocks], dtype=np.float64).reshape(nb * block_size, kv_heads, head_dim)[:n]
        v = np.asarray(vc[blocks], dtype=np.float64).reshape(nb * block_size, kv_heads, head_dim)[:n]
        qs = qf[s].reshape(q_len, kv_heads, group, head_dim)  # (T, kvh, group, D)
        scores = np.einsum("tkgd,nkd->tkgn", qs, k) * scale_v  # (T, kvh, group, n)
        last = n - q_len + np.arange(q_len)  # last visible position of each query token
        visible = np.arange(n)[None, :] <= last[:, None]  # (T, n)
        scores = np.where(visible[:, None, None, :], scores, -np.inf)
        with np.errstate(invalid="ignore", over="ignore"):
            m = np.max(scores, axis=-1, keepdims=True)
            m = np.where(np.isneginf(m), 0.0, m)  # a query seeing nothing: exps 0, sum 0, out 0
            e = np.exp(scores - m)
            total = np.sum(e, axis=-1, keepdims=True)
            p = e / np.where(total == 0, 1.0, total)
        out[s] = np.einsum("tkgn,nkd->tkgd", p, v).reshape(q_len, q_heads, head_dim)
    return out


# ---- kernel plans ------------------------------------------------------------------------------------------


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


def _v1_tile(hd: int, itemsize: int) -> int:
    """v1's tokens per tile: 8 KB of K, a multiple of 8 tokens, at least 8."""
    return max(8, (_V1_TILE_BYTES // (hd * itemsize)) // 8 * 8)


class _Plan:
    """One attention launch: name expression, query rows per CTA, tokens per tile, dynamic shared memory."""

    __slots__ = ("expr", "rows", "tile", "smem")

    def __init__(self, expr: str, rows: int, tile: int, smem: int) -> None:
        # tile: the split granule (split ranges are whole multiples of it)
        self.expr, self.rows, self.tile, self.smem = expr, rows, tile, smem


def _plan(
    version: int, dtype: Any, head_dim: int, rows_total: int, stages: int | None = None
) -> _Plan | None:
    """The kernel of `version` for this dtype / head_dim / query rows per kv head, or None if it cannot
    (stages: v3 / v4's pipeline depth, default _V3_STAGES / _V4_STAGES[head dim bucket])."""
    dtype = np.dtype(dtype)
    t = cuda_type(dtype)
    if version == 1:
        hd = _bucket(head_dim, _V1_HEAD_DIMS)
        if hd is None:
            return None
        rows = _bucket(rows_total, _V1_ROWS) or _V1_ROWS[-1]
        tk = _v1_tile(hd, dtype.itemsize)
        ks = hd + _VECTOR_BYTES // dtype.itemsize
        smem = 2 * tk * ks * dtype.itemsize + (rows * hd + rows * (tk + 1) + 3 * rows) * 4 + rows * 4
        return _Plan(f"paged_attention_v1<{t}, {hd}, {rows}, {tk}>", rows, tk, smem)
    if version == 2:
        hd = _bucket(head_dim, _V2_HEAD_DIMS)
        if dtype != np.float16 or hd is None:
            return None
        ks = hd + 8
        smem = (_V2_STAGES * 2 * _V2_TILE * ks + _V2_ROWS * ks) * 2 + (
            2 * _V2_WARPS * _V2_ROWS + 2 * _V2_ROWS
        ) * 4
        return _Plan(f"paged_attention_v2<{t}, {hd}, {_V2_STAGES}>", _V2_ROWS, _V2_TILE, smem)
    if version in (3, 4):
        hd = _bucket(head_dim, _V2_HEAD_DIMS)
        if dtype != np.float16 or hd is None:
            return None
        ks = hd + 8
        if stages is None:
            stages = _V3_STAGES if version == 3 else _V4_STAGES[hd]
        smem = (_V2_WARPS * stages * 2 * _V3_WARP_TILE * ks + _V2_ROWS * ks) * 2 + (
            2 * _V2_WARPS * _V2_ROWS + 2 * _V2_ROWS
        ) * 4
        if version == 4:  # plus one 8-byte mbarrier per (warp, stage): v4_smem in paged_attention.cu
            smem += _V2_WARPS * stages * 8
        expr = f"paged_attention_v{version}<{t}, {hd}, {stages}>"
        return _Plan(expr, _V2_ROWS, _V3_SPLIT_GRANULE, smem)
    raise ValueError(f"no paged_attention version {version}")


def _default_version(dtype: Any, head_dim: int) -> int:
    return 3 if np.dtype(dtype) == np.float16 and head_dim <= _V2_HEAD_DIMS[-1] else 1


def choose_num_splits(ctas: int, max_tokens: int, sms: int, ctas_per_sm: int = _CTAS_PER_SM) -> int:
    """Auto split count: 1 when the `ctas` CTAs of one pass already cover the `sms` SMs (a second wave, or
    the combine pass, costs more than the SMs left idle: measured with v2 at 256 CTAs on 132 SMs, 2 splits
    were 5% slower); else about `ctas_per_sm` CTAs per SM in one wave (floor(ctas_per_sm * sms / ctas)),
    keeping >= 256 positions per split."""
    if ctas <= 0 or max_tokens <= 0 or ctas >= sms:
        return 1
    return max(1, min((ctas_per_sm * sms) // ctas, max_tokens // _MIN_SPLIT_TOKENS))


def split_layout(num_splits: int, max_tokens: int, tile: int) -> tuple[int, int]:
    """(splits launched, positions per split): ranges of a whole number of tiles covering max_tokens."""
    if max_tokens <= 0 or num_splits <= 1:
        return 1, max(max_tokens, 1)
    per = -(-max_tokens // num_splits)
    per = -(-per // tile) * tile
    return -(-max_tokens // per), per


def _instantiations() -> list[str]:
    """Every name expression the launcher can request."""
    exprs: list[str] = []
    for dtype in _checks.GPU_DTYPES:
        for hd in _V1_HEAD_DIMS:
            for rows in _V1_ROWS:
                exprs.append(_plan(1, dtype, hd, rows).expr)  # type: ignore[union-attr]
    for hd in _V2_HEAD_DIMS:
        exprs.append(_plan(2, np.float16, hd, 1).expr)  # type: ignore[union-attr]
        for stages in _V3_STAGE_CHOICES:
            exprs.append(_plan(3, np.float16, hd, 1, stages).expr)  # type: ignore[union-attr]
        for stages in (*_V4_STAGE_CHOICES, _V4_STAGES[hd]):
            exprs.append(_plan(4, np.float16, hd, 1, stages).expr)  # type: ignore[union-attr]
    for dtype in _checks.GPU_DTYPES:
        exprs.append(f"paged_attention_combine<{cuda_type(dtype)}>")
    exprs.append(f"paged_attention_check_tables<{_CHECK_THREADS}>")
    return list(dict.fromkeys(exprs))


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _check_int_array(a: Any, name: str, ref: Any, ndim: int) -> None:
    if backend.is_cupy(a) != backend.is_cupy(ref):
        raise ValueError(
            f"paged_attention: {name} is a {'GPU' if backend.is_cupy(a) else 'CPU'} array but q is a "
            f"{'GPU' if backend.is_cupy(ref) else 'CPU'} array; move both to one device"
        )
    if backend.is_cupy(a) and a.device != ref.device:
        raise ValueError(f"paged_attention: {name} is on {a.device} but q is on {ref.device}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"paged_attention: {name} must be an integer array (int32), got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"paged_attention: {name} must have {ndim} dimensions, got shape {tuple(a.shape)}")


def _as_int32(a: Any) -> Any:
    """A C-contiguous int32 copy/view; wider values are clipped to [-1, INT32_MAX] so that an id that does
    not fit int32 stays out of range (the debug check reports it) instead of wrapping to a valid one."""
    xp = backend.array_module(a)
    if a.dtype != np.int32:
        a = (xp.minimum(a, INT32_MAX) if a.dtype.kind == "u" else xp.clip(a, -1, INT32_MAX)).astype(np.int32)
    return xp.ascontiguousarray(a)


def _debug_flag(debug: Any) -> bool:
    if debug is None:
        return debug_enabled()
    if not isinstance(debug, (bool, np.bool_)):
        raise TypeError(f"paged_attention: debug must be True, False or None, got {debug!r}")
    return bool(debug)


def _bad_entry_error(
    s: int,
    slot: int,
    tables: np.ndarray,
    ctx: np.ndarray,
    owners: np.ndarray | None,
    num_blocks: int,
    bs: int,
) -> ValueError:
    """The ValueError for the first failing (sequence, slot); slot == table width means context_lens[s]."""
    width = tables.shape[1]
    if slot == width:
        return ValueError(
            f"paged_attention: context_lens[{s}] = {int(ctx[s])} is outside [0, {width * bs}] (sequence {s}: "
            f"its block table row holds {width} blocks of {bs} tokens)"
        )
    block = int(tables[s, slot])
    if block < 0 or block >= num_blocks:
        return ValueError(
            f"paged_attention: sequence {s}, table slot {slot}: block id {block} is out of range for a cache "
            f"of {num_blocks} blocks"
        )
    owner = int(owners[block]) if owners is not None else -1
    return ValueError(
        f"paged_attention: sequence {s}, table slot {slot}: block id {block} belongs to sequence {owner} "
        f"(block_owners), not to sequence {s}"
    )


def _first_bad_numpy(
    tables: np.ndarray, ctx: np.ndarray, owners: np.ndarray | None, num_blocks: int, bs: int
) -> tuple[int, int] | None:
    """(sequence, slot) of the first failing entry in the order of the debug kernel, or None."""
    num_seqs, width = tables.shape
    ctx = ctx.astype(np.int64)
    ctx_ok = (ctx >= 0) & (ctx <= width * bs)
    used = np.where(ctx_ok, -(-ctx // bs), 0)  # blocks in use per sequence
    in_use = np.arange(width)[None, :] < used[:, None]
    t = tables.astype(np.int64)
    bad = in_use & ((t < 0) | (t >= num_blocks))
    if owners is not None:
        own = owners.astype(np.int64)[np.clip(t, 0, max(num_blocks - 1, 0))] if num_blocks else t
        bad |= in_use & ~bad & (own != -1) & (own != np.arange(num_seqs)[:, None])
    codes = np.concatenate([bad, ~ctx_ok[:, None]], axis=1)  # column `width`: the context length check
    if not codes.any():
        return None
    flat = int(np.argmax(codes.reshape(-1)))
    return flat // (width + 1), flat % (width + 1)


def _check_tables_gpu(tables: Any, ctx: Any, owners: Any, num_blocks: int, bs: int) -> None:
    """Run the check kernel, read its one int back and raise for the first failing entry."""
    cp = backend.require_cupy()
    num_seqs, width = tables.shape
    first = cp.full((1,), INT32_MAX, dtype=np.int32)
    total = num_seqs * (width + 1)
    launch(
        get_function(_FAMILY, f"paged_attention_check_tables<{_CHECK_THREADS}>"),
        (-(-total // _CHECK_THREADS),),
        (_CHECK_THREADS,),
        (
            tables,
            ctx,
            owners if owners is not None else _NULL,
            i32(num_seqs),
            i32(width),
            i32(bs.bit_length() - 1),
            i32(num_blocks),
            first,
        ),
    )
    code = int(first.get()[0])
    if code == INT32_MAX:
        return
    s, slot = divmod(code, width + 1)
    own = owners.get() if owners is not None else None
    raise _bad_entry_error(s, slot, tables.get(), ctx.get(), own, num_blocks, bs)


# ---- the op ------------------------------------------------------------------------------------------------


def _kernel_ready(a: Any, vec: int) -> bool:
    """The kernels' layout needs: last dim contiguous, other strides whole 16-byte vectors, base aligned."""
    item = a.itemsize
    if a.shape[-1] > 1 and a.strides[-1] != item:
        return False
    if any(st % (vec * item) for st in a.strides[:-1]):
        return False
    return a.data.ptr % _VECTOR_BYTES == 0


def _padded(a: Any, head_dim: int) -> Any:
    """A contiguous copy of `a` with the last dim zero-padded to head_dim (a no-op copy when equal)."""
    cp = backend.require_cupy()
    if a.shape[-1] == head_dim:
        return cp.ascontiguousarray(a)
    b = cp.zeros((*a.shape[:-1], head_dim), dtype=a.dtype)
    b[..., : a.shape[-1]] = a
    return b


def _device_cc(a: Any) -> int:
    """Compute capability of the device holding CuPy array `a`, as major * 10 + minor (90 = sm_90)."""
    return int(a.device.compute_capability)


def _check_v4_device(q: Any) -> None:
    """v4 uses sm_90 bulk copies (cp.async.bulk) and mbarrier transaction counts: refuse older GPUs (its
    kernel body is compiled out there and would trap)."""
    cc = _device_cc(q)
    if cc < _V4_MIN_CC:
        raise ValueError(
            f"paged_attention: version=4 needs a GPU of compute capability >= 9.0 (TMA bulk copies); "
            f"{q.device} has {cc // 10}.{cc % 10}; use version=3"
        )


@functools.cache
def _resident_per_sm(device_id: int, expr: str, smem: int) -> int:
    """CTAs of kernel `expr` resident per SM of device `device_id`: its register count is a driver query,
    so it is read once per (device, kernel) rather than on every decode step."""
    return resident_blocks(get_function(_FAMILY, expr), _THREADS, smem, limits_of(device_id))


def _numba_paged() -> Any:
    # Imported on first use: Numba is an optional extra and slow to import.
    from rawformer.kernels.numba import paged_attention as numba_paged

    return numba_paged


def paged_attention(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_tables: Any,
    context_lens: Any,
    *,
    scale: Any = None,
    num_splits: int | None = None,
    block_owners: Any = None,
    debug: bool | None = None,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Attention of a few new query tokens per sequence over a paged KV cache.

        out[s, t, h] = sum_{p <= P} softmax_p(scale * q[s, t, h] . k_p) v_p,  P = context_lens[s] - q_len + t,
        k_p = k_cache[block_tables[s, p // block_size], p % block_size, h // (q_heads // kv_heads)]

    Parameters
    ----------
    q : (num_seqs, q_len, q_heads, head_dim), float16 / float32 (float64 on the CPU); last dim contiguous
        (other dims may be strided, e.g. a view into a packed qkv buffer)
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim), q's dtype and device; block_size in
        8, 16, 32, 64, 128; kv_heads divides q_heads
    block_tables : int32 (num_seqs, max_blocks_per_seq) (int64 is converted once)
    context_lens : int32 (num_seqs,): tokens in the cache per sequence, including the q_len new ones
    scale : multiplier of q . k (default 1 / sqrt(head_dim))
    num_splits : split-KV count (None: auto, see the module docstring; 1: one pass, no combine)
    block_owners : optional int32 (num_blocks,): owning sequence of each block, -1 = shared / free (debug)
    debug : check the block tables first (default: RAWFORMER_DEBUG=1)
    out : optional array of q's shape, dtype and device to write into
    impl : None / "cuda" or "numba" for GPU arrays
    version : CUDA kernel version 1 (SIMT), 2, 3 or 4 (tensor cores, float16, head_dim <= 128; 3 is the
        default there; 4 needs compute capability >= 9.0)

    Returns
    -------
    out : array like q (`out` when given)
    """
    q, give_back = adopt(q, "q")
    k_cache = adopt(k_cache, "k_cache")[0]
    v_cache = adopt(v_cache, "v_cache")[0]
    block_tables = adopt(block_tables, "block_tables")[0]
    context_lens = adopt(context_lens, "context_lens")[0]
    owners = adopt_optional(block_owners, "block_owners")
    out_arr = adopt_optional(out, "out")

    _checks.check_float(q, "q")
    _checks.check_same_place(q, "q", k_cache=k_cache, v_cache=v_cache)
    if q.ndim != 4:
        raise ValueError(
            f"paged_attention: q must be (num_seqs, q_len, q_heads, head_dim), got shape {tuple(q.shape)}"
        )
    if k_cache.ndim != 4:
        raise ValueError(
            "paged_attention: k_cache must be (num_blocks, block_size, kv_heads, head_dim), got shape "
            f"{tuple(k_cache.shape)}"
        )
    _checks.check_shape(v_cache, "v_cache", tuple(k_cache.shape))
    num_seqs, q_len, q_heads, head_dim = (int(n) for n in q.shape)
    num_blocks, block_size, kv_heads, cache_dim = (int(n) for n in k_cache.shape)
    if cache_dim != head_dim:
        raise ValueError(f"paged_attention: k_cache has head_dim {cache_dim} but q has {head_dim}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"paged_attention: k_cache has block_size {block_size}; allowed: {BLOCK_SIZES}")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(
            f"paged_attention: k_cache has {kv_heads} heads, which does not divide q's {q_heads} heads"
        )
    _check_int_array(block_tables, "block_tables", q, 2)
    _check_int_array(context_lens, "context_lens", q, 1)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"paged_attention: block_tables has {block_tables.shape[0]} rows but q has {num_seqs} sequences"
        )
    _checks.check_shape(context_lens, "context_lens", (num_seqs,))
    if owners is not None:
        _check_int_array(owners, "block_owners", q, 1)
        _checks.check_shape(owners, "block_owners", (num_blocks,))
    scale_v = 1.0 / math.sqrt(head_dim) if scale is None else _checks.check_scalar(scale, "scale")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)):
            raise TypeError(f"paged_attention: num_splits must be an int or None, got {num_splits!r}")
        if num_splits < 1:
            raise ValueError(f"paged_attention: num_splits must be >= 1, got {num_splits}")
    dbg = _debug_flag(debug)
    _checks.check_out(out_arr, "out", q)
    which = _checks.check_impl(impl, q)
    check_version(version, VERSIONS, which)
    if version in (2, 3, 4) and (q.dtype != np.float16 or head_dim > _V2_HEAD_DIMS[-1]):
        raise ValueError(
            f"paged_attention: version={version} runs float16 with head_dim <= {_V2_HEAD_DIMS[-1]}; got "
            f"{q.dtype}, head_dim {head_dim}"
        )
    if which != "numpy" and head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"paged_attention: the GPU kernels take head_dim <= {_MAX_HEAD_DIM}, got {head_dim}")

    if which == "numpy":
        tables_np = np.asarray(block_tables)
        ctx_np = np.asarray(context_lens)
        bad = _first_bad_numpy(tables_np, ctx_np, owners if dbg else None, num_blocks, block_size)
        if bad is not None:
            raise _bad_entry_error(*bad, tables_np, ctx_np, owners, num_blocks, block_size)
        ref = paged_attention_ref(q, k_cache, v_cache, tables_np, ctx_np, scale_v)
        return finish(ref.astype(q.dtype), out_arr, out, give_back)

    cp = backend.require_cupy()
    if version == 4 and which == "cuda":
        _check_v4_device(q)
    if q.size == 0:
        return finish(cp.zeros(q.shape, dtype=q.dtype), out_arr, out, give_back)
    tables = _as_int32(block_tables)
    ctx = _as_int32(context_lens)
    width = int(tables.shape[1])
    if dbg:
        _check_tables_gpu(
            tables, ctx, _as_int32(owners) if owners is not None else None, num_blocks, block_size
        )
    if width == 0 or num_blocks == 0:  # nothing can be cached: every context is 0
        return finish(cp.zeros(q.shape, dtype=q.dtype), out_arr, out, give_back)

    if which == "numba":
        result = cp.empty(q.shape, dtype=q.dtype)
        _numba_paged().paged_attention_forward(
            cp.ascontiguousarray(q),
            cp.ascontiguousarray(k_cache),
            cp.ascontiguousarray(v_cache),
            tables,
            ctx,
            result,
            scale_v,
            num_splits=num_splits,
        )
        return finish(result, out_arr, out, give_back)

    # CUDA: the kernels read 16-byte vectors of the cache. Head dims that are not whole vectors, and
    # layouts that break the alignment, get one zero-padded contiguous copy (slow: it copies the cache).
    vec = _VECTOR_BYTES // q.itemsize
    kdim = -(-head_dim // vec) * vec
    if kdim != head_dim or not (_kernel_ready(k_cache, vec) and _kernel_ready(v_cache, vec)):
        k_cache, v_cache = _padded(k_cache, kdim), _padded(v_cache, kdim)
    if kdim != head_dim or q.strides[-1] != q.itemsize or any(st % q.itemsize for st in q.strides):
        q = _padded(q, kdim)

    chosen = version if version is not None else _default_version(q.dtype, head_dim)
    if chosen == 3 and max(k_cache.strides[1], v_cache.strides[1]) // q.itemsize >= _V3_MAX_TOKEN_STRIDE:
        # v3 keeps in-block token offsets in 32 bits: a view with a huge token stride gets a compact copy
        k_cache, v_cache = _padded(k_cache, kdim), _padded(v_cache, kdim)
        if k_cache.strides[1] // q.itemsize >= _V3_MAX_TOKEN_STRIDE:
            raise ValueError(
                f"paged_attention: version=3 needs kv_heads x head_dim < {_V3_MAX_TOKEN_STRIDE}; "
                "use version=2"
            )
    group = q_heads // kv_heads
    plan = _plan(chosen, q.dtype, kdim, group * q_len)
    if plan is None:  # version=2 / 3 were refused above; v1 takes every head_dim <= 256
        raise ValueError(f"paged_attention: version={chosen} cannot take head_dim {head_dim}")
    chunks = -(-(group * q_len) // plan.rows)
    if chosen in (3, 4):  # 1-D grid over (sequence, kv head, row chunk)
        if num_seqs * kv_heads * chunks > _MAX_GRID_X:
            raise ValueError(
                f"paged_attention: {num_seqs} sequences x {kv_heads} kv heads x {chunks} row chunks exceed "
                "the grid limit"
            )
    elif kv_heads * chunks > _MAX_GRID_YZ:
        raise ValueError(f"paged_attention: {kv_heads} kv heads x {chunks} row chunks exceed the grid limit")
    max_tokens = width * block_size
    kernel = get_function(_FAMILY, plan.expr)
    wanted = num_splits
    if wanted is None:
        device_id = cp.cuda.Device().id
        # v3 / v4 aim at their own resident CTAs per SM (v3: 2 at head dim 128, 3 at 64 with 3 stages;
        # shared memory and registers decide); v1 / v2 keep the 2 they were measured with
        per_sm = _resident_per_sm(device_id, plan.expr, plan.smem) if chosen in (3, 4) else _CTAS_PER_SM
        wanted = choose_num_splits(num_seqs * kv_heads * chunks, max_tokens, limits_of(device_id).sms, per_sm)
    splits, split_tokens = split_layout(min(int(wanted), _MAX_SPLITS), max_tokens, plan.tile)

    in_place = (
        out_arr is not None
        and kdim == head_dim
        and out_arr.flags.c_contiguous
        and not any(cp.may_share_memory(out_arr, a) for a in (q, k_cache, v_cache))
    )
    result = out_arr if in_place else cp.empty((num_seqs, q_len, q_heads, kdim), dtype=q.dtype)
    part_out = part_lse = _NULL
    if splits > 1:
        part_out = cp.empty((num_seqs, q_len, q_heads, splits, kdim), dtype=np.float32)
        part_lse = cp.empty((num_seqs, q_len, q_heads, splits), dtype=np.float32)
    item = q.itemsize
    q_st = [st // item for st in q.strides[:3]]
    k_st = [st // item for st in k_cache.strides[:3]]
    v_st = [st // item for st in v_cache.strides[:3]]
    # Bytes for RAWFORMER_DEBUG's GB/s line only (it reads context_lens back: debug mode syncs anyway).
    moved = None
    if debug_enabled():
        moved = 2 * int(cp.sum(ctx, dtype=np.int64)) * kv_heads * head_dim * item + 2 * q.size * item
    grid = (
        (num_seqs * kv_heads * chunks, splits, 1)
        if chosen in (3, 4)
        else (num_seqs, kv_heads * chunks, splits)
    )
    launch(
        kernel,
        grid,
        (_THREADS,),
        (
            q,
            k_cache,
            v_cache,
            tables,
            ctx,
            result,
            part_out,
            part_lse,
            i32(q_len),
            i32(q_heads),
            i32(kv_heads),
            i32(kdim),
            i32(block_size.bit_length() - 1),
            i32(width),
            i32(split_tokens),
            i32(splits),
            *(np.int64(v) for v in q_st),
            *(np.int64(v) for v in k_st),
            *(np.int64(v) for v in v_st),
            np.float32(scale_v * LOG2E),
        ),
        shared_mem=plan.smem,
        bytes_moved=moved,
        pdl=True,  # every version waits (rf::pdl_wait) before its first access
    )
    if splits > 1:
        launch(
            get_function(_FAMILY, f"paged_attention_combine<{cuda_type(q.dtype)}>"),
            (num_seqs * q_len * q_heads,),
            (_THREADS,),
            (part_out, part_lse, result, i32(splits), i32(kdim)),
            shared_mem=4 * splits,
            bytes_moved=part_out.nbytes + part_lse.nbytes + result.nbytes,
            pdl=True,
        )
    if kdim != head_dim:
        result = result[..., :head_dim]
    return finish(result, out_arr, out, give_back)
