"""Backward of fused attention (FlashAttention-2 style): dq, dk, dv from q, k, v, out, dout and the saved lse.

Formulas, per sequence, q head h with kv head g = h // (q_heads // kv_heads), visible keys as in
rf.attention (j < len_k and, under `causal`, j <= i + (len_k - len_q): bottom-right aligned):

    P_ij  = exp(scale * q_i . k_j - lse_i)          (0 for invisible j, and for queries with lse = -inf)
    D_i   = sum_d dout_id * out_id
    dP_ij = dout_i . v_j
    dS_ij = P_ij * (dP_ij - D_i)
    dq_i  = scale * sum_j dS_ij k_j
    dk_j  = scale * sum_{i, h in group g} dS_ij q_i      (GQA: summed over the q heads sharing kv head g)
    dv_j  = sum_{i, h in group g} P_ij dout_i

Layouts are those of rf.attention: padded q / out / dout (batch, seq_q, q_heads, D), k / v (batch, seq_k,
kv_heads, D), lse float32 (batch, q_heads, seq_q); varlen q (total_q, q_heads, D), k / v (total_k, kv_heads,
D), lse (q_heads, total_q) with int32 cu_seqlens_q / cu_seqlens_k (batch + 1,). dq, dk, dv have the shapes
and dtypes of q, k, v. No seq_q x seq_k buffer is ever made on the GPU: P is recomputed tile by tile from lse.

Arrays run where they live: NumPy inputs run the float64 reference `attention_backward_ref`; CuPy inputs run
`cuda_src/attention_backward.cu`:
    preprocess  D = rowsum(dout * out) in fp32 (layout of lse) and a zeroed fp32 dq accumulator (8 lanes
                per row, 16-byte accesses)
    v1          SIMT: one block per (16-key tile, kv head, sequence), fp32 tiles in shared memory;
                loops over the group's q heads and the visible query tiles; dk / dv accumulated in shared
                memory and written once; dq added into the fp32 accumulator with atomics. Any dtype, D <= 256
                (zero-padded to a multiple of 16).
    v2          tensor cores (float16, D in {64, 128}): one block of 4 warps per 64-key tile, each warp owning
                16 keys; S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q with mma.sync m16n8k16 (dk and
                dv in registers for the whole loop), dQ += dS K per query tile through shared memory and fp32
                atomics into the accumulator. Query tiles double-buffered (cp.async prefetch of the next).
    v3          the v2 kernel with half the query rows per tile (32 for D = 64, 16 for D = 128), for sweeps
    v4          the v2 kernel with 8 warps: 128 keys per block (1 block of 8 warps per SM by registers), so
                each query tile's dQ is computed over twice as many keys per atomic pass (half the dq atomics
                of v2), and on sm_90 dQ is added with 16-byte vector reductions (red.global.add.v4.f32: a
                quarter of v2's atomic instructions); query tiles of 64 (D = 64) / 16 (D = 128) rows.
                Blocks start longest first under causal (key tile slowest in launch order) and each starts
                its query tiles at a different one (co-resident blocks of a head hit different dq rows)
    convert     dq = accumulator cast to q's dtype (the scale folded in)
Default: v4 where it applies (`_DEFAULT_TC`), else v1. bench/train_kernels.py times the default
("rawformer"), v2 ("rf-v2"), v3 ("rf-v3") and v1 ("rf-v1") against torch's flash backward. H100, GPT-2 small
8 x 1024 x 12 x 64 fp16: v2 0.649 ms = 0.44x torch, v3 (same dq atomic count, other tile shape) 0.684 ms:
the time follows the dq atomics (~100 M fp32 atomics at ~155 G/s), which v4 halves and vectorises.
v4 not yet measured when it was made the default.
dq is accumulated with fp32 atomics, so it may differ in the last bits from run to run; dk and dv are
deterministic (one writer per element).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional, check_version, f64

__all__ = ["attention_backward", "attention_backward_ref"]

_FAMILY = "attention_backward"
VERSIONS = (1, 2, 3, 4)
LOG2E = 1.4426950408889634
_NULL = np.uintp(0)

# v1 (SIMT): keys per block, queries per tile, threads; head dims compiled (others zero-padded up).
_V1_BN, _V1_BM, _V1_THREADS = 16, 16, 128
_V1_DIMS = tuple(range(16, 257, 16))
# Tensor-core kernel attention_backward_v2<D, BM, WARPS>: WARPS x 16 keys per block; BM queries per tile by
# head dim (registers: dK + dV are D floats per lane, S + dP 2 * BM / 8 * 4).
_TC_WARPS = {2: 4, 3: 4, 4: 8}
_TC_BM = {
    2: {64: 64, 128: 32},
    3: {64: 32, 128: 16},  # the v2 kernel with half the query rows per tile (for sweeps)
    4: {64: 64, 128: 16},  # 8 warps; D = 128 at BM = 32 spills on sm_90 (255 registers), BM = 16 does not
}
_V2_BM = _TC_BM[2]  # head dims the tensor-core versions take
_DEFAULT_TC = 4  # the tensor-core version used when version=None (fp16, D in _V2_BM)
_PRE_THREADS, _PRE_LANES = 128, 8  # preprocess: threads per block, lanes per (token, head) row
_CONVERT_THREADS = 256  # convert: 4 elements per thread
_MAX_GRID_YZ = 65535


# ---- float64 reference -----------------------------------------------------------------------------------


def _ref_dense(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray, do: np.ndarray, lse: np.ndarray,
    scale: float, causal: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One padded batch in float64: q / o / do (B, Sq, Hq, D), k / v (B, Sk, Hk, D), lse (B, Hq, Sq)."""
    bsz, s_q, h_q, d = q.shape
    s_k, h_k = k.shape[1], k.shape[2]
    grp = h_q // h_k
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    if bsz == 0 or s_q == 0 or s_k == 0 or h_q == 0:
        return dq, dk, dv
    qh = q.transpose(0, 2, 1, 3)  # (B, Hq, Sq, D)
    oh, doh = o.transpose(0, 2, 1, 3), do.transpose(0, 2, 1, 3)
    kh = np.repeat(k.transpose(0, 2, 1, 3), grp, axis=1)  # (B, Hq, Sk, D): q head h reads kv head h // grp
    vh = np.repeat(v.transpose(0, 2, 1, 3), grp, axis=1)
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale  # (B, Hq, Sq, Sk)
    keep = np.ones((s_q, s_k), dtype=bool)
    if causal:
        keep = np.arange(s_k)[None, :] <= np.arange(s_q)[:, None] + (s_k - s_q)
    finite = np.isfinite(lse)[..., None]  # lse = -inf: the query sees no key, P = 0
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(keep & finite, np.exp(s - np.where(finite, lse[..., None], 0.0)), 0.0)
    dd = np.sum(doh * oh, axis=-1, keepdims=True)  # (B, Hq, Sq, 1)
    dp = np.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - dd)
    dqh = scale * np.matmul(ds, kh)  # (B, Hq, Sq, D)
    dkh = scale * np.matmul(ds.transpose(0, 1, 3, 2), qh)  # (B, Hq, Sk, D)
    dvh = np.matmul(p.transpose(0, 1, 3, 2), doh)
    dq = dqh.transpose(0, 2, 1, 3)
    dk = dkh.reshape(bsz, h_k, grp, s_k, d).sum(axis=2).transpose(0, 2, 1, 3)
    dv = dvh.reshape(bsz, h_k, grp, s_k, -1).sum(axis=2).transpose(0, 2, 1, 3)
    return dq, dk, dv


