"""GPT-2 and Llama for training: the layouts of rawformer.models.gpt2 / .llama, built on rawformer.autograd.

GPT-2:

    x = wte[ids] + wpe[0..T)                                        (B, T, H)
    per block:  x = x + c_proj(attention(split(c_attn(ln_1(x)))))
                x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                                        (B T, V), the head tied to wte

Llama:
    x = embed_tokens[ids]
    per layer:  x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h))),  h = rms_norm(x)
                x = x + down_proj(swiglu(gate_proj(h), up_proj(h))),                     h = rms_norm(x)
    logits = rms_norm(x) @ lm_head^T        (embed_tokens^T when tie_word_embeddings)
with grouped-query attention (kv heads shared by q-head groups) and RoPE in NeoX halves at the
frequencies of `llama_inv_freq(config)`.

Parameters carry exactly the names and layouts of the native models' `weight_shapes` (Hugging Face names:
GPT-2's Conv1D (in, out) matrices, Llama's nn.Linear (out, in)), so a trained state dict is a checkpoint the
inference models load (`rawformer.export.load_hf` on a directory with config.json + model.safetensors).

Initialisation (GPT-2 paper, section 2.3, as nanoGPT does it): N(0, 0.02) for matrices and embeddings, the
two residual projections of each block scaled by 1 / sqrt(2 layers), biases 0, norm weights 1. Drawn on the
host from one seed in float32, so every backend starts from the same weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import autograd as ag
from rawformer.autograd import Tensor
from rawformer.models import gpt2, llama
from rawformer.models.config import GPT2Config, LlamaConfig, llama_inv_freq

__all__ = ["GPT", "Llama", "build_model", "init_weights", "model_class"]

_RESIDUAL_OUT = ("attn.c_proj.weight", "mlp.c_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight")


def _shapes(config: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(config, GPT2Config):
        return gpt2.weight_shapes(config)
    if isinstance(config, LlamaConfig):
        return llama.weight_shapes(config)
    raise TypeError(f"training supports GPT2Config and LlamaConfig, got {type(config).__name__}")


def init_weights(config: Any, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """float32 host weights for `config` by GPT-2's initialisation (module docstring), weight_shapes order."""
    rng = np.random.default_rng(seed)
    layers = config.n_layer if isinstance(config, GPT2Config) else config.num_hidden_layers
    resid_std = std / math.sqrt(2 * layers)
    out: dict[str, np.ndarray] = {}
    for name, shape in _shapes(config).items():
        if name.endswith(".bias"):
            w = np.zeros(shape, dtype=np.float32)
        elif len(shape) == 1:  # a norm's scale
            w = np.ones(shape, dtype=np.float32)
        else:
            s = resid_std if name.endswith(_RESIDUAL_OUT) else std
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(s)
        out[name] = w
    return out


