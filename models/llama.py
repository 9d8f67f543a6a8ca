"""Llama (Touvron et al. 2023, "Llama 2"; Meta 2024, "The Llama 3 Herd of Models").

A pre-RMSNorm decoder without biases:
    x = x + o_proj(attention(rope(q), rope(k), v)),   q, k, v = projections of rms_norm(x)
    x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),   h = rms_norm(x)
then a final RMSNorm and an untied lm head (tied when tie_word_embeddings, as Llama 3.2 1B / 3B). Each
residual add is fused with the norm after it and the projection after that (common.norm_linear: x = x + a,
y = rms_norm(x) @ W; on the GPU one kernel for a batch-1 decode step, rf.add_rms_norm_linear).
Grouped-query attention: num_key_value_heads divides num_attention_heads; q head j reads kv head
j // (heads / kv_heads). RoPE in the NeoX "halves" layout of the HF checkpoints (pairs (p, p + head_dim/2)),
frequencies `llama_inv_freq(config)`: rope_theta, and Llama 3 / linear rope_scaling.

Weights: the names and layouts of the Hugging Face LlamaForCausalLM checkpoint, the "model." prefix removed
by the loader. nn.Linear stores (out, in); the model keeps `x @ W` matrices (in, out), built once here:

    embed_tokens.weight (vocab, H)                     lm_head.weight (vocab, H)   (absent when tied)
    layers.{i}.input_layernorm.weight (H)              layers.{i}.post_attention_layernorm.weight (H)
    layers.{i}.self_attn.q_proj.weight (heads D, H)    -> with k_proj, v_proj: one fused (H, (heads + 2 kv) D)
    layers.{i}.self_attn.k_proj.weight (kv D, H)          matrix, so q, k, v come from one GEMM as views
    layers.{i}.self_attn.v_proj.weight (kv D, H)
    layers.{i}.self_attn.o_proj.weight (H, heads D)    -> transposed (heads D, H)
    layers.{i}.mlp.gate_proj.weight (I, H), up_proj (I, H), down_proj (H, I)   -> transposed
    norm.weight (H)
    (with attention_bias: q/k/v/o_proj.bias; with mlp_bias: gate/up/down_proj.bias)
Checkpoint buffers such as layers.{i}.self_attn.rotary_emb.inv_freq are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from rawformer.models.common import (
    StepBatch,
    check_weights,
    decoder_attention,
    last_token_rows,
    linear,
    linear_weight,
    norm_linear,
    plan_step,
    random_weights,
    run_layers,
    stacked_linear_weight,
)
from rawformer.models.config import LlamaConfig, llama_inv_freq
from rawformer.models.int8_kv import int8_kv_attention, uses_int8_kv

import rawformer as rf

__all__ = ["HF_PREFIXES", "LlamaModel", "init_random", "weight_shapes"]

HF_PREFIXES = ("model.",)  # stripped from checkpoint names by the loader


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model reads (HF names without "model.", HF layouts)."""
    h, inter, d = config.hidden_size, config.intermediate_size, int(config.head_dim)  # type: ignore[arg-type]
    qd, kd = config.num_attention_heads * d, config.kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (qd, h),
            p + "self_attn.k_proj.weight": (kd, h),
            p + "self_attn.v_proj.weight": (kd, h),
            p + "self_attn.o_proj.weight": (h, qd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if config.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kd,),
                p + "self_attn.v_proj.bias": (kd,), p + "self_attn.o_proj.bias": (h,),
            }  # fmt: skip
        if config.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (h,),
            }  # fmt: skip
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


class Block:
    """One decoder block: norm scales as given, projections as contiguous (in, out) matrices."""

    def __init__(self, w: dict[str, Any], i: int, config: LlamaConfig, xp: Any) -> None:
        p = f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        self.ln_1 = w[p + "input_layernorm.weight"]
        self.ln_2 = w[p + "post_attention_layernorm.weight"]
        # (H, (heads + 2 kv_heads) D): q | k | v along the output axis
        self.w_qkv = stacked_linear_weight([w[a + n + "_proj.weight"] for n in "qkv"], xp)
        self.w_o = linear_weight(w[a + "o_proj.weight"], xp)  # (heads D, H)
        self.w_gate = linear_weight(w[m + "gate_proj.weight"], xp)  # (H, I)
        self.w_up = linear_weight(w[m + "up_proj.weight"], xp)  # (H, I)
        self.w_down = linear_weight(w[m + "down_proj.weight"], xp)  # (I, H)
        self.b_qkv = self.b_o = self.b_gate = self.b_up = self.b_down = None
        if config.attention_bias:
            self.b_qkv = xp.concatenate([w[a + n + "_proj.bias"] for n in "qkv"])
            self.b_o = w[a + "o_proj.bias"]
        if config.mlp_bias:
            self.b_gate, self.b_up, self.b_down = (w[m + n + "_proj.bias"] for n in ("gate", "up", "down"))


