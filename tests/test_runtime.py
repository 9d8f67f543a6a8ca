"""rawformer.runtime: generation (greedy against a no-cache loop, ragged batches, waves, stops, errors that
leave the pool as it was), the sampler (its documented distribution on tiny vocabularies, seeds), the
CUDA-graph bookkeeping (through a stand-in capture backend on the CPU), embeddings; and on the GPU: greedy
tokens equal to the CPU's, graphs equal to eager, graphs replayed."""

from __future__ import annotations

import numpy as np
import pytest
from graph_standin import ReplayCapture
from rawformer.models import BertConfig, GPT2Config, LlamaConfig, init_random

from rawformer.memory import KVArena, KVPool, OutOfBlocks, SequenceTooLong
from rawformer.runtime import (
    DecodeGraphs,
    Generator,
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    bucket_for,
    embed,
    generate,
    make_pool,
    sample_tokens,
    sampling_probs,
)

STD = 0.3  # peaked logits in the tiny configs: greedy choices are far from ties
GPT2_TINY = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LLAMA_TINY = LlamaConfig(
    vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0, max_position_embeddings=128,
)  # fmt: skip
CONFIGS = {"gpt2": GPT2_TINY, "llama": LLAMA_TINY}
PROMPTS = [[5, 6, 7], [11, 3, 2, 9, 1, 4, 8, 30, 2, 2, 17], [40], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def model_of(kind, dtype=np.float64, xp=np, seed=0):
    return init_random(CONFIGS[kind], seed, dtype, xp, std=STD)


def pool_of(model, num_blocks=64, block_size=8, **kw):
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, block_size,
        num_blocks=num_blocks, xp=model.xp,
    )  # fmt: skip
    return KVPool(arena, **kw)


