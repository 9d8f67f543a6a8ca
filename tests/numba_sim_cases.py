"""The Numba kernels run in the Numba CUDA simulator, on tiny grids, against small float64 formulas.

Not collected by a plain `pytest tests` (the name does not start with test_): test_numba_kernels.py runs this
file in a subprocess with NUMBA_ENABLE_CUDASIM=1, which must be set before numba.cuda is first imported.
The simulator runs every CUDA thread as a Python thread, so the grids here are a few blocks of 32-128
threads; layouts are chosen explicitly (RowPlan) to reach every kernel variant: sub-warp groups, warp groups,
multi-warp groups (alone in a block, and several per block with the backward's shared-memory combine),
packed rows (two float16 per word, and the one-per-word scalar float16 case), the looped kernels with several
batches and a tail, the norm backward's column-slab mode with unequal slabs, the partial-sum reduction with
several rounds, vector widths 1, 2, 4 and 8, and the scalar tail of the elementwise kernels. Warp shuffles
and a faster block runner come from tests/numba_sim_shim.py. The simulator checks every array index, so an
out-of-bounds access fails here too.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "") in ("", "0"):
    pytest.skip(
        "runs under NUMBA_ENABLE_CUDASIM=1 only (test_numba_kernels.py starts it)", allow_module_level=True
    )

import numba_sim_shim  # noqa: E402
from tolerances import assert_close  # noqa: E402

numba_sim_shim.install()

from rawformer.kernels.numba import activations as act  # noqa: E402
from rawformer.kernels.numba import norms as nrm  # noqa: E402
from rawformer.kernels.numba import paged_attention as pa  # noqa: E402
from rawformer.kernels.numba import softmax as smx  # noqa: E402
from rawformer.kernels.numba._numba import RowPlan  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # NumPy scalars meet -inf - -inf in a kernel

F16, F32 = np.float16, np.float32


def _nan(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


# ---- float64 formulas -------------------------------------------------------------------------------------
def softmax64(x, scale=1.0, log=False, mask=None, causal_rows=0, causal_offset=0):
    z = x.astype(np.float64) * scale
    if mask is not None:
        z = z + mask.astype(np.float64)
    masking = mask is not None or causal_rows > 0
    if causal_rows:
        r = np.arange(z.shape[0])[:, None] % causal_rows
        z = np.where(np.arange(z.shape[1])[None, :] > r + causal_offset, -np.inf, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = z.max(axis=1, keepdims=True)
        dead = (m == -np.inf) & masking
        m = np.where(dead, 0.0, m)
        e = np.exp(z - m)
        s = e.sum(axis=1, keepdims=True)
        y = (z - m - np.log(s)) if log else e / s
    return np.where(dead, 0.0, y)


def softmax_grad64(dy, y, scale, log):
    g, p = dy.astype(np.float64), y.astype(np.float64)
    if log:
        return scale * (g - np.exp(p) * g.sum(axis=1, keepdims=True))
    return scale * p * (g - (g * p).sum(axis=1, keepdims=True))


def norm64(h, w, b, eps, rms):
    h = h.astype(np.float64)
    mu = np.zeros((h.shape[0], 1)) if rms else h.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(((h - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    y = (h - mu) * rstd * w.astype(np.float64)
    if not rms:
        y = y + b.astype(np.float64)
    return y, mu[:, 0], rstd[:, 0]


def norm_grad64(dy, x, w, mu, rstd, rms):
    dy, x = dy.astype(np.float64), x.astype(np.float64)
    xhat = (x - mu[:, None]) * rstd[:, None]
    g = dy * w.astype(np.float64)
    c1 = 0.0 if rms else g.mean(axis=1, keepdims=True)
    dx = rstd[:, None] * (g - c1 - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


_erf = np.vectorize(math.erf)


def gelu64(u, tanh_form):
    if tanh_form:
        return 0.5 * u * (1 + np.tanh(0.7978845608 * (u + 0.044715 * u**3)))
    return 0.5 * u * (1 + _erf(u / math.sqrt(2)))


def gelu_grad64(u, tanh_form):
    if tanh_form:
        t = np.tanh(0.7978845608 * (u + 0.044715 * u**3))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * 0.7978845608 * (1 + 3 * 0.044715 * u * u)
    return 0.5 * (1 + _erf(u / math.sqrt(2))) + u * np.exp(-u * u / 2) / math.sqrt(2 * math.pi)


# ---- softmax -----------------------------------------------------------------------------------------------
SOFTMAX_LAYOUTS = [
    # (plan, rows, cols, dtype): sub-warp groups with 2 packs, a warp group, a 2-warp block group, the loop
    (RowPlan("regs", 8, 32, 2, 2), 5, 30, F32),
    (RowPlan("regs", 32, 32, 1, 1), 2, 19, F16),
    (RowPlan("regs", 64, 64, 4, 1), 2, 200, F32),
    (RowPlan("loop", 64, 64, 8), 2, 1032, F16),  # 1032 = 2 loop iterations of 512 + 8
]


@pytest.mark.parametrize("plan,rows,cols,dtype", SOFTMAX_LAYOUTS)
def test_softmax_forward_layouts(plan, rows, cols, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    mask = np.where(rng.random((rows, cols)) < 0.3, -np.inf, rng.standard_normal((rows, cols))).astype(dtype)
    mask[0] = -np.inf  # a fully masked row gives zeros
    for log, m, causal_rows, offset in (
        (False, None, 0, 0),
        (True, mask, 0, 0),
        (False, mask, 2, 1),
        (True, None, 3, -1),
    ):
        y = _nan((rows, cols), dtype)
        smx.run_forward(plan, x, y, 0.7, log, m, causal_rows, offset)
        assert_close(y, softmax64(x, 0.7, log, m, causal_rows, offset), dtype, name=f"{plan} log={log}")


@pytest.mark.parametrize("plan", [RowPlan("regs", 32, 32, 1, 1), RowPlan("loop", 32, 32, 1)])
def test_softmax_special_values(plan):
    x = np.zeros((4, 19), F32)
    x[0, 3] = np.nan  # NaN: the row is NaN
    x[1, :] = -np.inf  # all -inf without masking: NaN, as NumPy
    x[2, 5] = np.inf  # +inf: NaN
    x[3, 7] = -np.inf  # one -inf entry: 0
    y = _nan(x.shape, F32)
    smx.run_forward(plan, x, y, 1.0, False, None, 0, 0)
    assert np.isnan(y[:3]).all()
    assert y[3, 7] == 0 and np.allclose(y[3].sum(), 1.0)
    y = _nan(x.shape, F32)  # with a mask, the all -inf row gives zeros; NaN and +inf still give NaN
    smx.run_forward(plan, x, y, 1.0, True, np.zeros_like(x), 0, 0)
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all() and (y[1] == 0).all()


@pytest.mark.parametrize(
    "plan,rows,cols,dtype",
    [
        (RowPlan("regs", 8, 32, 2, 2), 5, 30, F16),  # packed: one word per vector of two
        (RowPlan("regs", 8, 32, 8, 2), 5, 120, F16),  # four words per 16-byte vector
        (RowPlan("regs", 32, 32, 1, 2), 2, 50, F16),  # scalar float16: one element per word
        (RowPlan("regs", 64, 64, 4, 1), 2, 200, F32),
        (RowPlan("loop", 64, 64, 2), 2, 300, F32),
    ],
)
def test_softmax_backward_layouts(plan, rows, cols, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, cols))
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    for log in (False, True):
        y = softmax64(x, log=log).astype(dtype)
        dx = _nan((rows, cols), dtype)
        smx.run_backward(plan, dy, y, dx, 1.3, log)
        assert_close(dx, softmax_grad64(dy, y, 1.3, log), dtype, name=f"{plan} log={log}")


def test_softmax_default_plan():
    """The production entry points pick their own layout (here a warp group of a 128-thread block)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 19)).astype(F16)
    assert smx.forward_plan(x, x, None) == RowPlan("regs", 32, 128, 1, 1)
    y = _nan(x.shape, F16)
    smx.softmax_forward(x, y, 1.0, False, None, 0, 0)
    assert_close(y, softmax64(x), F16)
    dx = _nan(x.shape, F16)
    smx.softmax_backward(x, y, dx, 1.0, False)
    assert_close(dx, softmax_grad64(x, y, 1.0, False), F16)


