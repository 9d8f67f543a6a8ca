"""The INT8 KV cache as a pool option: rawformer.memory.int8_arena.Int8KVArena under KVPool (sizes, fork /
copy-on-write and swap moving the scales with the int8 values) and models/int8_kv.py's attention in the
three step plans (prefill, decode, gather) against float64 references over the dequantized cache, and the
models over it (greedy generation vs the float cache)."""

from __future__ import annotations

import numpy as np
import pytest
from rawformer.models import GPT2Config, LlamaConfig, init_random
from rawformer.models.common import plan_step
from rawformer.models.int8_kv import int8_kv_attention

from rawformer.memory import KVArena, KVPool
from rawformer.memory.int8_arena import Int8KVArena
from rawformer.ops.kv_int8 import fake_quantize_kv, kv_write_int8
from rawformer.runtime.generate import generate, make_pool

BS = 4  # tokens per block: small, so that sequences span several blocks


def arena(layers=2, kv_heads=2, head_dim=8, num_blocks=12, dtype=np.float64, xp=np):
    return Int8KVArena(layers, kv_heads, head_dim, dtype, BS, num_blocks=num_blocks, xp=xp)


def fill(pool, seq_ids, rng, new=None):
    """One prepared step of `seq_ids`: random K / V written into every layer at its slots (the INT8
    quantizer); returns (batch, k, v) with k, v (layers, T, kv_heads, head_dim)."""
    a = pool.arena
    batch = pool.prepare(seq_ids, new)
    t = int(batch.tokens.shape[0])
    k = rng.standard_normal((a.layers, t, a.kv_heads, a.head_dim))
    v = rng.standard_normal((a.layers, t, a.kv_heads, a.head_dim))
    for layer in range(a.layers):
        kv_write_int8(k[layer], v[layer], batch.slot_mapping, *a.layer(layer))
    return batch, k, v


def contents(a, blocks):
    """(int8 values, scales) of the given blocks, every layer, K and V (copies)."""
    return a.data[:, :, blocks].copy(), a.scales[:, :, blocks].copy()


def test_sizes_twice_the_tokens():
    """A byte budget holds ~2x the tokens of a float16 arena (int8 + a 2-byte scale per head_dim values)."""
    budget = 1 << 20
    i8 = Int8KVArena(4, 2, 64, np.float16, 16, budget_bytes=budget, xp=np)
    f16 = KVArena(4, 2, 64, np.float16, 16, budget_bytes=budget, xp=np)
    assert i8.token_bytes == 2 * 4 * 2 * (64 + 2)
    assert i8.nbytes == i8.num_blocks * i8.block_bytes <= budget
    assert i8.num_blocks / f16.num_blocks == pytest.approx(128 / 66, rel=0.02)
    assert i8.data.dtype == np.int8 and i8.scales.dtype == np.float16 and i8.dtype == np.float16
    assert not np.any(i8.data) and not np.any(i8.scales)  # zeroed: unwritten slots dequantize to 0
    with pytest.raises(TypeError, match="dtype must be float16 or float32"):
        Int8KVArena(1, 1, 64, np.int8, 16, num_blocks=1, xp=np)
    with pytest.raises(ValueError, match="exactly one of"):
        Int8KVArena(1, 1, 64, np.float16, 16, xp=np)


def test_fork_copy_on_write_copies_scales():
    rng = np.random.default_rng(0)
    pool = KVPool(arena(), max_seq_len=32, prefix_caching=False)
    a = pool.arena
    pool.add_sequence(0, list(range(10)))  # blocks: 4 + 4 + 2 (the last one partly filled)
    fill(pool, [0], rng)
    pool.fork(0, 1)
    assert pool.block_table(1) == pool.block_table(0)
    before = contents(a, pool.block_table(0))
    slot = pool.append_slots(1, 1)  # the shared partial block is copied first
    t0, t1 = pool.block_table(0), pool.block_table(1)
    assert t0[:2] == t1[:2] and t0[2] != t1[2]
    q, s = contents(a, [t1[2]])
    np.testing.assert_array_equal(q[:, :, 0, :2], before[0][:, :, 2, :2])
    np.testing.assert_array_equal(s[:, :, 0, :2], before[1][:, :, 2, :2])
    assert np.all(s[:, :, 0, :2] > 0)  # real scales, not a zeroed block
    # writing the fork's new token leaves the original's block alone
    k = rng.standard_normal((1, a.kv_heads, a.head_dim)) * 100
    for layer in range(a.layers):
        kv_write_int8(k, k, slot, *a.layer(layer))
    after = contents(a, t0)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_swap_out_and_in_keep_values_and_scales():
    rng = np.random.default_rng(1)
    pool = KVPool(arena(num_blocks=8), max_seq_len=32, prefix_caching=False)
    a = pool.arena
    pool.add_sequence(0, list(range(11)))
    fill(pool, [0], rng)
    blocks = pool.block_table(0)
    before = contents(a, blocks)
    moved = pool.swap_out(0)
    assert moved == len(blocks) * a.block_bytes  # the host copy holds values and scales
    pool.add_sequence(1, list(range(20)))  # reuses the freed blocks: overwrite them
    fill(pool, [1], rng)
    pool.free_sequence(1)
    pool.swap_in(0)
    after = contents(a, pool.block_table(0))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    with pytest.raises(ValueError, match="not a host buffer"):
        a.from_host(np.zeros((2, 2, 5), np.uint8), [0])