def no_cache_greedy(model, prompt, n):
    """The straightforward loop: every step recomputes the whole sequence with the model's forward in a fresh
    cache (nothing reused between steps) and takes the argmax of the last position."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        pool = pool_of(model, num_blocks=16, block_size=8)
        pool.add_sequence(0, seq)
        logits = np.asarray(model.forward(pool.prepare([0]), pool.arena, last_only=True), dtype=np.float64)
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        seq.append(tok)
    return out


class CharTokenizer:
    """A tokenizer stand-in: token t is the character chr(65 + t)."""

    def __init__(self, eos=None):
        self.eos_token_id = eos
        self.pad_token_id = 0

    def encode(self, text):
        return [ord(c) - 65 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(chr(65 + int(i)) for i in ids)

    def pad(self, seqs):
        longest = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), longest), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask


# ---- greedy generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_no_cache_loop_ragged(kind):
    model = model_of(kind)
    news = [6, 9, 1, 4]
    out = generate(model, PROMPTS, news)
    for p, n, toks, res in zip(PROMPTS, news, out.token_ids, out.results, strict=True):
        assert toks == no_cache_greedy(model, p, n)
        assert res.finish_reason == "length" and res.prompt_ids == p and res.text is None
    assert out.stats["generated_tokens"] == sum(news)
    assert out.stats["decode_steps"] == max(news) - 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_waves_prefill_groups_prefix_hits_and_reuse(kind):
    """Waves of max_batch, prefill split into groups, prompts sharing cached full blocks (the gather path),
    and a Generator used twice: the same tokens as one plain call, and the pool is empty afterwards."""
    model = model_of(kind)
    expected = generate(model, PROMPTS, 5).token_ids
    pool = pool_of(model)
    free = pool.num_free_blocks
    gen = Generator(model, pool, max_batch=3, max_prefill_tokens=12)
    assert gen.generate(PROMPTS, 5).token_ids == expected
    assert gen.last_stats["waves"] == 2 and gen.last_stats["prefill_forwards"] >= 3
    # the same prompts again: their full blocks are in the prefix cache (prompts 1 and 3 hit)
    again = gen.generate(PROMPTS, 5)
    assert again.token_ids == expected
    assert pool.stats().prefix_hit_blocks > 0
    assert pool.num_free_blocks == free and len(pool) == 0
    pool.check()


def test_prompt_forms():
    model = model_of("gpt2")
    ref = generate(model, [PROMPTS[0]], 4).token_ids
    assert generate(model, PROMPTS[0], 4).token_ids == ref
    assert generate(model, np.array(PROMPTS[0]), 4).token_ids == ref
    assert generate(model, np.array([PROMPTS[0], PROMPTS[0]]), 4).token_ids == ref * 2
    tok = CharTokenizer()
    text = tok.decode(PROMPTS[0])
    out = generate(model, text, 4, tokenizer=tok)
    assert out.token_ids == ref and out.texts == [tok.decode(ref[0])]


def test_max_len_finish_and_too_long_prompt():
    model = model_of("gpt2")  # n_positions = 64
    pool = pool_of(model, num_blocks=32)
    free = pool.num_free_blocks
    gen = Generator(model, pool)
    assert gen.max_len == 64
    out = gen.generate([list(range(60))], 20)
    # the sequence may hold 64 tokens: 4 fed back + the last one sampled = 5
    assert len(out.token_ids[0]) == 5 and out.results[0].finish_reason == "max_len"
    assert out.token_ids[0] == no_cache_greedy(model, list(range(60)), 5)
    with pytest.raises(SequenceTooLong, match="prompt 1 has 65 tokens; at most 64"):
        gen.generate([[1, 2], list(range(65))], 3)
    with pytest.raises(ValueError, match="at most 64"):  # SequenceTooLong is a ValueError
        gen.generate([list(range(65))], 3)
    assert pool.num_free_blocks == free and len(pool) == 0
    small = Generator(model, pool_of(model, num_blocks=32, max_seq_len=20))
    with pytest.raises(SequenceTooLong, match="max_seq_len=20"):
        small.generate([list(range(21))], 1)


# ---- stops ------------------------------------------------------------------------------------------------


def test_stop_tokens_and_eos():
    model = model_of("llama")
    free_run = generate(model, PROMPTS[:2], 8).token_ids
    stop_tok = free_run[0][3]
    first = free_run[0].index(stop_tok)
    out = generate(model, PROMPTS[:2], 8, stop=[stop_tok])
    assert out.token_ids[0] == free_run[0][: first + 1]
    assert out.results[0].finish_reason == "stop_token"
    r1 = out.results[1]
    if stop_tok in free_run[1]:
        assert r1.token_ids == free_run[1][: free_run[1].index(stop_tok) + 1]
    else:
        assert r1.token_ids == free_run[1] and r1.finish_reason == "length"
    # the tokenizer's eos stops unless ignore_eos; the text leaves the stop token out
    tok = CharTokenizer(eos=stop_tok)
    out = generate(model, PROMPTS[:1], 8, tokenizer=tok)
    assert out.token_ids[0] == free_run[0][: first + 1]
    assert out.texts[0] == tok.decode(free_run[0][:first])
    assert generate(model, PROMPTS[:1], 8, tokenizer=tok, ignore_eos=True).token_ids[0] == free_run[0]


def test_stop_strings():
    model = model_of("gpt2")
    tok = CharTokenizer()
    free_run = generate(model, PROMPTS[:1], 10).token_ids[0]
    text = tok.decode(free_run)
    stop = text[4:6]
    cut = text.find(stop)
    out = generate(model, PROMPTS[:1], 10, tokenizer=tok, stop=[stop, "never-there"])
    r = out.results[0]
    assert r.finish_reason == "stop_string"
    assert r.text == text[:cut]
    assert r.token_ids == free_run[: cut + len(stop)]  # generation stopped at the token completing it
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, PROMPTS[:1], 4, stop="ab")
    with pytest.raises(TypeError, match="a stop is a token id"):
        generate(model, PROMPTS[:1], 4, stop=[1.5])


# ---- errors leave the pool as it was ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_out_of_blocks_during_decode_restores_the_pool(kind):
    model = model_of(kind)
    pool = pool_of(model, num_blocks=6, block_size=8)
    pool.add_sequence("other", [1, 2, 3])  # someone else's sequence: untouched
    free = pool.num_free_blocks
    gen = Generator(model, pool)
    # prompts fit (2 + 2 blocks of 5 free) but decoding past 16 tokens each needs 6
    with pytest.raises(OutOfBlocks, match="decode step") as info:
        gen.generate([list(range(1, 15)), list(range(2, 16))], 12)
    assert info.value.needed > info.value.free
    assert pool.num_free_blocks == free and pool.seq_ids == ["other"]
    pool.check()
    with pytest.raises(OutOfBlocks, match="the prompt of request 2"):
        gen.generate([[1] * 8, [2] * 8, [3] * 40], 2)
    assert pool.num_free_blocks == free and pool.seq_ids == ["other"]
    pool.check()
    # the pool still works
    assert gen.generate([PROMPTS[0]], 3).token_ids == [no_cache_greedy(model, PROMPTS[0], 3)]


def test_an_error_inside_the_forward_restores_the_pool():
    model = model_of("gpt2")
    pool = pool_of(model)
    free = pool.num_free_blocks

    class Failing:
        def __init__(self, inner, fail_at):
            self.inner, self.calls, self.fail_at = inner, 0, fail_at
            for a in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype", "xp", "config"):
                setattr(self, a, getattr(inner, a))

        def forward(self, batch, arena, last_only=False):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("boom")
            return self.inner.forward(batch, arena, last_only=last_only)

    for at in (1, 3):
        with pytest.raises(RuntimeError, match="boom"):
            Generator(Failing(model, at), pool).generate(PROMPTS, 6)
        assert pool.num_free_blocks == free and len(pool) == 0
    pool.check()


def test_argument_errors():
    model = model_of("gpt2")
    gen = Generator(model, pool_of(model))
    for kwargs, err, msg in [
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=-2), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(temperature=[0.5]), ValueError, "temperature has 1 values for 2 prompts"),
    ]:
        with pytest.raises(err, match=msg):
            gen.generate([[1, 2], [3]], 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="token id 97, outside"):
        gen.generate([[1, 97]], 2)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        gen.generate("hello", 2)
    with pytest.raises(TypeError, match="prompts must be"):
        gen.generate(3.5, 2)
    with pytest.raises(ValueError, match="CUDA graphs need the GPU"):
        Generator(model, pool_of(model), use_graphs=True)
    with pytest.raises(ValueError, match="arena is"):
        Generator(model, pool_of(model_of("llama")))
    with pytest.raises(TypeError, match="no 'forward'"):
        Generator(object(), pool_of(model))


# ---- sampling ---------------------------------------------------------------------------------------------

LOGITS = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 1.0], [0.3, -0.2, 2.5, 2.4, 0.0, -3.0]])


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_sampling_probs_documented_distribution():
    # temperature only: softmax(l / t)
    p = sampling_probs(LOGITS, temperature=0.7)
    for s in range(2):
        np.testing.assert_allclose(p[s], softmax(LOGITS[s] / 0.7), rtol=1e-12)
    # top-k: the k largest (row 0 has a tie at the 2nd place: both 1.0 stay with k = 2)
    p = sampling_probs(LOGITS, top_k=2)
    np.testing.assert_allclose(p[0], softmax(np.where(np.isin(np.arange(6), [0, 1, 5]), LOGITS[0], -np.inf)))
    np.testing.assert_allclose(p[1], softmax(np.where(np.isin(np.arange(6), [2, 3]), LOGITS[1], -np.inf)))
    # top-p: the shortest most-likely prefix with mass >= p
    for top_p in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999):
        p = sampling_probs(LOGITS, top_p=top_p)
        for s in range(2):
            q = softmax(LOGITS[s])
            order = np.argsort(-q, kind="stable")
            before = np.cumsum(q[order]) - q[order]
            keep = order[before < top_p]
            thr = q[keep].min()
            kept = q >= thr  # ties at the boundary stay
            np.testing.assert_allclose(p[s], np.where(kept, q, 0) / q[kept].sum(), rtol=1e-12, atol=1e-15)
    # top-k then top-p, per-row parameters, temperature first
    p = sampling_probs(LOGITS, temperature=[1.0, 2.0], top_k=[3, 0], top_p=[0.6, 0.9])
    q0 = softmax(np.where(np.isin(np.arange(6), [0, 1, 5]), LOGITS[0], -np.inf))  # 2.0 and the two 1.0
    assert q0[0] < 0.6 and np.count_nonzero(p[0]) == 3  # 2.0 alone < 0.6: the tie at 1.0 comes with it
    q1 = softmax(LOGITS[1] / 2.0)
    o = np.argsort(-q1)
    n = int(np.sum(np.cumsum(q1[o]) - q1[o] < 0.9))
    assert np.count_nonzero(p[1]) == n
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_inverse_cdf_matches_the_distribution():
    """Uniforms on a fine grid give every token a share equal to its probability (within 1 / N)."""
    n = 20000
    u = (np.arange(n) + 0.5) / n
    for kw in (dict(temperature=0.8), dict(temperature=1.0, top_k=3), dict(temperature=1.3, top_p=0.7)):
        probs = sampling_probs(LOGITS, **kw)
        for s in range(2):
            rows = np.repeat(LOGITS[s : s + 1], n, axis=0)
            toks = sample_tokens(rows, u, **kw)
            freq = np.bincount(toks, minlength=6) / n
            np.testing.assert_allclose(freq, probs[s], atol=2.0 / n)
            assert np.all(freq[probs[s] == 0] == 0)


def test_greedy_and_repetition_penalty():
    assert sample_tokens(LOGITS, [0.3, 0.9], temperature=0.0).tolist() == [0, 2]
    seen = np.zeros_like(LOGITS, dtype=bool)
    seen[0, 0] = seen[1, 2] = seen[1, 4] = True
    pen = apply_repetition_penalty(LOGITS, seen, np.array([3.0, 2.0]))
    expected = LOGITS.copy()
    expected[0, 0] = 2.0 / 3.0
    expected[1, 2] = 2.5 / 2.0
    expected[1, 4] = 0.0 * 2.0
    np.testing.assert_allclose(pen, expected)
    assert sample_tokens(LOGITS, [0, 0], 0.0, repetition_penalty=[3.0, 2.0], seen=seen).tolist() == [1, 3]
    # a mixed batch: row 0 greedy, row 1 sampled with u just above the mass of tokens 0..2
    probs = sampling_probs(LOGITS[1:], temperature=1.0)[0]
    u = probs[:3].sum() + 1e-9
    assert sample_tokens(LOGITS, [0.5, u], temperature=[0.0, 1.0]).tolist() == [0, 3]


def test_sampler_seeds_and_statistics():
    params = [SamplingParams(temperature=1.0, top_k=4, seed=(7, i)) for i in range(2)]
    logits = np.repeat(LOGITS[:1], 2, axis=0)
    a, b = Sampler(params, 6), Sampler(params, 6)
    draws_a = np.array([a(logits, [0, 1]) for _ in range(3000)])
    draws_b = np.array([b(logits, [0, 1]) for _ in range(3000)])
    assert np.array_equal(draws_a, draws_b)  # reproducible
    assert not np.array_equal(draws_a[:, 0], draws_a[:, 1])  # two requests, two streams
    # a request's stream does not depend on the batch around it
    alone = Sampler(params[1:], 6)
    assert np.array_equal([alone(logits[:1], [0])[0] for _ in range(50)], draws_a[:50, 1])
    freq = np.bincount(draws_a.ravel(), minlength=6) / draws_a.size
    expected = sampling_probs(LOGITS[:1], top_k=4)[0]
    assert np.all(np.abs(freq - expected) < 0.02), (freq, expected)
    assert freq[4] == 0  # outside the top 4


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_sampling_reproducible(kind):
    model = model_of(kind)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = generate(model, PROMPTS, 6, seed=11, **kw).token_ids
    assert generate(model, PROMPTS, 6, seed=11, **kw).token_ids == a
    assert generate(model, PROMPTS, 6, seed=12, **kw).token_ids != a
    # per-request seeds: request 2 alone gives what it gave in the batch
    seeds = [101, 102, 103, 104]
    batch = generate(model, PROMPTS, 6, seed=seeds, **kw).token_ids
    assert generate(model, [PROMPTS[2]], 6, seed=[103], **kw).token_ids[0] == batch[2]


def test_repetition_penalty_in_generation_matches_a_loop():
    """Greedy with a penalty: each step's argmax of the penalised logits (prompt + generated seen)."""
    model = model_of("llama")
    prompt, n, r = PROMPTS[1], 6, 1.8
    out = generate(model, [prompt], n, repetition_penalty=r).token_ids[0]
    seq, expected = list(prompt), []
    for _ in range(n):
        pool = pool_of(model, num_blocks=16)
        pool.add_sequence(0, seq)
        lg = np.asarray(model.forward(pool.prepare([0]), pool.arena, last_only=True))[0]
        seen = np.isin(np.arange(lg.shape[0]), seq)
        lg = np.where(seen, np.where(lg > 0, lg / r, lg * r), lg)
        expected.append(int(np.argmax(lg)))
        seq.append(expected[-1])
    assert out == expected


