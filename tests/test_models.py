"""GPT-2, Llama and BERT against the independent float64 implementations of test_models_reference.py.

Decoders run through a hand-built paged cache (MiniArena / MiniPool: shuffled block ids, NaN in unwritten
slots): ragged prefill, decode steps of 1 and of several tokens (rf.paged_attention), and the gather path
(a continuation after a cached prefix, ragged q lengths). Every step's logits are compared with the full
sequence's logits from the reference. CPU tests run the NumPy path; the `gpu` ones the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_models_reference as ref
from rawformer.models import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    bert,
    gpt2,
    init_random,
    llama,
    llama_inv_freq,
)
from rawformer.models.common import plan_step, random_weights
from test_models_reference import MiniArena, MiniPool

STD = 0.3  # weights large enough that attention is far from uniform in the tiny configs
# max |out - ref| / max |ref| per dtype (the model's GEMMs run in its dtype)
# (float16: ~3e-3 seen when the NumPy path is fed float16 weights; the kernels accumulate in float32)
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4, np.dtype(np.float16): 1e-2}

GPT2_TINY = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LLAMA_TINY = LlamaConfig(
    vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0,
)  # fmt: skip


def close(out, expected, dtype, what="logits"):
    out = ref.f64(out)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    err = float(np.max(np.abs(out - expected)) / max(np.max(np.abs(expected)), 1e-30))
    assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3e} > {TOL[np.dtype(dtype)]} ({dtype})"


def build(kind, cfg, dtype=np.float64, xp=np, seed=0, std=STD):
    """(model, float64 host weights) of a random model."""
    mod = {"gpt2": gpt2, "llama": llama, "bert": bert}[kind]
    w = random_weights(mod.weight_shapes(cfg), seed, dtype, xp, std)
    model = {"gpt2": GPT2Model, "llama": LlamaModel, "bert": BertModel}[kind](cfg, w, xp)
    return model, {k: ref.f64(v) for k, v in w.items()}


def reference_logits(kind, w, cfg, tokens):
    return (ref.gpt2_logits if kind == "gpt2" else ref.llama_logits)(w, cfg, tokens)


def arena_for(model, xp=np, num_blocks=48, block_size=8):
    return MiniArena(
        model.num_layers, model.num_kv_heads, model.head_dim, num_blocks, block_size, model.dtype, xp
    )


def run_steps(kind, cfg, steps, dtype=np.float64, xp=np, block_size=8, expect_modes=None, std=STD):
    """Feed `steps` (each a dict seq_id -> new tokens) through the model and compare every step's logits with
    the reference logits of each sequence's full history; last_only gives the last row of each sequence."""
    model, w = build(kind, cfg, dtype, xp, std=std)
    arena, pool = arena_for(model, xp, block_size=block_size), MiniPool(48, block_size, seed=3)
    history: dict[int, list[int]] = {}
    for n, step in enumerate(steps):
        ids, toks = list(step), list(step.values())
        batch = pool.prepare(ids, toks, xp)
        if expect_modes is not None:
            assert plan_step(batch, block_size, xp).mode == expect_modes[n]
        logits = model.forward(batch, arena)
        # again with last_only (rewrites the same K/V into the same slots)
        last = ref.f64(model.forward(batch, arena, last_only=True))
        ends = np.cumsum([len(t) for t in toks]) - 1
        np.testing.assert_allclose(
            last, ref.f64(logits)[ends], rtol=0, atol=TOL[np.dtype(dtype)] * np.abs(last).max()
        )
        row = 0
        for sid, new in step.items():
            history.setdefault(sid, []).extend(new)
            full = reference_logits(kind, w, cfg, history[sid])
            close(logits[row : row + len(new)], full[-len(new) :], dtype, f"step {n} seq {sid}")
            row += len(new)
    return model


