"""Numba CUDA softmax / log-softmax, forward and backward, over the last axis of a (rows, cols) matrix.

Formulas (per row, z = scale * x + mask, with causal masking z_j = -inf for j > (r % causal_rows) + offset):
    softmax      y = exp(z - max z) / sum exp(z - max z)
    log_softmax  y = z - max z - log(sum exp(z - max z))
    backward     dx = scale * y * (dy - sum(dy * y))          (softmax)
                 dx = scale * (dy - exp(y) * sum(dy))         (log_softmax)
A row whose every entry is masked (max z = -inf while a mask or the causal rule is on) gives zeros. Without
masking a row follows NumPy: a NaN, or a max of +/-inf, makes the whole row NaN.

Kernels (the layout is `RowPlan` in _numba.py; arrays are flat, row r starts at r * cols):
  regs  the row lives in registers (a cuda.local.array of compile-time size, fully unrolled: no local memory):
        one HBM read of x (and mask), one write of y.
        forward: z as float32, a group of G <= 32 lanes per row for rows up to 1024, else one block of
        128..1024 threads per row (16 per thread) up to 16384.
        backward: dy and y held as packed storage words (`load_words` / `word_get`: two float16 per
        register), 16 words of each per lane in warp groups (1024 float16 / 512 float32 columns), else a
        block per row: 128..1024 threads of 8 words, then 1024 threads of 16 words (32768 float16 / 16384
        float32 columns: a 32000-column vocabulary row is read once).
        Block kernels are capped at 64 registers (1024 threads per SM).
        Reductions: shfl_xor_sync butterflies, across warps through 32 floats of shared memory.
  loop  one block of 512 threads per row for longer rows: an online pass (running max, sum rescaled when the
        max grows, one exp per element) then the output pass, which reads x again (mostly from L2).
Loads and stores are 16 bytes wide (8 x float16 / 4 x float32) when cols and the pointers allow
(`load_vec` / `store_vec` in _numba.py), else narrower. All arithmetic is float32.

Versus the CuPy CUDA kernels: the same memory traffic in regs mode; the loop mode reads the row twice where a
CUDA kernel can stage it in dynamic shared memory. Numba's launch path (argument typing per call) costs tens
of microseconds of host time per launch, which only shows on tiny inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from rawformer.kernels.numba._numba import (
    NAN,
    NEG_INF,
    RowPlan,
    cuda,
    current_stream,
    flat,
    float32,
    int64,
    jit_kernel,
    launch,
    load_vec,
    load_words,
    make_group_reducers,
    max_nan,
    min_blocks,
    per_word,
    plan_rows,
    store_vec,
    uint32,
    vec_width,
    word_get,
)

# Register budgets per thread. Forward: float32 elements (warp groups; (threads, elements) block tiers).
FORWARD_WARP_ITEMS = 32
FORWARD_BLOCK_TIERS = ((128, 16), (256, 16), (512, 16), (1024, 16))
# Backward: 32-bit words of each of dy and y (x2 elements for float16 vectors).
BACKWARD_WARP_WORDS = 16
BACKWARD_BLOCK_TIERS = ((128, 8), (256, 8), (512, 8), (1024, 8), (1024, 16))


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _forward_regs(
    group: int, block: int, vec: int, packs: int, log: bool, has_mask: bool, causal: bool, min_blk: int = 1
):
    items = vec * packs
    rows_per_block = block // group
    masking = has_mask or causal
    group_sum, group_max = make_group_reducers(group, block)

    @jit_kernel(block, min_blk)
    def softmax_forward_regs(x, mask, y, rows, cols, scale, causal_rows, causal_offset):
        scratch = cuda.shared.array(32, float32)
        buf = cuda.local.array(items, float32)
        mbuf = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        row = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.x // group
        valid = row < rows  # threads past the last row still join the reductions
        base = int64(row) * cols
        limit = cols
        if causal:
            limit = min(cols, row % causal_rows + causal_offset + 1)  # columns >= limit are masked
        m = NEG_INF
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                load_vec(x, base + c, buf, p * vec, vec)
                if has_mask:
                    load_vec(mask, base + c, mbuf, 0, vec)
                for k in range(vec):
                    z = buf[p * vec + k] * scale
                    if has_mask:
                        z += mbuf[k]
                    if causal and c + k >= limit:
                        z = NEG_INF
                    buf[p * vec + k] = z
                    m = max_nan(m, z)
            else:
                for k in range(vec):
                    buf[p * vec + k] = NEG_INF
        m = group_max(m, scratch)
        s = float32(0)
        for i in range(items):
            e = math.exp(buf[i] - m)  # padding: exp(-inf) = 0
            if not log:
                buf[i] = e
            s += e
        s = group_sum(s, scratch)
        if m == NEG_INF:  # every entry masked (zeros), or an all -inf row without masking (NaN like NumPy)
            fill = float32(0) if masking else NAN
            for i in range(items):
                buf[i] = fill
        elif log:
            shift = m + math.log(s)
            for i in range(items):
                buf[i] = buf[i] - shift
        else:
            inv = float32(1) / s
            for i in range(items):
                buf[i] = buf[i] * inv
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                store_vec(y, base + c, buf, p * vec, vec)

    return softmax_forward_regs


@functools.cache
def _forward_loop(block: int, vec: int, log: bool, has_mask: bool, causal: bool):
    masking = has_mask or causal
    group_sum, group_max = make_group_reducers(block, block)
    step = block * vec

    @jit_kernel(block)
    def softmax_forward_loop(x, mask, y, rows, cols, scale, causal_rows, causal_offset):
        scratch = cuda.shared.array(32, float32)
        v = cuda.local.array(vec, float32)
        mv = cuda.local.array(vec, float32)
        row = cuda.blockIdx.x
        base = int64(row) * cols
        limit = cols
        if causal:
            limit = min(cols, row % causal_rows + causal_offset + 1)
        # pass 1: this thread's running max m and sum s of exp(z - m), rescaled when m grows
        m = NEG_INF
        s = float32(0)
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(x, base + c, v, 0, vec)
            if has_mask:
                load_vec(mask, base + c, mv, 0, vec)
            chunk_max = NEG_INF
            for k in range(vec):
                z = v[k] * scale
                if has_mask:
                    z += mv[k]
                if causal and c + k >= limit:
                    z = NEG_INF
                v[k] = z
                chunk_max = max_nan(chunk_max, z)
            new_max = max_nan(m, chunk_max)
            if new_max != m:  # the max grew (or turned NaN, which then makes s NaN)
                s *= math.exp(m - new_max)  # from m = -inf: exp(-inf) = 0, and s was 0
                m = new_max
            if m != NEG_INF:  # else every value so far is -inf and adds nothing
                for k in range(vec):
                    s += math.exp(v[k] - m)
            c += step
        row_max = group_max(m, scratch)
        if m != NEG_INF:
            s *= math.exp(m - row_max)
        total = group_sum(s, scratch)
        fully = row_max == NEG_INF
        fill = float32(0) if masking else NAN
        shift = row_max
        inv = float32(0)
        if not fully:
            if log:
                shift = row_max + math.log(total)
            else:
                inv = float32(1) / total
        # pass 2: recompute z and write
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(x, base + c, v, 0, vec)
            if has_mask:
                load_vec(mask, base + c, mv, 0, vec)
            for k in range(vec):
                z = v[k] * scale
                if has_mask:
                    z += mv[k]
                if causal and c + k >= limit:
                    z = NEG_INF
                if fully:
                    v[k] = fill
                elif log:
                    v[k] = z - shift
                else:
                    v[k] = math.exp(z - shift) * inv
            store_vec(y, base + c, v, 0, vec)
            c += step

    return softmax_forward_loop


def forward_plan(x: Any, y: Any, mask: Any) -> RowPlan:
    """The layout `softmax_forward` uses for these arrays."""
    cols = x.shape[1]
    vec = vec_width((cols,), x, y, mask)
    return plan_rows(cols, vec, FORWARD_WARP_ITEMS, FORWARD_BLOCK_TIERS)


def run_forward(plan: RowPlan, x, y, scale, log, mask, causal_rows, causal_offset) -> None:
    """`softmax_forward` with an explicit layout (tests use small ones for the simulator)."""
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    has_mask, causal = mask is not None, causal_rows > 0
    args = (
        flat(x),
        flat(mask if has_mask else x),  # a typed placeholder when there is no mask; never read
        flat(y),
        rows,
        cols,
        float32(scale),
        max(int(causal_rows), 1),
        int(causal_offset),
    )
    stream = current_stream(x)
    if plan.mode == "regs":
        kernel = _forward_regs(
            plan.group, plan.block, plan.vec, plan.packs, bool(log), has_mask, causal, min_blocks(plan)
        )
        launch(kernel, -(-rows // plan.rows_per_block), plan.block, stream, *args)
    else:
        kernel = _forward_loop(plan.block, plan.vec, bool(log), has_mask, causal)
        launch(kernel, rows, plan.block, stream, *args)


def softmax_forward(x, y, scale, log, mask, causal_rows, causal_offset) -> None:
    """y = softmax(scale * x + mask) over the last axis (log_softmax when `log`), with the causal rule.

    Parameters
    ----------
    x, y : (rows, cols) C-contiguous float16/float32 device arrays; y is written.
    scale : float.
    log : bool, log_softmax instead of softmax.
    mask : None or (rows, cols) additive array of x's dtype.
    causal_rows, causal_offset : int; causal_rows > 0 masks column j of row r when
        j > (r % causal_rows) + causal_offset.
    """
    run_forward(forward_plan(x, y, mask), x, y, scale, log, mask, causal_rows, causal_offset)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _backward_regs(group: int, block: int, vec: int, packs: int, per: int, log: bool, min_blk: int = 1):
    items = vec * packs
    nwords = items // per
    rows_per_block = block // group
    group_sum, _ = make_group_reducers(group, block)

    @jit_kernel(block, min_blk)
    def softmax_backward_regs(dy, y, dx, rows, cols, scale):
        scratch = cuda.shared.array(32, float32)
        gw = cuda.local.array(nwords, uint32)  # dy and y packed as stored (two float16 per word)
        yw = cuda.local.array(nwords, uint32)
        out = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        row = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.x // group
        valid = row < rows
        base = int64(row) * cols
        for p in range(packs):  # every load of the row first
            c = (p * group + t) * vec
            if valid and c < cols:
                load_words(dy, base + c, gw, p * vec, vec)
                load_words(y, base + c, yw, p * vec, vec)
        acc = float32(0)
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                for k in range(vec):
                    g = word_get(gw, p * vec + k, dy, vec)
                    if log:
                        acc += g
                    else:
                        acc += g * word_get(yw, p * vec + k, y, vec)
        acc = group_sum(acc, scratch)
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                for k in range(vec):
                    g = word_get(gw, p * vec + k, dy, vec)
                    v = word_get(yw, p * vec + k, y, vec)
                    if log:
                        out[k] = scale * (g - math.exp(v) * acc)
                    else:
                        out[k] = scale * v * (g - acc)
                store_vec(dx, base + c, out, 0, vec)

    return softmax_backward_regs


@functools.cache
def _backward_loop(block: int, vec: int, log: bool):
    group_sum, _ = make_group_reducers(block, block)
    step = block * vec

    @jit_kernel(block)
    def softmax_backward_loop(dy, y, dx, rows, cols, scale):
        scratch = cuda.shared.array(32, float32)
        gv = cuda.local.array(vec, float32)
        yv = cuda.local.array(vec, float32)
        base = int64(cuda.blockIdx.x) * cols
        acc = float32(0)
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(dy, base + c, gv, 0, vec)
            if not log:
                load_vec(y, base + c, yv, 0, vec)
            for k in range(vec):
                if log:
                    acc += gv[k]
                else:
                    acc += gv[k] * yv[k]
            c += step
        acc = group_sum(acc, scratch)
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(dy, base + c, gv, 0, vec)
            load_vec(y, base + c, yv, 0, vec)
            for k in range(vec):
                if log:
                    gv[k] = scale * (gv[k] - math.exp(yv[k]) * acc)
                else:
                    gv[k] = scale * yv[k] * (gv[k] - acc)
            store_vec(dx, base + c, gv, 0, vec)
            c += step

    return softmax_backward_loop


def backward_plan(dy: Any, y: Any, dx: Any) -> RowPlan:
    """The layout `softmax_backward` uses for these arrays."""
    cols = dy.shape[1]
    vec = vec_width((cols,), dy, y, dx)
    per = per_word(dy.dtype, vec)
    tiers = tuple((threads, words * per) for threads, words in BACKWARD_BLOCK_TIERS)
    return plan_rows(cols, vec, BACKWARD_WARP_WORDS * per, tiers)


def run_backward(plan: RowPlan, dy, y, dx, scale, log) -> None:
    """`softmax_backward` with an explicit layout."""
    rows, cols = dy.shape
    if rows == 0 or cols == 0:
        return
    args = (flat(dy), flat(y), flat(dx), rows, cols, float32(scale))
    stream = current_stream(dy)
    if plan.mode == "regs":
        per = per_word(dy.dtype, plan.vec)
        kernel = _backward_regs(
            plan.group, plan.block, plan.vec, plan.packs, per, bool(log), min_blocks(plan)
        )
        launch(kernel, -(-rows // plan.rows_per_block), plan.block, stream, *args)
    else:
        launch(_backward_loop(plan.block, plan.vec, bool(log)), rows, plan.block, stream, *args)


def softmax_backward(dy, y, dx, scale, log) -> None:
    """dx from the upstream gradient dy and the forward output y.

    softmax: dx = scale * y * (dy - sum(dy * y)); log_softmax: dx = scale * (dy - exp(y) * sum(dy)).
    All (rows, cols) C-contiguous float16/float32 device arrays of one dtype; dx is written.
    """
    run_backward(backward_plan(dy, y, dx), dy, y, dx, scale, log)
