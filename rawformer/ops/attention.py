"""Fused prefill attention (FlashAttention-2 style): padded or variable-length batches, causal, GQA, masks.

Formula, per sequence b, query i, q head h (kv head g = h // (q_heads // kv_heads)):

    z_ij = scale * q[b, i, h, :] . k[b, j, g, :] + mask[b, h, i, j]      (-inf where j is not visible)
    out[b, i, h, :] = sum_j exp(z_ij - lse_i) * v[b, j, g, :]
    lse[b, h, i]    = log sum_j exp(z_ij)

Visible keys: j < len_k, and under `causal` j <= i + (len_k - len_q) (bottom-right alignment: the last query
sees every key, as in chunked prefill over a KV cache). A query that sees no key gets out = 0, lse = -inf.
`scale` defaults to 1 / sqrt(head_dim).

Layouts (the contract of issue 3, notes/attention_contract.md section 1):
    padded  q (batch, seq_q, q_heads, D), k / v (batch, seq_k, kv_heads, D); out like q;
            lse float32 (batch, q_heads, seq_q)
    varlen  q (total_q, q_heads, D), k / v (total_k, kv_heads, D), cu_seqlens_q / cu_seqlens_k int32
            (batch + 1,) cumulative offsets from 0; lse float32 (q_heads, total_q)
    mask    additive float (natural-log units) or bool (True = may attend), broadcastable to
            (batch, q_heads, seq_q, seq_k); padded layout only

Only the last dim must be contiguous: q, k, v may be strided views (e.g. into one packed qkv buffer); the
kernels take strides in elements. Anything else is copied once.

Kernel selection (cuda_src/attention.cu describes the versions):
    float16, head_dim in {64, 96, 128}   v2: tensor-core flash kernel, 4 warps x 16 query rows (BM = 64),
                                         BN = 64 keys per tile
    everything else                      v1: SIMT flash kernel (fp32 tiles in shared memory); head dims
                                         not in _V1_DIMS are zero-padded to the next one
    version=3                            the v2 kernel with 8 warps (BM = 128), for benchmarks
    version=4                            FlashAttention-2 layout: 4 warps x 32 query rows (BM = 128), every
                                         K / V fragment feeds two mma's; K and V waited for separately
                                         (float16, head_dim in {64, 96, 128}; BN from _V4_BN)
GQA: with q_heads / kv_heads = G > 1 the launcher folds the G q heads of a kv head into the row tile
(pack = G), so every K/V tile is loaded once per group.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.kernels.specialize import cpp_bool
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64, finish

__all__ = ["attention", "attention_ref"]

_FAMILY = "attention"
VERSIONS = (1, 2, 3, 4)
LOG2E = 1.4426950408889634
_NULL = np.uintp(0)  # a null device pointer, passed by value like any 8-byte scalar

# v1: head dims compiled exactly; others are zero-padded up to the next one (zeros change neither q.k nor
# the first D columns of P V). Shapes of attention_v1 (kV1* in attention.cu): 16 rows x 32 keys per tile.
_V1_DIMS = tuple(range(16, 257, 16))
_V1_BM, _V1_BN, _V1_THREADS = 16, 32, 128
# v2 / v3: (warps per block, keys per tile); head dims with a tensor-core instantiation.
_V2_DIMS = (64, 96, 128)
_V2_CONFIG = {2: (4, 64), 3: (8, 64)}
# v4: 4 warps x 32 rows (attention_v4 in attention.cu); keys per tile by (head_dim, masked): the largest BN
# whose instantiation fits 255 registers without spills (ptxas, sm_80 and sm_90). Shared memory
# 2 * D * (128 + 4 * BN) bytes: 96 KB at D = 128, BN = 64 (two blocks per SM).
_V4_BM, _V4_THREADS = 128, 128
_V4_BN = {(64, False): 64, (96, False): 64, (128, False): 64, (64, True): 64, (96, True): 32, (128, True): 32}
# The tensor-core version run when version=None, from the H100 sweeps (bench/results/h100/attention_sweep*):
# v4 (32 query rows per warp) is 1.1-1.3x v2 without causal masking and on long causal sequences (8192:
# 260 vs 246 TFLOP/s at D 64, 300 vs 277 at D 128), but at causal 1024 it loses (111 vs 185 at D 64, 165 vs
# 210 at D 128): its 128-row tiles leave more of the diagonal to the masked path. Causal below this many
# query rows therefore runs v2.
_V4_CAUSAL_MIN_ROWS = 4096


def _default_tc_version(causal: bool, seq_q: int) -> int:
    """The tensor-core version for float16 inputs with D in {64, 96, 128} when version=None."""
    return 2 if causal and seq_q < _V4_CAUSAL_MIN_ROWS else 4


_PACK_GQA = True  # fold the q heads of a GQA group into the row tile (K/V read once per group)
_MAX_GRID_YZ = 65535
_REF_CHUNK_BYTES = 1 << 30  # the reference works on query-row chunks whose float64 scores fit this


# ---- float64 reference -----------------------------------------------------------------------------------


def _ref_dense(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray | None, causal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One padded batch in float64: q (B, Sq, Hq, D), k / v (B, Sk, Hk, D), mask None or broadcastable to
    (B, Hq, Sq, Sk) float64. Returns out (B, Sq, Hq, D) and lse (B, Hq, Sq)."""
    bsz, s_q, h_q, d = q.shape
    s_k, h_k = k.shape[1], k.shape[2]
    grp = h_q // h_k
    out = np.zeros((bsz, s_q, h_q, v.shape[-1]), dtype=np.float64)
    lse = np.full((bsz, h_q, s_q), -np.inf, dtype=np.float64)
    if bsz == 0 or s_q == 0 or h_q == 0 or s_k == 0:
        return out, lse
    kt = k.transpose(0, 2, 3, 1)  # (B, Hk, D, Sk)
    vt = v.transpose(0, 2, 1, 3)  # (B, Hk, Sk, D)
    qg = q.transpose(0, 2, 1, 3).reshape(bsz, h_k, grp, s_q, d)  # (B, Hk, G, Sq, D): q head = g*G + r
    maskb = None if mask is None else np.broadcast_to(mask, (bsz, h_q, s_q, s_k))
    rows = max(1, _REF_CHUNK_BYTES // max(1, 8 * bsz * h_q * s_k))
    for i0 in range(0, s_q, rows):
        i1 = min(s_q, i0 + rows)
        z = np.matmul(qg[:, :, :, i0:i1], kt[:, :, None]) * scale  # (B, Hk, G, n, Sk)
        z = z.reshape(bsz, h_q, i1 - i0, s_k)
        if maskb is not None:
            z = z + maskb[:, :, i0:i1]
        if causal:
            keep = np.arange(s_k)[None, :] <= np.arange(i0, i1)[:, None] + (s_k - s_q)
            z = np.where(keep, z, -np.inf)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            m = np.max(z, axis=-1, keepdims=True)
            m = np.where(m == -np.inf, 0.0, m)  # a row with no visible key: exp(-inf - 0) = 0 everywhere
            e = np.exp(z - m)
            s = np.sum(e, axis=-1, keepdims=True)
            empty = s == 0
            p = e / np.where(empty, 1.0, s)
            o = np.matmul(p.reshape(bsz, h_k, grp * (i1 - i0), s_k), vt)  # (B, Hk, G*n, D)
            lse[:, :, i0:i1] = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, s)))[..., 0]
        out[:, i0:i1] = o.reshape(bsz, h_q, i1 - i0, -1).transpose(0, 2, 1, 3)
    return out, lse


