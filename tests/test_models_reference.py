"""Independent float64 NumPy implementations of GPT-2, Llama and BERT for the model and loading tests.

Written from the papers / HF definitions directly over the checkpoint-layout weight dicts (nn.Linear (out, in)
used as `x @ W.T`, GPT-2 Conv1D (in, out) as `x @ W`), one sequence at a time, dense attention with explicit
loops over heads: nothing here calls rawformer. Also a minimal paged KV arena and a hand-built
AttentionBatch, so the models can be tested before rawformer.memory exists. A few tests check the references
themselves against known values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer.memory import AttentionBatch

# ---- building blocks ---------------------------------------------------------------------------------------


def f64(a: Any) -> np.ndarray:
    a = a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a
    return np.asarray(a, dtype=np.float64)


def layer_norm(x: np.ndarray, w: Any, b: Any, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * f64(w) + f64(b)


def rms_norm(x: np.ndarray, w: Any, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * f64(w)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, key_ok: Any = None) -> np.ndarray:
    """q (S, Hq, D), k / v (S, Hk, D): softmax(q k^T / sqrt(D)) v per head; q head h reads kv head
    h // (Hq / Hk)."""
    s, hq, d = q.shape
    hk = k.shape[1]
    out = np.zeros_like(q)
    for h in range(hq):
        g = h // (hq // hk)
        z = q[:, h] @ k[:, g].T / math.sqrt(d)  # (S, S)
        if causal:
            z = np.where(np.tril(np.ones((s, s), dtype=bool)), z, -np.inf)
        if key_ok is not None:
            z = np.where(key_ok[None, :], z, -np.inf)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, g]
    return out


def rope_neox(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF's rotate_half RoPE of x (S, H, D); angles float32(pos) * float32 inv_freq in float32, as in HF."""
    ang = (positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]).astype(np.float64)
    cos = np.cos(np.concatenate([ang, ang], axis=-1))[:, None, :]  # (S, 1, D)
    sin = np.sin(np.concatenate([ang, ang], axis=-1))[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Llama 3.1's frequency scaling, written as a loop over frequencies."""
    inv = [theta ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]
    if scaling is None:
        return np.array(inv, dtype=np.float32)
    if scaling["rope_type"] == "linear":
        return np.array([f / scaling["factor"] for f in inv], dtype=np.float32)
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out, dtype=np.float32)


# ---- models, one sequence ----------------------------------------------------------------------------------


def gpt2_logits(w: dict[str, Any], cfg: Any, tokens: list[int]) -> np.ndarray:
    """(S, V) logits of one sequence."""
    s, nh, hd = len(tokens), cfg.n_head, cfg.n_embd // cfg.n_head
    eps = cfg.layer_norm_epsilon
    act = gelu_tanh if cfg.activation_function != "gelu" else gelu_erf
    x = f64(w["wte.weight"])[tokens] + f64(w["wpe.weight"])[:s]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = h @ f64(w[p + "attn.c_attn.weight"]) + f64(w[p + "attn.c_attn.bias"])
        q, k, v = (a.reshape(s, nh, hd) for a in np.split(qkv, 3, axis=-1))
        a = attention(q, k, v, causal=True).reshape(s, nh * hd)
        x = x + a @ f64(w[p + "attn.c_proj.weight"]) + f64(w[p + "attn.c_proj.bias"])
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        m = act(h @ f64(w[p + "mlp.c_fc.weight"]) + f64(w[p + "mlp.c_fc.bias"]))
        x = x + m @ f64(w[p + "mlp.c_proj.weight"]) + f64(w[p + "mlp.c_proj.bias"])
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ f64(w["wte.weight"]).T


def _lin(x: np.ndarray, w: dict[str, Any], name: str, bias: bool) -> np.ndarray:
    y = x @ f64(w[name + ".weight"]).T
    return y + f64(w[name + ".bias"]) if bias else y