# ---- norms -------------------------------------------------------------------------------------------------
NORM_LAYOUTS = [
    (RowPlan("regs", 8, 32, 2, 2), 5, 30, F32),
    (RowPlan("regs", 8, 32, 8, 3), 3, 184, F16),  # packed, four words per vector, a short last pack
    (RowPlan("regs", 32, 32, 1, 1), 2, 19, F16),  # scalar float16: one element per word
    (RowPlan("regs", 64, 64, 2, 2), 2, 250, F16),  # a 2-warp block group, one word per vector
    (RowPlan("loop", 64, 64, 8), 2, 2312, F16),  # batches of 64 x 32 (64 x 16 with a residual), a tail
    (RowPlan("loop", 32, 32, 1), 2, 601, F32),  # scalar batches of 16, the last one partial
]


@pytest.mark.parametrize("plan,rows,cols,dtype", NORM_LAYOUTS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norms_forward_layouts(plan, rows, cols, dtype, rms):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((rows, cols)) * 2 + 30).astype(dtype)  # mean >> spread: no cancellation
    res = rng.standard_normal((rows, cols)).astype(dtype)
    w = rng.standard_normal(cols).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    for residual in (None, res):
        y, h = _nan((rows, cols), dtype), (None if residual is None else _nan((rows, cols), dtype))
        mean = None if rms else _nan(rows, F32)
        rstd = _nan(rows, F32)
        nrm.run_forward(plan, x, residual, w, None if rms else b, y, h, mean, rstd, 1e-5)
        # with a residual, h as stored (x + residual rounded to the dtype) is what is normalised
        h64 = x.astype(np.float64) if residual is None else (x.astype(np.float64) + residual).astype(dtype)
        ry, rmu, rr = norm64(h64, w, b, 1e-5, rms)
        assert_close(y, ry, dtype, name="y")
        assert_close(rstd, rr, F32, name="rstd")
        if not rms:
            assert_close(mean, rmu, F32, name="mean")
        if residual is not None:
            assert_close(h, h64, dtype, name="h")