@pytest.mark.gpu
def test_block_copies_gpu(cp):
    """The GPU copies (cudaMemcpy2DAsync of the int8 rows and of the scale rows) match the NumPy ones:
    copy_blocks (runs and single blocks), to_host, from_host with indices."""
    rng = np.random.default_rng(3)
    arenas = [Int8KVArena(2, 2, 64, np.float16, 16, num_blocks=9, xp=xp) for xp in (np, cp)]
    q = rng.integers(-127, 128, size=arenas[0].data.shape, dtype=np.int8)
    s = rng.random(arenas[0].scales.shape).astype(np.float16)
    hosts = []
    for a in arenas:
        a.data[...] = a.xp.asarray(q)
        a.scales[...] = a.xp.asarray(s)
        a.copy_blocks([0, 1, 2, 6], [3, 4, 5, 8])
        h = a.to_host([4, 5, 1, 7])
        cp.cuda.get_current_stream().synchronize()
        hosts.append(h.copy())
        a.from_host(h, [0, 2], [3, 1])
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(hosts[1], hosts[0])
    np.testing.assert_array_equal(cp.asnumpy(arenas[1].data), arenas[0].data)
    np.testing.assert_array_equal(cp.asnumpy(arenas[1].scales), arenas[0].scales)
    with pytest.raises(ValueError, match="head_dim"):
        Int8KVArena(1, 1, 40, np.float16, 16, num_blocks=1, xp=cp)


