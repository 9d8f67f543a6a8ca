"""rawformer.models: GPT-2, Llama, BERT and DeepSeek-V2 (MLA + MoE), one readable file each, numpy-style
code over rawformer ops.

Every model is `Model(config, weights, xp)` with weights named and laid out as in the Hugging Face checkpoints
(see each file's docstring for the table), running on NumPy (the float64 reference ops) or CuPy (the kernels).
Decoders: `forward(batch, arena, last_only=False) -> logits` over the paged KV cache; BERT:
`forward(input_ids, attention_mask) -> hidden` and `embed(...)` (mean pooling, L2 normalised).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rawformer.models import bert, deepseek, gpt2, llama
from rawformer.models.bert import BertModel
from rawformer.models.config import (
    BertConfig,
    DeepseekV2Config,
    GPT2Config,
    LlamaConfig,
    config_from_dict,
    llama_inv_freq,
)
from rawformer.models.deepseek import DeepseekV2Model
from rawformer.models.gpt2 import GPT2Model
from rawformer.models.llama import LlamaModel

__all__ = [
    "BertConfig",
    "BertModel",
    "DeepseekV2Config",
    "DeepseekV2Model",
    "GPT2Config",
    "GPT2Model",
    "LlamaConfig",
    "LlamaModel",
    "build_model",
    "config_from_dict",
    "init_random",
    "llama_inv_freq",
    "module_for",
]

_MODULES = {GPT2Config: gpt2, LlamaConfig: llama, BertConfig: bert, DeepseekV2Config: deepseek}
_CLASSES = {
    GPT2Config: GPT2Model,
    LlamaConfig: LlamaModel,
    BertConfig: BertModel,
    DeepseekV2Config: DeepseekV2Model,
}


def module_for(config: Any) -> Any:
    """The model module (gpt2, llama, bert) of a config: its weight_shapes, HF_PREFIXES, init_random."""
    try:
        return _MODULES[type(config)]
    except KeyError:
        raise TypeError(f"not a model config: {type(config).__name__}") from None


def build_model(config: Any, weights: dict[str, Any], xp: Any = None) -> GPT2Model | LlamaModel | BertModel:
    """The model class of `config` built from `weights` (HF names and layouts)."""
    module_for(config)
    return _CLASSES[type(config)](config, weights, xp)


def init_random(
    config: Any, seed: int = 0, dtype: Any = np.float32, xp: Any = np, std: float = 0.02
) -> GPT2Model | LlamaModel | BertModel:
    """A model of `config` with random weights, identical on every backend for a seed (benchmarks, tests).

    Parameters
    ----------
    config : GPT2Config, LlamaConfig or BertConfig
    seed : generator seed
    dtype : float16 / float32 on the GPU, float32 / float64 on the CPU
    xp : numpy or cupy: where the weights live
    std : standard deviation of the weights (norm scales are 1 + N(0, std))
    """
    return module_for(config).init_random(config, seed, dtype, xp, std)