# ---- decoders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ragged_prefill(kind, dtype):
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    rng = np.random.default_rng(1)
    step = {0: list(rng.integers(0, cfg.vocab_size, 5)), 1: [7], 2: list(rng.integers(0, cfg.vocab_size, 19))}
    run_steps(kind, cfg, [step], dtype, expect_modes=["prefill"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefill_then_decode_equals_full_forward(kind):
    """Prefill a ragged batch, then decode 1 token per sequence for 5 steps (crossing block boundaries), then
    a 3-token step (speculative-style q_len 3 through rf.paged_attention)."""
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    rng = np.random.default_rng(2)
    tok = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, n)]  # noqa: E731
    steps = [{0: tok(6), 1: tok(11), 2: tok(1)}]
    steps += [{0: tok(1), 1: tok(1), 2: tok(1)} for _ in range(5)]
    steps += [{0: tok(3), 1: tok(3), 2: tok(3)}]
    run_steps(kind, cfg, steps, expect_modes=["prefill"] + ["decode"] * 6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gather_path_prefix_and_ragged(kind):
    """A long continuation after a cached prefix (q_len 20 > 16) and ragged q lengths both gather the
    cached K/V and run rf.attention with q_len != k_len; a new sequence joins a running batch."""
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    rng = np.random.default_rng(3)
    tok = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, n)]  # noqa: E731
    steps = [
        {0: tok(9), 1: tok(4)},
        {0: tok(20)},  # chunked prefill / cached prefix: 20 new tokens after 9 cached
        {
            0: tok(2),
            1: tok(5),
            2: tok(3),
        },  # ragged q lengths, sequence 2 new (not a prefill: 0 and 1 are not)
        {0: tok(1), 1: tok(1), 2: tok(1)},
    ]
    run_steps(kind, cfg, steps, expect_modes=["prefill", "gather", "gather", "decode"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_last_only(kind):
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    model, w = build(kind, cfg)
    pool = MiniPool(48, 8)
    seqs = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    logits = model.forward(pool.prepare([0, 1, 2], seqs), arena_for(model), last_only=True)
    assert logits.shape == (3, cfg.vocab_size)
    for r, s in enumerate(seqs):
        close(logits[r], reference_logits(kind, w, cfg, s)[-1], np.float64)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_forward_layers_is_forward_one_layer_at_a_time(kind):
    """The generator yields each layer's index once its work is launched (K/V of that layer written, the
    later layers' not yet), and returns the logits forward gives."""
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    model, w = build(kind, cfg)
    pool, arena = MiniPool(48, 8), arena_for(model)
    seqs = [[3, 1, 4, 1, 5], [9, 2]]
    batch = pool.prepare([0, 1], seqs)
    slots = np.asarray(batch.slot_mapping)
    steps = model.forward_layers(batch, arena, last_only=True)

    def cached(layer):  # the new tokens' K in the (NaN-filled) cache of a layer
        return arena.k(layer).reshape(-1, model.num_kv_heads, model.head_dim)[slots]

    for layer in range(model.num_layers):
        assert next(steps) == layer
        assert np.isfinite(cached(layer)).all()  # this layer's K/V are written
        if layer + 1 < model.num_layers:  # the next layer's not yet
            assert np.isnan(cached(layer + 1)).all()
    with pytest.raises(StopIteration) as stop:
        next(steps)
    for r, s in enumerate(seqs):
        close(stop.value.value[r], reference_logits(kind, w, cfg, s)[-1], np.float64)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llama_gqa(kv_heads):
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=24,
    )  # fmt: skip  (head_dim * heads != hidden: the projections carry it)
    rng = np.random.default_rng(kv_heads)
    tok = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, n)]  # noqa: E731
    run_steps("llama", cfg, [{0: tok(7), 1: tok(3)}, {0: tok(1), 1: tok(1)}, {0: tok(4), 1: tok(2)}])


def test_llama_biases_tied_head_and_rope_scaling():
    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, rope_scaling=scaling, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_theta=10000.0,
    )  # fmt: skip
    assert "lm_head.weight" not in llama.weight_shapes(cfg)
    run_steps("llama", cfg, [{0: list(range(1, 30))}, {0: [5]}])


