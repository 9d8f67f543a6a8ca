"""BERT encoder (Devlin et al. 2019) and sentence embeddings (Reimers & Gurevych 2019, Sentence-BERT).

    x = layer_norm(word_emb[ids] + pos_emb[0..S-1] + type_emb[token_type_ids])
    per layer (post-LN):  x = layer_norm(x + attn_out(attention(q, k, v, key padding mask)))
                          x = layer_norm(x + out(gelu_erf(intermediate(x))))
`embed` is the sentence-transformers pipeline of all-MiniLM-L6-v2: mean of the hidden states over the tokens
with attention_mask 1, then (by default) L2 normalisation, e = m / max(|m|, 1e-12).

Padding: the (B, S) attention_mask becomes rf.attention's additive key mask (B, 1, 1, S) (0 or -inf), so
padded keys are never seen; the hidden states of padded query positions are computed but not used.

Weights: the names and layouts of the Hugging Face BertModel checkpoint (the "bert." prefix of BertFor*
checkpoints is removed by the loader, old "LayerNorm.gamma / .beta" names become ".weight / .bias").
nn.Linear stores (out, in); the model keeps (in, out) matrices for `x @ W`, query / key / value fused:

    embeddings.word_embeddings.weight (vocab, H)   embeddings.position_embeddings.weight (max_pos, H)
    embeddings.token_type_embeddings.weight (type_vocab, H)   embeddings.LayerNorm.weight / .bias (H)
    encoder.layer.{i}.attention.self.{query,key,value}.weight (H, H) / .bias   -> one (H, 3H) matrix
    encoder.layer.{i}.attention.output.dense.weight (H, H) / .bias
    encoder.layer.{i}.attention.output.LayerNorm.weight / .bias
    encoder.layer.{i}.intermediate.dense.weight (I, H) / .bias
    encoder.layer.{i}.output.dense.weight (H, I) / .bias
    encoder.layer.{i}.output.LayerNorm.weight / .bias
The pooler, the MLM head (cls.*) and embeddings.position_ids are not read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rawformer.models.common import check_weights, linear, linear_weight, random_weights
from rawformer.models.config import BertConfig

import rawformer as rf

__all__ = ["BertModel", "HF_PREFIXES", "init_random", "weight_shapes"]

HF_PREFIXES = ("bert.",)  # stripped from checkpoint names by the loader
HF_RENAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}  # old checkpoints


def weight_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model reads (HF BertModel names and layouts)."""
    h, inter = config.hidden_size, config.intermediate_size
    e = "embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        e + "word_embeddings.weight": (config.vocab_size, h),
        e + "position_embeddings.weight": (config.max_position_embeddings, h),
        e + "token_type_embeddings.weight": (config.type_vocab_size, h),
        e + "LayerNorm.weight": (h,),
        e + "LayerNorm.bias": (h,),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            shapes |= {p + f"attention.self.{n}.weight": (h, h), p + f"attention.self.{n}.bias": (h,)}
        shapes |= {
            p + "attention.output.dense.weight": (h, h), p + "attention.output.dense.bias": (h,),
            p + "attention.output.LayerNorm.weight": (h,), p + "attention.output.LayerNorm.bias": (h,),
            p + "intermediate.dense.weight": (inter, h), p + "intermediate.dense.bias": (inter,),
            p + "output.dense.weight": (h, inter), p + "output.dense.bias": (h,),
            p + "output.LayerNorm.weight": (h,), p + "output.LayerNorm.bias": (h,),
        }  # fmt: skip
    return shapes


class Layer:
    """One post-LN encoder layer: (in, out) matrices, q | k | v fused along the output axis."""

    def __init__(self, w: dict[str, Any], i: int, xp: Any) -> None:
        p = f"encoder.layer.{i}."
        s = p + "attention.self."
        self.w_qkv = xp.concatenate(
            [linear_weight(w[s + n + ".weight"], xp) for n in ("query", "key", "value")], 1
        )
        self.b_qkv = xp.concatenate([w[s + n + ".bias"] for n in ("query", "key", "value")])  # (3H,)
        self.w_o = linear_weight(w[p + "attention.output.dense.weight"], xp)  # (H, H)
        self.b_o = w[p + "attention.output.dense.bias"]
        self.ln_1 = (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        self.w_i = linear_weight(w[p + "intermediate.dense.weight"], xp)  # (H, I)
        self.b_i = w[p + "intermediate.dense.bias"]
        self.w_out = linear_weight(w[p + "output.dense.weight"], xp)  # (I, H)
        self.b_out = w[p + "output.dense.bias"]
        self.ln_2 = (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])