# ---- CUDA-graph bookkeeping (a stand-in backend on the CPU) --------------------------------------------


def test_bucket_for():
    b = (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 33, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 64, None]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_graph_path_bookkeeping_on_cpu(kind):
    """Padded buckets, one capture per (bucket, width), a replay per decode step, the same tokens as the
    plain path; a step-buffer move invalidates the graphs, which are recaptured."""
    model = model_of(kind)
    news = [2, 5, 7, 3]
    expected = generate(model, PROMPTS, news).token_ids
    pool = pool_of(model, max_tokens=64, max_seqs=4)
    backend = ReplayCapture()
    gen = Generator(model, pool, graph_backend=backend, use_graphs=True)
    assert gen.generate(PROMPTS, news).token_ids == expected
    st = gen.graph_stats
    assert st.replays == gen.last_stats["decode_steps"] == max(news) - 1
    # active sequences 3 (bucket 4), 2 (2), 1 (1): three graphs of one width
    assert (
        st.captures == 3 and len({w for _, w in st.keys}) == 1 and sorted(b for b, _ in st.keys) == [1, 2, 4]
    )
    # the same call again: replays only
    assert gen.generate(PROMPTS, news).token_ids == expected
    assert gen.graph_stats.captures == 3 and gen.graph_stats.replays == 2 * (max(news) - 1)
    # a long prompt grows the pool's step buffers: the graphs' inputs moved
    grown = pool._steps.grown
    longs = [[int(t) for t in row] for row in np.random.default_rng(0).integers(0, 80, (4, 50))]
    out = gen.generate(PROMPTS + longs, news + [3] * 4)
    assert pool._steps.grown > grown
    assert gen.graph_stats.invalidations >= 1 and backend.released >= 3
    assert out.token_ids[:4] == expected
    assert out.token_ids[4:] == [no_cache_greedy(model, p, 3) for p in longs]