def test_llama3_inv_freq():
    scaling = {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    got = llama_inv_freq(cfg)
    assert got.dtype == np.float32 and got.shape == (32,)
    np.testing.assert_allclose(got, ref.llama3_inv_freq(64, 500000.0, scaling), rtol=1e-6)
    assert got[0] == 1.0 and abs(got[-1] * 32 - 500000.0 ** (-62 / 64)) < 1e-12  # high freq kept, low scaled
    lin = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_scaling={"type": "linear", "factor": 2.0})
    np.testing.assert_allclose(llama_inv_freq(lin), ref.llama3_inv_freq(32, 10000.0, None) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_gpt2_erf_gelu_and_too_long():
    cfg = GPT2Config(
        vocab_size=40, n_positions=12, n_embd=16, n_layer=1, n_head=2, activation_function="gelu"
    )
    run_steps("gpt2", cfg, [{0: list(range(10))}, {0: [3]}])
    model, _ = build("gpt2", cfg)
    pool = MiniPool(8, 8)
    with pytest.raises(ValueError, match="n_positions=12"):
        model.forward(pool.prepare([0], [list(range(13))]), arena_for(model, num_blocks=8))


def pool_steps(kind, dtype=np.float64, xp=np):
    """The models on rawformer.memory's KVArena / KVPool: a shared prompt prefix (a prefix-cache hit makes
    the second prompt's step a gather), a fork, then decode steps; logits against the reference."""
    memory = pytest.importorskip("rawformer.memory")
    cfg = GPT2_TINY if kind == "gpt2" else LLAMA_TINY
    model, w = build(kind, cfg, dtype, xp)
    arena = memory.KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, 8, num_blocks=32, xp=xp
    )
    pool = memory.KVPool(arena)
    rng = np.random.default_rng(7)
    prefix = [int(t) for t in rng.integers(0, cfg.vocab_size, 16)]  # two full blocks
    tail = [int(t) for t in rng.integers(0, cfg.vocab_size, 18)]  # > 16 new tokens after the hit: a gather
    history = {0: prefix + [3, 4, 5], 1: prefix + tail}
    pool.add_sequence(0, history[0])
    step = pool.prepare([0])
    assert step.is_prefill
    logits = model.forward(step, arena, last_only=True)
    close(logits[0], reference_logits(kind, w, cfg, history[0])[-1], dtype, "prompt 0")
    assert pool.add_sequence(1, history[1]) == 16  # the shared prefix is found in the cache
    step = pool.prepare([1])
    assert not step.is_prefill and plan_step(step, 8, xp).mode == "gather"
    logits = model.forward(step, arena)
    close(logits, reference_logits(kind, w, cfg, history[1])[-18:], dtype, "prompt 1 after a prefix hit")
    pool.fork(1, 2)
    history[2] = list(history[1])
    for n in range(4):
        new = {s: int(rng.integers(0, cfg.vocab_size)) for s in (0, 1, 2)}
        step = pool.prepare([0, 1, 2], [[new[0]], [new[1]], [new[2]]])
        logits = model.forward(step, arena)
        for r, s in enumerate((0, 1, 2)):
            history[s].append(new[s])
            close(logits[r], reference_logits(kind, w, cfg, history[s])[-1], dtype, f"decode {n} seq {s}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_with_the_memory_pool(kind):
    pool_steps(kind)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_with_the_memory_pool(cp, kind):
    pool_steps(kind, np.float32, cp)


# ---- BERT --------------------------------------------------------------------------------------------------

BERT_TINY = BertConfig(
    vocab_size=71,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=56,
    max_position_embeddings=40,
)


def padded(seqs, pad=0):
    s = max(len(x) for x in seqs)
    ids = np.full((len(seqs), s), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), s), dtype=np.int64)
    for i, x in enumerate(seqs):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
    return ids, mask


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bert_forward_and_embed_with_padding(dtype):
    model, w = build("bert", BERT_TINY, dtype)
    seqs = [[2, 5, 9, 11, 3], [2, 7, 3], [2, 1, 4, 1, 5, 9, 2, 6, 3], [4]]
    ids, mask = padded(seqs)
    hidden = model.forward(ids, mask)
    assert hidden.shape == (4, 9, 32) and hidden.dtype == dtype
    for i, s in enumerate(seqs):
        close(hidden[i, : len(s)], ref.bert_hidden(w, BERT_TINY, s), dtype, f"hidden {i}")
    emb = model.embed(ids, mask)
    expected = np.stack([ref.sentence_embedding(w, BERT_TINY, s) for s in seqs])
    close(emb, expected, dtype, "embeddings")
    np.testing.assert_allclose(np.linalg.norm(ref.f64(emb), axis=1), 1.0, rtol=1e-5)
    # padding does not change a sentence's embedding
    alone = model.embed(np.array([seqs[1]]), np.ones((1, 3)))
    np.testing.assert_allclose(ref.f64(alone[0]), ref.f64(emb[1]), rtol=1e-5, atol=1e-6)
    raw = model.embed(ids, mask, normalize=False)
    np.testing.assert_allclose(
        ref.f64(raw[1]), ref.bert_hidden(w, BERT_TINY, seqs[1]).mean(0), rtol=1e-4, atol=1e-5
    )


def test_bert_token_types_and_errors():
    model, w = build("bert", BERT_TINY)
    ids, tt = np.array([[2, 5, 3, 7, 3]]), np.array([[0, 0, 0, 1, 1]])
    close(
        model.forward(ids, None, tt)[0],
        ref.bert_hidden(w, BERT_TINY, [2, 5, 3, 7, 3], [0, 0, 0, 1, 1]),
        np.float64,
    )
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward(ids, np.ones((1, 4)))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model.forward(np.zeros((1, 41), dtype=np.int64))
    with pytest.raises(ValueError, match="input_ids"):
        model.forward(np.zeros((2, 3), dtype=np.float32))


