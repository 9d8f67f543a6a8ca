"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A pre-LayerNorm decoder: learned token and position embeddings, n_layer blocks of
    x = x + attn(layer_norm(x));  x = x + mlp(layer_norm(x)),   mlp = c_proj(gelu_tanh(c_fc(.)))
then a final LayerNorm and the lm head tied to the token embedding (logits = x @ wte.T). Each residual add
is fused with the norm that follows it (rf.add_layer_norm: x = x + a, h = layer_norm(x)), so a block runs
two fused norms and no separate add.

Weights: the names and layouts of the Hugging Face GPT2Model checkpoint (the "transformer." prefix of
GPT2LMHeadModel is removed by the loader; lm_head.weight is wte.weight and not read). HF's Conv1D stores
(in, out) matrices, which is already the layout of `x @ W`, so nothing is transposed:

    wte.weight (vocab, n_embd)      wpe.weight (n_positions, n_embd)
    h.{i}.ln_1.weight / .bias (n_embd)
    h.{i}.attn.c_attn.weight (n_embd, 3 n_embd) / .bias      q | k | v along the output axis
    h.{i}.attn.c_proj.weight (n_embd, n_embd) / .bias
    h.{i}.ln_2.weight / .bias
    h.{i}.mlp.c_fc.weight (n_embd, inner) / .bias            inner = n_inner or 4 n_embd
    h.{i}.mlp.c_proj.weight (inner, n_embd) / .bias
    ln_f.weight / .bias
Checkpoint buffers (h.{i}.attn.bias, h.{i}.attn.masked_bias: causal masks) are ignored.

Attention per layer: c_attn gives (T, 3 n_embd); q, k, v are strided views of it, (T, n_head, head_dim)
each; rf.kv_write puts k, v into the paged cache, then `decoder_attention` (models/common.py).
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
    plan_step,
    random_weights,
    run_layers,
)
from rawformer.models.config import GPT2Config
from rawformer.models.int8_kv import int8_kv_attention, uses_int8_kv

import rawformer as rf

__all__ = ["GPT2Model", "HF_PREFIXES", "init_random", "weight_shapes"]

HF_PREFIXES = ("transformer.",)  # stripped from checkpoint names by the loader


