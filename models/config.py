"""Model configurations: one frozen dataclass per architecture, field names as in Hugging Face config.json.

Because the fields carry the config.json keys, reading a checkpoint's config is `Config.from_dict(d)` (keys
we do not use are ignored) and `config_from_dict(d)` picks the class from `model_type`. Defaults are those of
the original models (GPT-2 small, Llama-2-7B style, BERT-base).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "BertConfig",
    "DeepseekV2Config",
    "GPT2Config",
    "LlamaConfig",
    "MODEL_TYPES",
    "config_from_dict",
    "deepseek_rope",
    "llama_inv_freq",
]


_C = TypeVar("_C", bound="_FromDict")


class _FromDict:
    """`Config.from_dict(d)` for the config dataclasses below."""

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """The config of a config.json dict, from the keys that are fields (config.json has many more)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{type(cfg).__name__}.{n} must be a positive int, got {v!r}")


def _divides(cfg: Any, heads: str, width: str) -> None:
    if getattr(cfg, width) % getattr(cfg, heads):
        raise ValueError(
            f"{type(cfg).__name__}: {width}={getattr(cfg, width)} is not a multiple of {heads}="
            f"{getattr(cfg, heads)}"
        )


# GELU names in config.json -> rf.gelu's `approximate`
_GELU = {
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu": "none",
}