def _mask_f64(mask: Any) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(backend.to_numpy(mask))
    if m.dtype == np.bool_:
        return np.where(m, 0.0, -np.inf)
    return m.astype(np.float64)


def attention_ref(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    return_lse: bool = False,
) -> Any:
    """float64 NumPy attention (the formula in the module docstring); arguments as `attention`.

    Returns out float64 (q's shape), or (out, lse) with return_lse: lse float64 (batch, q_heads, seq_q), or
    (q_heads, total_q) for varlen. Vectorised over heads and keys; a Python loop over the sequences of a
    varlen batch and over query-row chunks of about 1 GB of scores."""
    qa, ka, va = f64(q), f64(k), f64(v)
    d = qa.shape[-1]
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if cu_seqlens_q is None:
        out, lse = _ref_dense(qa, ka, va, sc, _mask_f64(mask), bool(causal))
    else:
        cq = np.asarray(backend.to_numpy(cu_seqlens_q)).astype(np.int64)
        ck = np.asarray(backend.to_numpy(cu_seqlens_k)).astype(np.int64)
        out = np.zeros(qa.shape[:-1] + (va.shape[-1],), dtype=np.float64)
        lse = np.full((qa.shape[1], qa.shape[0]), -np.inf, dtype=np.float64)
        for b in range(len(cq) - 1):
            q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
            o_b, l_b = _ref_dense(qa[None, q0:q1], ka[None, k0:k1], va[None, k0:k1], sc, None, bool(causal))
            out[q0:q1] = o_b[0]
            lse[:, q0:q1] = l_b[0]
    return (out, lse) if return_lse else out