@pytest.fixture
def small_reduce(monkeypatch):
    """The partial-sum reduction with 2 slices per column (the kernel is the same; the simulator is slow
    with the production 512-thread blocks), so a few partial rows already take several rounds."""
    monkeypatch.setattr(nrm, "REDUCE_SLICES", 2)


@pytest.mark.parametrize(
    "plan,rows,cols,dtype,grid",
    [
        (RowPlan("regs", 8, 32, 2, 2), 45, 30, F32, 12),  # 4 groups per block, 12 partial rows: 2 rounds
        (RowPlan("regs", 32, 64, 8, 1), 5, 256, F16, 1),  # 2 warp groups per block, one loops over 3 rows
        (RowPlan("regs", 64, 128, 4, 1), 5, 200, F32, 1),  # 2 groups of 2 warps per block
        (RowPlan("regs", 64, 64, 1, 4), 3, 250, F16, 2),  # group == block, scalar float16
        (RowPlan("cols", 32, 32, 8, 0), 7, 296, F16, 3),  # slabs of 3, 3 and 1 rows; 2 column blocks
        (RowPlan("cols", 64, 32, 1, 0), 11, 45, F32, 20),  # a slab per row (more slabs than rows asked)
    ],
)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norms_backward_layouts(plan, rows, cols, dtype, grid, rms, small_reduce):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((rows, cols)).astype(dtype)
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    w = rng.standard_normal(cols).astype(dtype)
    _, mu, rstd = norm64(x, w, w, 1e-5, rms)
    mu, rstd = mu.astype(F32), rstd.astype(F32)
    dx = _nan((rows, cols), dtype)
    dw, db = _nan(cols, F32), (None if rms else _nan(cols, F32))
    nrm.run_backward(plan, dy, x, w, None if rms else mu, rstd, dx, dw, db, grid=grid)
    rdx, rdw, rdb = norm_grad64(dy, x, w, mu, rstd, rms)
    assert_close(dx, rdx, dtype, name="dx")
    assert_close(dw, rdw, F32, name="dweight")
    if not rms:
        assert_close(db, rdb, F32, name="dbias")


def test_norms_empty():
    x = np.zeros((0, 8), F32)
    dw, db = _nan(8, F32), _nan(8, F32)
    nrm.layer_norm_backward(x, x, np.ones(8, F32), np.zeros(0, F32), np.zeros(0, F32), x.copy(), dw, db)
    assert (dw == 0).all() and (db == 0).all()  # sums over no rows
    x = np.zeros((2, 0), F32)
    mean, rstd = np.zeros(2, F32), np.zeros(2, F32)
    nrm.layer_norm_forward(x, None, np.ones(0, F32), np.zeros(0, F32), x.copy(), None, mean, rstd, 1e-5)
    assert np.isnan(mean).all() and np.isnan(rstd).all()


