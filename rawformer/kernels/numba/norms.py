"""Numba CUDA layer norm and RMS norm, forward (optionally fused with a residual add) and backward.

Formulas (per row of h = x (+ residual), n = cols):
    layer norm  mean = sum(h) / n, rstd = 1 / sqrt(sum((h - mean)^2) / n + eps), y = (h - mean) * rstd * w + b
    rms norm    rstd = 1 / sqrt(sum(h^2) / n + eps),                                y = h * rstd * w
    backward    xhat = (x - mean) * rstd (mean = 0 for rms),  g = dy * w
                dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (rms: without the mean(g) term)
                dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
With a residual, h is written out (rounded to the storage dtype) and that rounded h is what gets
normalised, exactly as an unfused add followed by the norm (and as the CUDA kernels do). The variance is
two-pass (sum of squared deviations from the mean, both over registers), never E[h^2] - mean^2.

Kernels (layout in `RowPlan`, _numba.py):
  regs  forward: the row in registers, one read of x (+ residual), one write of y (+ h); a group of <= 32
        lanes per row up to 1024 columns, else a block of 128..1024 threads up to 16384.
        backward: each row group loops over rows (a grid of about 2048 threads per SM) with the same columns
        on every row, so it keeps its dweight/dbias partial sums in registers and writes one float32 partial
        row per group at the end: partials (groups, cols). Up to 512 columns per warp group, 8192 per block.
  loop  one block of 512 threads per row, looping over the columns: forward reads the row three times
        (mean, variance, output; the re-reads mostly hit L2); backward twice, accumulating its partials in its
        own partial row in global memory (each column owned by one thread: no races, no atomics).
  reduce_partials: dweight/dbias = column sums of the partial rows, 32 columns x 8 row slices per block,
        slices combined in a fixed order: deterministic, bit-identical run to run (no atomics).
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
    make_group_reducers,
    plan_rows,
    sm_count,
    store_vec,
    vec_width,
)

FORWARD_ITEMS = (32, 16)
BACKWARD_ITEMS = (16, 8)  # backward keeps x, g and two accumulators per element
REDUCE_COLS, REDUCE_SLICES = 32, 8
THREADS_PER_SM = 2048  # backward grid: enough row groups to fill every SM once


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _forward_regs(group: int, block: int, vec: int, packs: int, rms: bool, has_res: bool):
    items = vec * packs
    rows_per_block = block // group
    group_sum, _ = make_group_reducers(group, block)

    @jit_kernel(block)
    def norm_forward_regs(x, res, w, b, y, h, mean_out, rstd_out, rows, cols, eps):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        buf = cuda.local.array(items, float32)
        tmp = cuda.local.array(vec, float32)
        tmp2 = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        row = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.x // group
        valid = row < rows
        base = int64(row) * cols
        s = float32(0)
        for p in range(packs):
            c = (p * group + t) * vec
            if valid and c < cols:
                load_vec(x, base + c, buf, p * vec, vec)
                if has_res:
                    load_vec(res, base + c, tmp, 0, vec)
                    for k in range(vec):
                        buf[p * vec + k] += tmp[k]
                    store_vec(h, base + c, buf, p * vec, vec)
                    load_vec(h, base + c, buf, p * vec, vec)  # normalise h as stored (rounded), as unfused
                for k in range(vec):
                    if rms:
                        s += buf[p * vec + k] * buf[p * vec + k]
                    else:
                        s += buf[p * vec + k]
            else:
                for k in range(vec):
                    buf[p * vec + k] = float32(0)
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
                        d = buf[p * vec + k] - mu
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
                    v = (buf[p * vec + k] - mu) * r * tmp[k]
                    if not rms:
                        v += tmp2[k]
                    buf[p * vec + k] = v
                store_vec(y, base + c, buf, p * vec, vec)

    return norm_forward_regs


@functools.cache
def _forward_loop(block: int, vec: int, rms: bool, has_res: bool):
    group_sum, _ = make_group_reducers(block, block)
    step = block * vec

    @jit_kernel(block)
    def norm_forward_loop(x, res, w, b, y, h, mean_out, rstd_out, rows, cols, eps):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        v = cuda.local.array(vec, float32)
        tmp = cuda.local.array(vec, float32)
        row = cuda.blockIdx.x
        base = int64(row) * cols
        # pass 1: sum (layer norm) or sum of squares (rms); h is written here
        s = float32(0)
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(x, base + c, v, 0, vec)
            if has_res:
                load_vec(res, base + c, tmp, 0, vec)
                for k in range(vec):
                    v[k] += tmp[k]
                store_vec(h, base + c, v, 0, vec)
                load_vec(h, base + c, v, 0, vec)  # normalise h as stored (rounded), as unfused
            for k in range(vec):
                s += v[k] * v[k] if rms else v[k]
            c += step
        s = group_sum(s, scratch)
        mu = float32(0)
        if rms:
            var = s / ncols
        else:
            mu = s / ncols
            # pass 2: squared deviations from the mean
            ss = float32(0)
            c = cuda.threadIdx.x * vec
            while c < cols:
                load_vec(h if has_res else x, base + c, v, 0, vec)  # this thread wrote h in pass 1
                for k in range(vec):
                    d = v[k] - mu
                    ss += d * d
                c += step
            var = group_sum(ss, scratch) / ncols
        r = float32(1) / math.sqrt(var + eps)
        if cuda.threadIdx.x == 0:
            if not rms:
                mean_out[row] = mu
            rstd_out[row] = r
        # last pass: normalise and write
        c = cuda.threadIdx.x * vec
        while c < cols:
            load_vec(h if has_res else x, base + c, v, 0, vec)
            load_vec(w, c, tmp, 0, vec)
            for k in range(vec):
                v[k] = (v[k] - mu) * r * tmp[k]
            if not rms:
                load_vec(b, c, tmp, 0, vec)
                for k in range(vec):
                    v[k] += tmp[k]
            store_vec(y, base + c, v, 0, vec)
            c += step

    return norm_forward_loop


def forward_plan(x: Any, residual: Any, weight: Any, bias: Any, y: Any, h: Any) -> RowPlan:
    """The layout the norm forward launchers use for these arrays."""
    cols = x.shape[1]
    return plan_rows(cols, vec_width((cols,), x, residual, weight, bias, y, h), *FORWARD_ITEMS)


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
        kernel = _forward_regs(plan.group, plan.block, plan.vec, plan.packs, rms, has_res)
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
def _backward_regs(group: int, block: int, vec: int, packs: int, rms: bool):
    items = vec * packs
    rows_per_block = block // group
    pvec = min(vec, 4)  # float32 partials: at most 4 per 16-byte store
    group_sum, _ = make_group_reducers(group, block)

    @jit_kernel(block)
    def norm_backward_regs(dy, x, w, mean, rstd, dx, part_w, part_b, rows, cols, iters):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        xb = cuda.local.array(items, float32)
        gb = cuda.local.array(items, float32)
        dw = cuda.local.array(items, float32)
        db = cuda.local.array(items, float32)
        wv = cuda.local.array(vec, float32)
        t = cuda.threadIdx.x % group
        gid = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.x // group
        ngroups = cuda.gridDim.x * rows_per_block
        for i in range(items):
            dw[i] = float32(0)
            db[i] = float32(0)
        # `iters` is the same for every thread, so the shuffles below run uniformly across each warp
        for it in range(iters):
            row = gid + it * ngroups
            valid = row < rows
            base = int64(row) * cols
            mu = float32(0)
            r = float32(0)
            if valid:
                if not rms:
                    mu = mean[row]
                r = rstd[row]
            a1 = float32(0)  # sum of g
            a2 = float32(0)  # sum of g * xhat
            for p in range(packs):
                c = (p * group + t) * vec
                if valid and c < cols:
                    load_vec(x, base + c, xb, p * vec, vec)
                    load_vec(dy, base + c, gb, p * vec, vec)
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        i = p * vec + k
                        xh = (xb[i] - mu) * r
                        d = gb[i]
                        dw[i] += d * xh
                        db[i] += d
                        g = d * wv[k]
                        a1 += g
                        a2 += g * xh
                        xb[i] = xh
                        gb[i] = g
                else:
                    for k in range(vec):
                        xb[p * vec + k] = float32(0)
                        gb[p * vec + k] = float32(0)
            a2 = group_sum(a2, scratch) / ncols
            if not rms:
                a1 = group_sum(a1, scratch) / ncols
            for p in range(packs):
                c = (p * group + t) * vec
                if valid and c < cols:
                    for k in range(vec):
                        i = p * vec + k
                        if rms:
                            gb[i] = r * (gb[i] - xb[i] * a2)
                        else:
                            gb[i] = r * (gb[i] - a1 - xb[i] * a2)
                    store_vec(dx, base + c, gb, p * vec, vec)
        # this group's partial row
        pbase = int64(gid) * cols
        for p in range(packs):
            c = (p * group + t) * vec
            if c < cols:
                for q in range(0, vec, pvec):
                    store_vec(part_w, pbase + c + q, dw, p * vec + q, pvec)
                    if not rms:
                        store_vec(part_b, pbase + c + q, db, p * vec + q, pvec)

    return norm_backward_regs


@functools.cache
def _backward_loop(block: int, vec: int, rms: bool):
    group_sum, _ = make_group_reducers(block, block)
    step = block * vec

    @jit_kernel(block)
    def norm_backward_loop(dy, x, w, mean, rstd, dx, part_w, part_b, rows, cols, iters):
        scratch = cuda.shared.array(32, float32)
        ncols = float32(cols)  # dividing by the int64 would promote the maths to float64
        xv = cuda.local.array(vec, float32)
        gv = cuda.local.array(vec, float32)
        wv = cuda.local.array(vec, float32)
        pw = cuda.local.array(vec, float32)
        pb = cuda.local.array(vec, float32)
        pbase = int64(cuda.blockIdx.x) * cols
        c = cuda.threadIdx.x * vec
        while c < cols:  # this block's partial row starts at zero; each column has one owner thread
            for k in range(vec):
                part_w[pbase + c + k] = float32(0)
                if not rms:
                    part_b[pbase + c + k] = float32(0)
            c += step
        for it in range(iters):
            row = cuda.blockIdx.x + it * cuda.gridDim.x
            if row < rows:  # uniform across the block: one row per block
                base = int64(row) * cols
                mu = float32(0) if rms else mean[row]
                r = rstd[row]
                a1 = float32(0)
                a2 = float32(0)
                c = cuda.threadIdx.x * vec
                while c < cols:
                    load_vec(x, base + c, xv, 0, vec)
                    load_vec(dy, base + c, gv, 0, vec)
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        g = gv[k] * wv[k]
                        a1 += g
                        a2 += g * (xv[k] - mu) * r
                    c += step
                a2 = group_sum(a2, scratch) / ncols
                if not rms:
                    a1 = group_sum(a1, scratch) / ncols
                c = cuda.threadIdx.x * vec
                while c < cols:
                    load_vec(x, base + c, xv, 0, vec)
                    load_vec(dy, base + c, gv, 0, vec)
                    load_vec(w, c, wv, 0, vec)
                    for k in range(vec):
                        pw[k] = part_w[pbase + c + k]
                        if not rms:
                            pb[k] = part_b[pbase + c + k]
                    for k in range(vec):
                        xh = (xv[k] - mu) * r
                        d = gv[k]
                        pw[k] += d * xh
                        pb[k] += d
                        g = d * wv[k]
                        if rms:
                            gv[k] = r * (g - xh * a2)
                        else:
                            gv[k] = r * (g - a1 - xh * a2)
                    store_vec(dx, base + c, gv, 0, vec)
                    for k in range(vec):
                        part_w[pbase + c + k] = pw[k]
                        if not rms:
                            part_b[pbase + c + k] = pb[k]
                    c += step

    return norm_backward_loop


@functools.cache
def _reduce_partials():
    threads = REDUCE_COLS * REDUCE_SLICES

    @jit_kernel(threads)
    def reduce_partials(part, out, nparts, cols):
        sums = cuda.shared.array(threads, float32)
        tx = cuda.threadIdx.x % REDUCE_COLS
        ty = cuda.threadIdx.x // REDUCE_COLS
        col = cuda.blockIdx.x * REDUCE_COLS + tx
        acc = float32(0)
        if col < cols:
            p = ty
            while p < nparts:
                acc += part[int64(p) * cols + col]
                p += REDUCE_SLICES
        sums[cuda.threadIdx.x] = acc
        cuda.syncthreads()
        if ty == 0 and col < cols:
            total = float32(0)
            for s in range(REDUCE_SLICES):  # a fixed order: the same bits every run
                total += sums[s * REDUCE_COLS + tx]
            out[col] = total

    return reduce_partials


def backward_plan(dy: Any, x: Any, weight: Any, dx: Any) -> RowPlan:
    """The layout the norm backward launchers use for these arrays."""
    cols = x.shape[1]
    vec = vec_width((cols,), dy, x, weight, dx)
    return plan_rows(cols, vec, *BACKWARD_ITEMS)


def run_backward(
    plan: RowPlan, dy, x, weight, mean, rstd, dx, dweight, dbias, grid: int | None = None
) -> None:
    """Layer norm (mean given) or RMS norm (mean None) backward with an explicit layout; `grid` overrides
    the number of blocks (tests use it to make row groups loop over several rows)."""
    rows, cols = x.shape
    rms = mean is None
    if cols == 0:
        return
    if rows == 0:  # sums over no rows
        dweight[...] = 0
        if dbias is not None:
            dbias[...] = 0
        return
    rows_per_block = plan.rows_per_block if plan.mode == "regs" else 1
    if grid is None:
        grid = sm_count(x) * max(1, THREADS_PER_SM // plan.block)
    grid = max(1, min(grid, -(-rows // rows_per_block)))
    groups = grid * rows_per_block
    iters = -(-rows // groups)
    part_w = device_array_like(x, (groups, cols), np.float32)
    part_b = device_array_like(x, (1,) if rms else (groups, cols), np.float32)  # rms: an unused placeholder
    args = (
        flat(dy),
        flat(x),
        flat(weight),
        flat(rstd if rms else mean),
        flat(rstd),
        flat(dx),
        flat(part_w),
        flat(part_b),
        rows,
        cols,
        iters,
    )
    stream = current_stream(x)
    if plan.mode == "regs":
        kernel = _backward_regs(plan.group, plan.block, plan.vec, plan.packs, rms)
    else:
        kernel = _backward_loop(plan.block, plan.vec, rms)
    launch(kernel, grid, plan.block, stream, *args)
    reduce = _reduce_partials()
    reduce_grid = -(-cols // REDUCE_COLS)
    threads = REDUCE_COLS * REDUCE_SLICES
    launch(reduce, reduce_grid, threads, stream, flat(part_w), flat(dweight), groups, cols)
    if not rms:
        launch(reduce, reduce_grid, threads, stream, flat(part_b), flat(dbias), groups, cols)


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