def attention_backward_ref(
    q: Any, k: Any, v: Any, out: Any, dout: Any, lse: Any, *, causal: bool = False,
    scale: float | None = None, cu_seqlens_q: Any = None, cu_seqlens_k: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """float64 (dq, dk, dv) by the module docstring's formulas, with P recomputed from the given lse."""
    qa, ka, va, oa, da, la = (f64(a) for a in (q, k, v, out, dout, lse))
    sc = 1.0 / math.sqrt(qa.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        return _ref_dense(qa, ka, va, oa, da, la, sc, bool(causal))
    cq = np.asarray(backend.to_numpy(cu_seqlens_q)).astype(np.int64)
    ck = np.asarray(backend.to_numpy(cu_seqlens_k)).astype(np.int64)
    dq, dk, dv = np.zeros(qa.shape), np.zeros(ka.shape), np.zeros(va.shape)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        r = _ref_dense(
            qa[None, q0:q1], ka[None, k0:k1], va[None, k0:k1], oa[None, q0:q1], da[None, q0:q1],
            la[None, :, q0:q1], sc, bool(causal),
        )  # fmt: skip
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = r[0][0], r[1][0], r[2][0]
    return dq, dk, dv


# ---- kernel plans ----------------------------------------------------------------------------------------


def _v1_dim(d: int) -> int:
    return next(x for x in _V1_DIMS if x >= d)


def _expr(version: int, dtype: Any, d: int) -> str:
    if version == 1:
        return f"attention_backward_v1<{cuda_type(dtype)}, {_v1_dim(d)}>"
    return f"attention_backward_v2<{d}, {_bm(version, d)}, {_TC_WARPS[version]}>"


def _bm(version: int, d: int) -> int:
    """Query rows per tile of the tensor-core kernel (versions 2, 3, 4)."""
    return _TC_BM[version][d]


def _bn(version: int) -> int:
    """Keys per block: 16 for v1, 16 per warp for the tensor-core versions."""
    return _V1_BN if version == 1 else 16 * _TC_WARPS[version]


def _threads(version: int) -> int:
    return _V1_THREADS if version == 1 else 32 * _TC_WARPS[version]


def _can_run(version: int, dtype: Any, d: int) -> bool:
    if version == 1:
        return d <= _V1_DIMS[-1]
    return np.dtype(dtype) == np.float16 and d in _V2_BM


def _smem_bytes(version: int, d: int) -> int:
    """Dynamic shared memory (the formulas of v1_smem_bytes / v2_smem_bytes in attention_backward.cu)."""
    if version == 1:
        dp = _v1_dim(d)
        return 4 * (4 * _V1_BN * (dp + 1) + 2 * _V1_BM * (dp + 1) + 2 * _V1_BM * (_V1_BN + 1) + 2 * _V1_BM)
    bm, bn = _bm(version, d), _bn(version)
    return 2 * (2 * bn + 4 * bm) * (d + 8) + 2 * bm * (bn + 8) + 16 * bm


def _pre_expr(dtype: Any) -> str:
    return f"attention_backward_preprocess<{cuda_type(dtype)}, {_PRE_THREADS}>"


def _convert_expr(dtype: Any) -> str:
    return f"attention_backward_convert<{cuda_type(dtype)}>"


def _instantiations() -> list[str]:
    exprs = []
    for dtype in _checks.GPU_DTYPES:
        exprs += [_pre_expr(dtype), _convert_expr(dtype)]
        exprs += [_expr(1, dtype, d) for d in _V1_DIMS]
        exprs += [_expr(v, dtype, d) for v in _TC_WARPS for d in _V2_BM if _can_run(v, dtype, d)]
    return list(dict.fromkeys(exprs))


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"attention_backward: {name} must be True or False, got {value!r}")
    return bool(value)


def _check_inputs(
    q: Any, k: Any, v: Any, out: Any, dout: Any, lse: Any, varlen: bool
) -> tuple[int, int, int, tuple[int, ...]]:
    """Shapes and dtypes; returns (q_heads, kv_heads, head_dim, lse shape)."""
    _checks.check_float(q, "q")
    _checks.check_same_place(q, "q", k=k, v=v, out=out, dout=dout)
    nd = 3 if varlen else 4
    layout = "(tokens, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != nd:
            raise ValueError(
                f"attention_backward: {name} must have {nd} dimensions {layout}, got {tuple(a.shape)}"
            )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"attention_backward: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"attention_backward: k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    h_q, h_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d or d < 1:
        raise ValueError(f"attention_backward: k has head_dim {k.shape[-1]} but q has {d}")
    if h_k < 1 or h_q % h_k:
        raise ValueError(f"attention_backward: k has {h_k} heads, which does not divide q's {h_q} heads")
    _checks.check_shape(out, "out", tuple(q.shape))
    _checks.check_shape(dout, "dout", tuple(q.shape))
    lse_shape = (h_q, q.shape[0]) if varlen else (q.shape[0], h_q, q.shape[1])
    if backend.is_cupy(lse) != backend.is_cupy(q):
        raise ValueError("attention_backward: lse must live where q does (both NumPy or both CuPy)")
    if lse.dtype.kind != "f":
        raise TypeError(f"attention_backward: lse must be a float array (float32), got dtype {lse.dtype}")
    _checks.check_shape(lse, "lse", lse_shape)
    return h_q, h_k, d, lse_shape


def _check_cu(cu: Any, name: str, like: Any, total: int) -> Any:
    if backend.is_cupy(cu) != backend.is_cupy(like):
        raise ValueError(f"attention_backward: {name} must live where q does")
    if cu.ndim != 1 or cu.shape[0] < 1 or cu.dtype.kind not in "iu":
        raise ValueError(f"attention_backward: {name} must be an int32 array of shape (batch + 1,)")
    host = np.asarray(backend.to_numpy(cu)).astype(np.int64)
    if host[0] != 0 or np.any(np.diff(host) < 0) or host[-1] > total:
        raise ValueError(f"attention_backward: {name} must start at 0, not decrease, and end <= {total}")
    return host


# ---- launcher --------------------------------------------------------------------------------------------


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    dout: Any,
    lse: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    impl: str | None = None,
    version: int | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients of rf.attention with respect to q, k and v (formulas in the module docstring).

    Parameters
    ----------
    q, k, v : the forward's inputs, layouts as rf.attention (padded or varlen); float16 / float32
        (float64 on the CPU); kv_heads divides q_heads
    out : the forward's output (q's shape and dtype)
    dout : the gradient of the loss with respect to out (q's shape and dtype)
    lse : the forward's log-sum-exp, float32 (batch, q_heads, seq_q), or (q_heads, total_q) for varlen
    causal, scale : as the forward (scale defaults to 1 / sqrt(D))
    cu_seqlens_q, cu_seqlens_k : int32 (batch + 1,) offsets for the varlen layout (both or none)
    impl : None / "cuda" for GPU arrays
    version : 1 (SIMT, any dtype, D <= 256), 2 (tensor cores, float16, D in {64, 128}), 3 (v2 with half
        the query rows per tile) or 4 (v2 with 8 warps, 128 keys per block); default 4 where it applies

    Returns
    -------
    (dq, dk, dv) : arrays of q's, k's and v's shapes and dtypes, on their device.
    """
    q, give_back = adopt(q, "q")
    k, v, out_a, dout_a, lse_a = (
        adopt(a, n)[0] for a, n in ((k, "k"), (v, "v"), (out, "out"), (dout, "dout"), (lse, "lse"))
    )
    cu_q = adopt_optional(cu_seqlens_q, "cu_seqlens_q")
    cu_k = adopt_optional(cu_seqlens_k, "cu_seqlens_k")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("attention_backward: give both cu_seqlens_q and cu_seqlens_k (varlen) or neither")
    varlen = cu_q is not None
    h_q, h_k, d, _ = _check_inputs(q, k, v, out_a, dout_a, lse_a, varlen)
    causal = _check_bool(causal, "causal")
    sc = 1.0 / math.sqrt(d) if scale is None else _checks.check_scalar(scale, "scale")
    which = _checks.check_impl(impl, q)
    if which == "numba":
        raise ValueError("attention_backward: there is no Numba kernel; use impl='cuda'")
    check_version(version, VERSIONS, which)
    if version is not None and not _can_run(version, q.dtype, d):
        need = "head_dim <= 256" if version == 1 else f"float16 and head_dim in {tuple(_V2_BM)}"
        raise ValueError(f"attention_backward: version={version} needs {need}; got {q.dtype}, head_dim {d}")
    host_q = host_k = None
    if varlen:
        host_q = _check_cu(cu_q, "cu_seqlens_q", q, q.shape[0])
        host_k = _check_cu(cu_k, "cu_seqlens_k", q, k.shape[0])
        if host_q.shape != host_k.shape:
            raise ValueError("attention_backward: cu_seqlens_q and cu_seqlens_k must have the same length")

    if which == "numpy":
        dq, dk, dv = attention_backward_ref(
            q, k, v, out_a, dout_a, lse_a, causal=causal, scale=sc, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
        )
        return give_back(dq.astype(q.dtype)), give_back(dk.astype(k.dtype)), give_back(dv.astype(v.dtype))
    if d > _V1_DIMS[-1]:
        raise ValueError(
            f"attention_backward: head_dim {d} is larger than the GPU kernels take ({_V1_DIMS[-1]})"
        )
    res = _run_gpu(
        q, k, v, out_a, dout_a, lse_a, cu_q, cu_k, host_q, host_k, h_q, h_k, d, sc, causal, version
    )
    return tuple(give_back(a) for a in res)  # type: ignore[return-value]


def _run_gpu(
    q: Any, k: Any, v: Any, o: Any, do: Any, lse: Any, cu_q: Any, cu_k: Any, host_q: Any, host_k: Any,
    h_q: int, h_k: int, d: int, sc: float, causal: bool, version: int | None,
) -> tuple[Any, Any, Any]:  # fmt: skip
    cp = backend.require_cupy()
    varlen = cu_q is not None
    chosen = version if version is not None else (_DEFAULT_TC if _can_run(_DEFAULT_TC, q.dtype, d) else 1)
    dp = d if chosen != 1 else _v1_dim(d)
    # Padded layout: a block per key tile writes every key < seq_k (zeros where no query sees it), so no
    # zero fill; varlen: tokens past cu_seqlens_k[-1] are visited by no block and must read zero.
    alloc = cp.zeros if varlen else cp.empty
    dk_out = alloc(k.shape[:-1] + (dp,), dtype=k.dtype)
    dv_out = alloc(v.shape[:-1] + (dp,), dtype=v.dtype)
    if varlen:
        batch = host_q.shape[0] - 1
        s_q = int(np.max(np.diff(host_q))) if batch else 0
        s_k = int(np.max(np.diff(host_k))) if batch else 0
        cu_q32, cu_k32 = cp.asarray(host_q, dtype=cp.int32), cp.asarray(host_k, dtype=cp.int32)
    else:
        batch, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
        cu_q32 = cu_k32 = _NULL
    if q.size == 0 or batch == 0 or s_q == 0 or s_k == 0:
        dq = cp.zeros(q.shape, dtype=q.dtype)
        dk_out.fill(0)
        dv_out.fill(0)
        return dq, dk_out[..., :d], dv_out[..., :d]

    # Contiguous, 16-byte aligned operands (one copy where needed: the kernels read 16-byte vectors),
    # zero-padded to the compiled head dim for v1.
    def prep(a: Any) -> Any:
        a = cp.ascontiguousarray(a)
        if a.data.ptr % 16:
            a = a.copy()
        if dp != d:
            padded = cp.zeros(a.shape[:-1] + (dp,), dtype=a.dtype)
            padded[..., :d] = a
            a = padded
        return a

    qc, kc, vc, oc, doc = (prep(a) for a in (q, k, v, o, do))
    lse32 = cp.ascontiguousarray(lse, dtype=cp.float32)
    rows = q.shape[0] if varlen else batch * s_q  # token rows of q
    dq_acc = cp.empty((rows, h_q, dp), dtype=cp.float32)
    delta = cp.empty(lse32.shape, dtype=cp.float32)
    # preprocess: _PRE_LANES lanes per (token, head) row
    pairs = rows * h_q
    per_block = _PRE_THREADS // _PRE_LANES
    launch(
        get_function(_FAMILY, _pre_expr(q.dtype)),
        (-(-pairs // per_block),),
        (_PRE_THREADS,),
        (oc, doc, delta, dq_acc, i32(rows), i32(h_q), i32(dp), i32(0 if varlen else s_q), i32(int(varlen))),
        bytes_moved=2 * oc.nbytes + 4 * dq_acc.size,
    )
    bn = _bn(chosen)
    grid = (-(-s_k // bn), h_k, batch)
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        raise ValueError(f"attention_backward: grid {grid} exceeds the CUDA limit of {_MAX_GRID_YZ}")
    args = (
        qc, kc, vc, doc, lse32, delta, dq_acc, dk_out, dv_out, cu_q32, cu_k32,
        i32(0 if varlen else s_q), i32(0 if varlen else s_k), i32(rows), i32(h_q), i32(h_k),
        np.float32(sc * LOG2E), np.float32(sc), i32(int(causal)),
    )  # fmt: skip
    launch(
        get_function(_FAMILY, _expr(chosen, q.dtype, d)),
        grid,
        (_threads(chosen),),
        args,
        shared_mem=_smem_bytes(chosen, d),
        bytes_moved=qc.nbytes * 4 + kc.nbytes * 4,
    )
    dq = cp.empty(qc.shape, dtype=q.dtype)
    launch(
        get_function(_FAMILY, _convert_expr(q.dtype)),
        (-(-dq.size // (4 * _CONVERT_THREADS)),),
        (_CONVERT_THREADS,),
        (dq_acc, dq, np.int64(dq.size), np.float32(sc)),
        bytes_moved=4 * dq.size + dq.nbytes,
    )
    if dp != d:
        return (
            cp.ascontiguousarray(dq[..., :d]),
            cp.ascontiguousarray(dk_out[..., :d]),
            cp.ascontiguousarray(dv_out[..., :d]),
        )
    return dq, dk_out, dv_out