def test_decode_graphs_checks_one_token_per_sequence():
    model = model_of("gpt2")
    pool = pool_of(model)
    pool.add_sequence(0, [1, 2, 3])
    batch = pool.prepare([0])  # a prefill of 3 tokens
    with pytest.raises(ValueError, match="one new token per sequence"):
        DecodeGraphs(lambda b: None, ReplayCapture()).run(batch)


# ---- pools and embeddings ---------------------------------------------------------------------------------


def test_make_pool_and_default_pool():
    model = model_of("llama")
    pool = make_pool(model, 100, block_size=16)
    assert pool.arena.num_blocks == 7 and pool.max_seq_len == 100
    gen = Generator(model)  # a default pool
    assert gen.pool.max_seq_len == LLAMA_TINY.max_position_embeddings
    assert gen.generate([PROMPTS[0]], 3).token_ids == [no_cache_greedy(model, PROMPTS[0], 3)]


def test_embed():
    cfg = BertConfig(
        vocab_size=71, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=56,
        max_position_embeddings=40,
    )  # fmt: skip
    model = init_random(cfg, 0, np.float64, np, std=STD)
    tok = CharTokenizer()
    texts = ["ABC", "HELLO", "Q"]
    ids, mask = tok.pad(tok.encode_batch(texts))
    np.testing.assert_allclose(embed(model, tok, texts), model.embed(ids, mask))
    np.testing.assert_allclose(embed(model, tok, "ABC")[0], model.embed(ids[:1, :3], mask[:1, :3])[0])
    with pytest.raises(TypeError, match="not an encoder"):
        embed(model_of("gpt2"), tok, texts)
    with pytest.raises(ValueError, match="tokenizer"):
        embed(model, None, texts)