def reference(q, ctx_k, ctx_v, q_pos):
    """float64 causal attention of queries at positions q_pos over a context (S_k, kv_heads, D), GQA."""
    heads, kv_heads, d = q.shape[1], ctx_k.shape[1], q.shape[2]
    rep = heads // kv_heads
    kk, vv = np.repeat(ctx_k, rep, axis=1), np.repeat(ctx_v, rep, axis=1)  # (S_k, heads, D)
    s = np.einsum("thd,shd->ths", q, kk) / np.sqrt(d)
    s = np.where(np.arange(ctx_k.shape[0])[None, None] <= np.asarray(q_pos)[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("ths,shd->thd", p, vv)


def test_attention_in_every_plan():
    """Prefill (fresh K / V), decode (paged_attention_int8) and gather (dequantize_kv) over the INT8 cache
    agree with float64 attention over what the cache holds (fake_quantize_kv of the written K / V)."""
    rng = np.random.default_rng(2)
    heads, kv_heads, d = 4, 2, 8
    pool = KVPool(arena(layers=1, kv_heads=kv_heads, head_dim=d, num_blocks=16), max_seq_len=40)
    a = pool.arena
    prompts = [list(range(7)), list(range(20, 25))]
    for i, p in enumerate(prompts):
        pool.add_sequence(i, p)
    hist_k = [[], []]
    hist_v = [[], []]
    for step, new in enumerate([None, [[1], [2]], [[3, 4], [5]]]):
        batch = pool.prepare([0, 1], new)
        plan = plan_step(batch, BS, np)
        assert plan.mode == ("prefill", "decode", "gather")[step]
        t = int(batch.tokens.shape[0])
        q = rng.standard_normal((t, heads, d))
        k = rng.standard_normal((t, kv_heads, d))
        v = rng.standard_normal((t, kv_heads, d))
        out = np.full((t, heads, d), np.nan)
        out[:] = int8_kv_attention(q, k, v, batch, plan, a, 0)
        cu = np.asarray(batch.cu_seqlens_q)
        for i in range(2):
            rows = slice(int(cu[i]), int(cu[i + 1]))
            fresh = step == 0  # a prompt attends to its own unquantized K / V
            hist_k[i].append(k[rows] if fresh else fake_quantize_kv(k[rows]))
            hist_v[i].append(v[rows] if fresh else fake_quantize_kv(v[rows]))
            ctx_k, ctx_v = np.concatenate(hist_k[i]), np.concatenate(hist_v[i])
            n = ctx_k.shape[0]
            pos = np.arange(n - (rows.stop - rows.start), n)
            want = reference(q[rows], ctx_k, ctx_v, pos)
            np.testing.assert_allclose(out[rows], want, rtol=1e-10, atol=1e-10)
            if fresh:  # from now on the context is what the cache holds
                hist_k[i][-1], hist_v[i][-1] = fake_quantize_kv(k[rows]), fake_quantize_kv(v[rows])
        # the cache holds the quantized K of every token written this step
        kc, vc = a.dequantized(0)
        slots = np.asarray(batch.slot_mapping)
        np.testing.assert_array_equal(kc.reshape(-1, kv_heads, d)[slots], fake_quantize_kv(k))


# ---- model level ----------------------------------------------------------------------------------------

MODELS = {
    "llama": LlamaConfig(
        vocab_size=61,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
    "gpt2": GPT2Config(vocab_size=61, n_positions=64, n_embd=128, n_layer=2, n_head=2),
}  # fmt: skip  (head_dim 64: what the GPU kernels take)


def pools(model, tokens=96):
    return tuple(make_pool(model, tokens, max_seq_len=tokens, kv_int8=q) for q in (False, True))


def forced_logits(model, pool, prompt, tokens):
    """Last-token logits (steps, V) of the prompt, then of each of `tokens` fed back (teacher forcing)."""
    pool.add_sequence(0, prompt)
    out = []
    for new in [None, *[[t] for t in tokens]]:
        batch = pool.prepare([0], None if new is None else [new])
        lg = model.forward(batch, pool.arena, last_only=True)
        out.append(lg if model.xp is np else model.xp.asnumpy(lg))
    pool.free_sequence(0)
    return np.concatenate(out).astype(np.float64)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_cpu(name):
    """Greedy decoding over the INT8 cache vs the float cache (CPU float64 references): the same first
    tokens (random weights have near ties later), and teacher-forced logits within INT8 rounding."""
    model = init_random(MODELS[name], seed=3, std=0.1, dtype=np.float64)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    ref_pool, q_pool = pools(model)
    want = generate(model, prompts, 12, pool=ref_pool, use_graphs=False)
    got = generate(model, prompts, 12, pool=q_pool, use_graphs=False)
    for g, w in zip(got.results, want.results, strict=True):
        assert g.token_ids[:6] == w.token_ids[:6]
    toks = want.results[0].token_ids
    ref_pool, q_pool = pools(model)
    lf = forced_logits(model, ref_pool, prompts[0], toks)
    lq = forced_logits(model, q_pool, prompts[0], toks)
    err = np.abs(lq - lf).max() / np.abs(lf).max()
    assert 0 < err < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_gpu(cp, name):
    """float16 on the GPU: paged_attention_int8 in decode; greedy tokens equal the float16 cache's for the
    first 6 steps of each prompt (later ones may part on a near tie), teacher-forced logits within INT8
    rounding, and CUDA-graph decoding over the INT8 arena gives the eager tokens."""
    model = init_random(MODELS[name], seed=3, std=0.1, dtype=np.float16, xp=cp)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40))]
    ref_pool, q_pool = pools(model, tokens=256)
    want = generate(model, prompts, 16, pool=ref_pool, use_graphs=False)
    got = generate(model, prompts, 16, pool=q_pool, use_graphs=False)
    for g, w in zip(got.results, want.results, strict=True):
        assert g.token_ids[:6] == w.token_ids[:6]
    toks = want.results[2].token_ids
    ref_pool, q_pool = pools(model, tokens=256)
    lf = forced_logits(model, ref_pool, prompts[2], toks)
    lq = forced_logits(model, q_pool, prompts[2], toks)
    assert np.isfinite(lq).all() and np.abs(lq - lf).max() / np.abs(lf).max() < 3e-2
    _, q_pool2 = pools(model, tokens=256)
    got_g = generate(model, prompts, 16, pool=q_pool2, use_graphs=True)  # CUDA graphs over the INT8 arena
    assert [r.token_ids for r in got_g.results] == [r.token_ids for r in got.results]