class _Trainable:
    """What the training models share: parameters from a weights dict, creation, the loss."""

    config: Any

    def __init__(self, config: Any, weights: dict[str, Any]) -> None:
        shapes = _shapes(config)
        who = type(self).__name__
        missing = [n for n in shapes if n not in weights]
        if missing:
            raise KeyError(f"{who}: missing weight {missing[0]!r}")
        dtypes = {np.dtype(weights[n].dtype) for n in shapes}
        if len(dtypes) != 1:
            raise ValueError(f"{who}: weights must share one dtype, got {sorted(map(str, dtypes))}")
        for n, shape in shapes.items():
            if tuple(weights[n].shape) != shape:
                raise ValueError(f"{who}: weight {n!r} has shape {tuple(weights[n].shape)}, expected {shape}")
        self.config = config
        self.params = {n: Tensor(weights[n], requires_grad=True, name=n) for n in shapes}
        self.dtype = dtypes.pop()

    @classmethod
    def create(cls, config: Any, *, seed: int = 0, dtype: Any = np.float32, xp: Any = np) -> Any:
        """A freshly initialised model (init_weights) in `dtype`, on xp's device."""
        host = init_weights(config, seed)
        return cls(config, {n: xp.asarray(w.astype(dtype)) for n, w in host.items()})

    def parameters(self) -> dict[str, Tensor]:
        """name -> parameter Tensor, in weight_shapes order."""
        return self.params

    @property
    def xp(self) -> Any:
        return next(iter(self.params.values())).xp

    def num_parameters(self) -> int:
        return sum(p.size for p in self.params.values())

    def loss(self, ids: Any, targets: Any, *, grad_scale: float = 1.0, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy of ids (B, T) against targets (B, T), a 0-d float32 Tensor.

        grad_scale: the seed backward() will get (loss scale / accumulation steps), folded into the fused
        loss kernel's gradient; the logits' buffer is reused for their gradient."""
        count = None
        if isinstance(targets, np.ndarray):  # host targets: count the rows here, no device sync for it
            count = int(np.count_nonzero(targets != ignore_index))
        logits = self.forward(ids)
        t = self.xp.asarray(targets).reshape(-1)
        return ag.cross_entropy(
            logits, t, ignore_index=ignore_index, grad_scale=grad_scale, inplace=True, count=count
        )

    def forward(self, ids: Any) -> Tensor:  # pragma: no cover - each model defines it
        raise NotImplementedError


class GPT(_Trainable):
    """A GPT-2 whose parameters are autograd Tensors (leaves with requires_grad).

    Parameters
    ----------
    config : GPT2Config
    weights : name -> array for every name of weight_shapes(config) (NumPy or CuPy, one float dtype); the
        arrays are taken as the parameters' data (not copied)
    """

    config: GPT2Config

    def block(self, i: int, x: Tensor) -> Tensor:
        """Transformer block i on the residual stream x (B, T, H) (pipeline stages call it too)."""
        cfg, p = self.config, self.params
        b, t = x.shape[0], x.shape[1]
        nh, hd, h, eps = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.layer_norm_epsilon
        pre = f"h.{i}."
        a = ag.layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        qkv = ag.linear(a, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])  # (B, T, 3H)
        q, k, v = (ag.reshape(z, (b, t, nh, hd)) for z in ag.split(qkv, 3, axis=-1))  # (B, T, nh, hd)
        a = ag.reshape(ag.attention(q, k, v, causal=True), (b, t, h))
        x = ag.add(x, ag.linear(a, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"]))
        a = ag.layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        m = ag.gelu(ag.linear(a, p[pre + "mlp.c_fc.weight"]), p[pre + "mlp.c_fc.bias"], cfg.gelu_approximate)
        return ag.add(x, ag.linear(m, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"]))

    def forward(self, ids: Any) -> Tensor:
        """Logits (B T, V) of int token ids (B, T), T <= n_positions (NumPy, or where the parameters live)."""
        cfg, p = self.config, self.params
        ids = self.xp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"GPT.forward: ids must be (batch, seq), got shape {tuple(ids.shape)}")
        b, t = (int(s) for s in ids.shape)
        if t > cfg.n_positions:
            raise ValueError(f"GPT.forward: sequence of {t} tokens exceeds n_positions={cfg.n_positions}")
        h, eps = cfg.n_embd, cfg.layer_norm_epsilon
        positions = self.xp.arange(t, dtype=np.int64)
        x = ag.add(ag.embedding(p["wte.weight"], ids), ag.embedding(p["wpe.weight"], positions))  # (B, T, H)
        for i in range(cfg.n_layer):
            x = self.block(i, x)
        x = ag.layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
        return ag.linear(ag.reshape(x, (b * t, h)), p["wte.weight"], transposed=True)  # (B T, V)


class Llama(_Trainable):
    """A Llama whose parameters are autograd Tensors (HF names and (out, in) layouts; see the docstring).

    Parameters
    ----------
    config : LlamaConfig
    weights : name -> array for every name of rawformer.models.llama.weight_shapes(config)
    """

    config: LlamaConfig

    def __init__(self, config: LlamaConfig, weights: dict[str, Any]) -> None:
        super().__init__(config, weights)
        self.inv_freq = self.xp.asarray(llama_inv_freq(config))  # (D / 2,) float32

    def forward(self, ids: Any) -> Tensor:
        """Logits (B T, V) of int token ids (B, T) (NumPy, or where the parameters live)."""
        cfg, p, xp = self.config, self.params, self.xp
        ids = xp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"Llama.forward: ids must be (batch, seq), got shape {tuple(ids.shape)}")
        b, t = (int(s) for s in ids.shape)
        nh, kv, d = cfg.num_attention_heads, cfg.kv_heads, int(cfg.head_dim)  # type: ignore[arg-type]
        eps = cfg.rms_norm_eps
        positions = xp.arange(t, dtype=np.int64)

        def proj(x: Tensor, name: str) -> Tensor:  # nn.Linear: y = x W^T (+ b)
            return ag.linear(x, p[name + ".weight"], p.get(name + ".bias"), transposed=True)

        x = ag.embedding(p["embed_tokens.weight"], ids)  # (B, T, H)
        for i in range(cfg.num_hidden_layers):
            pre = f"layers.{i}."
            h = ag.rms_norm(x, p[pre + "input_layernorm.weight"], eps)
            q = ag.reshape(proj(h, pre + "self_attn.q_proj"), (b, t, nh, d))  # (B, T, nh, d)
            k = ag.reshape(proj(h, pre + "self_attn.k_proj"), (b, t, kv, d))  # (B, T, kv, d)
            v = ag.reshape(proj(h, pre + "self_attn.v_proj"), (b, t, kv, d))
            q, k = ag.rope(q, positions, self.inv_freq), ag.rope(k, positions, self.inv_freq)
            a = ag.reshape(ag.attention(q, k, v, causal=True), (b, t, nh * d))
            x = ag.add(x, proj(a, pre + "self_attn.o_proj"))
            h = ag.rms_norm(x, p[pre + "post_attention_layernorm.weight"], eps)
            m = ag.swiglu(proj(h, pre + "mlp.gate_proj"), proj(h, pre + "mlp.up_proj"))  # (B, T, I)
            x = ag.add(x, proj(m, pre + "mlp.down_proj"))
        x = ag.reshape(ag.rms_norm(x, p["norm.weight"], eps), (b * t, cfg.hidden_size))
        head = p["embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
        return ag.linear(x, head, transposed=True)  # (B T, V)


def model_class(config: Any) -> type[GPT] | type[Llama]:
    """GPT for a GPT2Config, Llama for a LlamaConfig."""
    if isinstance(config, GPT2Config):
        return GPT
    if isinstance(config, LlamaConfig):
        return Llama
    raise TypeError(f"training supports GPT2Config and LlamaConfig, got {type(config).__name__}")


def build_model(config: Any, *, seed: int = 0, dtype: Any = np.float32, xp: Any = np) -> GPT | Llama:
    """A freshly initialised training model of a GPT2Config or LlamaConfig."""
    return model_class(config).create(config, seed=seed, dtype=dtype, xp=xp)