# ---- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_greedy_equals_cpu_fp32(cp, kind):
    """32 new tokens, ragged batch: the GPU fp32 path (graphs on) gives the CPU reference path's tokens."""
    news = [32, 32, 20, 32]
    cpu = generate(model_of(kind, np.float32), PROMPTS, news).token_ids
    gpu_model = model_of(kind, np.float32, cp)
    gen = Generator(gpu_model, pool_of(gpu_model, num_blocks=64))
    assert gen.use_graphs
    assert gen.generate(PROMPTS, news).token_ids == cpu
    assert gen.graph_stats.error is None, gen.graph_stats.error
    assert gen.graph_stats.replays == 31


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_graphs_equal_eager_and_replay(cp, kind, dtype):
    model = model_of(kind, dtype, cp)
    news = [3, 12, 25, 7]
    eager = Generator(model, pool_of(model), use_graphs=False)
    graphs = Generator(model, pool_of(model), use_graphs=True)
    ref = eager.generate(PROMPTS, news).token_ids
    assert graphs.generate(PROMPTS, news).token_ids == ref
    st = graphs.graph_stats
    assert st.error is None, st.error
    assert st.replays == max(news) - 1 and st.captures == 3  # buckets 4, 2, 1
    assert graphs.generate(PROMPTS, news).token_ids == ref
    assert graphs.graph_stats.captures == 3 and graphs.graph_stats.replays == 2 * (max(news) - 1)
    # sampling goes through the same graphs: equal under a seed
    kw = dict(temperature=0.8, top_p=0.9, top_k=30, repetition_penalty=1.2, seed=5)
    assert graphs.generate(PROMPTS, news, **kw).token_ids == eager.generate(PROMPTS, news, **kw).token_ids


