"""paged_attention: the float64 reference against a literal per-token loop and against dense attention over
a contiguous cache, block-size invariance, the NumPy path (dtypes, out=, zero sizes), argument errors, the
block-table debug checks and the split rule (CPU); every CUDA version, dtype, head dim, GQA ratio, block
size, q_len, ragged contexts and split count against the reference, poisoned outputs and caches, strided
views, debug detection and the Numba path (GPU)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from foreign import DLPackOnly
from tolerances import assert_close, poison

import rawformer  # noqa: F401
from rawformer.kernels import modules

pa = importlib.import_module("rawformer.ops.paged_attention")

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


# ---- building cases -------------------------------------------------------------------------------------


class Case:
    """A paged cache holding `contexts` tokens per sequence in shuffled blocks, with NaN in every cache slot
    no sequence owns (so a kernel that reads past a context fails) and garbage ids in unused table slots."""

    def __init__(
        self,
        rng,
        contexts,
        *,
        q_len=1,
        q_heads=4,
        kv_heads=2,
        head_dim=16,
        block_size=8,
        dtype=F32,
        spare_blocks=3,
        garbage=True,
    ):
        self.contexts = np.asarray(contexts, dtype=np.int32)
        num_seqs = len(contexts)
        used = [-(-int(c) // block_size) for c in contexts]
        width = max(used + [1])
        num_blocks = sum(used) + spare_blocks
        perm = rng.permutation(num_blocks).astype(np.int32)
        self.tables = np.full((num_seqs, width), 10**6 if garbage else 0, dtype=np.int32)
        self.owners = np.full((num_blocks,), -1, dtype=np.int32)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = np.full(shape, np.nan, dtype=dtype)
        self.v = np.full(shape, np.nan, dtype=dtype)
        nxt = 0
        for s, (c, nb) in enumerate(zip(contexts, used, strict=True)):
            blocks = perm[nxt : nxt + nb]
            nxt += nb
            self.tables[s, :nb] = blocks
            self.owners[blocks] = s
            for p in range(int(c)):
                b, off = blocks[p // block_size], p % block_size
                self.k[b, off] = rng.standard_normal((kv_heads, head_dim))
                self.v[b, off] = rng.standard_normal((kv_heads, head_dim))
        if not garbage:
            self.k = np.nan_to_num(self.k, nan=0.0)
            self.v = np.nan_to_num(self.v, nan=0.0)
        self.q = rng.standard_normal((num_seqs, q_len, q_heads, head_dim)).astype(dtype)
        self.block_size = block_size

    def args(self, xp=np):
        conv = (lambda a: a) if xp is np else xp.asarray
        return tuple(conv(a) for a in (self.q, self.k, self.v, self.tables, self.contexts))

    def ref(self, scale=None):
        return pa.paged_attention_ref(self.q, self.k, self.v, self.tables, self.contexts, scale)


def literal_paged_attention(q, k_cache, v_cache, tables, contexts, scale):
    """Token by token, head by head, key by key with the math module: the definition of the op."""
    num_seqs, q_len, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros(q.shape, dtype=np.float64)
    for s in range(num_seqs):
        for t in range(q_len):
            last = int(contexts[s]) - q_len + t
            for h in range(q_heads):
                keys = list(range(last + 1))
                if not keys:
                    continue
                qv = [float(x) for x in q[s, t, h]]
                scores = []
                for p in keys:
                    kv = k_cache[tables[s, p // block_size], p % block_size, h // group]
                    scores.append(scale * math.fsum(a * float(b) for a, b in zip(qv, kv, strict=True)))
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = math.fsum(weights)
                for w, p in zip(weights, keys, strict=True):
                    vv = v_cache[tables[s, p // block_size], p % block_size, h // group].astype(np.float64)
                    out[s, t, h] += (w / total) * vv
    return out


# ---- reference (CPU) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("q_len", "q_heads", "kv_heads"), [(1, 4, 4), (1, 4, 2), (3, 4, 1), (3, 6, 2)])
def test_ref_matches_literal_loop(rng, q_len, q_heads, kv_heads):
    # contexts: empty, shorter than q_len (early queries see nothing), block-boundary values, ragged
    case = Case(rng, [0, 1, 2, 7, 8, 9, 17], q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=8)
    scale = 0.37
    got = case.ref(scale)
    want = literal_paged_attention(case.q, case.k, case.v, case.tables, case.contexts, scale)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    assert np.all(got[0] == 0)  # context 0 -> zeros


def test_ref_default_scale_and_known_value():
    # one sequence, one key: out = v whatever q is; two equal keys: the mean of the values
    q = np.ones((1, 1, 1, 4))
    k = np.zeros((1, 8, 1, 4))
    v = np.arange(32, dtype=np.float64).reshape(1, 8, 1, 4)
    got = pa.paged_attention_ref(q, k, v, np.zeros((1, 1), np.int32), np.array([2], np.int32))
    np.testing.assert_allclose(got[0, 0, 0], (v[0, 0, 0] + v[0, 1, 0]) / 2)


def dense_causal_attention(q, k, v, scale):
    """q (B, T, H, D), k / v (B, N, KVH, D) contiguous: bottom-right causal softmax attention, GQA by
    repeating kv heads, written with plain matrix products."""
    group = q.shape[2] // k.shape[2]
    kr = np.repeat(k, group, axis=2).transpose(0, 2, 3, 1)  # (B, H, D, N)
    vr = np.repeat(v, group, axis=2).transpose(0, 2, 1, 3)  # (B, H, N, D)
    s = scale * np.matmul(q.transpose(0, 2, 1, 3), kr)  # (B, H, T, N)
    t, n = q.shape[1], k.shape[1]
    keep = np.arange(n)[None, :] <= np.arange(t)[:, None] + (n - t)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p, vr).transpose(0, 2, 1, 3)  # (B, T, H, D)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_ref_equals_contiguous_cache(rng, block_size):
    b, n, t, h, kvh, d = 3, 37, 3, 8, 2, 16
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, n, kvh, d))
    v = rng.standard_normal((b, n, kvh, d))
    nb = -(-n // block_size)
    perm = rng.permutation(b * nb + 2)
    tables = perm[: b * nb].reshape(b, nb).astype(np.int32)
    k_cache = np.full((b * nb + 2, block_size, kvh, d), np.nan)
    v_cache = np.full_like(k_cache, np.nan)
    for s in range(b):
        for p in range(n):
            k_cache[tables[s, p // block_size], p % block_size] = k[s, p]
            v_cache[tables[s, p // block_size], p % block_size] = v[s, p]
    got = pa.paged_attention_ref(q, k_cache, v_cache, tables, np.full(b, n, np.int32), 0.25)
    np.testing.assert_allclose(got, dense_causal_attention(q, k, v, 0.25), rtol=1e-12, atol=1e-13)


# ---- the NumPy path of the op (CPU) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_op_numpy_dtypes_and_out(rng, dtype):
    case = Case(rng, [5, 0, 19], q_len=2, dtype=dtype)
    got = pa.paged_attention(*case.args())
    assert got.dtype == dtype and got.shape == case.q.shape
    np.testing.assert_array_equal(got, case.ref().astype(dtype))
    out = poison(np, case.q.shape, dtype)
    assert pa.paged_attention(*case.args(), out=out) is out
    np.testing.assert_array_equal(out, got)


def test_op_numpy_int64_tables_dlpack_and_views(rng):
    case = Case(rng, [9, 3], q_len=1, q_heads=4, kv_heads=4)
    q, k, v, tables, ctx = case.args()
    want = case.ref(0.5)
    np.testing.assert_allclose(pa.paged_attention(q, k, v, tables.astype(np.int64), ctx, scale=0.5), want)
    got = pa.paged_attention(DLPackOnly(q), DLPackOnly(k), DLPackOnly(v), tables, ctx, scale=0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    packed = np.stack([q, q + 1, q - 1], axis=2)  # (seqs, q_len, 3, heads, dim): q as a strided view
    np.testing.assert_allclose(pa.paged_attention(packed[:, :, 0], k, v, tables, ctx, scale=0.5), want)


def test_op_numpy_zero_sizes(rng):
    case = Case(rng, [4], q_len=1)
    q, k, v, tables, ctx = case.args()
    assert pa.paged_attention(q[:0], k, v, tables[:0], ctx[:0]).shape == (0, 1, 4, 16)
    empty_cache = np.zeros((0, 8, 2, 16), np.float32)
    got = pa.paged_attention(q, empty_cache, empty_cache, np.zeros((1, 0), np.int32), np.zeros(1, np.int32))
    np.testing.assert_array_equal(got, np.zeros_like(q))


# ---- argument errors (CPU) --------------------------------------------------------------------------------


def _base(rng):
    return Case(rng, [9, 3], q_len=1, q_heads=4, kv_heads=2).args()


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: {"q": a["q"][0]}, ValueError, "q must be"),
        (lambda a: {"k_cache": a["k_cache"][0]}, ValueError, "k_cache must be"),
        (lambda a: {"v_cache": a["v_cache"][:, :, :1]}, ValueError, "v_cache has shape"),
        (lambda a: {"q": a["q"][..., :8]}, ValueError, "head_dim"),
        (lambda a: {"q": a["q"].astype(np.int32)}, TypeError, "q has dtype"),
        (lambda a: {"k_cache": a["k_cache"].astype(np.float64)}, TypeError, "k_cache has dtype"),
        (lambda a: {"q": a["q"][:, :, :3]}, ValueError, "does not divide"),
        (lambda a: {"block_tables": a["block_tables"].astype(np.float32)}, TypeError, "block_tables must be"),
        (lambda a: {"block_tables": a["block_tables"][0]}, ValueError, "block_tables must have 2"),
        (lambda a: {"block_tables": a["block_tables"][:1]}, ValueError, "block_tables has 1 rows"),
        (lambda a: {"context_lens": a["context_lens"][:1]}, ValueError, "context_lens has shape"),
        (lambda a: {"context_lens": a["context_lens"] * 1.0}, TypeError, "context_lens must be"),
        (lambda a: {"scale": float("nan")}, ValueError, "scale must be finite"),
        (lambda a: {"num_splits": 0}, ValueError, "num_splits must be >= 1"),
        (lambda a: {"num_splits": 2.0}, TypeError, "num_splits must be an int"),
        (lambda a: {"impl": "cuda"}, ValueError, "runs on a GPU"),
        (lambda a: {"impl": "triton"}, ValueError, "impl must be"),
        (lambda a: {"version": 2}, ValueError, "does not apply"),
        (lambda a: {"version": 7}, ValueError, "version must be one of"),
        (lambda a: {"debug": "yes"}, TypeError, "debug must be"),
        (lambda a: {"block_owners": np.zeros(3, np.int32)}, ValueError, "block_owners has shape"),
        (lambda a: {"out": np.zeros((2, 1, 4, 8), np.float32)}, ValueError, "out has shape"),
        (lambda a: {"q": [[1.0]]}, TypeError, "q must be an array"),
    ],
)
def test_argument_errors(rng, mutate, error, match):
    q, k, v, tables, ctx = _base(rng)
    base = {"q": q, "k_cache": k, "v_cache": v, "block_tables": tables, "context_lens": ctx}
    changes = mutate(base)
    pos = {n: changes.pop(n, base[n]) for n in base}
    with pytest.raises(error, match=match):
        pa.paged_attention(*pos.values(), **changes)


def test_block_size_must_be_listed(rng):
    q = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    cache = np.zeros((2, 12, 2, 8), np.float32)
    with pytest.raises(ValueError, match="block_size 12"):
        pa.paged_attention(q, cache, cache, np.zeros((1, 1), np.int32), np.ones(1, np.int32))


# ---- debug checks (CPU) -----------------------------------------------------------------------------------


def test_out_of_range_blocks_always_detected_on_numpy(rng):
    case = Case(rng, [9, 17, 3], block_size=8)
    q, k, v, tables, ctx = case.args()
    num_blocks = k.shape[0]
    for bad in (num_blocks, -1, 10**6):
        t = tables.copy()
        t[1, 2] = bad  # sequence 1 uses 3 blocks: slot 2 is in use
        with pytest.raises(ValueError, match=rf"sequence 1, table slot 2: block id {bad} is out of range"):
            pa.paged_attention(q, k, v, t, ctx)
    t = tables.copy()
    t[0, 2] = -5  # sequence 0 uses 2 blocks: slot 2 is not read, anything may be there
    np.testing.assert_array_equal(
        pa.paged_attention(q, k, v, t, ctx), pa.paged_attention(q, k, v, tables, ctx)
    )


def test_context_lens_out_of_range(rng):
    q, k, v, tables, ctx = Case(rng, [9, 17], block_size=8).args()
    for value in (tables.shape[1] * 8 + 1, -1):
        bad = ctx.copy()
        bad[1] = value
        with pytest.raises(ValueError, match=rf"context_lens\[1\] = {value} is outside"):
            pa.paged_attention(q, k, v, tables, bad)


def test_foreign_blocks_detected_in_debug_mode(rng, monkeypatch):
    case = Case(rng, [9, 17, 3], block_size=8)
    q, k, v, tables, ctx = case.args()
    t = tables.copy()
    t[2, 0] = tables[1, 1]  # sequence 2 reads a block owned by sequence 1
    msg = rf"sequence 2, table slot 0: block id {tables[1, 1]} belongs to sequence 1"
    with pytest.raises(ValueError, match=msg):
        pa.paged_attention(q, k, v, t, ctx, block_owners=case.owners, debug=True)
    pa.paged_attention(q, k, v, t, ctx, block_owners=case.owners, debug=False)  # trusted without debug
    monkeypatch.setenv("RAWFORMER_DEBUG", "1")
    with pytest.raises(ValueError, match=msg):
        pa.paged_attention(q, k, v, t, ctx, block_owners=case.owners)
    shared = case.owners.copy()
    shared[tables[1, 1]] = -1  # a shared block (e.g. a common prefix) may be read by anyone
    pa.paged_attention(q, k, v, t, ctx, block_owners=shared)


def test_first_bad_entry_order(rng):
    tables = np.array([[0, 1, 9], [2, 3, 9]], np.int32)
    owners = np.array([0, 0, 1, -1], np.int32)
    ctx = np.array([16, 16], np.int32)
    assert pa._first_bad_numpy(tables, ctx, owners, 4, 8) is None
    assert pa._first_bad_numpy(tables, np.array([17, 9], np.int32), owners, 4, 8) == (0, 2)
    assert pa._first_bad_numpy(tables, np.array([16, 30], np.int32), owners, 4, 8) == (1, 3)
    assert pa._first_bad_numpy(np.array([[0, 2, 9], [2, 3, 9]], np.int32), ctx, owners, 4, 8) == (0, 1)


# ---- kernel selection and the split rule (CPU) -------------------------------------------------------------


class _FakeGpuArray:
    device = "<CUDA Device 0>"


def test_v4_refused_below_sm90(monkeypatch):
    # v4's bulk copies and mbarrier transaction counts need sm_90: the launcher refuses older devices
    monkeypatch.setattr(pa, "_device_cc", lambda a: 80)
    with pytest.raises(ValueError, match=r"version=4 needs a GPU of compute capability >= 9.0.*has 8.0"):
        pa._check_v4_device(_FakeGpuArray())
    monkeypatch.setattr(pa, "_device_cc", lambda a: 90)
    pa._check_v4_device(_FakeGpuArray())


def test_split_rule():
    sms = 132
    assert pa.choose_num_splits(64 * 4, 4096, sms) == 1  # batch 64 x 4 kv heads fills the GPU
    assert pa.choose_num_splits(8 * 4, 32768, sms) == 8  # 256 CTAs: about 2 per SM, one wave
    assert pa.choose_num_splits(8 * 32, 32768, sms) == 1
    assert pa.choose_num_splits(1, 1024, sms) == 4  # >= 256 positions per split
    assert pa.choose_num_splits(1, 100, sms) == 1
    assert pa.choose_num_splits(8 * 4, 32768, sms, ctas_per_sm=3) == 12  # the rule follows the residency
    assert pa.choose_num_splits(200, 32768, sms, ctas_per_sm=3) == 1
    for splits, tokens, tile in [(8, 32768, 64), (3, 1000, 64), (5, 16, 32), (1, 4097, 64), (64, 128, 64)]:
        n, per = pa.split_layout(splits, tokens, tile)
        assert 1 <= n <= splits and per * n >= tokens and per * (n - 1) < tokens
        assert n == 1 or per % tile == 0


def test_every_plan_is_registered():
    registered = set(modules.registered_families()["paged_attention"])
    for dtype in (F16, F32):
        for head_dim in range(8, 257, 8):
            for rows in (1, 2, 3, 4, 5, 8, 9, 16, 24, 32, 33, 128):
                for version in (1, 2, 3, 4):
                    plan = pa._plan(version, dtype, head_dim, rows)
                    if plan is None:
                        assert version in (2, 3, 4) and (dtype == F32 or head_dim > 128)
                        continue
                    assert plan.expr in registered
                    assert plan.smem <= 227 * 1024
                    if version in (2, 3, 4):
                        # 2 CTAs per SM on an H100 (228 KB per SM, 1 KB reserved per CTA)
                        assert 2 * (plan.smem + 1024) <= 228 * 1024
                        assert plan.tile % 64 == 0  # v3's 16-token tiles never straddle a split
    for head_dim in (64, 96, 128):
        for stages in pa._V3_STAGE_CHOICES:
            plan = pa._plan(3, F16, head_dim, 8, stages)
            assert plan.expr in registered
            # 2 stages: 3 CTAs per SM (the kernel's launch bound) must fit the H100's 228 KB
            assert (3 if stages == 2 else 2) * (plan.smem + 1024) <= 228 * 1024
    for head_dim in (64, 96, 128):
        for stages in (*pa._V4_STAGE_CHOICES, pa._V4_STAGES[head_dim]):
            plan = pa._plan(4, F16, head_dim, 8, stages)
            assert plan.expr in registered
            assert plan.expr == f"paged_attention_v4<__half, {head_dim}, {stages}>"
            # the kernel's v4_smem: v3's layout + one 8-byte mbarrier per (warp, stage)
            v3 = pa._plan(3, F16, head_dim, 8, stages)
            assert plan.smem == v3.smem + 4 * stages * 8
            assert plan.smem <= 227 * 1024  # the H100's per-block opt-in limit
    assert pa._plan(4, F16, 128, 1, 3).smem == 109_536 and pa._plan(4, F16, 64, 1, 6).smem == 113_728
    for head_dim, ctas in ((64, 3), (96, 2), (128, 3)):  # the defaults: CTAs per SM on an H100 (228 KB)
        assert (pa._plan(4, F16, head_dim, 1).smem + 1024) * ctas <= 228 * 1024
    assert pa._default_version(F16, 128) == 3 and pa._default_version(F16, 136) == 1
    assert pa._default_version(F32, 64) == 1


# ---- GPU --------------------------------------------------------------------------------------------------


def _gpu_contexts(block_size, q_len):
    # every edge at once, as one ragged batch: empty, shorter than q_len, block boundaries, long
    return [0, 1, 2, 15, 16, 17, block_size - 1, block_size, block_size + 1, 3 * block_size, 1000, 4097][
        (0 if q_len > 1 else 1) :
    ]


def _need_version(cp, version):
    """v4 runs on compute capability >= 9.0 only (test_gpu_v4_refused_below_sm90 covers older GPUs)."""
    if version == 4 and int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("version 4 needs sm_90")


def _run_gpu(cp, case, dtype, **kwargs):
    args = case.args(cp)
    out = poison(cp, case.q.shape, dtype)
    got = pa.paged_attention(*args, out=out, **kwargs)
    assert got is out
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 80])
@pytest.mark.parametrize(("version", "dtype"), [(1, F16), (1, F32), (2, F16), (3, F16), (4, F16)])
def test_gpu_matches_reference(cp, rng, version, dtype, head_dim, ratio, block_size, q_len):
    _need_version(cp, version)
    case = Case(
        rng,
        _gpu_contexts(block_size, q_len),
        q_len=q_len,
        q_heads=2 * ratio,
        kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    got = _run_gpu(cp, case, dtype, version=version, num_splits=1)
    assert_close(got, case.ref(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [1, 8])
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize(("version", "dtype"), [(1, F16), (1, F32), (2, F16), (3, F16), (4, F16)])
def test_gpu_splits(cp, rng, version, dtype, num_splits, ratio):
    _need_version(cp, version)
    case = Case(
        rng,
        [4097, 0, 1000, 1, 16, 2500],
        q_len=2,
        q_heads=4 * ratio,
        kv_heads=4,
        head_dim=128,
        block_size=16,
        dtype=dtype,
    )
    got = _run_gpu(cp, case, dtype, version=version, num_splits=num_splits)
    assert_close(got, case.ref(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "head_dim"), [(F16, 256), (F32, 256), (F16, 200), (F16, 36), (F32, 20)])
def test_gpu_other_head_dims(cp, rng, dtype, head_dim):
    # > 128 (v1 only), buckets with padding, and head dims that are not whole 16-byte vectors (padded copy)
    case = Case(
        rng, [1, 17, 300], q_len=2, q_heads=8, kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype
    )
    for splits in (1, 2):
        assert_close(_run_gpu(cp, case, dtype, num_splits=splits), case.ref(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_gpu_large_groups_use_row_chunks(cp, rng, version):
    _need_version(cp, version)
    # 16 q heads per kv head x 3 tokens = 48 rows: several row chunks per kv head
    case = Case(rng, [3, 40, 129], q_len=3, q_heads=32, kv_heads=2, head_dim=64, block_size=32, dtype=F16)
    assert_close(_run_gpu(cp, case, F16, version=version, num_splits=2), case.ref(), F16)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_gpu_strided_views_and_scale(cp, rng, version):
    _need_version(cp, version)
    case = Case(rng, [33, 5], q_len=1, q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=F16)
    q, k, v, tables, ctx = case.args(cp)
    packed = cp.stack([q, q, q], axis=2)  # (seqs, q_len, 3, heads, dim): q as a view, no copy
    kv = cp.stack([k, v], axis=1)  # (blocks, 2, block, kv_heads, dim): the caches as views
    got = pa.paged_attention(
        packed[:, :, 0], kv[:, 0], kv[:, 1], tables.astype(cp.int64), ctx, scale=0.3, version=version
    )
    assert_close(got, case.ref(0.3), F16)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_gpu_v3_block_sizes_and_splits(cp, rng, monkeypatch, block_size, num_splits, stages):
    # v3 reads two block ids per 16-token tile (tokens 0-7, 8-15) and gives each warp every 4th tile:
    # contexts shorter than one tile per warp, tile and block edges, every block size, split edges; both
    # compiled pipeline depths (2 stages re-reads Q from shared memory)
    monkeypatch.setattr(pa, "_V3_STAGES", stages)
    case = Case(
        rng,
        [0, 1, 15, 16, 17, 63, 64, 65, 129, 700, 1500],
        q_len=2,
        q_heads=16,
        kv_heads=4,
        head_dim=128,
        block_size=block_size,
        dtype=F16,
    )
    assert_close(_run_gpu(cp, case, F16, version=3, num_splits=num_splits), case.ref(), F16)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128, 80])
@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_gpu_v4_stages_block_sizes_and_splits(cp, rng, monkeypatch, head_dim, stages, block_size, num_splits):
    # every compiled pipeline depth of every head dim bucket (80: bucket 96, columns past head_dim zero-filled
    # once, never written by the bulk copies); tiles shorter than 16 tokens (clamped row copies), tile and
    # block edges, contexts shorter than one tile per warp and long enough to wrap every stage's mbarrier
    # phase many times (700 / 1500 tokens: ~11 / 23 tiles per warp)
    _need_version(cp, 4)
    monkeypatch.setitem(pa._V4_STAGES, pa._bucket(head_dim, pa._V2_HEAD_DIMS), stages)
    case = Case(
        rng,
        [0, 1, 15, 16, 17, 63, 64, 65, 129, 700, 1500],
        q_len=2,
        q_heads=16,
        kv_heads=4,
        head_dim=head_dim,
        block_size=block_size,
        dtype=F16,
    )
    assert_close(_run_gpu(cp, case, F16, version=4, num_splits=num_splits), case.ref(), F16)


@pytest.mark.gpu
def test_gpu_v4_refused_below_sm90(cp, rng):
    if int(cp.cuda.Device().compute_capability) >= 90:
        pytest.skip("this GPU runs version 4")
    q, k, v, tables, ctx = Case(rng, [3], q_len=1, dtype=F16).args(cp)
    with pytest.raises(ValueError, match="version=4 needs a GPU of compute capability"):
        pa.paged_attention(q, k, v, tables, ctx, version=4)


@pytest.mark.gpu
def test_gpu_v3_large_token_stride_copies(cp, rng, monkeypatch):
    # v3 keeps in-block token offsets in 32 bits; a cache view whose token stride passes the limit gets a
    # compact copy (the limit is lowered here so that a small view exercises the path)
    case = Case(rng, [40, 17], q_len=1, q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=F16)
    q, k, v, tables, ctx = case.args(cp)
    wide_k = cp.zeros((*k.shape[:-1], 128), k.dtype)
    wide_v = cp.zeros_like(wide_k)
    wide_k[..., :64], wide_v[..., :64] = k, v
    monkeypatch.setattr(pa, "_V3_MAX_TOKEN_STRIDE", 2 * 64 + 1)  # compact stride 128 passes, 256 does not
    got = pa.paged_attention(q, wide_k[..., :64], wide_v[..., :64], tables, ctx, version=3)
    assert_close(got, case.ref(), F16)


@pytest.mark.gpu
def test_gpu_zero_sizes(cp, rng):
    case = Case(rng, [0, 0], q_len=1, dtype=F16)
    q, k, v, tables, ctx = case.args(cp)
    cp.testing.assert_array_equal(pa.paged_attention(q, k, v, tables, ctx), cp.zeros_like(q))
    assert pa.paged_attention(q[:0], k, v, tables[:0], ctx[:0]).shape == (0,) + q.shape[1:]


@pytest.mark.gpu
def test_gpu_refusals(cp, rng):
    q, k, v, tables, ctx = Case(rng, [3], q_len=1, dtype=F32).args(cp)
    for version in (2, 3, 4):
        with pytest.raises(ValueError, match=f"version={version} runs float16"):
            pa.paged_attention(q, k, v, tables, ctx, version=version)
    big = cp.zeros((1, 1, 2, 264), cp.float16)
    cache = cp.zeros((1, 8, 2, 264), cp.float16)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        pa.paged_attention(big, cache, cache, tables, ctx)


@pytest.mark.gpu
def test_gpu_debug_detection(cp, rng):
    case = Case(rng, [9, 17, 3], block_size=8, dtype=F16)
    q, k, v, tables, ctx = case.args(cp)
    owners = cp.asarray(case.owners)
    pa.paged_attention(q, k, v, tables, ctx, block_owners=owners, debug=True)  # valid tables pass
    bad = tables.copy()
    bad[1, 2] = k.shape[0]
    with pytest.raises(ValueError, match=rf"sequence 1, table slot 2: block id {k.shape[0]} is out of range"):
        pa.paged_attention(q, k, v, bad, ctx, debug=True)
    bad = tables.copy()
    bad[2, 0] = tables[1, 1]
    with pytest.raises(ValueError, match=r"sequence 2, table slot 0: block id \d+ belongs to sequence 1"):
        pa.paged_attention(q, k, v, bad, ctx, block_owners=owners, debug=True)
    long = ctx.copy()
    long[0] = tables.shape[1] * 8 + 1
    with pytest.raises(ValueError, match=r"context_lens\[0\]"):
        pa.paged_attention(q, k, v, tables, long, debug=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_numba(cp, rng, dtype):
    pytest.importorskip("rawformer.kernels.numba.paged_attention")
    case = Case(
        rng, [1, 16, 17, 1000], q_len=3, q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=dtype
    )
    got = _run_gpu(cp, case, dtype, impl="numba")
    assert_close(got, case.ref(), dtype)