class LlamaModel:
    """Llama over the paged KV cache.

    Parameters
    ----------
    config : LlamaConfig
    weights : dict name -> array with the names and shapes of `weight_shapes(config)` (HF layouts); NumPy
        (float32 / float64: the reference path) or CuPy (float16 / float32: the kernels), one dtype
    xp : numpy or cupy (default: the module of the weights)
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, Any], xp: Any = None) -> None:
        self.config = config
        self.xp, self.dtype = check_weights("LlamaModel", weight_shapes(config), weights, xp)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.kv_heads
        self.head_dim = int(config.head_dim)  # type: ignore[arg-type]
        self.vocab_size = config.vocab_size
        self.embed = weights["embed_tokens.weight"]  # (V, H)
        self.blocks = [Block(weights, i, config, self.xp) for i in range(config.num_hidden_layers)]
        self.norm = weights["norm.weight"]
        # (V, H): logits = x @ lm_head.T (cuBLAS reads the transposed operand in place)
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.inv_freq = self.xp.asarray(llama_inv_freq(config))  # float32 (head_dim / 2,)

    def forward(self, batch: StepBatch, arena: Any, *, last_only: bool = False) -> Any:
        """Logits of the new tokens of one step; their rotated K and V are written into the arena.

        Parameters
        ----------
        batch : AttentionBatch (rawformer.memory) of this step, arrays where the weights live
        arena : KVArena with arena.k(L), arena.v(L) of shape (num_blocks, block_size, kv_heads, head_dim)
        last_only : only the last new token of each sequence

        Returns
        -------
        logits : (T, vocab) in the model dtype, or (S, vocab) with last_only
        """
        return run_layers(self.forward_layers(batch, arena, last_only=last_only))

    def forward_layers(self, batch: StepBatch, arena: Any, *, last_only: bool = False) -> Iterator[int]:
        """`forward`, one layer at a time: a generator that yields each layer's index once that layer's work
        is launched, and returns the logits (run_layers(...) takes them). The Scheduler launches a prefill
        a few layers per overlapped decode step this way (runtime/interleave.py); `batch` must stay valid
        until the generator ends (AttentionBatch.detached())."""
        cfg = self.config
        t = int(batch.tokens.shape[0])
        nh, nkv, d, eps = cfg.num_attention_heads, cfg.kv_heads, self.head_dim, cfg.rms_norm_eps
        plan = plan_step(batch, arena.k(0).shape[1], self.xp)
        int8_kv = uses_int8_kv(arena)

        x = self.embed[batch.tokens]  # (T, H) the residual stream
        m = None  # the MLP output not yet added to x (layer 0: nothing)
        for layer, blk in enumerate(self.blocks):
            # x = x + m; qkv = rms_norm(x) @ w_qkv (one kernel for a batch-1 decode step on the GPU)
            qkv, x = norm_linear(m, x, blk.ln_1, eps, blk.w_qkv, blk.b_qkv)  # (T, (nh + 2 nkv) d)
            q = qkv[:, : nh * d].reshape(t, nh, d)  # (T, nh, d) views of qkv
            k = qkv[:, nh * d : (nh + nkv) * d].reshape(t, nkv, d)  # (T, nkv, d)
            v = qkv[:, (nh + nkv) * d :].reshape(t, nkv, d)
            if int8_kv:  # an Int8KVArena: rotate, then quantize into the cache and attend (models/int8_kv.py)
                q = rf.rope(q, batch.positions, inv_freq=self.inv_freq)
                k = rf.rope(k, batch.positions, inv_freq=self.inv_freq)
                a = int8_kv_attention(q, k, v, batch, plan, arena, layer)  # (T, nh, d)
            else:
                kc, vc = arena.k(layer), arena.v(layer)
                q, k = rf.rope_kv_write(
                    q, k, v, batch.positions, kc, vc, batch.slot_mapping, inv_freq=self.inv_freq
                )
                a = decoder_attention(q, k, v, batch, plan, kc, vc)  # (T, nh, d)
            a = linear(a.reshape(t, nh * d), blk.w_o, blk.b_o)  # (T, H)
            # x = x + a; g = swiglu(rms_norm(x) @ w_gate, rms_norm(x) @ w_up)
            g, x = norm_linear(a, x, blk.ln_2, eps, blk.w_gate, blk.b_gate, blk.w_up, blk.b_up)  # (T, I)
            m = linear(g, blk.w_down, blk.b_down)  # (T, H)
            yield layer
        if last_only:
            rows = last_token_rows(batch)
            m, x = None if m is None else m[rows], x[rows]  # (S, H): the last token of each sequence goes on
        # x = x + m; the final norm and the lm head (V, H), read as x @ lm_head.T
        logits, _ = norm_linear(m, x, self.norm, eps, self.lm_head.T)
        return logits  # (T or S, V)


def init_random(
    config: LlamaConfig, seed: int = 0, dtype: Any = np.float32, xp: Any = np, std: float = 0.02
) -> LlamaModel:
    """A LlamaModel with N(0, std) weights (norm scales 1 + N(0, std)), same on all backends for a seed."""
    return LlamaModel(config, random_weights(weight_shapes(config), seed, dtype, xp, std), xp)