# ---- kernel plans ----------------------------------------------------------------------------------------


def _v1_dim(d: int) -> int:
    """The compiled v1 head dim a head dim d runs at (d itself, or the next listed one: zero-padded)."""
    return next(x for x in _V1_DIMS if x >= d)


def _expr(version: int, dtype: Any, d: int, masked: bool) -> str:
    if version == 1:
        t = "__half" if np.dtype(dtype) == np.float16 else "float"
        return f"attention_v1<{t}, {_v1_dim(d)}>"
    if version == 4:
        return f"attention_v4<{d}, {_V4_BN[d, masked]}, {cpp_bool(masked)}>"
    warps, bn = _V2_CONFIG[version]
    return f"attention_v2<{d}, {warps}, {bn}, {cpp_bool(masked)}>"


def _block_rows(version: int) -> int:
    if version == 4:
        return _V4_BM
    return _V1_BM if version == 1 else 16 * _V2_CONFIG[version][0]


def _threads(version: int) -> int:
    if version == 4:
        return _V4_THREADS
    return _V1_THREADS if version == 1 else 32 * _V2_CONFIG[version][0]


def _smem_bytes(version: int, d: int, masked: bool) -> int:
    """Dynamic shared memory of the kernel (the same formulas as v1/v2/v4_smem_bytes in attention.cu)."""
    if version == 1:
        dp = _v1_dim(d)
        return 4 * (_V1_BM * dp + 2 * _V1_BN * (dp + 1) + _V1_BM * _V1_BN)
    if version == 4:
        return 2 * d * (_V4_BM + 4 * _V4_BN[d, masked])
    warps, bn = _V2_CONFIG[version]
    return 2 * d * (16 * warps + 4 * bn)


def _can_run(version: int, dtype: Any, d: int) -> bool:
    if version == 1:
        return d <= _V1_DIMS[-1]
    return np.dtype(dtype) == np.float16 and d in _V2_DIMS


def _instantiations() -> list[str]:
    exprs = []
    for dtype in _checks.GPU_DTYPES:
        for version in VERSIONS:
            dims = _V1_DIMS if version == 1 else _V2_DIMS
            for d in dims:
                if not _can_run(version, dtype, d):
                    continue
                for masked in (False, True):
                    exprs.append(_expr(version, dtype, d, masked))
    return list(dict.fromkeys(exprs))


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"attention: {name} must be True or False, got {value!r}")
    return bool(value)


def _check_cu(cu: Any, name: str, like: Any) -> Any:
    if backend.is_cupy(cu) != backend.is_cupy(like):
        raise ValueError(f"attention: {name} must live where q does (both NumPy or both CuPy)")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"attention: {name} must have shape (batch + 1,), got {tuple(cu.shape)}")
    if cu.dtype.kind not in "iu":
        raise TypeError(f"attention: {name} must be an int32 array, got dtype {cu.dtype}")
    return cu


def _check_offsets(cu: np.ndarray, name: str, total: int) -> None:
    """Host values of cu_seqlens: start at 0, non-decreasing, end within the packed tokens."""
    if cu[0] != 0:
        raise ValueError(f"attention: {name} must start at 0, got {int(cu[0])}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"attention: {name} must be non-decreasing")
    if cu[-1] > total:
        raise ValueError(f"attention: {name} ends at {int(cu[-1])} but there are only {total} tokens")


def _check_max_seqlen(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"attention: {name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_inputs(q: Any, k: Any, v: Any, varlen: bool) -> tuple[int, int, int]:
    """Shapes of q, k, v; returns (q_heads, kv_heads, head_dim)."""
    _checks.check_float(q, "q")
    _checks.check_same_place(q, "q", k=k, v=v)
    nd = 3 if varlen else 4
    layout = "(tokens, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != nd:
            raise ValueError(
                f"attention: {name} must have {nd} dimensions {layout}"
                + (" with cu_seqlens" if varlen else "")
                + f", got shape {tuple(a.shape)}"
            )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"attention: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match"
        )
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    h_q, h_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"attention: k has head_dim {k.shape[-1]} but q has {d}")
    if d < 1:
        raise ValueError("attention: head_dim must be at least 1")
    if h_k < 1 or h_q % h_k:
        raise ValueError(f"attention: k has {h_k} heads, which does not divide q's {h_q} heads")
    return h_q, h_k, d


