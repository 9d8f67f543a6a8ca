"""The Numba paged decode attention kernel (rawformer/kernels/numba/paged_attention.py).

CPU: the layout rule, the kernel's own argument guards, an independent float64 loop reference checked against
rawformer.ops.paged_attention.paged_attention_ref, and the kernel in the Numba CUDA simulator (the
paged_attention cases of tests/numba_sim_cases.py, in a subprocess; its sm_90 PTX is checked by
tests/numba_ptx_check.py through test_numba_kernels.py), the split-KV rule, and a vectorised float64
reference (for long contexts) checked against the loop one. GPU (marked gpu): the kernel against the
references over head dims 64/80/128, GQA 1/4/8, block sizes 8..128, q_len 1 and 3, ragged contexts (1, 15,
16, 17, 1000, 4097, block boundaries, 0), split-KV forced to 1 and 3 splits and chosen by the auto rule
(long contexts, empty splits, scores spanning hundreds of log2 units), NaN-poisoned outputs and NaN in
every cache slot no sequence owns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import assert_close, poison

pytest.importorskip("numba")

from rawformer.kernels.numba import paged_attention as pa  # noqa: E402
from rawformer.kernels.numba.paged_attention import DecodePlan  # noqa: E402

HERE = Path(__file__).resolve().parent
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTEST_XDIST", "PYTEST_CURRENT"))
}


# ---- an independent float64 reference ----------------------------------------------------------------------
def paged_attention_loop(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Per sequence, query token and q head: gather the visible keys through the block table one position at
    a time, then a plain float64 softmax. Returns float64 (num_seqs, q_len, q_heads, head_dim)."""
    seqs, q_len, q_heads, dim = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros(q.shape)
    for s in range(seqs):
        ctx = int(context_lens[s])
        for t in range(q_len):
            pos = ctx - q_len + t  # this token's own position; it sees 0..pos
            if pos < 0:
                continue
            slots = [(int(block_tables[s, j // bs]), j % bs) for j in range(pos + 1)]
            keys = np.stack([k_cache[b, o] for b, o in slots]).astype(np.float64)  # (pos + 1, kv_heads, dim)
            values = np.stack([v_cache[b, o] for b, o in slots]).astype(np.float64)
            for h in range(q_heads):
                k, v = keys[:, h // group], values[:, h // group]
                z = scale * (k @ q[s, t, h].astype(np.float64))
                p = np.exp(z - z.max())
                out[s, t, h] = (p / p.sum()) @ v
    return out


def paged_attention_vec(q, k_cache, v_cache, block_tables, context_lens, scale):
    """The same formula, vectorised per sequence (long contexts): float64 (num_seqs, q_len, q_heads, dim)."""
    seqs, q_len, q_heads, dim = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros(q.shape)
    for s in range(seqs):
        ctx = int(context_lens[s])
        if ctx <= 0:
            continue
        pos = np.arange(ctx)
        blocks = block_tables[s, pos // bs]
        keys = k_cache[blocks, pos % bs].astype(np.float64)  # (ctx, kv_heads, dim)
        values = v_cache[blocks, pos % bs].astype(np.float64)
        qs = q[s].astype(np.float64).reshape(q_len, kv_heads, group, dim)
        z = scale * np.einsum("tgid,jgd->tgij", qs, keys)  # (q_len, kv_heads, group, ctx)
        last = ctx - q_len + np.arange(q_len)  # each query token's own position
        visible = pos[None, :] <= last[:, None]
        z = np.where(visible[:, None, None, :], z, -np.inf)
        with np.errstate(invalid="ignore"):
            p = np.exp(z - z.max(axis=-1, keepdims=True))
            o = np.einsum("tgij,jgd->tgid", p, values) / p.sum(axis=-1, keepdims=True)
        out[s] = np.where(np.isnan(o), 0.0, o).reshape(q_len, q_heads, dim)  # a token that sees nothing
    return out


def make_case(rng, dtype, contexts, q_len, q_heads, kv_heads, dim, bs, spare=3):
    """Caches of a shuffled block pool (`spare` blocks nobody owns), block tables padded with an absurd id
    (never read), and NaN in every cache slot no sequence's context covers (never read either)."""
    need = [-(-c // bs) for c in contexts]
    max_blocks = max(need + [0]) + 1
    num_blocks = sum(need) + spare
    k = (rng.standard_normal((num_blocks, bs, kv_heads, dim)) * 2).astype(dtype)
    v = rng.standard_normal((num_blocks, bs, kv_heads, dim)).astype(dtype)
    ids = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((len(contexts), max_blocks), 2**30, np.int32)
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = ids[used : used + n]
        used += n
    k[ids[used:]], v[ids[used:]] = np.nan, np.nan
    for s, c in enumerate(contexts):
        if c % bs:
            k[table[s, c // bs], c % bs :], v[table[s, c // bs], c % bs :] = np.nan, np.nan
    q = rng.standard_normal((len(contexts), q_len, q_heads, dim)).astype(dtype)
    return q, k, v, table, np.asarray(contexts, np.int32)


def _ops_ref():
    try:
        from rawformer.ops.paged_attention import paged_attention_ref
    except ImportError:
        return None
    return paged_attention_ref


# ---- CPU ---------------------------------------------------------------------------------------------------
def test_loop_reference_known_values():
    """One key: out = v. Two equal keys: the mean of their values. Context 0: zeros."""
    q = np.ones((2, 1, 1, 4))
    k = np.zeros((3, 2, 1, 4))
    v = np.arange(24, dtype=np.float64).reshape(3, 2, 1, 4)
    table = np.array([[2, 0], [1, 0]], np.int32)
    out = paged_attention_loop(q, k, v, table, np.array([1, 0], np.int32), 0.5)
    assert np.array_equal(out[0, 0, 0], v[2, 0, 0]) and (out[1] == 0).all()
    out = paged_attention_loop(q, k, v, table, np.array([3, 2], np.int32), 0.5)
    assert np.allclose(out[0, 0, 0], (v[2, 0, 0] + v[2, 1, 0] + v[0, 0, 0]) / 3)
    assert np.allclose(out[1, 0, 0], v[1, :, 0].mean(axis=0))


@pytest.mark.parametrize("q_len,q_heads,kv_heads,dim,bs", [(1, 4, 1, 16, 8), (3, 6, 2, 12, 16)])
def test_loop_reference_matches_ops_reference(q_len, q_heads, kv_heads, dim, bs):
    ref = _ops_ref()
    if ref is None:
        pytest.skip("rawformer.ops.paged_attention is not there yet")
    rng = np.random.default_rng(q_len * 100 + bs)
    q, k, v, table, lens = make_case(rng, F32, [0, 3, 15, 16, 17, 40], q_len, q_heads, kv_heads, dim, bs)
    want = paged_attention_loop(q, k, v, table, lens, 0.37)
    got = ref(q, k, v, table, lens, 0.37)
    assert got.shape == want.shape
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dim,vec,per,group_rows,want",
    [
        (
            128,
            8,
            2,
            1,
            DecodePlan(8, 16, 1, 4, 2, 1),
        ),  # float16: 16 lanes of 16 bytes per token, 2 tokens/warp
        (128, 8, 2, 8, DecodePlan(8, 16, 1, 4, 2, 8)),  # GQA 8:1, one query token: one pass
        (128, 8, 2, 24, DecodePlan(8, 16, 1, 4, 2, 8)),  # GQA 8:1, 3 query tokens: three passes of 8 rows
        (128, 4, 1, 8, DecodePlan(4, 32, 1, 4, 2, 8)),  # float32: a warp per token
        (64, 8, 2, 4, DecodePlan(8, 8, 1, 4, 2, 4)),  # 4 tokens per warp
        (80, 8, 2, 3, DecodePlan(8, 16, 1, 4, 2, 4)),  # 10 vectors on 16 lanes; rows rounded to 4
        (256, 4, 2, 8, DecodePlan(4, 32, 2, 4, 2, 8)),  # float16 8-byte: two vectors per lane
        (256, 4, 1, 8, DecodePlan(4, 32, 2, 4, 2, 4)),  # float32: raw K/V buffers take 64 registers: 4 rows
        (68, 4, 2, 1, DecodePlan(4, 32, 1, 4, 2, 1)),  # 8-byte float16 access (68 * 2 is no multiple of 16)
        (72, 1, 1, 16, DecodePlan(1, 32, 3, 4, 2, 8)),  # scalar: 21 rows would need 3 x 21 floats; 8 fit
        (
            8,
            8,
            2,
            2,
            DecodePlan(8, 1, 1, 4, 1, 2),
        ),  # one lane per token: one token per step (unroll <= lanes)
        (40, 4, 1, 6, DecodePlan(4, 16, 1, 4, 2, 8)),  # 6 rows rounded to a power of two
    ],
)
def test_layout_rule(dim, vec, per, group_rows, want):
    plan = pa.make_plan(dim, vec, group_rows, per=per)
    assert plan == want
    assert plan.lanes * plan.packs * plan.vec >= dim  # the lanes cover the row
    assert plan.rows & (plan.rows - 1) == 0 and plan.unroll <= plan.lanes
    assert plan.rows * plan.items <= pa.ROW_BUDGET or plan.rows == 1
    assert 2 * plan.rows * plan.items + 4 * plan.unroll * plan.items // per <= pa.REG_BUDGET or plan.rows == 1


@pytest.mark.parametrize(
    "ctas,max_tokens,heavy,want",
    [
        (8 * 4, 32768, True, 8),  # b8 x 32768 GQA 32:4: 2 CTAs per SM -> 8 splits of 4096
        (8 * 32, 32768, False, 2),  # b8 MHA: 4 light CTAs per SM -> 2 splits
        (64 * 4, 4096, True, 1),  # b64 GQA: 256 CTAs already fill 132 SMs twice
        (64 * 32, 4096, False, 1),
        (2, 300, True, 1),  # 300 positions: one split of >= 256
        (2, 1000, True, 3),  # 1000 positions: 3 splits of >= 256
        (1, 10**6, False, 528),  # one CTA, a huge table: 4 x 132
        (0, 4096, True, 1),
    ],
)
def test_split_rule(ctas, max_tokens, heavy, want):
    plan = DecodePlan(8, 16, 1, 4, 2, 8 if heavy else 1)
    assert plan.resident == (2 if heavy else 4)
    assert pa.choose_num_splits(ctas, max_tokens, 132, plan) == want


@pytest.mark.parametrize(
    "splits,max_tokens,step,want",
    [
        (8, 32768, 16, (8, 4096)),
        (3, 1000, 16, (3, 336)),  # 334 positions rounded up to whole steps of 16
        (5, 40, 16, (3, 16)),  # more splits than steps: the count launched is smaller
        (1, 5000, 16, (1, 5000)),
        (7, 0, 16, (1, 1)),  # an empty table
        (5000, 10**6, 16, (1009, 992)),  # capped at MAX_SPLITS, rounded to steps: 1009 launched
    ],
)
def test_split_layout(splits, max_tokens, step, want):
    got = pa.split_layout(splits, max_tokens, step)
    assert got == want
    n, per = got
    assert per % step == 0 or n == 1
    assert n * per >= max_tokens and (n - 1) * per < max(max_tokens, 1)


def test_split_plan_reads_the_table_width():
    q = np.zeros((1, 1, 8, 128), F16)
    kc = np.zeros((10, 16, 1, 128), F16)
    plan = pa.forward_plan(q, kc, kc, q)
    assert plan == DecodePlan(8, 16, 1, 4, 2, 8)
    table = np.zeros((1, 100), np.int32)  # 1600 positions, one CTA, 2 "SMs" (NumPy arrays): 4 CTAs wanted
    assert pa.split_plan(plan, q, kc, table) == (4, 400)
    assert pa.split_plan(plan, q, kc, table, 1) == (1, 1600)
    assert pa.split_plan(plan, q, kc, table, 3) == (3, 544)


@pytest.mark.parametrize("plan", [DecodePlan(8, 16, 1, 4, 4, 8), DecodePlan(8, 1, 16, 1, 1, 1)])
def test_plan_guard_accepts_valid(plan):
    pa._check_plan(plan, 128)


@pytest.mark.parametrize(
    "plan,dim",
    [
        (DecodePlan(8, 16, 1, 4, 2, 6), 128),  # rows not a power of two
        (DecodePlan(8, 2, 1, 4, 4, 8), 16),  # unroll > lanes
        (DecodePlan(8, 12, 1, 4, 2, 8), 96),  # lanes not a power of two
        (DecodePlan(8, 8, 1, 4, 2, 8), 128),  # 8 lanes x 8 do not cover 128
        (DecodePlan(8, 16, 1, 4, 2, 8), 100),  # vec does not divide head_dim
    ],
)
def test_plan_guard_rejects(plan, dim):
    with pytest.raises(ValueError):
        pa._check_plan(plan, dim)


@pytest.mark.parametrize("q_len,q_heads,kv_heads", [(1, 4, 1), (3, 6, 2), (2, 2, 2)])
def test_vectorised_reference_matches_loop(q_len, q_heads, kv_heads):
    rng = np.random.default_rng(q_len * 10 + q_heads)
    q, k, v, table, lens = make_case(rng, F32, [0, 1, 2, 15, 16, 17, 40], q_len, q_heads, kv_heads, 12, 8)
    want = paged_attention_loop(q, k, v, table, lens, 0.4)
    got = paged_attention_vec(q, k, v, table, lens, 0.4)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_plan_reads_alignment():
    def fake(shape, dtype, offset=0):
        n = int(np.prod(shape))
        buf = np.zeros(n + 16 + offset, dtype)
        start = (-buf.ctypes.data % 16) // buf.itemsize + offset
        return buf[start : start + n].reshape(shape)

    q = fake((2, 1, 8, 128), F16)
    kc = fake((5, 16, 1, 128), F16)
    assert pa.forward_plan(q, kc, kc, q).vec == 8
    assert pa.forward_plan(fake((2, 1, 8, 128), F16, 1), kc, kc, q).vec == 1  # a 2-byte offset q
    q68, k68 = fake((2, 1, 8, 68), F16), fake((5, 16, 1, 68), F16)
    assert pa.forward_plan(q68, k68, k68, q68).vec == 4  # 136-byte rows: 8-byte access
    assert pa.forward_plan(q, kc, kc, q, max_vec=4) == DecodePlan(4, 32, 1, 4, 2, 8)  # the benchmark knob
    assert pa.forward_plan(q, kc, kc, q, max_vec=3).vec == 2


@pytest.mark.parametrize(
    "change,err",
    [
        (lambda a: dict(a, out=a["out"][:, :, :4]), ValueError),  # out not like q
        (lambda a: dict(a, k_cache=a["k_cache"][..., :8]), ValueError),  # head_dim mismatch
        (
            lambda a: dict(
                a, k_cache=a["k_cache"][:, :, :1].repeat(3, 2), v_cache=a["v_cache"][:, :, :1].repeat(3, 2)
            ),
            ValueError,
        ),  # 3 kv heads do not divide 8 q heads
        (lambda a: dict(a, block_tables=a["block_tables"].astype(np.int64)), TypeError),
        (lambda a: dict(a, context_lens=a["context_lens"][:1]), ValueError),
        (lambda a: {n: x.repeat(20, 3) if x.ndim == 4 else x for n, x in a.items()}, ValueError),  # dim 320
        (lambda a: dict(a, k_cache=a["k_cache"][:, :12], v_cache=a["v_cache"][:, :12]), ValueError),  # bs 12
    ],
)
def test_kernel_guards(change, err):
    args = dict(
        q=np.zeros((2, 1, 8, 16), F32),
        k_cache=np.zeros((4, 16, 2, 16), F32),
        v_cache=np.zeros((4, 16, 2, 16), F32),
        block_tables=np.zeros((2, 2), np.int32),
        context_lens=np.zeros(2, np.int32),
        out=np.zeros((2, 1, 8, 16), F32),
    )
    a = change(args)
    with pytest.raises(err):
        pa.paged_attention_forward(
            a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"], a["out"], 1.0
        )


def test_kernel_in_cuda_simulator():
    """The paged_attention cases of tests/numba_sim_cases.py under NUMBA_ENABLE_CUDASIM=1 (every code path:
    several passes over the rows, idle lanes, scalar packs, one to 32 lanes per token, context 0)."""
    env = dict(CLEAN_ENV, NUMBA_ENABLE_CUDASIM="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "paged_attention",
        str(HERE / "numba_sim_cases.py"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
    assert run.returncode == 0, f"simulator cases failed:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1]


# ---- GPU ---------------------------------------------------------------------------------------------------
BASE_CONTEXTS = (1, 15, 16, 17, 1000, 0)


def _contexts(bs, q_len):
    c = set(BASE_CONTEXTS) | {bs - 1, bs, bs + 1, 2 * bs, 3 * bs - 1}
    return sorted(x for x in c if x == 0 or x >= q_len)  # a context holds at least the q_len new tokens


def _check_gpu(
    cp, dtype, contexts, q_len, q_heads, kv_heads, dim, bs, seed, scale=None, num_splits=None, loop_ref=True
):
    """Run the kernel (auto split-KV unless num_splits is given: small test grids split) and compare with the
    loop reference (or the vectorised one for long contexts), and the ops reference when it is there."""
    rng = np.random.default_rng(seed)
    q, k, v, table, lens = make_case(rng, dtype, contexts, q_len, q_heads, kv_heads, dim, bs)
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    out = poison(cp, q.shape, dtype)
    args = [cp.asarray(a) for a in (q, k, v, table, lens)]
    pa.paged_attention_forward(*args, out, scale, num_splits=num_splits)
    got = cp.asnumpy(out)
    splits = pa.split_plan(
        pa.forward_plan(args[0], args[1], args[2], out), args[0], args[1], args[3], num_splits
    )
    name = f"{dtype} d={dim} {q_heads}:{kv_heads} bs={bs} q_len={q_len} splits={splits}"
    want = (paged_attention_loop if loop_ref else paged_attention_vec)(q, k, v, table, lens, scale)
    assert_close(got, want, dtype, name=name + " (loop ref)")
    ref = _ops_ref()
    if ref is not None:
        assert_close(got, ref(q, k, v, table, lens, scale), dtype, name=name + " (ops ref)")
    assert (got[lens == 0] == 0).all()
    return splits


GRID = [
    (dtype, dim, gqa, q_len, (8, 16, 128)[(i + j) % 3])
    for i, (dtype, dim) in enumerate((d, h) for d in (F16, F32) for h in (64, 80, 128))
    for j, (gqa, q_len) in enumerate((g, t) for g in (1, 4, 8) for t in (1, 3))
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,dim,gqa,q_len,bs", GRID, ids=str)
def test_gpu_paged_attention(cp, dtype, dim, gqa, q_len, bs):
    kv_heads = 2
    _check_gpu(cp, dtype, _contexts(bs, q_len), q_len, gqa * kv_heads, kv_heads, dim, bs, dim * 100 + bs)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", pa.BLOCK_SIZES)
def test_gpu_every_block_size(cp, bs):
    _check_gpu(cp, F16, _contexts(bs, 1), 1, 8, 2, 128, bs, bs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_gpu_long_context_and_many_rows(cp, dtype):
    """4097 tokens; GQA 8:1 x 3 query tokens = 24 rows (three passes of 8); one kv head (MQA)."""
    _check_gpu(cp, dtype, [4097, 1, 0, 4096], 3, 8, 1, 128, 16, 7)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,dtype", [(68, F16), (96, F16), (40, F32), (256, F16)], ids=str)
def test_gpu_other_head_dims(cp, dim, dtype):
    """8-byte float16 access (68), 96, a float32 row of 10 vectors, two packs... and 256."""
    _check_gpu(cp, dtype, [1, 17, 300], 2, 4, 2, dim, 16, dim)


@pytest.mark.gpu
@pytest.mark.parametrize("max_vec", [4, 2, 1])
def test_gpu_narrower_access_plans(cp, max_vec):
    """The benchmark knob: float16 head_dim 128 read 8, 4 or 2 bytes at a time (32 lanes per token)."""
    rng = np.random.default_rng(max_vec)
    q, k, v, table, lens = make_case(rng, F16, [1000, 17, 0, 1], 3, 8, 2, 128, 16)
    args = [cp.asarray(a) for a in (q, k, v, table, lens)]
    out = poison(cp, q.shape, F16)
    plan = pa.forward_plan(args[0], args[1], args[2], out, max_vec=max_vec)
    assert plan.vec == max_vec and plan.lanes == 32
    pa.run_forward(plan, *args, out, 0.09)
    assert_close(out, paged_attention_loop(q, k, v, table, lens, 0.09), F16)


@pytest.mark.gpu
def test_gpu_misaligned_pointer_falls_back(cp):
    """q and out views starting 2 bytes into their buffers: scalar access, same results."""
    rng = np.random.default_rng(3)
    q, k, v, table, lens = make_case(rng, F16, [33, 5], 1, 4, 2, 64, 16)
    buf = cp.asarray(np.concatenate([np.zeros(1, F16), q.ravel()]))
    qd = buf[1:].reshape(q.shape)
    obuf = cp.full(q.size + 1, np.nan, F16)
    out = obuf[1:].reshape(q.shape)
    kd, vd = cp.asarray(k), cp.asarray(v)
    assert pa.forward_plan(qd, kd, vd, out).vec == 1
    pa.paged_attention_forward(qd, kd, vd, cp.asarray(table), cp.asarray(lens), out, 0.125)
    assert_close(out, paged_attention_loop(q, k, v, table, lens, 0.125), F16)


@pytest.mark.gpu
def test_gpu_runs_on_cupy_current_stream(cp):
    rng = np.random.default_rng(5)
    q, k, v, table, lens = make_case(rng, F16, [1000, 17], 1, 8, 1, 128, 16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = poison(cp, q.shape, F16)
        args = (cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(table), cp.asarray(lens))
        pa.paged_attention_forward(*args, out, 0.1)
        got = out.get(stream=stream)
    stream.synchronize()
    assert_close(got, paged_attention_loop(q, k, v, table, lens, 0.1), F16)


# split-KV: (dtype, contexts, q_len, q_heads, kv_heads, head_dim, block_size)
SPLIT_CASES = [
    (F16, [4097, 1, 0, 300, 2048], 1, 32, 4, 128, 16),  # GQA 8:1, the decode benchmark's heads
    (F16, [4097, 17, 0, 1000], 1, 8, 8, 128, 16),  # MHA
    (F32, [3000, 5, 700], 3, 8, 2, 64, 32),  # GQA 4:1, 3 query tokens: 12 rows in two passes
    (F16, [1000, 16, 2500], 2, 8, 1, 80, 8),  # MQA, head_dim 80
    (F32, [2049, 40], 1, 4, 4, 128, 128),  # float32 MHA, 128-token blocks
]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3, None], ids=lambda x: f"splits={x}")
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_gpu_split_kv(cp, case, splits):
    """Forced one pass, three splits (later ones empty for short sequences) and the auto rule."""
    dtype, contexts, q_len, q_heads, kv_heads, dim, bs = SPLIT_CASES[case]
    got = _check_gpu(
        cp, dtype, contexts, q_len, q_heads, kv_heads, dim, bs, 100 + case, num_splits=splits, loop_ref=False
    )
    if splits is not None:
        assert got[0] == splits
    elif case == 0:
        assert got[0] > 1  # 20 CTAs on a GPU of tens of SMs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_gpu_long_context_auto_split(cp, dtype):
    """Two sequences of 32768 and 20000 positions, GQA 8:1 over 2 kv heads: 4 CTAs, tens of splits."""
    got = _check_gpu(cp, dtype, [32768, 20000], 1, 16, 2, 128, 16, 11, loop_ref=False)
    assert got[0] > 1


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_scores_spanning_hundreds_of_log2_units(cp, splits):
    """A large scale: the running max jumps many times (lazy rescale) and the splits' lse differ widely."""
    _check_gpu(cp, F32, [3000, 77], 1, 8, 2, 64, 16, 13, scale=2.0, num_splits=splits, loop_ref=False)


@pytest.mark.gpu
def test_gpu_split_kv_misaligned_and_scalar(cp):
    """Scalar access (q and out 2 bytes into their buffers) with splits: the combine writes scalars too."""
    rng = np.random.default_rng(17)
    q, k, v, table, lens = make_case(rng, F16, [900, 5], 1, 4, 2, 64, 16)
    buf = cp.asarray(np.concatenate([np.zeros(1, F16), q.ravel()]))
    qd = buf[1:].reshape(q.shape)
    out = cp.full(q.size + 1, np.nan, F16)[1:].reshape(q.shape)
    kd, vd, td = cp.asarray(k), cp.asarray(v), cp.asarray(table)
    plan = pa.forward_plan(qd, kd, vd, out)
    assert plan.vec == 1
    pa.paged_attention_forward(qd, kd, vd, td, cp.asarray(lens), out, 0.125, num_splits=3)
    assert pa.split_plan(plan, qd, kd, td, 3)[0] == 3
    assert_close(out, paged_attention_vec(q, k, v, table, lens, 0.125), F16)