# ---- construction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_weight_errors_name_the_tensor(kind):
    cfg = {"gpt2": GPT2_TINY, "llama": LLAMA_TINY, "bert": BERT_TINY}[kind]
    mod = {"gpt2": gpt2, "llama": llama, "bert": bert}[kind]
    cls = {"gpt2": GPT2Model, "llama": LlamaModel, "bert": BertModel}[kind]
    shapes = mod.weight_shapes(cfg)
    w = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}
    victim = sorted(shapes)[len(shapes) // 2]
    missing = {n: a for n, a in w.items() if n != victim}
    with pytest.raises(KeyError, match=victim.replace(".", r"\.")):
        cls(cfg, missing)
    bad = dict(w, **{victim: np.zeros((3,) + shapes[victim], np.float32)})
    with pytest.raises(ValueError, match=victim.replace(".", r"\.") + ".*shape"):
        cls(cfg, bad)
    mixed = dict(w, **{victim: w[victim].astype(np.float64)})
    with pytest.raises(ValueError, match="float64"):
        cls(cfg, mixed)
    with pytest.raises(ValueError, match="float16"):
        cls(cfg, {n: a.astype(np.float16) for n, a in w.items()})  # float16 runs on the GPU only
    cls(cfg, dict(w, unused_buffer=np.zeros(3)))  # extra tensors are ignored


def test_init_random_is_reproducible():
    a = init_random(GPT2_TINY, seed=5, dtype=np.float32)
    b = init_random(GPT2_TINY, seed=5, dtype=np.float32)
    c = init_random(GPT2_TINY, seed=6, dtype=np.float32)
    assert a.dtype == np.float32 and a.num_layers == 2 and a.num_kv_heads == 4 and a.head_dim == 8
    np.testing.assert_array_equal(a.wte, b.wte)
    assert not np.array_equal(a.wte, c.wte)
    m = init_random(LLAMA_TINY, 1, np.float64)
    assert isinstance(m, LlamaModel) and m.dtype == np.float64 and m.num_kv_heads == 2
    with pytest.raises(TypeError, match="not a model config"):
        init_random({"model_type": "gpt2"})


def test_config_checks():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="n_embd"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config(activation_function="relu")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_dict({"scale_attn_by_inverse_layer_idx": True, "n_ctx": 1024})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_dict({"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig(position_embedding_type="relative_key")
    assert LlamaConfig(num_attention_heads=8).kv_heads == 8


# ---- GPU: the kernels against the float64 references -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_decoder_steps(cp, kind, dtype):
    cfg = (
        # head_dim 64: the tensor-core kernels
        GPT2Config(vocab_size=97, n_positions=128, n_embd=128, n_layer=2, n_head=2)
        if kind == "gpt2"
        else LlamaConfig(
            vocab_size=89, hidden_size=256, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64,
        )
    )  # fmt: skip
    rng = np.random.default_rng(4)
    tok = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, n)]  # noqa: E731
    steps = [{0: tok(13), 1: tok(40), 2: tok(1)}]
    steps += [{0: tok(1), 1: tok(1), 2: tok(1)} for _ in range(3)]
    steps += [{0: tok(2), 1: tok(2), 2: tok(2)}, {0: tok(20)}, {0: tok(3), 1: tok(1)}]
    run_steps(kind, cfg, steps, dtype, cp, block_size=16, std=0.08)  # moderate fp16 activations


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_bert(cp, dtype):
    cfg = BertConfig(
        vocab_size=71, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
    )
    model, w = build("bert", cfg, dtype, cp, std=0.08)
    seqs = [[2, 5, 9, 11, 3], [2, 7, 3], list(range(2, 40))]
    ids, mask = padded(seqs)
    emb = model.embed(cp.asarray(ids), cp.asarray(mask))
    expected = np.stack([ref.sentence_embedding(w, cfg, s) for s in seqs])
    cos = (ref.f64(emb) * expected).sum(axis=1)
    assert cos.min() >= (0.999 if dtype == np.float16 else 0.99999), cos


@pytest.mark.gpu
def test_gpu_greedy_matches_cpu(cp):
    """The argmax of every step's logits agrees between the GPU (fp32) and the CPU (fp32) paths."""
    cfg = LLAMA_TINY
    outs = {}
    for xp in (np, cp):
        model, _ = build("llama", cfg, np.float32, xp)
        arena, pool = arena_for(model, xp), MiniPool(48, 8)
        toks, seq = [], [1, 2, 3, 4]
        logits = model.forward(pool.prepare([0], [seq], xp), arena, last_only=True)
        for _ in range(8):
            nxt = int(ref.f64(logits)[0].argmax())
            toks.append(nxt)
            logits = model.forward(pool.prepare([0], [[nxt]], xp), arena, last_only=True)
        outs[xp.__name__] = toks
    assert outs["numpy"] == outs["cupy"]
