"""The INT8 KV cache: kv_write_int8 (bit-exact against a literal loop; GPU kernel against the NumPy path) and
paged_attention_int8 (against the float64 reference over the dequantized cache, and near fp attention)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from tolerances import assert_close

import rawformer  # noqa: F401  (registers the families test_cuda_compile sees)
from rawformer.kernels import modules
from rawformer.ops import kv_int8
from rawformer.ops.kv_int8 import (
    alloc_int8_cache,
    dequantize_kv,
    kv_write_int8,
    paged_attention_int8,
    paged_attention_int8_ref,
)
from rawformer.ops.paged_attention import paged_attention_ref

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def literal_quantize(row: np.ndarray) -> tuple[np.ndarray, np.float16]:
    """One (head_dim,) float32 row, element by element."""
    amax = np.float32(0)
    for x in row:
        amax = max(amax, abs(np.float32(x)))
    s16 = np.float16(amax / np.float32(127))
    s = np.float32(s16)
    q = np.zeros(row.shape, np.int8)
    if s > 0:
        for i, x in enumerate(row):
            q[i] = int(min(max(np.rint(np.float32(x) / s), -127), 127))
    return q, s16


def caches(num_blocks, block_size, kv_heads, head_dim, xp=np):
    kc, ks = alloc_int8_cache(num_blocks, block_size, kv_heads, head_dim, xp)
    vc, vs = alloc_int8_cache(num_blocks, block_size, kv_heads, head_dim, xp)
    return kc, vc, ks, vs


def test_write_matches_literal_rule_and_skips_padding(rng):
    k = (rng.standard_normal((5, 2, 64)) * 3).astype(np.float16)
    v = rng.standard_normal((5, 2, 64)).astype(np.float16)
    k[2, 1] = 0  # an all-zero head: scale 0, values 0
    slots = np.array([3, 17, -1, 8, 30])
    kc, vc, ks, vs = caches(4, 8, 2, 64)
    kc[2, 0] = 99  # slot 16: never written
    kv_write_int8(k, v, slots, kc, vc, ks, vs)
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        for h in range(2):
            for x, cache, scale in ((k, kc, ks), (v, vc, vs)):
                q, s = literal_quantize(x[t, h].astype(np.float32))
                np.testing.assert_array_equal(cache[slot // 8, slot % 8, h], q)
                assert scale[slot // 8, slot % 8, h] == s
    assert (kc[2, 0] == 99).all() and not kc[2, 2].any()  # slot 18 (token 2 was padding) untouched
    back = dequantize_kv(kc, ks)[0, 3]
    step = ks[0, 3].astype(np.float64)[:, None]
    assert np.all(np.abs(back - k[0].astype(np.float64)) <= 0.5 * step * (1 + 2**-10))


def test_attention_over_int8_cache_is_near_fp_attention(rng):
    """The reference is paged_attention_ref over the dequantized cache; and INT8 stays close to fp."""
    num_seqs, q_len, q_heads, kv_heads, d, bs = 3, 2, 8, 2, 128, 16
    ctx = np.array([37, 2, 0], np.int32)
    tables = np.full((num_seqs, 4), -1, np.int32)
    tables[0, :3], tables[1, :1] = [5, 1, 7], [2]
    kc, vc, ks, vs = caches(8, bs, kv_heads, d)
    kf = rng.standard_normal((8, bs, kv_heads, d))
    vf = rng.standard_normal((8, bs, kv_heads, d))
    slots = np.arange(8 * bs)
    kv_write_int8(kf.reshape(-1, kv_heads, d), vf.reshape(-1, kv_heads, d), slots, kc, vc, ks, vs)
    q = rng.standard_normal((num_seqs, q_len, q_heads, d))
    out = paged_attention_int8(q, kc, vc, ks, vs, tables, ctx)
    want = paged_attention_ref(q, dequantize_kv(kc, ks), dequantize_kv(vc, vs), tables, ctx)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    assert not out[2].any()  # an empty context: zeros
    fp = paged_attention_ref(q, kf, vf, tables, ctx)
    assert np.max(np.abs(out - fp)) < 0.05 * np.max(np.abs(fp))


def test_errors(rng):
    kc, vc, ks, vs = caches(2, 8, 2, 64)
    k = rng.standard_normal((3, 2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="one shape"):
        kv_write_int8(k, k[:2], np.arange(3), kc, vc, ks, vs)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write_int8(k, k, np.arange(2), kc, vc, ks, vs)
    with pytest.raises(ValueError, match="16 slots"):
        kv_write_int8(k, k, np.array([0, 1, 16]), kc, vc, ks, vs)
    with pytest.raises(ValueError, match="v_cache must be C-contiguous int8"):
        kv_write_int8(k, k, np.arange(3), kc, vc.astype(np.float16), ks, vs)
    with pytest.raises(ValueError, match="k_scale"):
        kv_write_int8(k, k, np.arange(3), kc, vc, ks[:1], vs)
    q = rng.standard_normal((1, 1, 3, 64))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention_int8(q, kc, vc, ks, vs, np.zeros((1, 2), np.int32), np.ones(1, np.int32))
    with pytest.raises(ValueError, match="head_dim 64, 96, 128, 256"):
        kv_int8._epl(80)


def test_instantiations_compile_with_nvcc(tmp_path):
    """Until rawformer.ops imports kv_int8 (then tests/test_cuda_compile.py covers it): nvcc, sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    exprs = modules.registered_families()["paged_attention_int8"]
    src = tmp_path / "kv8.cu"
    src.write_text(
        '#include "paged_attention_int8.cu"\nvoid* const kv8_instantiations[] = {\n'
        + "".join(f"    (void*)&{e},\n" for e in exprs)
        + "};\n"
    )
    cmd = [nvcc, *modules.COMPILE_OPTIONS, "-arch=sm_90", f"-I{modules.source_dir()}", "-Xptxas=-warn-spills"]
    proc = subprocess.run(
        [*cmd, "-c", str(src), "-o", str(tmp_path / "kv8.o")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not re.search(r"\d+ bytes spill", proc.stderr), proc.stderr


# ---- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_gpu_write_bit_exact(cp, rng, dtype, head_dim):
    kv_heads, tokens = 3, 29
    qkv = cp.asarray((rng.standard_normal((tokens, 8, head_dim)) * 2).astype(dtype))
    k, v = qkv[:, 2:5], qkv[:, 5:8]  # strided views of a fused projection
    slots = rng.permutation(6 * 16)[:tokens].astype(np.int32)
    slots[[3, 11]] = -1
    gpu = caches(6, 16, kv_heads, head_dim, cp)
    host = caches(6, 16, kv_heads, head_dim)
    kv_write_int8(k, v, cp.asarray(slots), *gpu)
    kv_write_int8(cp.asnumpy(k), cp.asnumpy(v), slots, *host)
    for g, h in zip(gpu, host, strict=True):
        np.testing.assert_array_equal(cp.asnumpy(g), h)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("q_len", [1, 3])
def test_gpu_attention(cp, rng, dtype, head_dim, q_len):
    num_seqs, q_heads, kv_heads, bs, nb = 4, 8, 2, 16, 40
    ctx = np.array([1 + q_len, 300, q_len, 0], np.int32)
    tables = np.full((num_seqs, 20), -1, np.int32)
    perm = rng.permutation(nb)
    used = 0
    for s, n in enumerate(ctx):
        blocks = -(-int(n) // bs)
        tables[s, :blocks] = perm[used : used + blocks]
        used += blocks
    c = caches(nb, bs, kv_heads, head_dim, cp)
    kf = cp.asarray(rng.standard_normal((nb * bs, kv_heads, head_dim)).astype(dtype))
    vf = cp.asarray(rng.standard_normal((nb * bs, kv_heads, head_dim)).astype(dtype))
    kv_write_int8(kf, vf, cp.arange(nb * bs, dtype=cp.int32), *c)
    q = cp.asarray(rng.standard_normal((num_seqs, q_len, q_heads, head_dim)).astype(dtype))
    cp.full(q.shape, np.nan, dtype=dtype)  # a NaN block in the pool for the output to land on
    out = paged_attention_int8(q, *c, cp.asarray(tables), cp.asarray(ctx))
    want = paged_attention_int8_ref(q, *c, tables, ctx)
    assert_close(out, want, dtype)
    assert not bool(out[3].any())