def llama_logits(w: dict[str, Any], cfg: Any, tokens: list[int]) -> np.ndarray:
    """(S, V) logits of one sequence."""
    s, nh = len(tokens), cfg.num_attention_heads
    nkv = cfg.num_key_value_heads or nh
    d = cfg.head_dim or cfg.hidden_size // nh
    eps, ab, mb = cfg.rms_norm_eps, cfg.attention_bias, cfg.mlp_bias
    inv = llama3_inv_freq(d, cfg.rope_theta, cfg.rope_scaling)
    pos = np.arange(s)
    x = f64(w["embed_tokens.weight"])[tokens]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rope_neox(_lin(h, w, p + "self_attn.q_proj", ab).reshape(s, nh, d), pos, inv)
        k = rope_neox(_lin(h, w, p + "self_attn.k_proj", ab).reshape(s, nkv, d), pos, inv)
        v = _lin(h, w, p + "self_attn.v_proj", ab).reshape(s, nkv, d)
        x = x + _lin(attention(q, k, v, causal=True).reshape(s, nh * d), w, p + "self_attn.o_proj", ab)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = silu(_lin(h, w, p + "mlp.gate_proj", mb)) * _lin(h, w, p + "mlp.up_proj", mb)
        x = x + _lin(g, w, p + "mlp.down_proj", mb)
    x = rms_norm(x, w["norm.weight"], eps)
    head = w["embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ f64(head).T


def bert_hidden(w: dict[str, Any], cfg: Any, ids: list[int], type_ids: list[int] | None = None) -> np.ndarray:
    """(S, H) last hidden states of one unpadded sequence."""
    s, nh = len(ids), cfg.num_attention_heads
    hd, eps = cfg.hidden_size // nh, cfg.layer_norm_eps
    act = gelu_erf if cfg.hidden_act == "gelu" else gelu_tanh
    e = "embeddings."
    tt = np.zeros(s, dtype=np.int64) if type_ids is None else np.asarray(type_ids)
    x = f64(w[e + "word_embeddings.weight"])[ids] + f64(w[e + "position_embeddings.weight"])[:s]
    x = layer_norm(
        x + f64(w[e + "token_type_embeddings.weight"])[tt],
        w[e + "LayerNorm.weight"],
        w[e + "LayerNorm.bias"],
        eps,
    )
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (
            _lin(x, w, p + f"attention.self.{n}", True).reshape(s, nh, hd) for n in ("query", "key", "value")
        )
        a = _lin(attention(q, k, v, causal=False).reshape(s, nh * hd), w, p + "attention.output.dense", True)
        x = layer_norm(
            x + a, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps
        )
        m = _lin(act(_lin(x, w, p + "intermediate.dense", True)), w, p + "output.dense", True)
        x = layer_norm(x + m, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x


def sentence_embedding(w: dict[str, Any], cfg: Any, ids: list[int]) -> np.ndarray:
    """Mean of the hidden states, L2-normalised (sentence-transformers' Pooling + Normalize)."""
    m = bert_hidden(w, cfg, ids).mean(axis=0)
    return m / np.linalg.norm(m)


# ---- a minimal paged cache, until rawformer.memory lands ---------------------------------------------------


class MiniArena:
    """One array (layers, 2, num_blocks, block_size, kv_heads, head_dim), NaN-filled so that reading a slot
    nobody wrote shows up in the logits."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int, dtype: Any, xp: Any
    ):
        self.data = xp.full((layers, 2, num_blocks, block_size, kv_heads, head_dim), np.nan, dtype=dtype)
        self.block_size = block_size

    def k(self, layer: int) -> Any:
        return self.data[layer, 0]

    def v(self, layer: int) -> Any:
        return self.data[layer, 1]


Batch = AttentionBatch  # the steps this pool lays out are the runtime's own


class MiniPool:
    """Sequences with their own blocks, taken from a shuffled free list (so block ids are out of order)."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def prepare(self, seq_ids: list[int], new_tokens: list[list[int]], xp: Any = np) -> Batch:
        bs = self.block_size
        positions, slots, tokens, cu = [], [], [], [0]
        prefill = True
        for sid, toks in zip(seq_ids, new_tokens, strict=True):
            start = self.lens.get(sid, 0)
            prefill &= start == 0
            table = self.tables.setdefault(sid, [])
            for p in range(start, start + len(toks)):
                if p // bs >= len(table):
                    table.append(self.free.pop())
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            self.lens[sid] = start + len(toks)
            tokens += toks
            cu.append(cu[-1] + len(toks))
        width = max(len(self.tables[s]) for s in seq_ids)
        tables = np.full((len(seq_ids), width), -1, dtype=np.int32)
        for r, sid in enumerate(seq_ids):
            tables[r, : len(self.tables[sid])] = self.tables[sid]
        ctx = np.array([self.lens[s] for s in seq_ids], dtype=np.int32)
        i32 = lambda a: xp.asarray(np.asarray(a, dtype=np.int32))  # noqa: E731
        return Batch(
            tokens=xp.asarray(np.asarray(tokens, dtype=np.int64)),
            positions=i32(positions),
            slot_mapping=i32(slots),
            cu_seqlens_q=i32(cu),
            context_lens=i32(ctx),
            block_tables=xp.asarray(tables),
            max_seqlen_q=max(len(t) for t in new_tokens),
            max_context=int(ctx.max()),
            is_prefill=bool(prefill),
        )


# ---- checks of the references themselves ------------------------------------------------------------------


def test_reference_gelu_known_values():
    x = np.array([-1.0, 0.0, 1.0, 2.0])
    # 0.5 x (1 + erf(x / sqrt 2)): Phi(1) = 0.8413447460685429, Phi(2) = 0.9772498680518208
    np.testing.assert_allclose(
        gelu_erf(x), [-0.15865525393145707, 0.0, 0.8413447460685429, 1.9544997361036416]
    )
    np.testing.assert_allclose(gelu_tanh(x), gelu_erf(x), atol=1e-3)  # the tanh form is within 1e-3


def test_reference_rope_is_a_rotation():
    x = np.random.default_rng(0).standard_normal((5, 2, 8))
    y = rope_neox(x, np.arange(5), llama3_inv_freq(8, 10000.0, None))
    np.testing.assert_allclose(y[0], x[0])  # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    # pair (0, 4) of position 1 turns by inv_freq[0] = 1 radian
    c, s = math.cos(1.0), math.sin(1.0)
    np.testing.assert_allclose(y[1, 0, 0], x[1, 0, 0] * c - x[1, 0, 4] * s, rtol=1e-6)


def test_reference_attention_uniform_and_causal():
    v = np.arange(12.0).reshape(3, 1, 4)
    q = np.zeros((3, 1, 4))
    out = attention(q, q, v, causal=True)  # equal scores: the mean of the visible values
    np.testing.assert_allclose(out[:, 0], [v[0, 0], v[:2, 0].mean(0), v[:, 0].mean(0)])