def _check_mask(mask: Any, q: Any, shape4: tuple[int, int, int, int]) -> None:
    if backend.is_cupy(mask) != backend.is_cupy(q):
        raise ValueError("attention: mask must live where q does (both NumPy or both CuPy)")
    if mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(f"attention: mask must be a float or bool array, got dtype {mask.dtype}")
    try:
        ok = mask.ndim <= 4 and np.broadcast_shapes(tuple(mask.shape), shape4) == shape4
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (batch, q_heads, seq_q, "
            f"seq_k) = {shape4}"
        )


# ---- launcher --------------------------------------------------------------------------------------------


def _elem_strides(a: Any, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides in elements; batch 0 for varlen."""
    st = [s // a.itemsize for s in a.strides]
    return (0, st[0], st[1]) if varlen else (st[0], st[1], st[2])


def _last_contiguous(a: Any) -> Any:
    cp = backend.require_cupy()
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return cp.ascontiguousarray(a)
    if any(s % a.itemsize for s in a.strides):
        return cp.ascontiguousarray(a)
    return a


def _aligned16(a: Any) -> bool:
    """cp.async 16-byte copies: the base and every row start (all strides) 16-byte aligned."""
    rows = zip(a.strides[:-1], a.shape[:-1], strict=True)
    return a.data.ptr % 16 == 0 and all(s % 16 == 0 for s, n in rows if n > 1)


def _pad_last(a: Any, dp: int) -> Any:
    cp = backend.require_cupy()
    padded = cp.zeros(a.shape[:-1] + (dp,), dtype=a.dtype)
    padded[..., : a.shape[-1]] = a
    return padded


def _gpu_mask(mask: Any, shape4: tuple[int, int, int, int]) -> tuple[Any, tuple[int, int, int]]:
    """float32 mask the kernel reads at b*m_sb + h*m_sh + i*m_sq + j, and (m_sb, m_sh, m_sq)."""
    cp = backend.require_cupy()
    m = cp.where(mask, 0.0, -cp.inf).astype(cp.float32) if mask.dtype == np.bool_ else mask.astype(cp.float32)
    m = m.reshape((1,) * (4 - m.ndim) + tuple(m.shape))
    if m.shape[-1] != shape4[-1] or (m.shape[-1] > 1 and m.strides[-1] != 4):
        m = cp.ascontiguousarray(cp.broadcast_to(m, m.shape[:-1] + (shape4[-1],)))
    st = tuple(0 if m.shape[i] == 1 else m.strides[i] // 4 for i in range(3))
    return m, st


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    out: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> Any:
    """Scaled dot-product attention, fused (never materialises the seq_q x seq_k scores on the GPU).

        out_i = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j      (visible keys j only)

    Parameters
    ----------
    q : (batch, seq_q, q_heads, D), or (total_q, q_heads, D) with cu_seqlens; float16 / float32
        (float64 on the CPU). Only the last dim must be contiguous.
    k, v : (batch, seq_k, kv_heads, D), or (total_k, kv_heads, D); q's dtype and device; kv_heads divides
        q_heads (q head h uses kv head h // (q_heads // kv_heads)).
    causal : query i sees keys j <= i + (len_k - len_q) (bottom-right aligned).
    scale : multiplies q . k; default 1 / sqrt(D).
    mask : additive float mask or bool (True = may attend) broadcastable to (batch, q_heads, seq_q, seq_k);
        padded layout only.
    cu_seqlens_q, cu_seqlens_k : int32 (batch + 1,) cumulative offsets from 0 (varlen layout; both or none).
    max_seqlen_q, max_seqlen_k : the longest sequence, when the caller knows it (else computed with one
        small device-to-host copy).
    return_lse : also return lse float32 (batch, q_heads, seq_q), or (q_heads, total_q) for varlen.
    out : optional array of q's shape, dtype and device to write into.
    impl : None / "cuda" for GPU arrays (there is no Numba prefill kernel).
    version : 1 (SIMT), 2 (tensor cores, float16, D in {64, 96, 128}), 3 (v2 with 8 warps) or 4 (32 query
        rows per warp, FlashAttention-2 layout; float16, D in {64, 96, 128}); default: for float16 and
        D in {64, 96, 128} version 4, or 2 when causal with fewer than 4096 query rows; else 1.

    Returns
    -------
    out (like q; `out` when given), or (out, lse) with return_lse. A query that sees no key gets zeros and
    lse = -inf.
    """
    q, give_back = adopt(q, "q")
    k = adopt(k, "k")[0]
    v = adopt(v, "v")[0]
    mask_arr = adopt_optional(mask, "mask")
    out_arr = adopt_optional(out, "out")
    cu_q = adopt_optional(cu_seqlens_q, "cu_seqlens_q")
    cu_k = adopt_optional(cu_seqlens_k, "cu_seqlens_k")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("attention: give both cu_seqlens_q and cu_seqlens_k (varlen) or neither")
    varlen = cu_q is not None
    h_q, h_k, d = _check_inputs(q, k, v, varlen)
    tail = False
    causal = _check_bool(causal, "causal")
    return_lse = _check_bool(return_lse, "return_lse")
    sc = 1.0 / math.sqrt(d) if scale is None else _checks.check_scalar(scale, "scale")
    max_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if varlen:
        _check_cu(cu_q, "cu_seqlens_q", q)
        _check_cu(cu_k, "cu_seqlens_k", q)
        if cu_q.shape != cu_k.shape:
            raise ValueError(
                f"attention: cu_seqlens_q has shape {tuple(cu_q.shape)} but cu_seqlens_k has "
                f"{tuple(cu_k.shape)}; both are (batch + 1,)"
            )
        if mask_arr is not None:
            raise ValueError("attention: mask works with the padded layout only, not with cu_seqlens")
        batch, s_q, s_k = cu_q.shape[0] - 1, None, None
        lse_shape = (h_q, q.shape[0])
    else:
        batch, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
        lse_shape = (batch, h_q, s_q)
        if mask_arr is not None:
            _check_mask(mask_arr, q, (batch, h_q, s_q, s_k))
    _checks.check_out(out_arr, "out", q)
    which = _checks.check_impl(impl, q)
    if which == "numba":
        raise ValueError("attention: impl='numba' is not available for prefill attention; use impl='cuda'")
    check_version(version, VERSIONS, which)
    if version is not None and not _can_run(version, q.dtype, d):
        need = "head_dim <= 256" if version == 1 else f"float16 and head_dim in {_V2_DIMS}"
        raise ValueError(f"attention: version={version} needs {need}; got {q.dtype}, head_dim {d}")
    if varlen and which == "numpy":
        _check_offsets(np.asarray(cu_q), "cu_seqlens_q", q.shape[0])
        _check_offsets(np.asarray(cu_k), "cu_seqlens_k", k.shape[0])

    if which == "numpy":
        res = attention_ref(
            q,
            k,
            v,
            causal=causal,
            scale=sc,
            mask=mask_arr,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            return_lse=True,
        )
        o = finish(res[0].astype(q.dtype), out_arr, out, give_back)
        return (o, give_back(res[1].astype(np.float32))) if return_lse else o

    cp = backend.require_cupy()
    if d > _V1_DIMS[-1]:
        raise ValueError(f"attention: head_dim {d} is larger than the GPU kernels take ({_V1_DIMS[-1]})")
    if varlen:
        cu_q = cp.ascontiguousarray(cu_q, dtype=cp.int32)
        cu_k = cp.ascontiguousarray(cu_k, dtype=cp.int32)
        if max_q is None:  # one small device->host copy; validate the offsets while they are here
            host_q = cu_q.get()
            _check_offsets(host_q, "cu_seqlens_q", q.shape[0])
            _check_offsets(cu_k.get(), "cu_seqlens_k", k.shape[0])
            max_q = int(np.max(np.diff(host_q))) if batch > 0 else 0
            # tokens past the last sequence belong to no query: zeros / -inf, as the reference gives
            tail = int(host_q[-1]) < q.shape[0]
        s_q = max_q

    lse = cp.empty(lse_shape, dtype=cp.float32) if return_lse else None
    if tail:  # a scratch output of the varlen path starts at zero (see _run_gpu); so must `out`
        if out_arr is not None:
            out_arr.fill(0)
        if lse is not None:
            lse.fill(-np.inf)
    result = _run_gpu(
        q, k, v, out_arr, lse, mask_arr, cu_q, cu_k, batch, s_q, s_k, h_q, h_k, d, sc, causal, version
    )
    o = finish(result, out_arr, out, give_back)
    return (o, give_back(lse)) if return_lse else o


def _run_gpu(
    q: Any, k: Any, v: Any, out_arr: Any, lse: Any, mask: Any, cu_q: Any, cu_k: Any,
    batch: int, s_q: int, s_k: int | None, h_q: int, h_k: int, d: int, sc: float, causal: bool,
    version: int | None,
) -> Any:  # fmt: skip
    """Launch the kernel; returns the array holding the output (out_arr itself when written in place)."""
    cp = backend.require_cupy()
    varlen = cu_q is not None
    empty = q.size == 0 or batch == 0 or s_q == 0
    if empty or (not varlen and s_k == 0):  # nothing to compute: zeros, lse -inf (no launch)
        res = cp.zeros(q.shape, dtype=q.dtype)
        if lse is not None:
            lse.fill(-np.inf)
        return res

    default_tc = _default_tc_version(causal, s_q)
    chosen = version if version is not None else (default_tc if _can_run(default_tc, q.dtype, d) else 1)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    if chosen != 1:  # cp.async moves 16-byte rows pieces: copy operands that are not 16-byte aligned
        q, k, v = (a if _aligned16(a) else cp.ascontiguousarray(a) for a in (q, k, v))
    dk = d if chosen != 1 else _v1_dim(d)
    if dk != d:  # v1 at a padded head dim: zeros in q / k leave q.k unchanged, padded v columns are dropped
        q, k, v = _pad_last(q, dk), _pad_last(k, dk), _pad_last(v, dk)

    # Where the kernel writes: `out` itself when its layout allows (last dim contiguous, no overlap with the
    # inputs, 4-byte aligned half2 stores for v2), else a scratch array copied over by `finish`.
    direct = (
        out_arr is not None
        and dk == d
        and out_arr.strides[-1] == out_arr.itemsize
        and all(s % out_arr.itemsize == 0 for s in out_arr.strides)
        and not any(cp.may_share_memory(out_arr, a) for a in (q, k, v))
        and (chosen == 1 or (out_arr.data.ptr % 4 == 0 and all(s % 4 == 0 for s in out_arr.strides[:-1])))
    )
    # varlen: tokens past cu_seqlens_q[-1] are never written by the kernel; zeros there, as the reference
    alloc = cp.zeros if varlen else cp.empty
    target = out_arr if direct else alloc(q.shape[:-1] + (dk,), dtype=q.dtype)

    pack = h_q // h_k if _PACK_GQA else 1
    block_rows = _block_rows(chosen)
    grid = (-(-(s_q * pack) // block_rows), h_q // pack, batch)
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        raise ValueError(
            f"attention: grid {grid} exceeds the CUDA limit of {_MAX_GRID_YZ} heads or sequences"
        )
    if mask is not None:
        mask_f, (m_sb, m_sh, m_sq) = _gpu_mask(mask, (batch, h_q, s_q, s_k))
    else:
        mask_f, m_sb, m_sh, m_sq = _NULL, 0, 0, 0
    if lse is None:
        lse_arg, lse_st = _NULL, (0, 0, 0)
    elif varlen:
        lse_arg, lse_st = lse, (0, 1, lse.shape[1])  # (q_heads, total_q): (batch, token, head)
    else:
        lse_arg, lse_st = lse, (h_q * s_q, 1, s_q)  # (batch, q_heads, seq_q)

    i64 = np.int64
    strides = [i64(x) for a in (q, k, v, target) for x in _elem_strides(a, varlen)]
    args = (
        q, k, v, target, lse_arg, mask_f,
        cu_q if varlen else _NULL, cu_k if varlen else _NULL,
        i32(0 if varlen else s_q), i32(0 if varlen else s_k), i32(h_q), i32(h_k), i32(pack),
        *strides, *(i64(x) for x in lse_st), i64(m_sb), i64(m_sh), i64(m_sq),
        np.float32(sc * LOG2E), i32(int(causal)),
    )  # fmt: skip
    expr = _expr(chosen, q.dtype, d, mask is not None)
    bytes_moved = q.nbytes + k.nbytes + v.nbytes + target.nbytes
    launch(
        get_function(_FAMILY, expr), grid, (_threads(chosen),), args,
        shared_mem=_smem_bytes(chosen, d, mask is not None), bytes_moved=bytes_moved,
    )  # fmt: skip
    if dk != d:
        return cp.ascontiguousarray(target[..., :d])
    return target
