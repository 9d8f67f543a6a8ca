"""Numba CUDA decode attention over a paged KV cache (one pass, no split-KV), float16 / float32.

Formula (per sequence s, query token t, q head h of kv head g = h // group, scale folded with log2(e)):
    pos   = context_lens[s] - q_len + t                      (the query's own position; causal)
    S_j   = scale * q[s, t, h] . K[s, j, g]                  for cache positions j = 0 .. pos
    out   = sum_j exp(S_j - max S) V[s, j, g] / sum_j exp(S_j - max S)
Cache position j of sequence s lives in block block_tables[s, j // block_size] at offset j % block_size:
K[s, j, g] = k_cache[block, offset, g, :] (token-major blocks, (num_blocks, block_size, kv_heads, head_dim)).
A row that sees no key (context_lens[s] == 0) gives zeros. Block ids are trusted (the ops layer checks them
in debug mode).

Kernel layout (`DecodePlan`):
  grid   one CTA per (sequence, kv head): blockIdx.x = s * kv_heads + g. The CTA handles every q head of the
         group times every query token: row r = t * group + i (q head g * group + i), `rows` rows per pass
         (all of them in one pass unless group * q_len exceeds the register budget), so each K/V element is
         read from memory once per pass.
  lanes  a token's head_dim row is read by `lanes` consecutive lanes (a power of two <= 32), `packs`
         vectors of `vec` elements each (16 bytes: 8 x float16 / 4 x float32 when head_dim and the pointers
         allow, else narrower): lane l of the group holds elements (p * lanes + l) * vec .. + vec. A warp
         thus streams 32 / lanes tokens at once, and `unroll` tokens per lane group per step (every K and V
         load of a step is issued before the maths), so a 4-warp CTA has warps * (32 / lanes) * unroll
         tokens (16 x 512 bytes for head_dim 128 float16) in flight. Consecutive tokens of a block are
         kv_heads * head_dim elements apart; each group's read is one contiguous head_dim row.
  maths  q rows pre-scaled by scale * log2(e) in registers (float32); per token and row a partial dot
         product over the lane's elements, completed by a shfl_xor_sync butterfly over the token's lanes;
         then an online softmax per (token group, row): running max m, sum l and accumulator acc (the lane's
         head_dim slice) in float32, rescaled by exp2(m_old - m_new) only when the step's max grows.
  merge  each token group (warps * 32 / lanes of them) writes (m, l, acc) to shared memory; after a barrier
         the CTA combines them per output element: M = max m_k, out = sum acc_k 2^(m_k - M) / sum l_k
         2^(m_k - M), and writes `vec` elements at a time.
Registers: rows * items floats each for q and acc (items = vec * packs); the row budget keeps
rows * items <= ROW_BUDGET (64) and rows <= MAX_ROWS (8), so head_dim 128 takes 8 rows per pass (GQA 8:1
with one query token in one pass; 3 query tokens take 3 passes, the later ones re-reading K/V, mostly from
L2). ptxas for sm_90 (tests/numba_ptx_check.py): head_dim 128 float16 with 8 rows 255 registers (two
4-warp CTAs per SM), 1 row 90; float32 with 8 rows 168; no spills. `forward_plan(..., max_vec=4)` gives
float16 8-byte access, 32 lanes per head_dim-128 token and about 170 registers at 8 rows (a variant for
the GPU benchmark to weigh against the 16-byte default). Split-KV is not done here (the CUDA kernels have
it); few (sequence, kv head) pairs with long contexts leave SMs idle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer.kernels.numba._numba import (
    FULL_MASK,
    NEG_INF,
    WARP,
    cuda,
    current_stream,
    flat,
    float32,
    int64,
    jit_kernel,
    launch,
    load_vec,
    next_pow2,
    store_vec,
    vec_width,
)

LOG2E = 1.4426950408889634
ROW_BUDGET = 64  # floats per thread for each of q and acc (rows per pass * items per lane)
MAX_ROWS = 8  # rows per pass (more spill: 16 float32 rows of head_dim 128 need > 255 registers)
WARPS = 4
UNROLL = 2
BLOCK_SIZES = (8, 16, 32, 64, 128)
MAX_HEAD_DIM = 256  # the register and shared-memory budgets above are sized for it


@dataclass(frozen=True)
class DecodePlan:
    """The launch shape of the decode kernel (see the module docstring).

    vec: elements per global access; lanes: lanes per token (power of two <= 32); packs: vectors per lane
    per token row; warps: warps per CTA; unroll: tokens per lane group per step; rows: query rows (q heads x
    query tokens of the kv-head group) per pass over the context.
    """

    vec: int
    lanes: int
    packs: int
    warps: int
    unroll: int
    rows: int

    @property
    def items(self) -> int:
        return self.vec * self.packs

    @property
    def threads(self) -> int:
        return self.warps * WARP

    @property
    def tokens_per_step(self) -> int:
        return self.warps * (WARP // self.lanes) * self.unroll


def make_plan(
    head_dim: int, vec: int, group_rows: int, warps: int = WARPS, unroll: int = UNROLL
) -> DecodePlan:
    """The layout for rows of `head_dim` read `vec` at a time and `group_rows` = group * q_len query rows."""
    nvec = -(-head_dim // vec)
    lanes = min(WARP, next_pow2(nvec))
    packs = -(-nvec // lanes)
    items = vec * packs
    rows = max(1, min(next_pow2(max(group_rows, 1)), ROW_BUDGET // items, MAX_ROWS))
    return DecodePlan(vec, lanes, packs, warps, unroll, rows)


def forward_plan(q: Any, k_cache: Any, v_cache: Any, out: Any, max_vec: int | None = None) -> DecodePlan:
    """The layout `paged_attention_forward` uses for these arrays. `max_vec` caps the elements per access
    (benchmarks: float16 with 8-byte access takes 32 lanes per head_dim-128 token and half the registers)."""
    _, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    vec = vec_width((head_dim,), q, k_cache, v_cache, out)
    if max_vec is not None:
        vec = min(vec, max(1, next_pow2(int(max_vec) + 1) // 2))  # the largest power of two <= max_vec
    return make_plan(head_dim, vec, (q_heads // max(kv_heads, 1)) * q_len)


@functools.cache
def _decode_kernel(
    head_dim: int, block_size: int, vec: int, lanes: int, packs: int, warps: int, unroll: int, rows: int
):
    items = vec * packs
    tpw = WARP // lanes  # token groups per warp
    slots = warps * tpw  # token groups per CTA: partial softmax states merged at the end
    threads = warps * WARP
    log_bs = block_size.bit_length() - 1
    bs_mask = block_size - 1
    nq = rows * items
    nbuf = unroll * items
    row_vecs = head_dim // vec  # output vectors per row (vec divides head_dim)
    n_state = slots * rows
    n_acc = slots * rows * head_dim
    n_sc = rows * unroll

    @jit_kernel(threads)
    def paged_attention_decode(
        q, k_cache, v_cache, block_tables, context_lens, out, kv_heads, group, q_len, max_blocks, scale_log2
    ):
        s_acc = cuda.shared.array(n_acc, float32)
        s_m = cuda.shared.array(n_state, float32)
        s_l = cuda.shared.array(n_state, float32)
        qr = cuda.local.array(nq, float32)  # q rows of the pass, this lane's slice, pre-scaled
        acc = cuda.local.array(nq, float32)
        kb = cuda.local.array(nbuf, float32)
        vb = cuda.local.array(nbuf, float32)
        sc = cuda.local.array(n_sc, float32)
        m = cuda.local.array(rows, float32)
        lsum = cuda.local.array(rows, float32)
        lim = cuda.local.array(rows, int64)  # last visible cache position per row (-1: none)
        ob = cuda.local.array(vec, float32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        sub = lane % lanes
        grp = lane // lanes
        slot = warp * tpw + grp
        seq = cuda.blockIdx.x // kv_heads
        h = cuda.blockIdx.x - seq * kv_heads
        ctx = max(int64(context_lens[seq]), int64(0))
        nrows = group * q_len
        q_heads = kv_heads * group
        tok_stride = int64(kv_heads) * head_dim  # elements between consecutive tokens of a block
        table = int64(seq) * max_blocks
        for r0 in range(0, nrows, rows):
            for r in range(rows):
                rr = r0 + r
                t = rr // group
                qbase = ((int64(seq) * q_len + t) * q_heads + h * group + rr - t * group) * head_dim
                lim[r] = ctx - q_len + t if rr < nrows else int64(-1)
                for p in range(packs):
                    c = (p * lanes + sub) * vec
                    if rr < nrows and c < head_dim:
                        load_vec(q, qbase + c, qr, r * items + p * vec, vec)
                        for i in range(vec):
                            qr[r * items + p * vec + i] *= scale_log2
                    else:
                        for i in range(vec):
                            qr[r * items + p * vec + i] = float32(0)
                m[r] = NEG_INF
                lsum[r] = float32(0)
                for i in range(items):
                    acc[r * items + i] = float32(0)
            for base in range(0, ctx, warps * tpw * unroll):
                # every K and V load of the step first
                for u in range(unroll):
                    tok = base + (u * warps + warp) * tpw + grp
                    ok = tok < ctx
                    addr = int64(0)
                    if ok:
                        blk = int64(block_tables[table + (tok >> log_bs)])
                        addr = (blk * block_size + (tok & bs_mask)) * tok_stride + h * head_dim
                    for p in range(packs):
                        c = (p * lanes + sub) * vec
                        if ok and c < head_dim:
                            load_vec(k_cache, addr + c, kb, u * items + p * vec, vec)
                            load_vec(v_cache, addr + c, vb, u * items + p * vec, vec)
                        else:
                            for i in range(vec):
                                kb[u * items + p * vec + i] = float32(0)
                                vb[u * items + p * vec + i] = float32(0)
                # scores: the lane's partial dot products, completed across the token's lanes
                for u in range(unroll):
                    tok = base + (u * warps + warp) * tpw + grp
                    for r in range(rows):
                        d = float32(0)
                        for i in range(items):
                            d += qr[r * items + i] * kb[u * items + i]
                        off = lanes // 2
                        while off > 0:
                            d += cuda.shfl_xor_sync(FULL_MASK, d, off)
                            off //= 2
                        sc[r * unroll + u] = d if tok <= lim[r] else NEG_INF
                # online softmax of this token group's rows
                for r in range(rows):
                    cm = NEG_INF
                    for u in range(unroll):
                        if sc[r * unroll + u] > cm:
                            cm = sc[r * unroll + u]
                    if cm > m[r]:
                        alpha = math.exp2(m[r] - cm)  # 0 on the first visible key (m = -inf)
                        lsum[r] *= alpha
                        for i in range(items):
                            acc[r * items + i] *= alpha
                        m[r] = cm
                    if cm != NEG_INF:
                        mr = m[r]
                        for u in range(unroll):
                            pr = math.exp2(sc[r * unroll + u] - mr)  # masked: exp2(-inf) = 0
                            lsum[r] += pr
                            for i in range(items):
                                acc[r * items + i] += pr * vb[u * items + i]
            # merge the token groups' states through shared memory
            for r in range(rows):
                if sub == 0:
                    s_m[slot * rows + r] = m[r]
                    s_l[slot * rows + r] = lsum[r]
                for p in range(packs):
                    c = (p * lanes + sub) * vec
                    if c < head_dim:
                        for i in range(vec):
                            s_acc[(slot * rows + r) * head_dim + c + i] = acc[r * items + p * vec + i]
            cuda.syncthreads()
            for j in range(tid, rows * row_vecs, threads):
                r = j // row_vecs
                c = (j - r * row_vecs) * vec
                rr = r0 + r
                if rr < nrows:
                    mx = NEG_INF
                    for k in range(slots):
                        if s_m[k * rows + r] > mx:
                            mx = s_m[k * rows + r]
                    den = float32(0)
                    for i in range(vec):
                        ob[i] = float32(0)
                    if mx != NEG_INF:
                        for k in range(slots):
                            w = math.exp2(s_m[k * rows + r] - mx)
                            den += s_l[k * rows + r] * w
                            for i in range(vec):
                                ob[i] += s_acc[(k * rows + r) * head_dim + c + i] * w
                        inv = float32(1) / den
                        for i in range(vec):
                            ob[i] *= inv
                    t = rr // group
                    obase = ((int64(seq) * q_len + t) * q_heads + h * group + rr - t * group) * head_dim
                    store_vec(out, obase + c, ob, 0, vec)
            cuda.syncthreads()  # the next pass rewrites the shared state

    return paged_attention_decode


def _check(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any, out: Any) -> None:
    # the ops layer validates the user's arguments; these guard the kernel's own assumptions
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape or out.shape != q.shape:
        raise ValueError(
            "paged_attention_forward: q/out (seqs, q_len, heads, dim), caches (blocks, bs, kvh, dim)"
        )
    if k_cache.shape[3] != q.shape[3] or k_cache.shape[2] < 1 or q.shape[2] % k_cache.shape[2]:
        raise ValueError("paged_attention_forward: head_dim or head counts do not match")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"paged_attention_forward: head_dim {q.shape[3]} > {MAX_HEAD_DIM}")
    if k_cache.shape[1] not in BLOCK_SIZES:
        raise ValueError(f"paged_attention_forward: block_size {k_cache.shape[1]} not in {BLOCK_SIZES}")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("paged_attention_forward: block_tables (seqs, max_blocks), context_lens (seqs,)")
    if np.dtype(block_tables.dtype) != np.int32 or np.dtype(context_lens.dtype) != np.int32:
        raise TypeError("paged_attention_forward: block_tables and context_lens must be int32")


def run_forward(
    plan: DecodePlan,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_tables: Any,
    context_lens: Any,
    out: Any,
    scale,
) -> None:
    """`paged_attention_forward` with an explicit layout (tests use small ones for the simulator)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    num_seqs, q_len, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_seqs == 0 or q_len == 0 or q_heads == 0 or head_dim == 0:
        return
    if head_dim % plan.vec:
        raise ValueError(f"paged_attention_forward: vec {plan.vec} does not divide head_dim {head_dim}")
    kernel = _decode_kernel(
        head_dim, block_size, plan.vec, plan.lanes, plan.packs, plan.warps, plan.unroll, plan.rows
    )
    launch(
        kernel,
        num_seqs * kv_heads,
        plan.threads,
        current_stream(q),
        flat(q),
        flat(k_cache),
        flat(v_cache),
        flat(block_tables),
        flat(context_lens),
        flat(out),
        kv_heads,
        q_heads // kv_heads,
        q_len,
        block_tables.shape[1],
        float32(float(scale) * LOG2E),
    )


def paged_attention_forward(q, k_cache, v_cache, block_tables, context_lens, out, scale) -> None:
    """Decode attention of new query tokens over a paged KV cache, one pass; writes `out` in place.

    Parameters
    ----------
    q, out : (num_seqs, q_len, q_heads, head_dim) C-contiguous float16/float32 device arrays.
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim), same dtype; kv_heads divides q_heads.
    block_tables : int32 (num_seqs, max_blocks_per_seq); entries past ceil(context_lens[s] / block_size)
        are never read.
    context_lens : int32 (num_seqs,), tokens in the cache per sequence including the q_len new ones.
    scale : float, the factor on q . k.

    Query token t of sequence s sits at position context_lens[s] - q_len + t and sees cache positions 0 up
    to it: out = softmax(scale * q K^T) V over those; a sequence with context 0 gets zeros.
    """
    run_forward(
        forward_plan(q, k_cache, v_cache, out), q, k_cache, v_cache, block_tables, context_lens, out, scale
    )