def test_norms_default_plan(small_reduce):
    """The production entry points pick their own layouts (a packed warp group forward; backward, a group
    of 4 threads per row in a 512-thread block)."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 24)).astype(F16)
    w = rng.standard_normal(24).astype(F16)
    y, rstd = _nan(x.shape, F16), _nan(3, F32)
    nrm.rms_norm_forward(x, None, w, y, None, rstd, 1e-6)
    assert_close(y, norm64(x, w, w, 1e-6, True)[0], F16)
    dx, dw = _nan(x.shape, F16), _nan(24, F32)
    nrm.rms_norm_backward(x, x, w, rstd, dx, dw)
    rdx, rdw, _ = norm_grad64(x, x, w, np.zeros(3), rstd, True)
    assert_close(dx, rdx, F16)
    assert_close(dw, rdw, F32)


# ---- activations -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows,cols,dtype,vec",
    [(3, 37, F16, None), (2, 24, F16, 8), (4, 16, F32, None), (5, 7, F32, 1), (2, 10, F16, 2)],
)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_activations_gelu(rows, cols, dtype, vec, approximate):
    rng = np.random.default_rng(19)
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    tanh_form = approximate == "tanh"
    for bias in (None, b):
        if bias is not None and vec is not None and cols % vec:
            continue
        u = x.astype(np.float64) + (0 if bias is None else bias)
        y = _nan(x.shape, dtype)
        act.gelu_forward(x, bias, y, approximate, vec=vec)
        assert_close(y, gelu64(u, tanh_form), dtype, name="gelu")
        dx = _nan(x.shape, dtype)
        act.gelu_backward(dy, x, bias, dx, approximate, vec=vec)
        assert_close(dx, dy * gelu_grad64(u, tanh_form), dtype, name="gelu_backward")


@pytest.mark.parametrize("rows,cols,dtype,vec", [(3, 37, F16, None), (4, 16, F32, None), (2, 10, F16, 2)])
def test_activations_swiglu(rows, cols, dtype, vec):
    rng = np.random.default_rng(23)
    g = (rng.standard_normal((rows, cols)) * 4).astype(dtype)
    g[0, :3] = [-30.0, 30.0, 0.0]  # saturated sigmoid on both sides
    up = rng.standard_normal((rows, cols)).astype(dtype)
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    g64 = g.astype(np.float64)
    s = 1 / (1 + np.exp(-g64))
    y = _nan(g.shape, dtype)
    act.swiglu_forward(g, up, y, vec=vec)
    assert_close(y, g64 * s * up, dtype, name="swiglu")
    dg, du = _nan(g.shape, dtype), _nan(g.shape, dtype)
    act.swiglu_backward(dy, g, up, dg, du, vec=vec)
    assert_close(dg, dy * up * s * (1 + g64 * (1 - s)), dtype, name="dgate")
    assert_close(du, dy * g64 * s, dtype, name="dup")


# ---- paged decode attention ------------------------------------------------------------------------------
def paged_attention64(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Loop form: each sequence's keys gathered through its block table, causal among the new tokens."""
    seqs, q_len, q_heads, dim = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros(q.shape)
    for s in range(seqs):
        ctx = int(context_lens[s])
        for t in range(q_len):
            pos = ctx - q_len + t
            if pos < 0:
                continue
            blocks = block_tables[s, np.arange(pos + 1) // bs]
            offs = np.arange(pos + 1) % bs
            for h in range(q_heads):
                k = k_cache[blocks, offs, h // group].astype(np.float64)
                v = v_cache[blocks, offs, h // group].astype(np.float64)
                z = scale * (k @ q[s, t, h].astype(np.float64))
                p = np.exp(z - z.max())
                out[s, t, h] = p @ v / p.sum()
    return out


def _paged_case(rng, dtype, seqs_ctx, q_len, q_heads, kv_heads, dim, bs):
    """A shuffled pool of blocks (one more than needed, so some block stays unused), NaN in unused slots."""
    need = [-(-c // bs) for c in seqs_ctx]
    max_blocks = max(max(need), 1) + 1
    num_blocks = sum(need) + 2
    k = (rng.standard_normal((num_blocks, bs, kv_heads, dim)) * 2).astype(dtype)
    v = rng.standard_normal((num_blocks, bs, kv_heads, dim)).astype(dtype)
    ids = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((len(seqs_ctx), max_blocks), 10**6, np.int32)  # entries past the context are never read
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = ids[used : used + n]
        used += n
    for blk in ids[used:]:
        k[blk], v[blk] = np.nan, np.nan
    for s, c in enumerate(seqs_ctx):  # the slots past a context inside its last block are garbage too
        if c % bs:
            k[table[s, c // bs], c % bs :], v[table[s, c // bs], c % bs :] = np.nan, np.nan
    q = rng.standard_normal((len(seqs_ctx), q_len, q_heads, dim)).astype(dtype)
    return q, k, v, table, np.asarray(seqs_ctx, np.int32)


@pytest.mark.parametrize(
    "plan,dtype,ctx,q_len,q_heads,kv_heads,dim,bs,splits",
    [
        # 2 lanes per token (16 tokens per warp), 2 warps x unroll 2: 64 tokens a step; all rows in one pass;
        # 8 scores per lane, one halving: 4 owned per lane
        (pa.DecodePlan(8, 2, 1, 2, 2, 4), F16, (0, 5, 19, 70), 2, 4, 2, 16, 8, 1),
        # 4 lanes x 3 scalar packs (the last lane idle past dim 11), rows of 2 of group 3: two passes; two
        # lanes hold each score
        (pa.DecodePlan(1, 4, 3, 1, 1, 2), F32, (17, 1, 33), 1, 6, 2, 11, 16, 1),
        # a whole warp per token (float32 vectors of 4, 32 x 4 = 128 > 96 columns: a partial last vector
        # lane set), 3 query tokens, MQA
        (pa.DecodePlan(4, 32, 1, 2, 1, 4), F32, (3, 16, 9), 3, 2, 1, 96, 8, 1),
        # the GQA 8:1 production shape scaled down: 16 lanes, 2 tokens x 8 rows = one score per lane
        (pa.DecodePlan(2, 16, 1, 1, 2, 8), F16, (40, 1), 1, 8, 1, 32, 8, 1),
        # the MHA shape: 2 scores over 16 lanes (8 copies each), 3 splits and the combine
        (pa.DecodePlan(2, 16, 1, 1, 2, 1), F16, (0, 23, 50), 1, 2, 2, 32, 8, 3),
        # split-KV with q_len 3, group 2 (6 rows in passes of 4 with padding rows), empty splits (ctx 5)
        (pa.DecodePlan(4, 4, 1, 1, 2, 4), F32, (5, 37), 3, 4, 2, 16, 8, 3),
    ],
)
def test_paged_attention_layouts(plan, dtype, ctx, q_len, q_heads, kv_heads, dim, bs, splits):
    rng = np.random.default_rng(29)
    q, k, v, table, lens = _paged_case(rng, dtype, ctx, q_len, q_heads, kv_heads, dim, bs)
    out = _nan(q.shape, dtype)
    assert pa.split_plan(plan, q, k, table, splits)[0] == splits
    pa.run_forward(plan, q, k, v, table, lens, out, 0.3, num_splits=splits)
    assert_close(out, paged_attention64(q, k, v, table, lens, 0.3), dtype, name=f"{plan} splits={splits}")
    assert (out[np.asarray(ctx) == 0] == 0).all()


def test_paged_attention_rescales():
    """Scores spanning hundreds of log2 units (a ramp over the shuffled block pool): the lazy rescale fires
    several times per row, and the split combine meets very different lse values."""
    rng = np.random.default_rng(37)
    q, k, v, table, lens = _paged_case(rng, F32, (45, 30), 1, 4, 1, 16, 8)
    ramp = np.arange(k.shape[0] * k.shape[1], dtype=np.float32).reshape(k.shape[0], k.shape[1], 1, 1) / 8
    k = (k + ramp * q[0, 0, 0]).astype(F32)  # pool slots further on score higher for q row 0
    plan = pa.DecodePlan(4, 4, 1, 1, 2, 4)
    for splits in (1, 2):
        out = _nan(q.shape, F32)
        pa.run_forward(plan, q, k, v, table, lens, out, 3.0, num_splits=splits)
        assert_close(out, paged_attention64(q, k, v, table, lens, 3.0), F32, name=f"splits={splits}")


def test_paged_attention_default_plan():
    rng = np.random.default_rng(31)
    q, k, v, table, lens = _paged_case(rng, F16, (1, 16), 1, 2, 1, 8, 16)
    assert pa.forward_plan(q, k, v, q) == pa.DecodePlan(8, 1, 1, 4, 1, 2)
    out = _nan(q.shape, F16)
    pa.paged_attention_forward(q, k, v, table, lens, out, 0.5)
    assert_close(out, paged_attention64(q, k, v, table, lens, 0.5), F16)


def test_paged_attention_auto_split():
    """The auto rule in the simulator (2 SMs): one sequence x one kv head of 600 positions -> 2 splits."""
    rng = np.random.default_rng(41)
    q, k, v, table, lens = _paged_case(rng, F32, (600,), 1, 2, 1, 8, 16)
    plan = pa.forward_plan(q, k, v, q)
    assert pa.split_plan(plan, q, k, table) == (2, 384)
    out = _nan(q.shape, F32)
    pa.paged_attention_forward(q, k, v, table, lens, out, 0.2)
    assert_close(out, paged_attention64(q, k, v, table, lens, 0.2), F32)
