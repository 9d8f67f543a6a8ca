"""Numba CUDA decode attention over a paged KV cache, with split-KV (flash-decoding), float16 / float32.

Formula (per sequence s, query token t, q head h of kv head g = h // group, scale folded with log2(e)):
    pos   = context_lens[s] - q_len + t                      (the query's own position; causal)
    S_j   = scale * log2(e) * q[s, t, h] . K[s, j, g]        for cache positions j = 0 .. pos
    out   = sum_j 2^(S_j - M) V[s, j, g] / sum_j 2^(S_j - M)
Cache position j of sequence s lives in block block_tables[s, j // block_size] at offset j % block_size:
K[s, j, g] = k_cache[block, offset, g, :] (token-major blocks, (num_blocks, block_size, kv_heads, head_dim)).
A row that sees no key (context_lens[s] == 0) gives zeros. Block ids are trusted (the ops layer checks them
in debug mode).

Split-KV (`split_plan`). Split i of a sequence covers positions [i T, (i + 1) T). With one split the kernel
writes `out`; with several it writes a float32 partial output (normalised over the split) and the split's
base-2 log-sum-exp lse_i = M_i + log2(l_i) (-inf when the split sees no key), and `_combine_kernel` merges
them: L = max_i lse_i, out = sum_i 2^(lse_i - L) out_i / sum_i 2^(lse_i - L). Scratch (CuPy):
part_out (num_seqs, q_len, q_heads, splits, head_dim), part_lse (num_seqs, q_len, q_heads, splits).
Auto rule: C = num_seqs * kv_heads CTAs of one pass; target = RESIDENT * SMs with RESIDENT = 2 for the
register-heavy plans (rows * items > 32: GQA groups, up to 255 registers, two 4-warp CTAs per SM) and 4
otherwise; splits = min(target // C, max_tokens // MIN_SPLIT_TOKENS), at least 1 (so no split once C
reaches the target; each split keeps >= 256 positions). max_tokens = max_blocks_per_seq * block_size
(known on the host without reading context_lens). T = ceil(max_tokens / splits) rounded up to the
kernel's tokens per step; the count launched is ceil(max_tokens / T). `num_splits=` forces a count.

Kernel layout (`DecodePlan`):
  grid   one CTA per (sequence, kv head, split): blockIdx.x = (s * kv_heads + g) * splits + split. The CTA
         handles every q head of the group times every query token: row r = t * group + i (q head
         g * group + i), `rows` rows per pass (a power of two; all of them in one pass unless group * q_len
         exceeds the register budget), so each K/V element is read from memory once per pass.
  lanes  a token's head_dim row is read by `lanes` consecutive lanes (a power of two <= 32), `packs`
         vectors of `vec` elements each (16 bytes when head_dim and the pointers allow, else narrower):
         lane l of the group holds elements (p * lanes + l) * vec .. + vec. A warp streams 32 / lanes
         tokens at once, `unroll` (<= lanes) tokens per lane group per step.
  loads  software pipelined: the K and V of step i + 1 are loaded (raw storage bits, two float16 per
         register) while step i computes, and the block-table entries two steps ahead, so neither the
         table lookup nor the cache read stalls the maths. Converted to float32 once per element.
  QK     q rows pre-scaled by scale * log2(e) in registers (float32). Each lane forms unroll * rows
         partial dot products (V values, index v = u * rows + r); a reduce-scatter butterfly completes
         them: at the step of offset o a lane keeps one half of its values and sends the other half to
         lane ^ o, so after log2(min(lanes, V)) halvings each lane owns nf = max(1, V / lanes) complete
         scores (values v = (sub // dup) * nf + t, dup = lanes / 2^halvings lanes holding copies); the
         rest of the offsets are plain adds. About 4 V shuffle+add+selects per step instead of
         V * log2(lanes) * 2 for a butterfly per row.
  softmax the owner lane of a score does its softmax: a max over the step's tokens (shuffles over the
         lane bits that encode u), then a lazy online rescale: the running max m of a row only moves when
         a score exceeds it by more than RESCALE_LOG2 (8, i.e. p <= 256, harmless in float32), so the
         accumulators are rescaled (alpha = 2^(m_old - m_new), broadcast from the row's owner) only a few
         times per context, and exactly (the same m scales the sum l and the accumulators).
  PV     p of every (token, row) is broadcast from its owner (one shuffle each) and each lane accumulates
         acc[r] += p * V over its head_dim slice.
  merge  each token group (warps * 32 / lanes of them) writes (m, l, acc) to shared memory; after a barrier
         the CTA combines them per output element: M = max m_k, out = sum acc_k 2^(m_k - M) / sum l_k
         2^(m_k - M), and writes `vec` elements at a time (or the float32 partial and its lse).
Registers: rows * items floats each for q and acc (items = vec * packs) plus 4 * unroll * items / per
words of raw K/V (this step and the next); the row budget keeps rows * items <= ROW_BUDGET (64),
2 rows items + 4 unroll items / per <= REG_BUDGET (160) and rows <= MAX_ROWS (8), so head_dim 128 takes 8
rows per pass (GQA 8:1 with one query token in one pass; 3 query tokens take 3 passes, the later ones
re-reading K/V, mostly from L2). ptxas 13.0 for sm_90 (tests/numba_ptx_check.py), no spills: float16
head_dim 128 with 1 row 128 registers, with 8 rows 255 (two CTAs per SM); float32 123 / 218; the combine
48. (float16 head dims 64 / 80 / 96 with 8 rows sit at 255 with 4 / 24 / 24 bytes of spills: kept, as 4
rows would mean two passes over K/V.) The sm_90 SASS of the float16 head_dim-128 8-row step (2 tokens per
16-lane group, 32 K/V elements per lane) is about 545 instructions: 256 FFMA, 32 HADD2 (the float16 ->
float32 conversions), 40 SHFL, about 120 integer; 64 FMUL more on the rare rescale path; with 1 row
(MHA) about 250. `forward_plan(..., max_vec=4)` gives float16 8-byte access, 32 lanes per head_dim-128
token and 195 registers (a variant for the GPU benchmark to weigh against the 16-byte default).
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
    device_array_like,
    flat,
    float32,
    int64,
    jit_kernel,
    launch,
    load_vec,
    load_words,
    next_pow2,
    per_word,
    sm_count,
    store_vec,
    types,
    uint32,
    vec_width,
    word_get,
)

uint64 = types.uint64  # a cast in kernels (an unsigned index skips Numba's negative-index wraparound)
LOG2E = 1.4426950408889634
ROW_BUDGET = 64  # floats per thread for each of q and acc (rows per pass * items per lane)
MAX_ROWS = 8  # rows per pass (more spill: 16 float32 rows of head_dim 128 need > 255 registers)
REG_BUDGET = 160  # floats per thread for q, acc and the raw K/V buffers (255 registers at 160)
WARPS = 4
UNROLL = 2
BLOCK_SIZES = (8, 16, 32, 64, 128)
MAX_HEAD_DIM = 256  # the register and shared-memory budgets above are sized for it
RESCALE_LOG2 = np.float32(8.0)  # lazy rescale: the running max moves only when exceeded by this (log2)
MIN_SPLIT_TOKENS = 256  # auto split-KV keeps at least this many positions per split
MAX_SPLITS = 1024
COMBINE_WARPS = 4  # the combine kernel: one warp per output row


@dataclass(frozen=True)
class DecodePlan:
    """The launch shape of the decode kernel (see the module docstring).

    vec: elements per global access; lanes: lanes per token (power of two <= 32); packs: vectors per lane
    per token row; warps: warps per CTA; unroll: tokens per lane group per step (power of two <= lanes);
    rows: query rows (q heads x query tokens of the kv-head group) per pass over the context (power of two).
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

    @property
    def resident(self) -> int:
        """CTAs per SM the auto split rule plans for (register-heavy plans: 2)."""
        return 2 if self.rows * self.items > 32 else 4


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def make_plan(
    head_dim: int, vec: int, group_rows: int, warps: int = WARPS, unroll: int = UNROLL, per: int = 1
) -> DecodePlan:
    """The layout for rows of `head_dim` read `vec` at a time and `group_rows` = group * q_len query rows;
    `per` = storage elements per 32-bit register (2: float16 read at least 2 at a time; 1 is conservative).

    rows: the largest power of two <= the group's rows (rounded up to a power of two) and MAX_ROWS with
    rows * items <= ROW_BUDGET and 2 rows items (q, acc) + 4 unroll items / per (K, V of this step and the
    next, raw) <= REG_BUDGET floats per thread."""
    nvec = -(-head_dim // vec)
    lanes = min(WARP, next_pow2(nvec))
    packs = -(-nvec // lanes)
    items = vec * packs
    unroll = min(unroll, lanes)
    rows = min(next_pow2(max(group_rows, 1)), MAX_ROWS)
    while rows > 1 and (
        rows * items > ROW_BUDGET or 2 * rows * items + 4 * unroll * items // per > REG_BUDGET
    ):
        rows //= 2
    return DecodePlan(vec, lanes, packs, warps, unroll, rows)


def forward_plan(q: Any, k_cache: Any, v_cache: Any, out: Any, max_vec: int | None = None) -> DecodePlan:
    """The layout `paged_attention_forward` uses for these arrays. `max_vec` caps the elements per access
    (benchmarks: float16 with 8-byte access takes 32 lanes per head_dim-128 token and half the registers)."""
    _, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    vec = vec_width((head_dim,), q, k_cache, v_cache, out)
    if max_vec is not None:
        vec = min(vec, _pow2_floor(int(max_vec)))  # the largest power of two <= max_vec
    return make_plan(head_dim, vec, (q_heads // max(kv_heads, 1)) * q_len, per=per_word(q.dtype, vec))


def choose_num_splits(ctas: int, max_tokens: int, sms: int, plan: DecodePlan) -> int:
    """Auto split count: about `plan.resident` CTAs per SM (one wave), each split >= MIN_SPLIT_TOKENS."""
    if ctas <= 0 or max_tokens <= 0:
        return 1
    return max(1, min((plan.resident * sms) // ctas, max_tokens // MIN_SPLIT_TOKENS, MAX_SPLITS))


def split_layout(num_splits: int, max_tokens: int, step: int) -> tuple[int, int]:
    """(splits launched, positions per split): ranges of whole steps covering max_tokens."""
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    if max_tokens <= 0 or num_splits <= 1:
        return 1, max(max_tokens, 1)
    per = -(-max_tokens // num_splits)
    per = -(-per // step) * step
    return -(-max_tokens // per), per


def split_plan(
    plan: DecodePlan, q: Any, k_cache: Any, block_tables: Any, num_splits: int | None = None
) -> tuple[int, int]:
    """(splits, positions per split) a call with these arrays launches (num_splits None: the auto rule)."""
    max_tokens = int(block_tables.shape[1]) * int(k_cache.shape[1])
    if num_splits is None:
        num_splits = choose_num_splits(q.shape[0] * k_cache.shape[2], max_tokens, sm_count(q), plan)
    return split_layout(num_splits, max_tokens, plan.tokens_per_step)


def _reduction_shape(lanes: int, unroll: int, rows: int) -> tuple[int, int, int, int]:
    """(halving steps, values per lane after them, lanes holding each value, log2 lanes)."""
    log_lanes = lanes.bit_length() - 1
    halvings = min(log_lanes, (unroll * rows).bit_length() - 1)
    return halvings, (unroll * rows) >> halvings, lanes >> halvings, log_lanes


@functools.cache
def _decode_kernel(
    head_dim: int,
    block_size: int,
    vec: int,
    lanes: int,
    packs: int,
    warps: int,
    unroll: int,
    rows: int,
    per: int,
):
    """The decode kernel for one layout; `per` = storage elements per 32-bit word (2: packed float16)."""
    items = vec * packs
    tpw = WARP // lanes  # token groups per warp
    slots = warps * tpw  # token groups per CTA: partial softmax states merged at the end
    threads = warps * WARP
    log_bs = block_size.bit_length() - 1
    bs_mask = block_size - 1
    nq = rows * items
    wpt = items // per  # words per token and lane
    nw = unroll * wpt
    nv = unroll * rows  # score values per lane before the reduce-scatter
    halvings, nf, dup, log_lanes = _reduction_shape(lanes, unroll, rows)
    log_u = unroll.bit_length() - 1
    step = warps * tpw * unroll
    row_vecs = head_dim // vec  # output vectors per row (vec divides head_dim)
    pvec = min(vec, 4)  # float32 partial stores: at most 16 bytes
    n_state = slots * rows
    n_acc = slots * rows * head_dim

    @jit_kernel(threads)
    def paged_attention_decode(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        kv_heads,
        group,
        q_len,
        max_blocks,
        num_splits,
        split_tokens,
        scale_log2,
    ):
        s_acc = cuda.shared.array(n_acc, float32)
        s_m = cuda.shared.array(n_state, float32)
        s_l = cuda.shared.array(n_state, float32)
        qr = cuda.local.array(nq, float32)  # q rows of the pass, this lane's slice, pre-scaled
        acc = cuda.local.array(nq, float32)
        kw = cuda.local.array(nw, uint32)  # this step's K / V, raw storage bits
        vw = cuda.local.array(nw, uint32)
        nkw = cuda.local.array(nw, uint32)  # the next step's, in flight while this one computes
        nvw = cuda.local.array(nw, uint32)
        ad = cuda.local.array(unroll, int64)  # row offsets of the next step's tokens (-1: none)
        kf = cuda.local.array(items, float32)
        sv = cuda.local.array(nv, float32)  # partial dot products, then the owned scores
        al = cuda.local.array(rows, float32)
        mo = cuda.local.array(nf, float32)  # running max of each owned score's row
        lo = cuda.local.array(nf, float32)  # this lane's part of that row's sum
        po = cuda.local.array(nf, float32)  # owned probabilities / rescale factors
        # per owned score: the last step base at which its token is visible (its row's last position, capped
        # by the split's end, less the token's offset within a step)
        lim = cuda.local.array(nf, int64)
        ob = cuda.local.array(vec, float32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        sub = lane % lanes
        grp = lane // lanes
        slot = warp * tpw + grp
        pair = cuda.blockIdx.x // num_splits
        split = cuda.blockIdx.x - pair * num_splits
        seq = pair // kv_heads
        h = pair - seq * kv_heads
        ctx = max(int64(context_lens[seq]), int64(0))
        start = int64(split) * split_tokens
        end = min(ctx, start + split_tokens)
        nrows = group * q_len
        q_heads = kv_heads * group
        tok_stride = int64(kv_heads) * head_dim  # elements between consecutive tokens of a block
        table = int64(seq) * max_blocks
        # the first score value this lane owns after the reduce-scatter; the lane works on its values in
        # the order v ^ vbase (q rows and tokens permuted once), so every halving keeps the lower half
        vbase = (sub // dup) * nf
        mu = vbase // rows  # token slot u holds token u ^ mu
        mr = vbase - mu * rows  # q slot r holds row r ^ mr
        xs = cuda.local.array(unroll, int64)  # shuffle lane masks of the token slots' owners
        for u in range(unroll):
            xs[u] = sub ^ ((u ^ mu) * (rows // nf) * dup)
        for r0 in range(0, nrows, rows):
            for r in range(rows):
                rr = r0 + (r ^ mr)
                t = rr // group
                qbase = ((int64(seq) * q_len + t) * q_heads + h * group + rr - t * group) * head_dim
                for p in range(packs):
                    c = (p * lanes + sub) * vec
                    if rr < nrows and c < head_dim:
                        load_vec(q, qbase + c, qr, r * items + p * vec, vec)
                        for i in range(vec):
                            qr[r * items + p * vec + i] *= scale_log2
                    else:
                        for i in range(vec):
                            qr[r * items + p * vec + i] = float32(0)
                for i in range(items):
                    acc[r * items + i] = float32(0)
            for j in range(nf):
                v = vbase + j
                rr = r0 + v % rows
                last = min(ctx - q_len + rr // group, end - 1) if rr < nrows else int64(-1)
                lim[j] = last - (((v // rows) * warps + warp) * tpw + grp)
                mo[j] = NEG_INF
                lo[j] = float32(0)
            # block rows of the first step
            for u in range(unroll):
                tok = start + ((u ^ mu) * warps + warp) * tpw + grp
                ad[u] = int64(-1)
                if tok < end:
                    blk = int64(block_tables[uint64(table + (tok >> log_bs))])  # unsigned: no wraparound code
                    ad[u] = (blk * block_size + (tok & bs_mask)) * tok_stride + h * head_dim
            # iteration `base` loads step base + step and computes step base (the first only loads)
            for base in range(start - step, end, step):
                for u in range(unroll):
                    for p in range(packs):
                        c = (p * lanes + sub) * vec
                        e = u * items + p * vec
                        if ad[u] >= 0 and c < head_dim:
                            load_words(k_cache, ad[u] + c, nkw, e, vec)
                            load_words(v_cache, ad[u] + c, nvw, e, vec)
                        else:
                            for i in range(vec // per):
                                nkw[e // per + i] = uint32(0)
                                nvw[e // per + i] = uint32(0)
                # block rows two steps ahead (used by the next iteration's loads)
                for u in range(unroll):
                    tok = base + 2 * step + ((u ^ mu) * warps + warp) * tpw + grp
                    ad[u] = int64(-1)
                    if tok < end:
                        blk = int64(
                            block_tables[uint64(table + (tok >> log_bs))]
                        )  # unsigned: no wraparound code
                        ad[u] = (blk * block_size + (tok & bs_mask)) * tok_stride + h * head_dim
                if base >= start:
                    # partial dot products of every (token, row)
                    for u in range(unroll):
                        for i in range(items):
                            kf[i] = word_get(kw, u * items + i, k_cache, vec)
                        for r in range(rows):
                            d = float32(0)
                            for i in range(items):
                                d += qr[r * items + i] * kf[i]
                            sv[u * rows + r] = d
                    # reduce-scatter: keep the lower half (this lane's values, by the permutation), send the
                    # upper half to lane ^ o (whose lower half it is)
                    for k in range(halvings):
                        o = lanes >> (k + 1)
                        half = nv >> (k + 1)
                        for j in range(half):
                            sv[j] += cuda.shfl_xor_sync(FULL_MASK, sv[j + half], o)
                    for k in range(halvings, log_lanes):
                        o = lanes >> (k + 1)
                        for j in range(nf):
                            sv[j] += cuda.shfl_xor_sync(FULL_MASK, sv[j], o)
                    # owned scores: mask, the step's max over its tokens, lazy rescale of the row
                    for j in range(nf):
                        s = sv[j] if base <= lim[j] else NEG_INF
                        sv[j] = s
                        cm = s
                        for k in range(log_u):
                            cm = max(cm, cuda.shfl_xor_sync(FULL_MASK, cm, lanes >> (k + 1)))
                        alpha = float32(1)
                        if cm > mo[j] + RESCALE_LOG2:
                            alpha = math.exp2(mo[j] - cm)  # 0 on the row's first visible key
                            lo[j] *= alpha
                            mo[j] = cm
                        po[j] = alpha
                    amin = float32(1)
                    for r in range(rows):  # row r's factor from its owner (the u = 0 value r)
                        al[r] = cuda.shfl_xor_sync(FULL_MASK, po[r % nf], sub ^ ((r // nf) * dup))
                        amin = min(amin, al[r])
                    if amin < float32(1):
                        for r in range(rows):
                            for i in range(items):
                                acc[r * items + i] *= al[r]
                    for j in range(nf):
                        pr = float32(0)
                        if sv[j] != NEG_INF:
                            pr = math.exp2(sv[j] - mo[j])
                        lo[j] += pr
                        po[j] = pr
                    # P V: each (token, row) probability from its owner
                    for u in range(unroll):
                        for i in range(items):
                            kf[i] = word_get(vw, u * items + i, v_cache, vec)
                        for r in range(rows):  # slot u, row r: value (u ^ mu) * rows + r
                            pv = cuda.shfl_xor_sync(FULL_MASK, po[r % nf], xs[u] ^ ((r // nf) * dup))
                            for i in range(items):
                                acc[r * items + i] += pv * kf[i]
                for i in range(nw):
                    kw[i] = nkw[i]
                    vw[i] = nvw[i]
            # merge the token groups' states through shared memory
            for j in range(nf):
                lt = lo[j]
                for k in range(log_u):  # the row's sum over the step's tokens' owners
                    lt += cuda.shfl_xor_sync(FULL_MASK, lt, lanes >> (k + 1))
                v = vbase + j
                if v < rows and sub % dup == 0:
                    s_m[slot * rows + v] = mo[j]
                    s_l[slot * rows + v] = lt
            for r in range(rows):
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
                    orow = (int64(seq) * q_len + t) * q_heads + h * group + rr - t * group
                    if num_splits == 1:
                        store_vec(out, orow * head_dim + c, ob, 0, vec)
                    else:
                        prow = orow * num_splits + split
                        for i in range(0, vec, pvec):
                            store_vec(part_out, prow * head_dim + c + i, ob, i, pvec)
                        if c == 0:
                            part_lse[prow] = mx + math.log2(den) if mx != NEG_INF else NEG_INF
            cuda.syncthreads()  # the next pass rewrites the shared state

    return paged_attention_decode


@functools.cache
def _combine_kernel(head_dim: int, vec: int, warps: int = COMBINE_WARPS):
    """One warp per output row: out = sum_i 2^(lse_i - L) part_i / sum_i 2^(lse_i - L), L = max_i lse_i."""
    threads = warps * WARP

    @jit_kernel(threads)
    def paged_attention_combine(part_out, part_lse, out, n_rows, num_splits):
        buf = cuda.local.array(vec, float32)
        ob = cuda.local.array(vec, float32)
        lane = cuda.threadIdx.x % WARP
        row = int64(cuda.blockIdx.x) * warps + cuda.threadIdx.x // WARP
        if row < n_rows:
            lbase = row * num_splits
            mx = NEG_INF
            for i in range(num_splits):
                mx = max(mx, part_lse[lbase + i])
            for c in range(lane * vec, head_dim, WARP * vec):
                for k in range(vec):
                    ob[k] = float32(0)
                if mx != NEG_INF:
                    den = float32(0)
                    for i in range(num_splits):
                        w = math.exp2(part_lse[lbase + i] - mx)  # a split without keys: 0
                        den += w
                        load_vec(part_out, (lbase + i) * head_dim + c, buf, 0, vec)
                        for k in range(vec):
                            ob[k] += w * buf[k]
                    inv = float32(1) / den
                    for k in range(vec):
                        ob[k] *= inv
                store_vec(out, row * head_dim + c, ob, 0, vec)

    return paged_attention_combine


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


def _check_plan(plan: DecodePlan, head_dim: int) -> None:
    def pow2(n: int) -> bool:
        return n >= 1 and not n & (n - 1)

    if head_dim % plan.vec:
        raise ValueError(f"paged_attention_forward: vec {plan.vec} does not divide head_dim {head_dim}")
    if not (pow2(plan.lanes) and plan.lanes <= WARP and pow2(plan.unroll) and plan.unroll <= plan.lanes):
        raise ValueError(f"paged_attention_forward: {plan}: lanes and unroll powers of two, unroll <= lanes")
    if not pow2(plan.rows) or plan.lanes * plan.packs * plan.vec < head_dim:
        raise ValueError(f"paged_attention_forward: {plan}: rows a power of two, lanes covering head_dim")


def run_forward(
    plan: DecodePlan,
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_tables: Any,
    context_lens: Any,
    out: Any,
    scale,
    num_splits: int | None = None,
) -> None:
    """`paged_attention_forward` with an explicit layout (tests use small ones for the simulator)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    num_seqs, q_len, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_seqs == 0 or q_len == 0 or q_heads == 0 or head_dim == 0:
        return
    _check_plan(plan, head_dim)
    splits, split_tokens = split_plan(plan, q, k_cache, block_tables, num_splits)
    per = per_word(q.dtype, plan.vec)
    kernel = _decode_kernel(
        head_dim, block_size, plan.vec, plan.lanes, plan.packs, plan.warps, plan.unroll, plan.rows, per
    )
    stream = current_stream(q)
    if splits > 1:
        part_out = device_array_like(q, (num_seqs, q_len, q_heads, splits, head_dim), np.float32)
        part_lse = device_array_like(q, (num_seqs, q_len, q_heads, splits), np.float32)
    else:  # not read: the kernel writes `out` directly
        part_out = part_lse = device_array_like(q, (1,), np.float32)
    launch(
        kernel,
        num_seqs * kv_heads * splits,
        plan.threads,
        stream,
        flat(q),
        flat(k_cache),
        flat(v_cache),
        flat(block_tables),
        flat(context_lens),
        flat(out),
        flat(part_out),
        flat(part_lse),
        kv_heads,
        q_heads // kv_heads,
        q_len,
        block_tables.shape[1],
        splits,
        split_tokens,
        float32(float(scale) * LOG2E),
    )
    if splits > 1:
        n_rows = num_seqs * q_len * q_heads
        combine = _combine_kernel(head_dim, min(plan.vec, 4))
        launch(
            combine,
            -(-n_rows // COMBINE_WARPS),
            COMBINE_WARPS * WARP,
            stream,
            flat(part_out),
            flat(part_lse),
            flat(out),
            n_rows,
            splits,
        )


def paged_attention_forward(
    q, k_cache, v_cache, block_tables, context_lens, out, scale, num_splits: int | None = None
) -> None:
    """Decode attention of new query tokens over a paged KV cache; writes `out` in place.

    Parameters
    ----------
    q, out : (num_seqs, q_len, q_heads, head_dim) C-contiguous float16/float32 device arrays.
    k_cache, v_cache : (num_blocks, block_size, kv_heads, head_dim), same dtype; kv_heads divides q_heads.
    block_tables : int32 (num_seqs, max_blocks_per_seq); entries past ceil(context_lens[s] / block_size)
        are never read.
    context_lens : int32 (num_seqs,), tokens in the cache per sequence including the q_len new ones.
    scale : float, the factor on q . k.
    num_splits : split-KV count (None: the auto rule of the module docstring; 1: one pass, no combine).

    Query token t of sequence s sits at position context_lens[s] - q_len + t and sees cache positions 0 up
    to it: out = softmax(scale * q K^T) V over those; a sequence with context 0 gets zeros.
    """
    run_forward(
        forward_plan(q, k_cache, v_cache, out),
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        num_splits,
    )