@pytest.mark.gpu
def test_gpu_graphs_invalidated_when_step_buffers_move(cp):
    model = model_of("llama", np.float32, cp)
    pool = pool_of(model, num_blocks=64, max_tokens=64, max_seqs=4)
    gen = Generator(model, pool)
    eager = Generator(model, pool_of(model, num_blocks=64), use_graphs=False)
    first = gen.generate(PROMPTS, 6).token_ids
    longs = [[int(t) for t in row] for row in np.random.default_rng(0).integers(0, 80, (4, 50))]
    out = gen.generate(PROMPTS + longs, 6).token_ids
    assert gen.graph_stats.invalidations >= 1
    assert out == eager.generate(PROMPTS + longs, 6).token_ids and out[:4] == first


@pytest.mark.gpu
def test_gpu_sampler_matches_host(cp):
    n = 4000
    u = (np.arange(n) + 0.5) / n
    for kw in (dict(temperature=0.8), dict(temperature=1.0, top_k=3), dict(temperature=1.3, top_p=0.7)):
        rows = np.repeat(LOGITS[1:], n, axis=0).astype(np.float32)
        host = sample_tokens(rows, u, **kw)
        dev = sample_tokens(cp.asarray(rows), u, **kw)
        assert isinstance(dev, np.ndarray)
        assert np.mean(host != dev) < 2e-3  # float32 cumulative sums may move a grid point at a boundary
        np.testing.assert_allclose(cp.asnumpy(sampling_probs(cp.asarray(rows[:1]), **kw)),
                                   sampling_probs(rows[:1], **kw), rtol=1e-5, atol=1e-7)  # fmt: skip


@pytest.mark.gpu
def test_gpu_out_of_blocks_restores_the_pool(cp):
    model = model_of("gpt2", np.float16, cp)
    pool = pool_of(model, num_blocks=6, block_size=8)
    free = pool.num_free_blocks
    with pytest.raises(OutOfBlocks, match="decode step"):
        Generator(model, pool).generate([list(range(1, 15)), list(range(2, 16))], 20)
    assert pool.num_free_blocks == free and len(pool) == 0
    pool.check()