def weight_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model reads (HF GPT2Model names and layouts)."""
    h, inner = config.n_embd, config.inner
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, h),
        "wpe.weight": (config.n_positions, h),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
            p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
            p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
            p + "mlp.c_fc.weight": (h, inner), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, h), p + "mlp.c_proj.bias": (h,),
        }  # fmt: skip
    shapes |= {"ln_f.weight": (h,), "ln_f.bias": (h,)}
    return shapes


class Block:
    """One pre-LN transformer block's weights. On the CPU, views of the weight dict (nothing is copied); on
    the GPU each Conv1D matrix (in, out) is stored as the transposed view of an (out, in) copy, the layout
    rf.linear's decode GEMV streams fastest (models/common.linear_weight says why)."""

    def __init__(self, w: dict[str, Any], i: int, xp: Any) -> None:
        p = f"h.{i}."

        def mat(name: str) -> Any:
            return w[name] if xp is np else xp.ascontiguousarray(w[name].T).T

        self.ln_1 = (w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        self.c_attn = (mat(p + "attn.c_attn.weight"), w[p + "attn.c_attn.bias"])  # (H, 3H), (3H,)
        self.attn_proj = (mat(p + "attn.c_proj.weight"), w[p + "attn.c_proj.bias"])  # (H, H), (H,)
        self.ln_2 = (w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        self.c_fc = (mat(p + "mlp.c_fc.weight"), w[p + "mlp.c_fc.bias"])  # (H, inner), (inner,)
        self.mlp_proj = (mat(p + "mlp.c_proj.weight"), w[p + "mlp.c_proj.bias"])  # (inner, H), (H,)


class GPT2Model:
    """GPT-2 over the paged KV cache.

    Parameters
    ----------
    config : GPT2Config
    weights : dict name -> array, the names and shapes of `weight_shapes(config)`; NumPy (float32 / float64:
        the reference path) or CuPy (float16 / float32: the kernels), one dtype
    xp : numpy or cupy (default: the module of the weights)
    """

    def __init__(self, config: GPT2Config, weights: dict[str, Any], xp: Any = None) -> None:
        self.config = config
        self.xp, self.dtype = check_weights("GPT2Model", weight_shapes(config), weights, xp)
        self.num_layers = config.n_layer
        self.num_kv_heads = config.n_head
        self.head_dim = config.head_dim
        self.vocab_size = config.vocab_size
        self.wte = weights["wte.weight"]  # (V, H); the lm head is wte.T (tied)
        self.wpe = weights["wpe.weight"]  # (P, H)
        self.blocks = [Block(weights, i, self.xp) for i in range(config.n_layer)]
        self.ln_f = (weights["ln_f.weight"], weights["ln_f.bias"])

    def forward(self, batch: StepBatch, arena: Any, *, last_only: bool = False) -> Any:
        """Logits of the new tokens of one step; their K/V are written into the arena.

        Parameters
        ----------
        batch : AttentionBatch (rawformer.memory) of this step, arrays where the weights live
        arena : KVArena with arena.k(L), arena.v(L) of shape (num_blocks, block_size, n_head, head_dim)
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
        if int(batch.max_context) > cfg.n_positions:
            raise ValueError(
                f"GPT2Model: a sequence reaches {int(batch.max_context)} tokens; the model has "
                f"n_positions={cfg.n_positions}"
            )
        t = int(batch.tokens.shape[0])
        nh, hd, eps = cfg.n_head, cfg.head_dim, cfg.layer_norm_epsilon
        plan = plan_step(batch, arena.k(0).shape[1], self.xp)
        int8_kv = uses_int8_kv(arena)

        x = self.wte[batch.tokens] + self.wpe[batch.positions]  # (T, H)
        h = rf.layer_norm(x, *self.blocks[0].ln_1, eps)
        for layer, blk in enumerate(self.blocks):
            qkv = linear(h, *blk.c_attn).reshape(t, 3, nh, hd)  # (T, 3, nh, hd)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (T, nh, hd) strided views
            if int8_kv:  # an Int8KVArena: quantize into the cache and attend (models/int8_kv.py)
                a = int8_kv_attention(q, k, v, batch, plan, arena, layer)  # (T, nh, hd)
            else:
                kc, vc = arena.k(layer), arena.v(layer)
                rf.kv_write(k, v, kc, vc, batch.slot_mapping)
                a = decoder_attention(q, k, v, batch, plan, kc, vc)  # (T, nh, hd)
            a = linear(a.reshape(t, nh * hd), *blk.attn_proj)
            h, x = rf.add_layer_norm(a, x, *blk.ln_2, eps)  # x = x + a; h = ln_2(x)
            m = rf.gelu(linear(h, blk.c_fc[0]), blk.c_fc[1], approximate=cfg.gelu_approximate)  # (T, inner)
            m = linear(m, *blk.mlp_proj)
            nxt = self.blocks[layer + 1].ln_1 if layer + 1 < len(self.blocks) else self.ln_f
            if last_only and layer + 1 == len(self.blocks):
                rows = last_token_rows(batch)
                m, x = m[rows], x[rows]  # (S, H): only the last token of each sequence goes on
            h, x = rf.add_layer_norm(m, x, *nxt, eps)  # x = x + m; h = next block's ln_1(x) (or ln_f)
            yield layer
        return linear(h, self.wte.T)  # (T or S, V): the tied head, wte read in place


def init_random(
    config: GPT2Config, seed: int = 0, dtype: Any = np.float32, xp: Any = np, std: float = 0.02
) -> GPT2Model:
    """A GPT2Model with N(0, std) weights (norm scales 1 + N(0, std)), the same on all backends for a seed."""
    return GPT2Model(config, random_weights(weight_shapes(config), seed, dtype, xp, std), xp)