@dataclass(frozen=True)
class GPT2Config(_FromDict):
    """GPT-2: pre-LayerNorm decoder, learned positions, GELU (tanh), lm head tied to the token embedding."""

    vocab_size: int = 50257  # tokens (GPT-2's BPE)
    n_positions: int = 1024  # learned positions: the longest sequence
    n_embd: int = 768  # hidden size
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"  # "gelu_new" (tanh approximation) or "gelu" (erf)
    scale_attn_weights: bool = True  # scores / sqrt(head_dim); the only form we run
    scale_attn_by_inverse_layer_idx: bool = False  # an extra 1 / (layer + 1) on the scores: not supported
    model_type: str = field(default="gpt2", repr=False)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        _divides(self, "n_head", "n_embd")
        if self.activation_function not in _GELU:
            raise ValueError(
                f"GPT2Config.activation_function {self.activation_function!r} is not supported "
                f"(known: {sorted(_GELU)})"
            )
        if not self.scale_attn_weights or self.scale_attn_by_inverse_layer_idx:
            raise ValueError(
                "GPT2Config: only scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False is supported"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def gelu_approximate(self) -> str:
        return _GELU[self.activation_function]


@dataclass(frozen=True)
class LlamaConfig(_FromDict):
    """Llama: pre-RMSNorm decoder, RoPE (NeoX halves), SwiGLU MLP, grouped-query attention, untied head."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = (
        None  # None, {"rope_type": "llama3", ...} or {"rope_type": "linear"}
    )
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # True: lm_head = embed_tokens (Llama 3.2 1B / 3B)
    attention_bias: bool = False  # q/k/v/o projections with biases
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = field(default="llama", repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            _divides(self, "num_attention_heads", "hidden_size")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )  # fmt: skip
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (RoPE pairs), got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        llama_inv_freq(self)  # reject an unknown rope_scaling now, not at the first forward

    @property
    def kv_heads(self) -> int:
        return int(self.num_key_value_heads)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BertConfig(_FromDict):
    """BERT encoder: post-LayerNorm, GELU (erf), learned absolute positions, token type embeddings."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # "gelu" (erf) or "gelu_new" (tanh)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    model_type: str = field(default="bert", repr=False)

    def __post_init__(self) -> None:
        _positive(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size",
        )  # fmt: skip
        _divides(self, "num_attention_heads", "hidden_size")
        if self.hidden_act not in _GELU:
            raise ValueError(
                f"BertConfig.hidden_act {self.hidden_act!r} is not supported (known: {sorted(_GELU)})"
            )
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"BertConfig.position_embedding_type {self.position_embedding_type!r} is not supported "
                "(only 'absolute')"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return _GELU[self.hidden_act]


@dataclass(frozen=True)
class DeepseekV2Config(_FromDict):
    """DeepSeek-V2: Multi-head Latent Attention + DeepSeekMoE (DeepSeek-AI 2024, arXiv 2405.04434).

    Attention per token: q = W_UQ rms_norm(W_DQ h) (q_lora_rank) or W_Q h; the KV latent
    c = rms_norm(W_DKV h) (kv_lora_rank) and one RoPE key k_rope = rope(W_KR h) (qk_rope_head_dim) shared by
    all heads are what the cache keeps; head i's key is [W_UK_i c ; k_rope], its value W_UV_i c.
    Layers >= first_k_dense_replace are MoE: n_shared_experts always-on experts + top num_experts_per_tok of
    n_routed_experts (softmax gate; "greedy" or "group_limited_greedy").
    RoPE: interleaved pairs (2p, 2p+1) on the rope dims; rope_scaling / rope_parameters "yarn" supported.
    Fields we cannot run are refused by name (see __post_init__)."""

    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288  # dense layers' SwiGLU width
    moe_intermediate_size: int = 1536  # one expert's SwiGLU width
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # must equal num_attention_heads (MLA has no GQA)
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512  # the cached latent
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the cached rope key (one per token, shared by the heads)
    v_head_dim: int = 128
    n_routed_experts: int | None = 160  # None: every layer dense
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1  # layers below are dense
    moe_layer_freq: int = 1  # every layer from first_k_dense_replace is MoE (the only supported value)
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy"
    n_group: int | None = None  # expert groups (group_limited_greedy)
    topk_group: int | None = None  # groups kept per token (group_limited_greedy)
    routed_scaling_factor: float = 1.0  # routed weights x this (when not norm_topk_prob)
    norm_topk_prob: bool = False  # True: top-k weights / their sum (DeepSeek's reference code)
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # original checkpoints: {"type": "yarn", ...}
    rope_parameters: dict[str, Any] | None = None  # transformers >= 5: {"rope_type", "rope_theta", ...}
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # not supported
    mlp_bias: bool = False  # not supported
    pretraining_tp: int = 1  # not supported otherwise
    model_type: str = field(default="deepseek_v2", repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        )  # fmt: skip
        name = "DeepseekV2Config"
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"{name}.num_key_value_heads must equal num_attention_heads (MLA has no GQA)")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"{name}.qk_rope_head_dim must be even (RoPE pairs), got {self.qk_rope_head_dim}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(self, flag):
                raise ValueError(f"{name}.{flag}=True is not supported")
        if self.pretraining_tp not in (None, 1):
            raise ValueError(f"{name}.pretraining_tp={self.pretraining_tp} is not supported (only 1)")
        if self.hidden_act != "silu":
            raise ValueError(f"{name}.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.scoring_func != "softmax":
            raise ValueError(f"{name}.scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.has_moe:
            _positive(self, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
            if self.moe_layer_freq != 1:
                raise ValueError(f"{name}.moe_layer_freq={self.moe_layer_freq} is not supported (only 1)")
            if self.num_experts_per_tok > self.n_routed_experts:  # type: ignore[operator]
                raise ValueError(f"{name}.num_experts_per_tok exceeds n_routed_experts")
            if self.topk_method == "group_limited_greedy":
                _positive(self, "n_group", "topk_group")
                if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:  # type: ignore
                    raise ValueError(f"{name}: n_group must divide n_routed_experts and be >= topk_group")
            elif self.topk_method != "greedy":
                raise ValueError(
                    f"{name}.topk_method {self.topk_method!r} is not supported "
                    "(known: greedy, group_limited_greedy)"
                )
        deepseek_rope(self)  # reject an unknown rope scaling now, not at the first forward

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts is not None and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.has_moe and layer >= self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dict(self) -> dict[str, Any]:
        """The rope settings, whichever key the checkpoint used (rope_parameters wins)."""
        return dict(self.rope_parameters or self.rope_scaling or {})


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_rope(config: DeepseekV2Config) -> tuple[np.ndarray, float, float]:
    """(inv_freq float32 (qk_rope_head_dim / 2,), rope_gain, softmax_scale) of a DeepseekV2 config.

    default:  inv_freq[p] = theta ** (-2p / d), gain 1, scale = qk_head_dim ** -0.5
    "yarn" (factor f, original_max_position_embeddings N, beta_fast / beta_slow, mscale, mscale_all_dim):
        lo, hi = floor / ceil of d ln(N / (2 pi beta)) / (2 ln theta) for beta_fast / beta_slow, clipped to
        [0, d - 1]; ramp[p] = clip((p - lo) / (hi - lo), 0, 1); inv_freq = inv / f * ramp + inv * (1 - ramp);
        gain (multiplies cos and sin) = m(f, mscale) / m(f, mscale_all_dim), m(f, a) = 0.1 a ln f + 1 (f > 1)
        (attention_factor when given); softmax scale = qk_head_dim ** -0.5 * m(f, mscale_all_dim) ** 2.
    """
    d = config.qk_rope_head_dim
    rs = config.rope_dict
    theta = float(rs.get("rope_theta", config.rope_theta))
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    scale = config.qk_head_dim**-0.5
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return inv.astype(np.float32), 1.0, scale
    if kind != "yarn":
        raise ValueError(
            f"DeepseekV2Config: rope scaling type {kind!r} is not supported (known: default, yarn)"
        )
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}  # fmt: skip
    unknown = sorted(set(rs) - known)
    if unknown:
        raise ValueError(f"DeepseekV2Config: yarn rope setting {unknown[0]!r} is not supported")
    factor = float(rs["factor"])
    old = float(rs.get("original_max_position_embeddings") or config.max_position_embeddings)
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

    def corr(rot: float) -> float:
        return d * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    inv_freq = inv / factor * ramp + inv * (1.0 - ramp)
    gain = rs.get("attention_factor")
    if gain is None:
        if mscale and mscale_all:
            gain = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            gain = _yarn_mscale(factor)
    if mscale_all:
        scale *= _yarn_mscale(factor, float(mscale_all)) ** 2
    return inv_freq.astype(np.float32), float(gain), scale


MODEL_TYPES: dict[str, type] = {
    "gpt2": GPT2Config,
    "llama": LlamaConfig,
    "bert": BertConfig,
    "deepseek_v2": DeepseekV2Config,
}


def config_from_dict(d: dict[str, Any]) -> GPT2Config | LlamaConfig | BertConfig | DeepseekV2Config:
    """The config of a Hugging Face config.json dict, chosen by its `model_type`.

    Raises ValueError naming the model_type when it is missing or not one of MODEL_TYPES."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {model_type!r} in config.json; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[model_type].from_dict(d)


def llama_inv_freq(config: LlamaConfig) -> np.ndarray:
    """float32 (head_dim / 2,) RoPE frequencies of a Llama config, rope_scaling applied.

    inv_freq[p] = rope_theta ** (-2p / head_dim)
    "linear" (factor f):  inv_freq / f    (positions divided by f)
    "llama3" (factor f, low_freq_factor l, high_freq_factor h, original_max_position_embeddings N):
        wavelength w = 2 pi / inv_freq;  w < N / h: unchanged;  w > N / l: inv_freq / f;
        between: (1 - s) inv_freq / f + s inv_freq,  s = (N / w - l) / (h - l)
    """
    d = int(config.head_dim)  # type: ignore[arg-type]
    inv = float(config.rope_theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    rs = config.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / float(rs["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        wavelen = 2.0 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1.0 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen < old_ctx / high, inv, np.where(wavelen > old_ctx / low, inv / factor, mid))
        return out.astype(np.float32)
    raise ValueError(
        f"LlamaConfig.rope_scaling type {kind!r} is not supported (known: default, linear, llama3)"
    )