def test_a_failed_capture_falls_back_to_eager():
    model = model_of("gpt2")
    expected = generate(model, PROMPTS, 5).token_ids

    class Broken(ReplayCapture):
        def capture(self, step):
            step()
            raise RuntimeError("operation not permitted when stream is capturing")

    pool = pool_of(model)
    gen = Generator(model, pool, graph_backend=Broken(), use_graphs=True)
    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        assert gen.generate(PROMPTS, 5).token_ids == expected
    assert gen.graph_stats.replays == 0 and "capture of (bucket, width)" in gen.graph_stats.error
    assert len(pool) == 0


# ---- greedy decode with the host one step ahead (Generator._decode_fed) -----------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_overlapped_greedy_equals_the_host_loop(kind):
    """The overlapped loop (tokens fed on the device, stops seen one step late) gives the results of the
    loop that reads every step's tokens first: stop tokens and strings that end some requests mid-batch
    (rows change under the in-flight step), ragged max_new_tokens, a request ending at the longest
    sequence; every block is back afterwards."""
    model = model_of(kind)
    tok = CharTokenizer()
    prompts = PROMPTS + [[7, 7, 1], list(range(20, 20 + 50))]
    news = [9, 14, 3, 11, 12, 20]
    free_run = generate(model, prompts, news).token_ids
    tail = free_run[5][:11]  # request 5 reaches the longest sequence (60) after 11 tokens: no stop there
    stop_tok = next(t for run in free_run[:5] for t in run[1:] if t not in tail)
    texts = [tok.decode(run) for run in free_run[:5]]
    stop_str = next(
        x[i : i + 2] for x in texts for i in range(1, len(x) - 1)
        if x[i : i + 2] not in tok.decode(tail) and stop_tok not in tok.encode(x[: i + 2])
    )  # fmt: skip
    runs = {}
    for overlap in (False, True):
        pool = pool_of(model, num_blocks=64, block_size=8, max_seq_len=60)
        free = pool.num_free_blocks
        gen = Generator(model, pool, tokenizer=tok, graph_backend=ReplayCapture(), overlap_host=overlap)
        out = gen.generate(prompts, news, stop=[stop_tok, stop_str])
        assert pool.num_free_blocks == free and pool.seq_ids == []
        pool.check()
        assert gen.last_stats.get("overlapped_steps", 0) == (gen.last_stats["decode_steps"] if overlap else 0)
        runs[overlap] = [(r.token_ids, r.finish_reason, r.text) for r in out.results]
    assert runs[True] == runs[False]
    reasons = {reason for _, reason, _ in runs[True]}
    assert {"stop_token", "stop_string", "max_len"} <= reasons, reasons
    # a prompt extending an overlapped generation shares nothing fed on the device (unknown ids are never
    # entered into the prefix cache) and still generates the reference tokens
    pool = pool_of(model, num_blocks=64, block_size=8, max_seq_len=60)
    gen = Generator(model, pool, graph_backend=ReplayCapture())
    first = gen.generate([PROMPTS[1]], 17).token_ids[0]
    longer = PROMPTS[1] + first
    assert gen.generate([longer], 3).token_ids[0] == no_cache_greedy(model, longer, 3)


def test_overlapped_out_of_blocks_restores_the_pool():
    model = model_of("llama")
    pool = pool_of(model, num_blocks=6, block_size=8)
    pool.add_sequence("other", [1, 2, 3])
    free = pool.num_free_blocks
    gen = Generator(model, pool, graph_backend=ReplayCapture())
    with pytest.raises(OutOfBlocks, match="decode step"):
        gen.generate([list(range(1, 15)), list(range(2, 16))], 12)
    assert pool.num_free_blocks == free and pool.seq_ids == ["other"]
    pool.check()
    assert gen.generate([PROMPTS[0]], 3).token_ids == [no_cache_greedy(model, PROMPTS[0], 3)]
