"""DeepSeek-V2 (DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
Language Model", arXiv 2405.04434): Multi-head Latent Attention (MLA) and DeepSeekMoE.

A pre-RMSNorm decoder. Attention of one token (h = rms_norm(x), per head i):

    q_i = W_UQ_i rms_norm(W_DQ h)           (q_lora_rank; or W_Q_i h)     = [q_nope_i (dn) ; q_rope_i (dr)]
    c   = rms_norm(W_DKV h)                 (kv_lora_rank R: the cached latent)
    k_r = rope(W_KR h)                      (dr: the cached rope key, ONE for all heads)
    k_i = [W_UK_i c ; k_r],   v_i = W_UV_i c,   q_rope_i = rope(q_rope_i)
    o   = W_O [softmax(scale q_i . k_i) v_i  for every head i]

RoPE rotates interleaved pairs (2p, 2p+1) of the rope dims (the checkpoints' complex-number form); YaRN
(rope_scaling type "yarn") sets inv_freq, a gain on the rotated vectors and the softmax scale
(`deepseek_rope`). The norms of the low-rank branches (q_a_layernorm, kv_a_layernorm) use eps 1e-6 as in the
reference code, the block norms rms_norm_eps.

Two ways to attend, the same maths (tests/test_mla.py checks they agree):
    prefill / gather (non-absorbed): the latents of the context are expanded, K_i = [W_UK_i c ; k_r] and
        V_i = W_UV_i c, then rf.attention over the heads (head dim padded to max(dn + dr, dv));
    decode (absorbed): W_UK is folded into the query, q_abs_i = W_UK_i^T q_nope_i (R), so
        q_i . k_i = q_abs_i . c + q_rope_i . k_r: every head attends the cached latents directly
        (rf.mla_decode: one shared latent "head"), and W_UV is applied to the attended latent afterwards:
        o_i = W_UV_i (sum_p softmax_p c_p).

MLP: layers < first_k_dense_replace a SwiGLU MLP; the others DeepSeekMoE: n_shared_experts always-on
experts (one SwiGLU of width n_shared x moe_intermediate_size) + num_experts_per_tok of n_routed_experts
routed experts: s = softmax(h W_gate^T) (float32); "greedy" takes the top-k of s; "group_limited_greedy" keeps
the topk_group groups (of n_routed / n_group experts) with the largest max score first. Weights:
s_topk * routed_scaling_factor, or s_topk / sum(s_topk) with norm_topk_prob (DeepSeek's reference code;
transformers 5 ignores norm_topk_prob: the checkpoints that ship set it False).

The cache is a LatentArena (rawformer.memory.latent): per token and layer the latent c and k_r only.

Weights: the Hugging Face DeepseekV2ForCausalLM names without "model." (nn.Linear (out, in)):
    embed_tokens.weight (V, H)     norm.weight (H)     lm_head.weight (V, H)   (absent when tied)
    layers.{i}.input_layernorm.weight, post_attention_layernorm.weight (H)
    layers.{i}.self_attn.q_a_proj.weight (q_lora, H), q_a_layernorm.weight (q_lora),
        q_b_proj.weight (heads (dn + dr), q_lora)        | or q_proj.weight (heads (dn + dr), H)
    layers.{i}.self_attn.kv_a_proj_with_mqa.weight (R + dr, H), kv_a_layernorm.weight (R),
        kv_b_proj.weight (heads (dn + dv), R)  [per head: dn rows of W_UK then dv rows of W_UV]
    layers.{i}.self_attn.o_proj.weight (H, heads dv)
    dense:  layers.{i}.mlp.gate_proj / up_proj (I, H), down_proj (H, I)
    MoE:    layers.{i}.mlp.gate.weight (E, H); mlp.experts.{e}.gate_proj / up_proj (Im, H), down_proj (H, Im);
            mlp.shared_experts.gate_proj / up_proj (ns Im, H), down_proj (H, ns Im)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rawformer.models.common import (
    StepBatch,
    StepPlan,
    check_weights,
    last_token_rows,
    linear,
    linear_weight,
    plan_step,
    random_weights,
)
from rawformer.models.config import DeepseekV2Config, deepseek_rope

import rawformer as rf
from rawformer import backend
from rawformer.memory.latent import LatentArena
from rawformer.ops.mla import mla_decode

__all__ = ["HF_PREFIXES", "DeepseekV2Model", "init_random", "weight_shapes"]

HF_PREFIXES = ("model.",)
LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the reference code's default, not rms_norm_eps


def weight_shapes(config: DeepseekV2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model reads (HF names without "model.", HF layouts)."""
    c = config
    h, nh, r, dr = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    dqk, dn, dv = c.qk_head_dim, c.qk_nope_head_dim, c.v_head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if c.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (nh * dqk, h)
        else:
            shapes |= {
                a + "q_a_proj.weight": (c.q_lora_rank, h),
                a + "q_a_layernorm.weight": (c.q_lora_rank,),
                a + "q_b_proj.weight": (nh * dqk, c.q_lora_rank),
            }
        shapes |= {
            a + "kv_a_proj_with_mqa.weight": (r + dr, h),
            a + "kv_a_layernorm.weight": (r,),
            a + "kv_b_proj.weight": (nh * (dn + dv), r),
            a + "o_proj.weight": (h, nh * dv),
        }
        if c.is_moe_layer(i):
            im = c.moe_intermediate_size
            shapes[m + "gate.weight"] = (int(c.n_routed_experts), h)  # type: ignore[arg-type]
            for e in range(int(c.n_routed_experts)):  # type: ignore[arg-type]
                x = f"{m}experts.{e}."
                shapes |= {x + "gate_proj.weight": (im, h), x + "up_proj.weight": (im, h),
                           x + "down_proj.weight": (h, im)}  # fmt: skip
            if c.n_shared_experts:
                w = im * c.n_shared_experts
                x = m + "shared_experts."
                shapes |= {x + "gate_proj.weight": (w, h), x + "up_proj.weight": (w, h),
                           x + "down_proj.weight": (h, w)}  # fmt: skip
        else:
            inter = c.intermediate_size
            shapes |= {m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h),
                       m + "down_proj.weight": (h, inter)}  # fmt: skip
    shapes["norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


class SwiGLU:
    """down(silu(x W_gate) * (x W_up)) with (in, out) matrices."""

    def __init__(self, w: dict[str, Any], prefix: str, xp: Any) -> None:
        self.gate = linear_weight(w[prefix + "gate_proj.weight"], xp)  # (H, I)
        self.up = linear_weight(w[prefix + "up_proj.weight"], xp)  # (H, I)
        self.down = linear_weight(w[prefix + "down_proj.weight"], xp)  # (I, H)

    def __call__(self, x: Any) -> Any:
        return linear(rf.swiglu(linear(x, self.gate), linear(x, self.up)), self.down)


class MoE:
    """DeepSeekMoE: shared experts + top-k routed experts (see the module docstring)."""

    def __init__(self, w: dict[str, Any], prefix: str, config: DeepseekV2Config, xp: Any) -> None:
        self.config = config
        self.xp = xp
        # (H, E): the router runs in float32 (as the checkpoints), float64 in a float64 model
        self.gate_dtype = np.float64 if w[prefix + "gate.weight"].dtype == np.float64 else np.float32
        self.gate = xp.ascontiguousarray(w[prefix + "gate.weight"].T.astype(self.gate_dtype))
        self.experts = [SwiGLU(w, f"{prefix}experts.{e}.", xp) for e in range(int(config.n_routed_experts))]  # type: ignore[arg-type]
        self.shared = SwiGLU(w, prefix + "shared_experts.", xp) if config.n_shared_experts else None

    def route(self, h: Any) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids (T, k), weights (T, k)) as host arrays (the expert loop runs on the host)."""
        c = self.config
        logits = backend.to_numpy(linear(h.astype(self.gate_dtype), self.gate)).astype(np.float64)  # (T, E)
        logits -= logits.max(axis=-1, keepdims=True)
        scores = np.exp(logits)
        scores /= scores.sum(axis=-1, keepdims=True)
        k = int(c.num_experts_per_tok)  # type: ignore[arg-type]
        chosen = scores
        if c.topk_method == "group_limited_greedy":
            g, tg = int(c.n_group), int(c.topk_group)  # type: ignore[arg-type]
            t, e = scores.shape
            group_best = scores.reshape(t, g, e // g).max(axis=-1)  # (T, G)
            keep = np.argsort(-group_best, axis=-1, kind="stable")[:, :tg]
            mask = np.zeros((t, g), dtype=bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            chosen = np.where(np.repeat(mask, e // g, axis=-1), scores, 0.0)
        ids = np.argsort(-chosen, axis=-1, kind="stable")[:, :k]  # (T, k)
        weights = np.take_along_axis(chosen, ids, axis=-1)
        if c.norm_topk_prob and k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        else:
            weights = weights * c.routed_scaling_factor
        return ids, weights

    def __call__(self, h: Any) -> Any:
        xp = self.xp
        ids, weights = self.route(h)
        out = self.shared(h) if self.shared is not None else xp.zeros_like(h)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)  # each token picks an expert at most once: rows are distinct
            w = xp.asarray(weights[rows, slot].astype(h.dtype))[:, None]
            r = xp.asarray(rows)
            out[r] += self.experts[int(e)](h[r]) * w
        return out


class Block:
    """One decoder layer's weights, as (in, out) matrices; the absorbed W_UK / W_UV split per head."""

    def __init__(self, w: dict[str, Any], i: int, config: DeepseekV2Config, xp: Any) -> None:
        c = config
        p, a = f"layers.{i}.", f"layers.{i}.self_attn."
        nh, r, dn, dv = c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim
        self.ln_1 = w[p + "input_layernorm.weight"]
        self.ln_2 = w[p + "post_attention_layernorm.weight"]
        # one GEMM for everything computed from h: [q_a (q_lora) or q (heads dqk)] | kv_a (R + dr)
        first = a + ("q_proj.weight" if c.q_lora_rank is None else "q_a_proj.weight")
        self.w_in = xp.concatenate(
            [linear_weight(w[first], xp), linear_weight(w[a + "kv_a_proj_with_mqa.weight"], xp)], axis=1
        )
        self.q_split = int(w[first].shape[0])
        self.q_ln = w.get(a + "q_a_layernorm.weight") if c.q_lora_rank is not None else None
        self.w_qb = linear_weight(w[a + "q_b_proj.weight"], xp) if c.q_lora_rank is not None else None
        self.kv_ln = w[a + "kv_a_layernorm.weight"]
        kvb = w[a + "kv_b_proj.weight"]  # (heads (dn + dv), R)
        self.w_kvb = linear_weight(kvb, xp)  # (R, heads (dn + dv)): the non-absorbed expansion
        per_head = kvb.reshape(nh, dn + dv, r)
        self.w_uk = xp.ascontiguousarray(per_head[:, :dn, :])  # (heads, dn, R): q_abs = q_nope @ W_UK_h
        self.w_uv_t = xp.ascontiguousarray(per_head[:, dn:, :].transpose(0, 2, 1))  # (heads, R, dv)
        self.w_o = linear_weight(w[a + "o_proj.weight"], xp)  # (heads dv, H)
        self.mlp = MoE(w, p + "mlp.", c, xp) if c.is_moe_layer(i) else SwiGLU(w, p + "mlp.", xp)


