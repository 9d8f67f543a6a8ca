"""The decoder models' attention over an INT8 KV cache (rawformer.memory.Int8KVArena).

A forward step over an Int8KVArena (`arena.kv_int8` is True) replaces, per layer,

    q, k = rf.rope_kv_write(q, k, v, positions, kc, vc, slots, inv_freq=...)    (Llama; GPT-2: rf.kv_write)
    a = decoder_attention(q, k, v, batch, plan, kc, vc)
by
    q, k = rf.rope(q, positions, inv_freq=...), rf.rope(k, positions, inv_freq=...)   (Llama only)
    a = int8_kv_attention(q, k, v, batch, plan, arena, layer)

which quantizes the new K / V into the cache (rf.kv_write_int8) and attends by the step's plan:

    prefill   rf.attention over the new tokens' own K / V, unquantized (as the float cache path: a prompt
              attends to itself before anything is read back)
    decode    rf.paged_attention_int8: the kernel reads int8 + scales and dequantizes in registers
    gather    the contexts' slots gathered from the cache and dequantized (rf.dequantize_kv) into a packed
              float K / V in q's dtype, then rf.attention (varlen) as the float path does
"""

from __future__ import annotations

from typing import Any

from rawformer.models.common import StepBatch, StepPlan, attend_gathered, decoder_attention, per_sequence

from rawformer.ops.kv_int8 import dequantize_kv, kv_write_int8, paged_attention_int8

__all__ = ["int8_kv_attention", "uses_int8_kv"]


def uses_int8_kv(arena: Any) -> bool:
    """Whether a forward step must take the INT8 path for this arena."""
    return bool(getattr(arena, "kv_int8", False))


def int8_kv_attention(
    q: Any, k: Any, v: Any, batch: StepBatch, plan: StepPlan, arena: Any, layer: int
) -> Any:
    """Write the new tokens' K / V into layer `layer` of an INT8 arena, then their causal attention.

    q (T, q_heads, D) (rotated), k / v (T, kv_heads, D) of the new tokens (k rotated; strided views allowed).
    Returns (T, q_heads, D) in q's dtype."""
    kc, vc, ks, vs = arena.layer(layer)
    kv_write_int8(k, v, batch.slot_mapping, kc, vc, ks, vs)
    tokens, heads, d = q.shape
    if plan.mode == "prefill":
        return decoder_attention(q, k, v, batch, plan, None, None)  # the caches are not read
    if plan.mode == "decode":
        q4 = per_sequence(q, plan)
        out = paged_attention_int8(q4, kc, vc, ks, vs, batch.block_tables, batch.context_lens)
        return out.reshape(tokens, heads, d)
    kv_heads = kc.shape[2]
    slots = plan.gather_slots
    k_all = dequantize_kv(kc.reshape(-1, kv_heads, d)[slots], ks.reshape(-1, kv_heads)[slots], q.dtype)
    v_all = dequantize_kv(vc.reshape(-1, kv_heads, d)[slots], vs.reshape(-1, kv_heads)[slots], q.dtype)
    return attend_gathered(q, k_all, v_all, batch, plan)
