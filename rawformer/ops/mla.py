"""Multi-head Latent Attention decode (DeepSeek-V2) over a paged latent cache, with weight absorption.

Every head attends ONE shared latent "head": the cache holds per token the KV latent c (R = kv_lora_rank)
and the rope key k_r (Dr = qk_rope_head_dim). With W_UK folded into the query (q_absorbed = W_UK_h^T q_nope)
the score of head h is q_absorbed . c + q_rope . k_r, and the value is the latent itself (W_UV is applied to
the output afterwards by the model).

Layouts:

    q_absorbed    (num_seqs, q_len, heads, R)            last dim contiguous
    q_rope        (num_seqs, q_len, heads, Dr)
    latent_cache  (num_blocks, block_size, R)             e.g. LatentArena.latent(L), a strided view
    rope_cache    (num_blocks, block_size, Dr)            e.g. LatentArena.rope(L)
    block_tables  int32 (num_seqs, max_blocks); context_lens int32 (num_seqs,) (the q_len new tokens included)
    out           (num_seqs, q_len, heads, R)             the attention-weighted latent

Formula. Query token t of sequence s sits at P = context_lens[s] - q_len + t and sees positions 0..P:

    out[s, t, h] = sum_{p <= P} softmax_p(scale (q_absorbed[s, t, h] . c_p + q_rope[s, t, h] . k_r,p)) c_p

A query that sees nothing gives zeros. NumPy inputs run the float64 reference `mla_decode_ref`.

GPU (impl="cuda"): float16 with (R, Dr) = (512, 64) (DeepSeek-V2 / V3) runs cuda_src/mla_decode.cu:
    version 1, rows = q_len x heads query rows:
        rows < 64   mla_decode_v1<512, 64, 1, 4, 64>: 16 rows per CTA, 4 warps, 64-token tiles
                    (memory-bound: the latent stream is read once per 16 rows)
        rows >= 64  mla_decode_v1<512, 64, 4, 8, 32>: 64 rows per CTA, 8 warps, 32-token tiles (every latent
                    tile feeds 4 x 16 rows of tensor-core MMAs: the compute-bound case of many heads)
    version 2, v1's work split with 3 barriers per tile instead of
    5, a STAGES-deep cp.async ring, a row-per-warp loader and programmatic dependent launch, tile configs
    (MT m-tiles of 16 rows, warps, tokens per tile, stages) picked for >= 2 resident CTAs per SM:
        rows <= 16  mla_decode_v2<512, 64, 1, 2, 32, 2>: 16 rows, 2 warps, 95 KB of shared memory
        rows > 16   mla_decode_v2<512, 64, 2, 4, 32, 2>: 32 rows, 4 warps, 113 KB (2 CTAs per H100 SM)
        `tile_config=` takes any of V2_CONFIGS (bench/mla.py measures them all).
    version 3, tensor cores with the heads as the M dimension and FlashMLA's shape: Q and K tiles in swizzled
    (unpadded) shared memory, so 64 rows and two 64-token stages fit one CTA; warps in RG row groups x CG
    column groups (each: WM m16 tiles x R / CG output columns, scores of TK / CG tokens of every tile); the
    CG warps of a row group exchange maxima and P through shared memory with a named barrier, one
    __syncthreads per tile for the cp.async ring (cuda_src/mla_decode.cu). Tile configs (MT, WM, CG, TK,
    STAGES), V3_CONFIGS:
        rows <= 16  mla_decode_v3<512, 64, 1, 1, 4, 64, 2>: 16 rows, 4 warps, 2 stages of 64 tokens
                    (memory-bound; measured best of the sweep at 16 heads: 0.045 ms vs 0.063 for 4 stages of
                    32 tokens)
        rows <= 32  mla_decode_v3<512, 64, 2, 1, 2, 32, 2>: 32 rows, 4 warps, 113 KB (2 CTAs per SM)
        rows > 32   mla_decode_v3<512, 64, 4, 2, 4, 64, 2>: 64 rows, 8 warps of 32 rows x 128 columns,
                    64-token tiles, 226 KB (compute-bound: 128 heads = 2 CTAs per sequence)
    The default version is DEFAULT_VERSION (one place): 3.
    Split-KV: with C = num_seqs x row chunks CTAs and S SMs, no split when C >= S; else about S / C splits
    (v2, v3: (resident CTAs per SM x S) / C; at least 256 positions each, multiples of the tile); partials
    in float32 (v1) / float16 (v2, v3: each normalised by its own sum) + base-2 log-sum-exp, merged by
    mla_decode_combine / mla_decode_combine_h.
Other dtypes / dims on the GPU run the same maths as the reference in float32 with CuPy (gather + matmul): a
correct, slower path for small models and tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.kernels.occupancy import limits_of, resident_blocks
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, finish

__all__ = ["mla_decode", "mla_decode_ref", "kernel_plan"]

_FAMILY = "mla_decode"
VERSIONS = (1, 2, 3)
# The one place that picks the default kernel: v3, which on the H100 (bench/results/h100/mla_sweep.md, 32 x
# 2048 context) took 16 heads from 0.048 ms (v2) to 0.045 and 128 heads from 0.135 ms to 0.110.
DEFAULT_VERSION = 3
LOG2E = 1.4426950408889634
_KERNEL_DIMS = ((512, 64),)  # (R, Dr) the kernel is compiled for
# (MT m-tiles of 16 rows, warps, tokens per tile): the two configurations of the header comment
_SMALL = (1, 4, 64)
_LARGE = (4, 8, 32)
_STAGES = 2  # v1
# v2 (MT, warps, tokens per tile, stages): the defaults first, then the other measured candidates
V2_SMALL = (1, 2, 32, 2)
V2_LARGE = (2, 4, 32, 2)
V2_CONFIGS = (V2_SMALL, V2_LARGE, (1, 4, 64, 2), (1, 2, 32, 4), (4, 8, 32, 2), (4, 8, 32, 3))
# v3 (MT m16 tiles per CTA, WM m16 tiles per warp, CG column groups, tokens per tile, stages): the defaults
# for <= 16, <= 32 and more rows first, then the other candidates bench/mla.py --variants all measures
V3_SMALL = (1, 1, 4, 64, 2)
V3_MID = (2, 1, 2, 32, 2)
V3_LARGE = (4, 2, 4, 64, 2)
V3_CONFIGS = (
    V3_SMALL,
    V3_MID,
    V3_LARGE,
    (1, 1, 2, 32, 2),
    (1, 1, 2, 32, 4),
    (4, 1, 2, 32, 3),
    (2, 2, 4, 64, 2),
)
TILE_CONFIGS = {2: V2_CONFIGS, 3: V3_CONFIGS}
# v3's choice by rows (up to 16, up to 32, more): the first config whose shared memory fits the GPU's limit
# (an A100 allows 163 KB: the 167 / 226 KB H100 configs fall back to 94 / 113 KB ones)
_V3_BY_ROWS = ((16, (V3_SMALL, (1, 1, 2, 32, 2))), (32, (V3_MID,)), (1 << 30, (V3_LARGE, V3_MID)))
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 256
_COMBINE_THREADS = 128


# ---- reference -------------------------------------------------------------------------------------------


def _gather_context(xp: Any, cache: Any, tables: Any, ctx_max: int, block_size: int) -> Any:
    """(num_seqs, ctx_max, width) rows of every sequence's first ctx_max positions (ids clipped to >= 0)."""
    pos = xp.arange(ctx_max)
    blocks = xp.maximum(tables[:, pos // block_size], 0)  # (S, C): padding ids read block 0, masked later
    return cache[blocks, (pos % block_size)[None, :]]


def _attend(
    xp: Any, qa: Any, qr: Any, lat: Any, rop: Any, ctx: Any, q_len: int, scale: float
) -> tuple[Any, Any]:
    """The maths of the formula on gathered contexts, in the arrays' dtype. Returns (out, lse natural)."""
    s_ = xp.einsum("sthr,scr->sthc", qa, lat) + xp.einsum("sthd,scd->sthc", qr, rop)  # (S, n, H, C)
    s_ *= scale
    c = lat.shape[1]
    last = ctx[:, None] - q_len + xp.arange(q_len)[None, :]  # (S, n) last visible position
    visible = xp.arange(c)[None, None, :] <= last[:, :, None]  # (S, n, C)
    s_ = xp.where(visible[:, :, None, :], s_, -xp.inf)
    m = xp.max(s_, axis=-1, keepdims=True) if c else xp.full(s_.shape[:-1] + (1,), -xp.inf)
    m = xp.where(xp.isneginf(m), 0.0, m)
    e = xp.exp(s_ - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    out = xp.einsum("sthc,scr->sthr", e / xp.where(total == 0, 1.0, total), lat)
    with np.errstate(divide="ignore"):
        lse = xp.where(total[..., 0] > 0, xp.log(xp.maximum(total[..., 0], 1e-300)) + m[..., 0], -xp.inf)
    return out, lse


def mla_decode_ref(
    q_absorbed: Any,
    q_rope: Any,
    latent_cache: Any,
    rope_cache: Any,
    block_tables: Any,
    context_lens: Any,
    scale: float,
    return_lse: bool = False,
) -> Any:
    """float64 MLA decode attention (see the module docstring for the formula).

    Returns out float64 (num_seqs, q_len, heads, R), and with return_lse also the natural log-sum-exp of
    the scaled scores (num_seqs, q_len, heads) (-inf for a query that sees nothing)."""
    qa, qr = _checks.f64(q_absorbed), _checks.f64(q_rope)
    lat_c, rope_c = _checks.f64(latent_cache), _checks.f64(rope_cache)
    tables = np.asarray(backend.to_numpy(block_tables)).astype(np.int64)
    ctx = np.asarray(backend.to_numpy(context_lens)).astype(np.int64)
    q_len = qa.shape[1]
    cmax = int(ctx.max()) if ctx.size else 0
    lat = _gather_context(np, lat_c, tables, cmax, lat_c.shape[1])
    rop = _gather_context(np, rope_c, tables, cmax, rope_c.shape[1])
    out, lse = _attend(np, qa, qr, lat, rop, ctx, q_len, float(scale))
    return (out, lse) if return_lse else out


# ---- kernel plan ------------------------------------------------------------------------------------------


def _expr(version: int, r: int, dr: int, config: tuple[int, ...]) -> str:
    return f"mla_decode_v{version}<{r}, {dr}, {', '.join(str(n) for n in config)}>"


def _smem(r: int, dr: int, config: tuple[int, int, int, int]) -> int:
    """Dynamic shared memory of mla_decode_v1 / v2 (the same carve-up: Q, the stages, P, 2 NP + 3 rows of
    floats: v1 running max / sum / rescale, v2 two running maxima by tile parity and the sum)."""
    mt, _, tk, stages = config
    pitch = r + dr + 8  # halves: 16 bytes of padding per row (ldmatrix conflict-free)
    rows = 16 * mt
    halves = rows * pitch + stages * tk * pitch + rows * (tk + 8)
    floats = 2 * rows * (tk // 16) + 3 * rows
    return halves * 2 + floats * 4


def _smem_v3(r: int, dr: int, config: tuple[int, ...]) -> int:
    """Dynamic shared memory of mla_decode_v3 (MlaV3Shape::SMEM): Q [16 MT][R + Dr] and STAGES x K
    [TK][R + Dr] unpadded (swizzled), P [16 MT][TK + 8] halves, the group exchange [CG][16 MT] floats."""
    mt, _, cg, tk, stages = config
    rows, kd = 16 * mt, r + dr
    return 2 * (rows * kd + stages * tk * kd + rows * (tk + 8)) + 4 * cg * rows


def _config(
    version: int, rows: int, tile_config: tuple[int, ...] | None, r: int, dr: int, smem_limit: int | None
) -> tuple[int, ...]:
    if version == 1:
        return (*(_LARGE if rows >= 64 else _SMALL), _STAGES)
    if tile_config is not None:
        return tuple(tile_config)
    if version == 3:
        candidates = next(c for most, c in _V3_BY_ROWS if rows <= most)
        fits = [c for c in candidates if smem_limit is None or _smem_v3(r, dr, c) <= smem_limit]
        return fits[0] if fits else candidates[-1]
    return V2_LARGE if rows > 16 else V2_SMALL


def kernel_plan(
    rows: int,
    r: int = 512,
    dr: int = 64,
    version: int = DEFAULT_VERSION,
    tile_config: Any = None,
    smem_limit: int | None = None,
) -> tuple[str, int, int, int, int]:
    """(name expression, threads, rows per CTA, tokens per tile, shared bytes) for `rows` = q_len x heads
    query rows; `smem_limit` (the GPU's shared bytes per block) steers v3's default choice."""
    config = _config(version, rows, tile_config, r, dr, smem_limit)
    if version == 3:
        mt, wm, cg, tk, _ = config
        return _expr(3, r, dr, config), 32 * (mt // wm) * cg, 16 * mt, tk, _smem_v3(r, dr, config)
    return _expr(version, r, dr, config), 32 * config[1], 16 * config[0], config[2], _smem(r, dr, config)


def _instantiations() -> list[str]:
    v1 = [(*c, _STAGES) for c in (_SMALL, _LARGE)]
    exprs = [_expr(1, r, dr, c) for r, dr in _KERNEL_DIMS for c in v1]
    exprs += [_expr(2, r, dr, c) for r, dr in _KERNEL_DIMS for c in V2_CONFIGS]
    exprs += [_expr(3, r, dr, c) for r, dr in _KERNEL_DIMS for c in V3_CONFIGS]
    exprs += [f"mla_decode_combine<{r}, {_COMBINE_THREADS}>" for r, _ in _KERNEL_DIMS]  # v1: fp32 partials
    exprs += [f"mla_decode_combine_h<{r}, {_COMBINE_THREADS}>" for r, _ in _KERNEL_DIMS]  # v2, v3: fp16
    return exprs


register_family(_FAMILY, _instantiations)


def choose_num_splits(ctas: int, max_tokens: int, sms: int, ctas_per_sm: int = 1) -> int:
    """1 when `ctas` already fill the resident slots (sms x ctas_per_sm), else about slots / ctas splits
    (one wave) of >= 256 positions each."""
    slots = sms * max(1, ctas_per_sm)
    if ctas <= 0 or max_tokens <= 0 or ctas >= slots:
        return 1
    return max(1, min(slots // ctas, max_tokens // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


# ---- the op ------------------------------------------------------------------------------------------------


def _check_int(a: Any, name: str, like: Any, ndim: int) -> None:
    if backend.is_cupy(a) != backend.is_cupy(like):
        raise ValueError(f"mla_decode: {name} and q_absorbed must both be CPU or both GPU arrays")
    if a.dtype.kind not in "iu":
        raise TypeError(f"mla_decode: {name} must be an integer array (int32), got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"mla_decode: {name} must have {ndim} dimensions, got shape {tuple(a.shape)}")


def _check_ranges(tables: np.ndarray, ctx: np.ndarray, num_blocks: int, block_size: int) -> None:
    """Every block id in use is in [0, num_blocks) and every context fits its table row (host arrays)."""
    width = tables.shape[1]
    for s in range(tables.shape[0]):
        n = int(ctx[s])
        if n < 0 or n > width * block_size:
            raise ValueError(
                f"mla_decode: context_lens[{s}] = {n} is outside [0, {width * block_size}] (its block table "
                f"row holds {width} blocks of {block_size} tokens)"
            )
        used = tables[s, : -(-n // block_size)]
        bad = np.nonzero((used < 0) | (used >= num_blocks))[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"mla_decode: sequence {s}, table slot {i}: block id {int(used[i])} is out of range for a "
                f"cache of {num_blocks} blocks"
            )


def _kernel_ready(a: Any) -> bool:
    """Last dim contiguous, other strides whole 16-byte vectors, base 16-byte aligned."""
    if a.strides[-1] != a.itemsize or any(st % 16 for st in a.strides[:-1]):
        return False
    return a.data.ptr % 16 == 0


def mla_decode(
    q_absorbed: Any,
    q_rope: Any,
    latent_cache: Any,
    rope_cache: Any,
    block_tables: Any,
    context_lens: Any,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    check: bool = True,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
    tile_config: tuple[int, ...] | None = None,
) -> Any:
    """MLA decode attention of a few new tokens per sequence over the paged latent cache.

        out[s, t, h] = sum_{p <= P} softmax_p(scale (q_absorbed[s,t,h] . c_p + q_rope[s,t,h] . k_r,p)) c_p,
        P = context_lens[s] - q_len + t,  c_p = latent_cache[block_tables[s, p // bs], p % bs]

    Parameters
    ----------
    q_absorbed : (num_seqs, q_len, heads, R) float16 / float32 (float64 on the CPU): W_UK-absorbed queries
    q_rope : (num_seqs, q_len, heads, Dr), q_absorbed's dtype and device: the rotated rope queries
    latent_cache : (num_blocks, block_size, R); rope_cache : (num_blocks, block_size, Dr); strided views
        (LatentArena.latent / rope) are read in place
    block_tables : int32 (num_seqs, max_blocks); context_lens : int32 (num_seqs,), new tokens included
    scale : multiplier of the scores (the model's softmax scale: qk_head_dim ** -0.5, YaRN mscale applied);
        default 1 / sqrt(R + Dr)
    num_splits : split-KV count (None: auto; see the module docstring)
    check : verify block ids and context lengths on the host first (reads them back on the GPU; the model
        passes False on its hot path, the pool having built the tables)
    out : optional array (num_seqs, q_len, heads, R) of q_absorbed's dtype and device
    impl : None / "cuda" for GPU arrays
    version : CUDA kernel version (1, 2 or 3; None: DEFAULT_VERSION)
    tile_config : versions 2 and 3, for benchmarks and tests: one of V2_CONFIGS (MT, warps, tokens per tile,
        stages) / V3_CONFIGS (MT, WM, CG, tokens per tile, stages)

    Returns
    -------
    out : (num_seqs, q_len, heads, R) like q_absorbed
    """
    qa, give_back = adopt(q_absorbed, "q_absorbed")
    qr = adopt(q_rope, "q_rope")[0]
    lat = adopt(latent_cache, "latent_cache")[0]
    rop = adopt(rope_cache, "rope_cache")[0]
    tables = adopt(block_tables, "block_tables")[0]
    ctx = adopt(context_lens, "context_lens")[0]
    out_arr = adopt_optional(out, "out")
    _checks.check_float(qa, "q_absorbed")
    _checks.check_same_place(qa, "q_absorbed", q_rope=qr, latent_cache=lat, rope_cache=rop)
    if qa.ndim != 4 or qr.ndim != 4:
        raise ValueError(
            "mla_decode: q_absorbed and q_rope must be (num_seqs, q_len, heads, dim), got shapes "
            f"{tuple(qa.shape)} and {tuple(qr.shape)}"
        )
    num_seqs, q_len, heads, r = (int(n) for n in qa.shape)
    dr = int(qr.shape[3])
    _checks.check_shape(qr, "q_rope", (num_seqs, q_len, heads, dr))
    if lat.ndim != 3 or int(lat.shape[2]) != r:
        raise ValueError(f"mla_decode: latent_cache must be (num_blocks, block_size, {r}), got {lat.shape}")
    num_blocks, block_size = int(lat.shape[0]), int(lat.shape[1])
    _checks.check_shape(rop, "rope_cache", (num_blocks, block_size, dr))
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"mla_decode: block_size must be a power of two, got {block_size}")
    _check_int(tables, "block_tables", qa, 2)
    _check_int(ctx, "context_lens", qa, 1)
    if tables.shape[0] != num_seqs:
        raise ValueError(
            f"mla_decode: block_tables has {tables.shape[0]} rows but q has {num_seqs} sequences"
        )
    _checks.check_shape(ctx, "context_lens", (num_seqs,))
    sc = 1.0 / math.sqrt(r + dr) if scale is None else _checks.check_scalar(scale, "scale")
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 1
    ):
        raise ValueError(f"mla_decode: num_splits must be a positive int or None, got {num_splits!r}")
    _checks.check_out(out_arr, "out", qa)
    which = _checks.check_impl(impl, qa)
    if which == "numba":
        raise ValueError("mla_decode: there is no Numba version; use impl='cuda'")
    if tile_config is not None:
        if version not in TILE_CONFIGS:
            raise ValueError(f"mla_decode: tile_config is for version=2 or 3, got version={version}")
        if tuple(tile_config) not in TILE_CONFIGS[version]:
            raise ValueError(
                f"mla_decode: tile_config for version {version} must be one of {TILE_CONFIGS[version]}, "
                f"got {tile_config!r}"
            )
    check_version(version, VERSIONS, which)
    if which == "numpy" or check:
        _check_ranges(
            np.asarray(backend.to_numpy(tables)).astype(np.int64),
            np.asarray(backend.to_numpy(ctx)).astype(np.int64),
            num_blocks,
            block_size,
        )
    if which == "numpy":
        ref = mla_decode_ref(qa, qr, lat, rop, tables, ctx, sc)
        return finish(ref.astype(qa.dtype), out_arr, out, give_back)

    cp = backend.require_cupy()
    tables32 = cp.ascontiguousarray(tables.astype(np.int32, copy=False))
    ctx32 = cp.ascontiguousarray(ctx.astype(np.int32, copy=False))
    width = int(tables32.shape[1])
    if qa.size == 0 or width == 0 or num_blocks == 0:
        return finish(cp.zeros(qa.shape, dtype=qa.dtype), out_arr, out, give_back)
    fast = qa.dtype == np.float16 and (r, dr) in _KERNEL_DIMS
    if version is not None and not fast:
        raise ValueError(
            f"mla_decode: version={version} runs float16 with (R, Dr) in {_KERNEL_DIMS}; got {qa.dtype}, "
            f"({r}, {dr})"
        )
    if not fast:  # the reference's maths in float32 on the GPU (small models, float32)
        cmax = width * block_size
        lat_g = _gather_context(cp, lat, tables32, cmax, block_size).astype(np.float32)
        rop_g = _gather_context(cp, rop, tables32, cmax, block_size).astype(np.float32)
        res, _ = _attend(cp, qa.astype(np.float32), qr.astype(np.float32), lat_g, rop_g, ctx32, q_len, sc)
        return finish(res.astype(qa.dtype), out_arr, out, give_back)

    if not _kernel_ready(lat) or not _kernel_ready(rop):
        lat, rop = cp.ascontiguousarray(lat), cp.ascontiguousarray(rop)
    if not _kernel_ready(qa):  # 16-byte cp.async reads of every query row
        qa = cp.ascontiguousarray(qa)
    if not _kernel_ready(qr):
        qr = cp.ascontiguousarray(qr)
    rows = q_len * heads
    ver = DEFAULT_VERSION if version is None else int(version)
    limits = limits_of(cp.cuda.Device().id)
    expr, threads, rows_per_cta, tile, smem = kernel_plan(
        rows, r, dr, ver, tile_config, limits.smem_per_block_optin
    )
    if smem > limits.smem_per_block_optin:
        raise ValueError(
            f"mla_decode: {expr} needs {smem} bytes of shared memory per block; this GPU allows "
            f"{limits.smem_per_block_optin} (pick another tile_config)"
        )
    kernel = get_function(_FAMILY, expr)
    chunks = -(-rows // rows_per_cta)
    max_tokens = width * block_size
    wanted = num_splits
    if wanted is None:
        # v1 keeps the rule it was measured with (one CTA per SM); v2 and v3 fill their resident slots
        per_sm = 1 if ver == 1 else resident_blocks(kernel, threads, smem, limits)
        wanted = choose_num_splits(num_seqs * chunks, max_tokens, limits.sms, per_sm)
    wanted = min(int(wanted), _MAX_SPLITS)
    per = -(-max_tokens // wanted)
    per = -(-per // tile) * tile
    splits = -(-max_tokens // per)
    result = cp.empty((num_seqs, q_len, heads, r), dtype=np.float16)
    part_out = part_lse = None
    if splits > 1:
        # v2 and v3 write fp16 partials (each already normalised by its own sum): half of v1's fp32 bytes
        part_dtype = np.float32 if ver == 1 else np.float16
        part_out = cp.empty((num_seqs, q_len, heads, splits, r), dtype=part_dtype)
        part_lse = cp.empty((num_seqs, q_len, heads, splits), dtype=np.float32)
    e = 2  # itemsize
    launch(
        kernel,
        (num_seqs * chunks, splits, 1),
        (threads,),
        (
            qa, qr, lat, rop, tables32, ctx32, result, part_out, part_lse,
            i32(q_len), i32(heads), i32(block_size.bit_length() - 1), i32(width), i32(per), i32(splits),
            np.int64(qa.strides[0] // e), np.int64(qa.strides[1] // e), np.int64(qa.strides[2] // e),
            np.int64(qr.strides[0] // e), np.int64(qr.strides[1] // e), np.int64(qr.strides[2] // e),
            np.int64(lat.strides[0] // e), np.int64(lat.strides[1] // e),
            np.int64(rop.strides[0] // e), np.int64(rop.strides[1] // e),
            np.float32(sc * LOG2E),
        ),
        shared_mem=smem,
        pdl=ver >= 2,  # v2 and v3 call rf::pdl_wait before their first read
    )  # fmt: skip
    if splits > 1:
        launch(
            get_function(_FAMILY, f"mla_decode_combine{'' if ver == 1 else '_h'}<{r}, {_COMBINE_THREADS}>"),
            (num_seqs * q_len * heads,),
            (_COMBINE_THREADS,),
            (part_out, part_lse, result, i32(splits)),
            shared_mem=4 * splits,
            pdl=True,  # waits for the partials with rf::pdl_wait
        )
    return finish(result, out_arr, out, give_back)