class DeepseekV2Model:
    """DeepSeek-V2 over the paged latent cache (rawformer.memory.LatentArena).

    Parameters
    ----------
    config : DeepseekV2Config
    weights : dict name -> array with the names and shapes of `weight_shapes(config)` (HF layouts); NumPy
        (float32 / float64: the reference path) or CuPy (float16 / float32: the kernels), one dtype
    xp : numpy or cupy (default: the module of the weights)
    absorb : how decode steps attend: True (default) the absorbed path over the cached latents
        (rf.mla_decode), False the non-absorbed path (latents expanded to per-head K / V, as prefill)
    """

    # A decode step cannot be captured in a CUDA graph: MoE routing reads the chosen experts on the host,
    # and the absorbed per-head products use cupy.matmul (not capture-safe). Runtimes: use_graphs=False.
    graph_capturable = False

    def __init__(
        self, config: DeepseekV2Config, weights: dict[str, Any], xp: Any = None, absorb: bool = True
    ) -> None:
        self.config = config
        self.xp, self.dtype = check_weights("DeepseekV2Model", weight_shapes(config), weights, xp)
        self.absorb = bool(absorb)
        self.num_layers = config.num_hidden_layers
        self.vocab_size = config.vocab_size
        self.embed = weights["embed_tokens.weight"]
        self.blocks = [Block(weights, i, config, self.xp) for i in range(config.num_hidden_layers)]
        self.norm = weights["norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        inv_freq, self.rope_gain, self.scale = deepseek_rope(config)
        self.inv_freq = self.xp.asarray(inv_freq)

    # The runtime's arena checks compare (layers, kv_heads, head_dim, dtype): a LatentArena is one "kv head"
    # of kv_lora_rank + qk_rope_head_dim per token and layer.
    @property
    def num_kv_heads(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return self.config.kv_lora_rank + self.config.qk_rope_head_dim

    @property
    def cache_geometry(self) -> dict[str, int]:
        """LatentArena(**model.cache_geometry, dtype=..., ...): the cache this model reads."""
        c = self.config
        return {"layers": c.num_hidden_layers, "kv_lora_rank": c.kv_lora_rank, "rope_dim": c.qk_rope_head_dim}

    def make_arena(
        self,
        block_size: int = 64,
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
    ) -> LatentArena:
        """The paged latent cache for this model (its dtype and device); exactly one of the sizes."""
        return LatentArena(
            **self.cache_geometry, dtype=self.dtype, block_size=block_size, num_blocks=num_blocks,
            budget_bytes=budget_bytes, budget_fraction=budget_fraction, xp=self.xp,
        )  # fmt: skip

    def _rope(self, x: Any, positions: Any) -> Any:
        """Interleaved-pair RoPE (T, heads, dr) with the YaRN gain."""
        y = rf.rope(x, positions, style="gptj", inv_freq=self.inv_freq)
        if self.rope_gain != 1.0:
            y *= y.dtype.type(self.rope_gain)
        return y

    def _expanded_attention(
        self, blk: Block, q: Any, c_ctx: Any, kr_ctx: Any, batch: StepBatch, plan: StepPlan
    ) -> Any:
        """Non-absorbed attention: q (T, heads, dqk); the context's latents c_ctx (Tk, R) and rope keys
        kr_ctx (Tk, dr) expanded to per-head K (Tk, heads, dqk) and V (Tk, heads, dv).
        Returns (T, heads, dv)."""
        xp, cfg = self.xp, self.config
        nh, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        tk = c_ctx.shape[0]
        kv = linear(c_ctx, blk.w_kvb).reshape(tk, nh, dn + dv)  # (Tk, nh, dn + dv)
        d = max(dn + dr, dv)  # rf.attention takes one head dim for q, k, v: zero-pad the shorter ones
        k = xp.zeros((tk, nh, d), dtype=q.dtype)
        k[:, :, :dn] = kv[:, :, :dn]
        k[:, :, dn : dn + dr] = kr_ctx[:, None, :]
        v = xp.zeros((tk, nh, d), dtype=q.dtype)
        v[:, :, :dv] = kv[:, :, dn:]
        if d != dn + dr:
            qp = xp.zeros((q.shape[0], nh, d), dtype=q.dtype)
            qp[:, :, : dn + dr] = q
            q = qp
        cu_k = batch.cu_seqlens_q if plan.mode == "prefill" else plan.cu_seqlens_k
        max_k = int(batch.max_seqlen_q) if plan.mode == "prefill" else int(batch.max_context)
        a = rf.attention(
            q, k, v, causal=True, scale=self.scale, cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=cu_k,
            max_seqlen_q=int(batch.max_seqlen_q), max_seqlen_k=max_k,
        )  # fmt: skip
        return a[:, :, :dv]

    def _absorbed_attention(
        self, blk: Block, q_nope: Any, q_pe: Any, batch: StepBatch, plan: StepPlan, arena: Any, layer: int
    ) -> Any:
        """Absorbed decode: q_abs = q_nope W_UK per head, attention over the cached latents, then W_UV.
        q_nope (T, heads, dn), q_pe (T, heads, dr) rotated. Returns (T, heads, dv)."""
        xp = self.xp
        t, nh, _ = q_nope.shape
        r = self.config.kv_lora_rank
        q_abs = xp.matmul(q_nope.transpose(1, 0, 2), blk.w_uk)  # (nh, T, R)
        seqs, n = t // plan.q_len, plan.q_len
        q_abs = xp.ascontiguousarray(q_abs.transpose(1, 0, 2)).reshape(seqs, n, nh, r)  # (S, n, nh, R)
        lat = mla_decode(
            q_abs,
            q_pe.reshape(seqs, n, nh, -1),
            arena.latent(layer),
            arena.rope(layer),
            batch.block_tables,
            batch.context_lens,
            scale=self.scale,
            check=False,
        )  # fmt: skip  (S, n, nh, R): the attended latent of every head
        o = xp.matmul(lat.reshape(t, nh, r).transpose(1, 0, 2), blk.w_uv_t)  # (nh, T, dv)
        return o.transpose(1, 0, 2)  # (T, nh, dv)

    def forward(self, batch: StepBatch, arena: Any, *, last_only: bool = False) -> Any:
        """Logits of the new tokens of one step; their latents and rope keys are written into the arena.

        Parameters
        ----------
        batch : AttentionBatch (rawformer.memory) of this step, arrays where the weights live
        arena : LatentArena with arena.latent(L) (num_blocks, block_size, R), arena.rope(L)
        last_only : only the last new token of each sequence

        Returns
        -------
        logits : (T, vocab) in the model dtype, or (S, vocab) with last_only
        """
        xp, cfg = self.xp, self.config
        t = int(batch.tokens.shape[0])
        nh, dn, dr, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        dqk, dv, eps = cfg.qk_head_dim, cfg.v_head_dim, cfg.rms_norm_eps
        plan = plan_step(batch, arena.block_size, xp)
        absorbed = plan.mode == "decode" and self.absorb
        if plan.mode == "decode" and not self.absorb:  # the non-absorbed path reads the cache like gather
            plan = _gather_plan(batch, arena.block_size, xp)

        x = self.embed[batch.tokens]  # (T, H)
        h = rf.rms_norm(x, self.blocks[0].ln_1, eps)
        for layer, blk in enumerate(self.blocks):
            u = linear(h, blk.w_in)  # (T, q_split + R + dr)
            if blk.w_qb is not None:
                q = linear(rf.rms_norm(u[:, : blk.q_split], blk.q_ln, LORA_NORM_EPS), blk.w_qb)
            else:
                q = u[:, : blk.q_split]
            q = q.reshape(t, nh, dqk)  # (T, nh, dn + dr)
            c = rf.rms_norm(u[:, blk.q_split : blk.q_split + r], blk.kv_ln, LORA_NORM_EPS)  # (T, R)
            kr = self._rope(u[:, blk.q_split + r :].reshape(t, 1, dr), batch.positions)  # (T, 1, dr)
            q_pe = self._rope(q[:, :, dn:], batch.positions)  # (T, nh, dr)
            row = xp.empty((t, 1, r + dr), dtype=c.dtype)  # the token's cache row: [c ; k_r]
            row[:, 0, :r] = c
            row[:, 0, r:] = kr[:, 0]
            cache = arena.data[layer, 0]  # (num_blocks, block_size, 1, R + dr)
            rf.kv_write(row, row, cache, cache, batch.slot_mapping)  # K and V planes are one here
            if absorbed:
                a = self._absorbed_attention(blk, q[:, :, :dn], q_pe, batch, plan, arena, layer)
            else:
                qf = xp.concatenate([q[:, :, :dn], q_pe], axis=-1)  # (T, nh, dqk)
                if plan.mode == "prefill":
                    c_ctx, kr_ctx = c, kr[:, 0]
                else:
                    rows = arena.rows(layer)[plan.gather_slots]  # (Tk, R + dr): every context, packed
                    c_ctx, kr_ctx = rows[:, :r], rows[:, r:]
                a = self._expanded_attention(blk, qf, c_ctx, kr_ctx, batch, plan)
            a = linear(xp.ascontiguousarray(a).reshape(t, nh * dv), blk.w_o)  # (T, H)
            h, x = rf.add_rms_norm(a, x, blk.ln_2, eps)  # x = x + a; h = rms_norm(x)
            m = blk.mlp(h)  # (T, H)
            nxt = self.blocks[layer + 1].ln_1 if layer + 1 < len(self.blocks) else self.norm
            if last_only and layer + 1 == len(self.blocks):
                rows_last = last_token_rows(batch)
                m, x = m[rows_last], x[rows_last]
            h, x = rf.add_rms_norm(m, x, nxt, eps)
        return linear(h, self.lm_head.T)  # (T or S, V)


def _gather_plan(batch: StepBatch, block_size: int, xp: Any) -> StepPlan:
    """The gather plan of a decode batch (plan_step builds it only for batches that are not decode)."""
    plan = plan_step(_NotDecode(batch), block_size, xp)
    return plan


class _NotDecode:
    """A view of a batch that plan_step does not take for a decode step (max_seqlen_q 0 -> gather)."""

    def __init__(self, batch: StepBatch) -> None:
        self._b = batch

    def __getattr__(self, name: str) -> Any:
        if name == "max_seqlen_q":
            return 0
        return getattr(self._b, name)


def init_random(
    config: DeepseekV2Config, seed: int = 0, dtype: Any = np.float32, xp: Any = np, std: float = 0.02
) -> DeepseekV2Model:
    """A DeepseekV2Model with N(0, std) weights (norm scales 1 + N(0, std)), the same on all backends."""
    return DeepseekV2Model(config, random_weights(weight_shapes(config), seed, dtype, xp, std), xp)