class BertModel:
    """BERT encoder with mean-pooled sentence embeddings.

    Parameters
    ----------
    config : BertConfig
    weights : dict name -> array with the names and shapes of `weight_shapes(config)` (HF layouts); NumPy
        (float32 / float64: the reference path) or CuPy (float16 / float32: the kernels), one dtype
    xp : numpy or cupy (default: the module of the weights)
    """

    def __init__(self, config: BertConfig, weights: dict[str, Any], xp: Any = None) -> None:
        self.config = config
        self.xp, self.dtype = check_weights("BertModel", weight_shapes(config), weights, xp)
        e = "embeddings."
        self.word = weights[e + "word_embeddings.weight"]  # (V, H)
        self.pos = weights[e + "position_embeddings.weight"]  # (P, H)
        self.types = weights[e + "token_type_embeddings.weight"]  # (type_vocab, H)
        self.ln_emb = (weights[e + "LayerNorm.weight"], weights[e + "LayerNorm.bias"])
        self.layers = [Layer(weights, i, self.xp) for i in range(config.num_hidden_layers)]

    def _inputs(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple[Any, Any, Any]:
        xp = self.xp
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"BertModel: input_ids must be an int (batch, seq) array, got {ids.dtype} {ids.shape}"
            )
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"BertModel: sequences of {ids.shape[1]} tokens; the model has max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        mask = xp.ones(ids.shape, dtype=bool) if attention_mask is None else xp.asarray(attention_mask) != 0
        tt = xp.zeros(ids.shape, dtype=ids.dtype) if token_type_ids is None else xp.asarray(token_type_ids)
        for name, a in (("attention_mask", mask), ("token_type_ids", tt)):
            if tuple(a.shape) != tuple(ids.shape):
                raise ValueError(
                    f"BertModel: {name} has shape {tuple(a.shape)}, input_ids {tuple(ids.shape)}"
                )
        return ids, mask, tt

    def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        """Last hidden states.

        Parameters
        ----------
        input_ids : int (B, S) token ids (NumPy or CuPy; moved to the weights' device)
        attention_mask : (B, S), 1 / True for real tokens, 0 for padding (default: all real)
        token_type_ids : int (B, S) segment ids (default: all 0)

        Returns
        -------
        hidden : (B, S, H) in the model dtype (rows of padded positions are not meaningful)
        """
        return self._hidden(*self._inputs(input_ids, attention_mask, token_type_ids))

    __call__ = forward

    def _hidden(self, ids: Any, mask: Any, tt: Any) -> Any:
        """`forward` on inputs already checked by `_inputs`: ids, tt int (B, S), mask bool (B, S)."""
        cfg = self.config
        b, s = ids.shape
        nh, hd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.layer_norm_eps
        x = self.word[ids] + self.pos[:s][None] + self.types[tt]  # (B, S, H)
        x = rf.layer_norm(x, *self.ln_emb, eps).reshape(b * s, cfg.hidden_size)  # (B S, H)
        # additive key mask, built once for all layers: 0 where the key is a real token, -inf on padding
        key_mask = self.xp.where(mask, 0.0, -np.inf).astype(np.float32)[:, None, None, :]  # (B, 1, 1, S)
        for lyr in self.layers:
            qkv = linear(x, lyr.w_qkv, lyr.b_qkv).reshape(b, s, 3, nh, hd)  # (B, S, 3, nh, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, S, nh, hd) strided views
            a = rf.attention(q, k, v, mask=key_mask)  # (B, S, nh, hd)
            a = linear(a.reshape(b * s, nh * hd), lyr.w_o, lyr.b_o)
            x = rf.add_layer_norm(a, x, *lyr.ln_1, eps)[0]  # layer_norm(x + a)
            m = rf.gelu(linear(x, lyr.w_i), lyr.b_i, approximate=cfg.gelu_approximate)
            m = linear(m, lyr.w_out, lyr.b_out)
            x = rf.add_layer_norm(m, x, *lyr.ln_2, eps)[0]  # layer_norm(x + m)
        return x.reshape(b, s, cfg.hidden_size)

    def embed(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        *,
        normalize: bool = True,
    ) -> Any:
        """Sentence embeddings: mean of the hidden states over the real tokens, L2-normalised by default.

            m_b = sum_s mask[b, s] hidden[b, s] / max(sum_s mask[b, s], 1e-9)
            e_b = m_b / max(||m_b||, 1e-12)

        Parameters
        ----------
        input_ids, attention_mask, token_type_ids : as `forward`
        normalize : L2-normalise (sentence-transformers' Normalize module); False gives the mean itself

        Returns
        -------
        (B, H) float32 (float64 for a float64 model): pooling is accumulated in at least float32
        """
        ids, mask, tt = self._inputs(input_ids, attention_mask, token_type_ids)
        hidden = self._hidden(ids, mask, tt)
        acc = np.float64 if self.dtype == np.float64 else np.float32
        w = mask.astype(acc)[:, :, None]  # (B, S, 1)
        pooled = (hidden.astype(acc) * w).sum(axis=1) / self.xp.maximum(w.sum(axis=1), 1e-9)  # (B, H)
        if not normalize:
            return pooled
        norm = self.xp.sqrt((pooled * pooled).sum(axis=1, keepdims=True))
        return pooled / self.xp.maximum(norm, 1e-12)


def init_random(
    config: BertConfig, seed: int = 0, dtype: Any = np.float32, xp: Any = np, std: float = 0.02
) -> BertModel:
    """A BertModel with N(0, std) weights (norm scales 1 + N(0, std)), the same on all backends for a seed."""
    return BertModel(config, random_weights(weight_shapes(config), seed, dtype, xp, std), xp)
