"""Memory planning: cache bytes per token of a model config, and how many blocks / tokens / sequences a
budget holds. MLA-aware: a DeepSeek-V2 layer caches one latent + one rope key per token, not K and V per head.

    bytes per token (all layers, itemsize s):
        GPT-2                 2 * n_layer * n_embd * s                                (K and V, every head)
        Llama                 2 * layers * kv_heads * head_dim * s                    (GQA: kv heads only)
        DeepSeek-V2 (MLA)     layers * (kv_lora_rank + qk_rope_head_dim) * s          (latent + rope key)

DeepSeek-V2 (60 layers, 128 heads): 60 x 576 x 2 = 69,120 bytes per token in fp16; the same model with MHA
caching K (192) and V (128) per head would need 60 x 128 x 320 x 2 = 4,915,200 (71x).

Configs are read by their fields (duck typing), so this module needs nothing from rawformer.models (memory
sits below models). `rawformer plan` calls `plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MemoryPlan", "cache_kind", "kv_bytes_per_token", "mha_bytes_per_token", "plan"]

MLA_BLOCK_SIZE = 64  # the MLA decode kernel's tile: one block per tile of the few-heads configuration
KV_BLOCK_SIZE = 16


def cache_kind(config: Any) -> str:
    """ "mla" (DeepSeek-V2 latent cache), "kv" (GPT-2 / Llama K and V), or TypeError for models without a
    decode cache (BERT) and unknown objects."""
    if hasattr(config, "kv_lora_rank") and hasattr(config, "qk_rope_head_dim"):
        return "mla"
    if hasattr(config, "n_layer") and hasattr(config, "n_embd"):
        return "kv"
    if hasattr(config, "num_key_value_heads") and hasattr(config, "head_dim"):
        return "kv"
    raise TypeError(f"kv_bytes_per_token: {type(config).__name__} has no decode cache (or is not a config)")


def _itemsize(cache_dtype: Any) -> int:
    try:
        dt = np.dtype(cache_dtype)
    except TypeError:
        raise TypeError(f"cache_dtype must be a float dtype, got {cache_dtype!r}") from None
    if dt.kind != "f":
        raise TypeError(f"cache_dtype must be a float dtype, got {dt}")
    return dt.itemsize


def kv_bytes_per_token(config: Any, cache_dtype: Any = "float16") -> int:
    """Cache bytes one token takes in all layers (formulas in the module docstring).

    Parameters
    ----------
    config : GPT2Config, LlamaConfig or DeepseekV2Config (any object with their fields)
    cache_dtype : the cache dtype (float16 default)
    """
    s = _itemsize(cache_dtype)
    if cache_kind(config) == "mla":
        return int(config.num_hidden_layers) * (int(config.kv_lora_rank) + int(config.qk_rope_head_dim)) * s
    if hasattr(config, "n_layer"):
        return 2 * int(config.n_layer) * int(config.n_embd) * s
    kv = config.num_key_value_heads or config.num_attention_heads
    return 2 * int(config.num_hidden_layers) * int(kv) * int(config.head_dim) * s


def mha_bytes_per_token(config: Any, cache_dtype: Any = "float16") -> int:
    """What an MLA config's cache would take per token with plain multi-head attention caching every
    head's K (qk_nope + qk_rope dims) and V (v_head_dim): the comparison of the DeepSeek-V2 paper."""
    if cache_kind(config) != "mla":
        return kv_bytes_per_token(config, cache_dtype)
    per_head = int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim) + int(config.v_head_dim)
    return int(config.num_hidden_layers) * int(config.num_attention_heads) * per_head * _itemsize(cache_dtype)


@dataclass(frozen=True)
class MemoryPlan:
    """What a cache budget holds for one model."""

    kind: str  # "mla" | "kv"
    bytes_per_token: int
    block_size: int
    block_bytes: int
    num_blocks: int
    tokens: int  # num_blocks * block_size
    context_len: int | None  # the context the sequence count is for
    max_seqs: int | None  # sequences of context_len tokens that fit (whole blocks each)
    budget_bytes: int

    @property
    def cache_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        seqs = (
            f", {self.max_seqs} sequences of {self.context_len} tokens" if self.max_seqs is not None else ""
        )
        return (
            f"{self.kind} cache: {self.bytes_per_token} B/token, blocks of {self.block_size} tokens "
            f"({self.block_bytes} B): {self.num_blocks} blocks = {self.tokens} tokens in "
            f"{self.cache_bytes / 2**30:.2f} GiB of {self.budget_bytes / 2**30:.2f} GiB{seqs}"
        )


def plan(
    config: Any,
    budget_bytes: int,
    block_size: int | None = None,
    *,
    cache_dtype: Any = "float16",
    context_len: int | None = None,
) -> MemoryPlan:
    """Blocks, tokens and sequences a cache budget holds for `config`.

    Parameters
    ----------
    config : GPT2Config, LlamaConfig or DeepseekV2Config
    budget_bytes : bytes for the cache (int >= 0)
    block_size : tokens per block (default 64 for MLA, 16 for K/V caches)
    cache_dtype : cache dtype (float16 default)
    context_len : optional tokens per sequence: max_seqs = num_blocks // ceil(context_len / block_size)

    Returns
    -------
    MemoryPlan (num_blocks = budget // (bytes_per_token * block_size))
    """
    kind = cache_kind(config)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
        raise ValueError(f"plan: budget_bytes must be an int >= 0, got {budget_bytes!r}")
    if block_size is None:
        block_size = MLA_BLOCK_SIZE if kind == "mla" else KV_BLOCK_SIZE
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"plan: block_size must be a positive int, got {block_size!r}")
    if context_len is not None and (
        isinstance(context_len, bool) or not isinstance(context_len, (int, np.integer)) or context_len < 1
    ):
        raise ValueError(f"plan: context_len must be a positive int or None, got {context_len!r}")
    per_token = kv_bytes_per_token(config, cache_dtype)
    block_bytes = per_token * int(block_size)
    blocks = int(budget_bytes) // block_bytes
    seqs = None if context_len is None else blocks // -(-int(context_len) // int(block_size))
    return MemoryPlan(
        kind, per_token, int(block_size), block_bytes, blocks, blocks * int(block_size), context_len, seqs,
        int(budget_bytes),
    )  # fmt: skip
