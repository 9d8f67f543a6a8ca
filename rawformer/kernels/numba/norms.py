"""Numba CUDA layer norm and RMS norm, forward (optionally fused with a residual add) and backward.

Formulas (per row of h = x (+ residual), n = cols):
    layer norm  mean = sum(h) / n, rstd = 1 / sqrt(sum((h - mean)^2) / n + eps), y = (h - mean) * rstd * w + b
    rms norm    rstd = 1 / sqrt(sum(h^2) / n + eps),                                y = h * rstd * w
    backward    xhat = (x - mean) * rstd (mean = 0 for rms),  g = dy * w
                dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (rms: without the mean(g) term)
                dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
With a residual, h is written out (rounded to the storage dtype) and that rounded h, read back from h, is what
gets normalised, exactly as an unfused add followed by the norm (and as the CUDA kernels do). The variance is
never E[h^2] - mean^2: it is two-pass over registers, or (looped rows) Chan's combination of exact
per-batch statistics.

Forward kernels (layout in `RowPlan`, _numba.py):
  regs  the row in registers as packed storage words (`load_words` / `word_get`: two float16 per register),
        one read of x (+ residual), one write of y (+ h), every load of the row issued first. A group of
        <= 32 lanes per row for up to 32 words per lane (2048 float16 / 1024 float32 columns), else a block
        per row: 128, 256 or 512 threads of 16 words, then 512 threads of 32 words (32768 float16 / 16384
        float32 columns). With a residual, x and the residual are held together, so half of each budget
        each, plus 1024 threads of 16 + 16 words (32768 float16). Block kernels are capped at 64 registers
        (two 512-thread rows per SM).
  loop  longer rows: one block of 512 threads per row (two per SM), in batches per thread loaded before use
        (4 vectors: 32 float16 / 16 float32; 16 elements each of x and residual with a residual).
        Layer norm: pass 1 keeps per thread the plain sum (for the mean) and Chan's running (count, mean,
        M2), merged with each batch's exact two-pass statistics; the block then sums M2_t + n_t (mean_t -
        mean)^2, so the row is read twice (statistics, output), not three times. RMS: sum of squares, output.
Backward kernels:
  regs  rows up to 1024 threads x 8 elements (8192 columns at 16-byte vectors): a group of `group` threads
        per row (a power of two: lanes of a warp or whole warps), several groups per 512-thread block; the
        grid is one wave (two blocks per SM, 64-register cap) and each group strides over the rows. x and dy
        stay packed in registers (x-hat and g are derived again for dx after the reduction, which costs
        fewer registers than keeping them); c1 = mean(g), c2 = mean(g * xhat) are reduced together (one
        round of barriers). A thread owns the same columns in every row, so its dweight / dbias sums stay in
        registers; at the end the block's groups add theirs in shared memory in a fixed order and the block
        writes one float32 partial row: partials (grid, cols). Reads x and dy once, writes dx once.
  cols  longer rows (CUDA v4's scheme): `norm_backward_stats` (a block of 512 threads per row, batches of
        16 elements) writes c1, c2 per row; then `norm_backward_cols`, grid (column vectors / 256, slabs):
        thread j owns one column vector and walks a slab of rows (16 elements each of x and dy in flight),
        writing dx and keeping dweight / dbias in registers, one partial row per slab. The slab count fills
        one wave (four 256-thread blocks per SM). Reads x and dy twice, all coalesced.
  reduce_partials: dweight and dbias = column sums of the partial rows in one launch, 32 columns x 16
        slices per block, 4 loads in flight per thread, slices combined in a fixed order: deterministic,
        bit-identical run to run (no atomics).
Loads and stores are 16 bytes wide where cols and the pointers allow (`load_vec` / `store_vec`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from rawformer.kernels.numba._numba import (
    RowPlan,
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
    make_group_reducers,
    make_pair_reducer,
    min_blocks,
    next_pow2,
    per_word,
    plan_rows,
    sm_count,
    store_vec,
    uint32,
    vec_width,
    word_get,
)

# Forward register budgets, in 32-bit words of the packed row per thread (x2 elements for float16 vectors):
# warp groups, then (threads per row, words per thread) block tiers in rising capacity. With a residual,
# x and the residual are both held until h is formed, so each gets half.
FORWARD_WARP_WORDS = 32
FORWARD_BLOCK_TIERS = ((128, 16), (256, 16), (512, 16), (512, 32))
FORWARD_RES_WARP_WORDS = 16
FORWARD_RES_BLOCK_TIERS = ((128, 8), (256, 8), (512, 8), (512, 16), (1024, 16))
BATCH = 16  # elements per thread loaded before they are used, in the looped and column kernels
# Backward: packed x and dy plus two float32 accumulators per element, 8 elements per thread (<= 64
# registers with the rest).
BACKWARD_ITEMS = 8
BACKWARD_BLOCK = 512  # threads per block of the fused backward (several row groups when rows are short)
BACKWARD_MAX_GROUP = 1024
STATS_THREADS = 512  # block per row of norm_backward_stats
COL_THREADS = 256  # block of norm_backward_cols
COL_BLOCKS_PER_SM = 4
REDUCE_COLS, REDUCE_SLICES, REDUCE_UNROLL = 32, 16, 4


def _batch_vectors(vec: int) -> int:
    """Vectors of `vec` elements per thread per batch: BATCH elements."""
    return max(1, BATCH // vec)


def _loop_vectors(vec: int) -> int:
    """Vectors per batch of the looped forward without a residual: at least 4 loads in flight (32 float16
    elements of 16-byte vectors; the registers allow it when there is no residual to load beside x)."""
    return max(4, BATCH // vec)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _forward_regs(
    group: int, block: int, vec: int, packs: int, per: int, rms: bool, has_res: bool, min_blk: int = 1
):
    items = vec * packs
    nwords = items // per
    rows_per_block = block // group
    group_sum, _ = make_group_reducers(group, block)

    @jit_kernel(block, min_blk)
    def norm_forward_regs(x, res, w, b, y, h, mean_out, rstd_out, rows, cols, eps):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        xw = cuda.local.array(nwords, uint32)  # the row, packed as stored (two float16 per word)
        rw = cuda.local.array(nwords if has_res else 1, uint32)  # the residual, packed
        tmp = cuda.local.array(vec, float32)
        tmp2 = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        row = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.x // group
        valid = row < rows  # threads past the last row still join the reductions
        base = int64(row) * cols
        # every load of the row first: a store to h may alias x for all the compiler knows, so a load
        # placed after one would wait for it
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                load_words(x, base + c, xw, p * vec, vec)
                if has_res:
                    load_words(res, base + c, rw, p * vec, vec)
        if has_res:
            for p in range(packs):
                c = (p * group + t) * vec
                if valid and c < cols:
                    for k in range(vec):
                        tmp[k] = word_get(xw, p * vec + k, x, vec) + word_get(rw, p * vec + k, res, vec)
                    store_vec(h, base + c, tmp, 0, vec)
                    load_words(h, base + c, xw, p * vec, vec)  # normalise h as stored (rounded), as unfused
        s = float32(0)
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                for k in range(vec):
                    v = word_get(xw, p * vec + k, x, vec)
                    s += v * v if rms else v
        s = group_sum(s, scratch)
        mu = float32(0)
        if rms:
            var = s / ncols
        else:
            mu = s / ncols
            ss = float32(0)
            for p in range(packs):
                c = (p * group + t) * vec
                if valid and c < cols:  # padding must not add (0 - mean)^2
                    for k in range(vec):
                        d = word_get(xw, p * vec + k, x, vec) - mu
                        ss += d * d
            var = group_sum(ss, scratch) / ncols
        r = float32(1) / math.sqrt(var + eps)
        if valid and t == 0:
            if not rms:
                mean_out[row] = mu
            rstd_out[row] = r
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                load_vec(w, c, tmp, 0, vec)
                if not rms:
                    load_vec(b, c, tmp2, 0, vec)
                for k in range(vec):
                    v = (word_get(xw, p * vec + k, x, vec) - mu) * r * tmp[k]
                    if not rms:
                        v += tmp2[k]
                    tmp[k] = v
                store_vec(y, base + c, tmp, 0, vec)

    return norm_forward_regs


@functools.cache
def _forward_loop(block: int, vec: int, rms: bool, has_res: bool):
    group_sum, _ = make_group_reducers(block, block)
    nb = _batch_vectors(vec) if has_res else _loop_vectors(vec)  # vectors per thread per batch
    step = block * vec
    batch = nb * vec

    @jit_kernel(block, max(1, 1024 // block))
    def norm_forward_loop(x, res, w, b, y, h, mean_out, rstd_out, rows, cols, eps):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        v = cuda.local.array(batch, float32)
        tmp = cuda.local.array(batch, float32)
        row = cuda.blockIdx.x
        base = int64(row) * cols
        src = h if has_res else x  # what is normalised (this thread wrote its part of h in pass 1)
        # pass 1: s = sum (layer norm) or sum of squares (rms); layer norm also (n_t, mean_t, m2_t), Chan's
        # running statistics of this thread's elements, merged batch by batch
        s = float32(0)
        n_t = float32(0)
        mean_t = float32(0)
        m2_t = float32(0)
        c0 = cuda.threadIdx.x * vec
        while c0 < cols:
            for u in range(nb):  # the batch's loads before any use
                c = c0 + u * step
                if c < cols:
                    load_vec(x, base + c, v, u * vec, vec)
                    if has_res:
                        load_vec(res, base + c, tmp, u * vec, vec)
            if has_res:
                for u in range(nb):
                    c = c0 + u * step
                    if c < cols:
                        for k in range(vec):
                            v[u * vec + k] += tmp[u * vec + k]
                        store_vec(h, base + c, v, u * vec, vec)
                        load_vec(h, base + c, v, u * vec, vec)  # normalise h as stored (rounded), as unfused
            bs = float32(0)
            cnt = float32(0)
            for u in range(nb):
                if c0 + u * step < cols:
                    cnt += float32(vec)
                    for k in range(vec):
                        e = v[u * vec + k]
                        bs += e * e if rms else e
            s += bs
            if not rms:
                bm = bs / cnt
                bq = float32(0)
                for u in range(nb):
                    if c0 + u * step < cols:
                        for k in range(vec):
                            d = v[u * vec + k] - bm
                            bq += d * d
                total = n_t + cnt
                d = bm - mean_t
                f = cnt / total
                mean_t += d * f
                m2_t += bq + d * d * n_t * f
                n_t = total
            c0 += nb * step
        s = group_sum(s, scratch)
        mu = float32(0)
        if rms:
            var = s / ncols
        else:
            mu = s / ncols
            d = mean_t - mu
            var = group_sum(m2_t + n_t * d * d, scratch) / ncols
        r = float32(1) / math.sqrt(var + eps)
        if cuda.threadIdx.x == 0:
            if not rms:
                mean_out[row] = mu
            rstd_out[row] = r
        # pass 2: normalise and write
        c0 = cuda.threadIdx.x * vec
        while c0 < cols:
            for u in range(nb):
                c = c0 + u * step
                if c < cols:
                    load_vec(src, base + c, v, u * vec, vec)
            for u in range(nb):
                c = c0 + u * step
                if c < cols:
                    load_vec(w, c, tmp, 0, vec)
                    for k in range(vec):
                        v[u * vec + k] = (v[u * vec + k] - mu) * r * tmp[k]
                    if not rms:
                        load_vec(b, c, tmp, 0, vec)
                        for k in range(vec):
                            v[u * vec + k] += tmp[k]
                    store_vec(y, base + c, v, u * vec, vec)
            c0 += nb * step

    return norm_forward_loop


def forward_plan(x: Any, residual: Any, weight: Any, bias: Any, y: Any, h: Any) -> RowPlan:
    """The layout the norm forward launchers use for these arrays."""
    cols = x.shape[1]
    vec = vec_width((cols,), x, residual, weight, bias, y, h)
    per = per_word(x.dtype, vec)
    warp_words, block_tiers = (
        (FORWARD_WARP_WORDS, FORWARD_BLOCK_TIERS)
        if residual is None
        else (FORWARD_RES_WARP_WORDS, FORWARD_RES_BLOCK_TIERS)
    )
    tiers = tuple((threads, words * per) for threads, words in block_tiers)
    return plan_rows(cols, vec, warp_words * per, tiers)


def run_forward(plan: RowPlan, x, residual, weight, bias, y, h, mean, rstd, eps) -> None:
    """Layer norm (mean given) or RMS norm (mean None) forward with an explicit layout."""
    rows, cols = x.shape
    rms = mean is None
    if rows == 0:
        return
    if cols == 0:  # an empty row has no mean or variance (NumPy gives NaN too)
        if mean is not None:
            mean[...] = np.nan
        rstd[...] = np.nan
        return
    has_res = residual is not None
    # Absent arrays get typed placeholders that the kernel never touches: inputs stand in for absent inputs
    # and for h; the absent mean is a scratch array (never an alias of an output: the simulator copies
    # every argument back after the kernel, and an aliased copy would overwrite the result)
    args = (
        flat(x),
        flat(residual if has_res else x),
        flat(weight),
        flat(weight if rms else bias),
        flat(y),
        flat(h if has_res else x),
        flat(device_array_like(x, (1,), np.float32) if rms else mean),
        flat(rstd),
        rows,
        cols,
        float32(eps),
    )
    stream = current_stream(x)
    if plan.mode == "regs":
        per = per_word(x.dtype, plan.vec)
        kernel = _forward_regs(
            plan.group, plan.block, plan.vec, plan.packs, per, rms, has_res, min_blocks(plan)
        )
        launch(kernel, -(-rows // plan.rows_per_block), plan.block, stream, *args)
    else:
        launch(_forward_loop(plan.block, plan.vec, rms, has_res), rows, plan.block, stream, *args)


def layer_norm_forward(x, residual, weight, bias, y, h, mean, rstd, eps) -> None:
    """Layer norm over the last axis, optionally of h = x + residual.

    Parameters
    ----------
    x, y : (rows, cols) C-contiguous float16/float32 device arrays; y is written.
    residual, h : None, or (rows, cols) arrays: h = x + residual is written and normalised.
    weight, bias : (cols,) arrays.
    mean, rstd : (rows,) float32 arrays, written.
    eps : float.
    """
    plan = forward_plan(x, residual, weight, bias, y, h)
    run_forward(plan, x, residual, weight, bias, y, h, mean, rstd, eps)


def rms_norm_forward(x, residual, weight, y, h, rstd, eps) -> None:
    """RMS norm over the last axis: y = h * rsqrt(mean(h^2) + eps) * weight, h = x (+ residual).

    Shapes as `layer_norm_forward`; rstd is the (rows,) float32 output.
    """
    plan = forward_plan(x, residual, weight, None, y, h)
    run_forward(plan, x, residual, weight, None, y, h, None, rstd, eps)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _backward_regs(group: int, block: int, vec: int, packs: int, per: int, rms: bool):
    items = vec * packs
    nwords = items // per
    rows_per_block = block // group
    width = group * items  # the columns a group covers (>= cols)
    combine = rows_per_block * width if rows_per_block > 1 else 1  # shared floats for the group sums
    pvec = min(vec, 4)  # float32 partials: at most 4 per 16-byte store
    group_sum2 = make_pair_reducer(group, block)

    @jit_kernel(block, max(1, 1024 // block))
    def norm_backward_regs(dy, x, w, mean, rstd, dx, part_w, part_b, rows, cols, iters):
        scratch = cuda.shared.array(64, float32)
        sums = cuda.shared.array(combine, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        xw = cuda.local.array(nwords, uint32)  # x and dy packed as stored (two float16 per word)
        gw = cuda.local.array(nwords, uint32)
        dw = cuda.local.array(items, float32)
        db = cuda.local.array(items, float32)
        wv = cuda.local.array(vec, float32)
        out = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        local_group = cuda.threadIdx.x // group
        ngroups = cuda.gridDim.x * rows_per_block
        for i in range(items):
            dw[i] = float32(0)
            db[i] = float32(0)
        # `iters` is the same for every thread, so the shuffles and barriers below run uniformly
        for it in range(iters):
            row = cuda.blockIdx.x * rows_per_block + local_group + it * ngroups
            valid = row < rows
            base = int64(row) * cols
            mu = float32(0)
            r = float32(0)
            if valid:
                if not rms:
                    mu = mean[row]
                r = rstd[row]
            for p in range(packs):  # the row's loads first
                c = (p * group + t) * vec
                if valid and c < cols:
                    load_words(x, base + c, xw, p * vec, vec)
                    load_words(dy, base + c, gw, p * vec, vec)
            a1 = float32(0)  # sum of g
            a2 = float32(0)  # sum of g * xhat
            for p in range(packs):
                c = (p * group + t) * vec
                if valid and c < cols:
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        i = p * vec + k
                        xh = (word_get(xw, i, x, vec) - mu) * r
                        d = word_get(gw, i, dy, vec)
                        dw[i] += d * xh
                        db[i] += d
                        g = d * wv[k]
                        a1 += g
                        a2 += g * xh
            a1, a2 = group_sum2(a1, a2, scratch)
            c1 = float32(0) if rms else a1 / ncols
            c2 = a2 / ncols
            for p in range(
                packs
            ):  # x-hat and g again from the packed row (fewer registers than keeping them)
                c = (p * group + t) * vec
                if valid and c < cols:
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        i = p * vec + k
                        xh = (word_get(xw, i, x, vec) - mu) * r
                        g = word_get(gw, i, dy, vec) * wv[k]
                        out[k] = r * (g - c1 - xh * c2)
                    store_vec(dx, base + c, out, 0, vec)
        # this block's partial row
        pbase = int64(cuda.blockIdx.x) * cols
        if rows_per_block == 1:  # each column has one owner thread: straight from registers
            for p in range(packs):
                c = (p * group + t) * vec
                if c < cols:
                    for q in range(0, vec, pvec):
                        store_vec(part_w, pbase + c + q, dw, p * vec + q, pvec)
                        if not rms:
                            store_vec(part_b, pbase + c + q, db, p * vec + q, pvec)
        else:  # the groups' sums meet in shared memory, added in group order (fixed: deterministic)
            for which in range(1 if rms else 2):
                cuda.syncthreads()  # earlier readers of `sums` are done
                for i in range(items):
                    sums[local_group * width + ((i // vec) * group + t) * vec + i % vec] = (
                        dw[i] if which == 0 else db[i]
                    )
                cuda.syncthreads()
                c = cuda.threadIdx.x
                while c < cols:
                    total = float32(0)
                    for j in range(rows_per_block):
                        total += sums[j * width + c]
                    if which == 0:
                        part_w[pbase + c] = total
                    else:
                        part_b[pbase + c] = total
                    c += block

    return norm_backward_regs


@functools.cache
def _backward_stats(block: int, vec: int, rms: bool):
    """c1 = mean(g), c2 = mean(g * xhat) of every row into consts (rows, 2): a block per row."""
    group_sum2 = make_pair_reducer(block, block)
    nb = _batch_vectors(vec)
    step = block * vec
    batch = nb * vec

    @jit_kernel(block, max(1, 1024 // block))
    def norm_backward_stats(dy, x, w, mean, rstd, consts, rows, cols):
        scratch = cuda.shared.array(64, float32)
        ncols = float32(cols)
        xv = cuda.local.array(batch, float32)
        gv = cuda.local.array(batch, float32)
        wv = cuda.local.array(vec, float32)
        row = cuda.blockIdx.x
        base = int64(row) * cols
        mu = float32(0) if rms else mean[row]
        r = rstd[row]
        a1 = float32(0)
        a2 = float32(0)
        c0 = cuda.threadIdx.x * vec
        while c0 < cols:
            for u in range(nb):
                c = c0 + u * step
                if c < cols:
                    load_vec(x, base + c, xv, u * vec, vec)
                    load_vec(dy, base + c, gv, u * vec, vec)
            for u in range(nb):
                c = c0 + u * step
                if c < cols:
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        g = gv[u * vec + k] * wv[k]
                        a1 += g
                        a2 += g * (xv[u * vec + k] - mu) * r
            c0 += nb * step
        a1, a2 = group_sum2(a1, a2, scratch)
        if cuda.threadIdx.x == 0:
            consts[2 * row] = float32(0) if rms else a1 / ncols
            consts[2 * row + 1] = a2 / ncols

    return norm_backward_stats


@functools.cache
def _backward_cols(block: int, vec: int, per: int, rms: bool):
    """dx and the dweight / dbias partials of one slab of rows for one column vector per thread."""
    nr = _batch_vectors(vec)  # rows in flight per thread
    nwords = nr * vec // per
    pvec = min(vec, 4)

    @jit_kernel(block, COL_BLOCKS_PER_SM)
    def norm_backward_cols(dy, x, w, mean, rstd, consts, dx, part_w, part_b, rows, cols, rows_per_part):
        xw = cuda.local.array(nwords, uint32)  # nr rows of x and dy, packed as stored
        gw = cuda.local.array(nwords, uint32)
        wv = cuda.local.array(vec, float32)
        dw = cuda.local.array(vec, float32)
        db = cuda.local.array(vec, float32)
        out = cuda.local.array(vec, float32)
        c = (cuda.blockIdx.x * block + cuda.threadIdx.x) * vec
        if c >= cols:  # no barriers in this kernel: threads past the row may leave
            return
        r0 = int64(cuda.blockIdx.y) * rows_per_part
        r1 = min(int64(rows), r0 + rows_per_part)
        load_vec(w, c, wv, 0, vec)
        for k in range(vec):
            dw[k] = float32(0)
            db[k] = float32(0)
        row0 = r0
        while row0 < r1:
            for u in range(nr):  # nr rows' loads before any use
                if row0 + u < r1:
                    base = (row0 + u) * cols + c
                    load_words(x, base, xw, u * vec, vec)
                    load_words(dy, base, gw, u * vec, vec)
            for u in range(nr):
                row = row0 + u
                if row < r1:
                    mu = float32(0) if rms else mean[row]
                    r = rstd[row]
                    c1 = consts[2 * row]
                    c2 = consts[2 * row + 1]
                    for k in range(vec):
                        xh = (word_get(xw, u * vec + k, x, vec) - mu) * r
                        d = word_get(gw, u * vec + k, dy, vec)
                        dw[k] += d * xh
                        db[k] += d
                        out[k] = r * (d * wv[k] - c1 - xh * c2)
                    store_vec(dx, row * cols + c, out, 0, vec)
            row0 += nr
        pbase = int64(cuda.blockIdx.y) * cols + c
        for q in range(0, vec, pvec):
            store_vec(part_w, pbase + q, dw, q, pvec)
            if not rms:
                store_vec(part_b, pbase + q, db, q, pvec)

    return norm_backward_cols


@functools.cache
def _reduce_partials(both: bool, ncols: int = REDUCE_COLS, slices: int = REDUCE_SLICES):
    """Column sums of one or two (parts, cols) float32 arrays: a block per `ncols` columns, `slices` threads
    per column each summing every slices-th partial row, REDUCE_UNROLL loads in flight per thread."""
    threads = ncols * slices
    span = slices * REDUCE_UNROLL

    @jit_kernel(threads)
    def reduce_partials(part_w, part_b, out_w, out_b, nparts, cols):
        sw = cuda.shared.array(threads, float32)
        sb = cuda.shared.array(threads, float32)
        aw = cuda.local.array(REDUCE_UNROLL, float32)
        ab = cuda.local.array(REDUCE_UNROLL, float32)
        tx = cuda.threadIdx.x % ncols
        ty = cuda.threadIdx.x // ncols
        col = cuda.blockIdx.x * ncols + tx
        for u in range(REDUCE_UNROLL):
            aw[u] = float32(0)
            ab[u] = float32(0)
        if col < cols:
            p0 = ty
            while p0 < nparts:  # partial rows p0, p0 + slices, ... : REDUCE_UNROLL loads in flight
                for u in range(REDUCE_UNROLL):
                    p = p0 + u * slices
                    if p < nparts:
                        aw[u] += part_w[int64(p) * cols + col]
                        if both:
                            ab[u] += part_b[int64(p) * cols + col]
                p0 += span
        tw = float32(0)
        tb = float32(0)
        for u in range(REDUCE_UNROLL):
            tw += aw[u]
            tb += ab[u]
        sw[cuda.threadIdx.x] = tw
        sb[cuda.threadIdx.x] = tb
        cuda.syncthreads()
        if ty == 0 and col < cols:
            total_w = float32(0)
            total_b = float32(0)
            for s in range(slices):  # a fixed order: the same bits every run
                total_w += sw[s * ncols + tx]
                total_b += sb[s * ncols + tx]
            out_w[col] = total_w
            if both:
                out_b[col] = total_b

    return reduce_partials


def backward_plan(dy: Any, x: Any, weight: Any, dx: Any) -> RowPlan:
    """The layout the norm backward launchers use for these arrays: "regs" with `group` threads per row
    (BACKWARD_ITEMS elements per thread) in blocks of BACKWARD_BLOCK, or "cols" (group = threads of the
    statistics kernel per row, block = threads of the column kernel) past 1024 threads per row."""
    cols = x.shape[1]
    vec = vec_width((cols,), dy, x, weight, dx)
    nvec = -(-cols // vec)
    threads = -(-nvec // max(1, BACKWARD_ITEMS // vec))
    if threads > BACKWARD_MAX_GROUP:
        return RowPlan("cols", STATS_THREADS, COL_THREADS, vec)
    group = next_pow2(threads)
    return RowPlan("regs", group, max(group, BACKWARD_BLOCK), vec, -(-nvec // group))


def _regs_grid(plan: RowPlan, rows: int, x: Any, grid: int | None) -> tuple[int, int]:
    """(blocks, row iterations) of the fused backward: at most one wave (the blocks resident at once, or
    `grid`), then as few blocks as give the same number of iterations (fewer partial rows, same time)."""
    per_block = plan.rows_per_block
    most = sm_count(x) * max(1, 1024 // plan.block) if grid is None else grid
    most = max(1, min(most, -(-rows // per_block)))
    iters = -(-rows // (most * per_block))
    return -(-rows // (iters * per_block)), iters


def run_backward(
    plan: RowPlan, dy, x, weight, mean, rstd, dx, dweight, dbias, grid: int | None = None
) -> None:
    """Layer norm (mean given) or RMS norm (mean None) backward with an explicit layout; `grid` overrides
    the number of partial rows (regs: blocks; cols: row slabs), which tests use to make blocks loop."""
    rows, cols = x.shape
    rms = mean is None
    if cols == 0:
        return
    if rows == 0:  # sums over no rows
        dweight[...] = 0
        if dbias is not None:
            dbias[...] = 0
        return
    stream = current_stream(x)
    head = (flat(dy), flat(x), flat(weight), flat(rstd if rms else mean), flat(rstd))
    if plan.mode == "regs":
        grid, iters = _regs_grid(plan, rows, x, grid)
        parts = grid
        part_w = device_array_like(x, (parts, cols), np.float32)
        part_b = device_array_like(x, (1,) if rms else (parts, cols), np.float32)  # rms: a placeholder
        per = per_word(x.dtype, plan.vec)
        kernel = _backward_regs(plan.group, plan.block, plan.vec, plan.packs, per, rms)
        launch(
            kernel, grid, plan.block, stream, *head, flat(dx), flat(part_w), flat(part_b), rows, cols, iters
        )
    else:
        consts = device_array_like(x, (rows, 2), np.float32)  # (c1, c2) per row
        launch(
            _backward_stats(plan.group, plan.vec, rms),
            rows,
            plan.group,
            stream,
            *head,
            flat(consts),
            rows,
            cols,
        )
        nvec = -(-cols // plan.vec)
        grid_x = -(-nvec // plan.block)  # column blocks
        if grid is None:
            grid = sm_count(x) * COL_BLOCKS_PER_SM // grid_x
        parts = max(1, min(rows, grid))
        rows_per_part = -(-rows // parts)
        parts = -(-rows // rows_per_part)
        part_w = device_array_like(x, (parts, cols), np.float32)
        part_b = device_array_like(x, (1,) if rms else (parts, cols), np.float32)
        kernel = _backward_cols(plan.block, plan.vec, per_word(x.dtype, plan.vec), rms)
        args = (*head, flat(consts), flat(dx), flat(part_w), flat(part_b), rows, cols, rows_per_part)
        launch(kernel, (grid_x, parts), plan.block, stream, *args)
    # rms: a placeholder the kernel does not write (never an alias of dweight: the simulator copies every
    # argument back after the kernel, and an aliased copy would overwrite the result)
    dbias_out = device_array_like(x, (1,), np.float32) if rms else dbias
    launch(
        _reduce_partials(not rms, REDUCE_COLS, REDUCE_SLICES),
        -(-cols // REDUCE_COLS),
        REDUCE_COLS * REDUCE_SLICES,
        stream,
        flat(part_w),
        flat(part_b),
        flat(dweight),
        flat(dbias_out),
        parts,
        cols,
    )


def layer_norm_backward(dy, x, weight, mean, rstd, dx, dweight, dbias) -> None:
    """Layer norm backward.

    Parameters
    ----------
    dy, x, dx : (rows, cols) C-contiguous float16/float32 device arrays; dx is written.
    weight : (cols,) array.  mean, rstd : (rows,) float32, saved by the forward.
    dweight, dbias : (cols,) float32, written with sum_rows(dy * xhat) and sum_rows(dy).
    """
    run_backward(backward_plan(dy, x, weight, dx), dy, x, weight, mean, rstd, dx, dweight, dbias)


def rms_norm_backward(dy, x, weight, rstd, dx, dweight) -> None:
    """RMS norm backward: dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd;
    dweight = sum_rows(dy * xhat). Shapes as `layer_norm_backward`."""
    run_backward(backward_plan(dy, x, weight, dx), dy, x, weight, None, rstd, dx, dweight, None)
