"""Public fused ops. Each module holds one family: its launchers and the NumPy references beside them."""

from rawformer.ops import kv_int8  # noqa: F401  (registers the paged_attention_int8 kernel family)
from rawformer.ops.activations import gelu, gelu_backward, silu, swiglu, swiglu_backward
from rawformer.ops.attention import attention
from rawformer.ops.attention_backward import attention_backward
from rawformer.ops.embedding import embedding, embedding_backward
from rawformer.ops.int8_norm_linear import int8_add_rms_norm_linear
from rawformer.ops.linear import linear, linear_swiglu
from rawformer.ops.loss import cross_entropy
from rawformer.ops.mla import mla_decode
from rawformer.ops.norm_linear import add_rms_norm_linear
from rawformer.ops.norms import (
    add_layer_norm,
    add_rms_norm,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from rawformer.ops.optim import adamw_step, grad_norm
from rawformer.ops.paged_attention import paged_attention
from rawformer.ops.quant import int8_linear, int8_linear_swiglu, quantize_int8
from rawformer.ops.rope import kv_write, rope, rope_kv_write
from rawformer.ops.softmax import log_softmax, log_softmax_backward, softmax, softmax_backward

__all__ = [
    "adamw_step",
    "add_layer_norm",
    "add_rms_norm",
    "add_rms_norm_linear",
    "attention",
    "attention_backward",
    "cross_entropy",
    "embedding",
    "embedding_backward",
    "gelu",
    "gelu_backward",
    "grad_norm",
    "int8_add_rms_norm_linear",
    "int8_linear",
    "int8_linear_swiglu",
    "kv_write",
    "layer_norm",
    "layer_norm_backward",
    "linear",
    "linear_swiglu",
    "log_softmax",
    "log_softmax_backward",
    "mla_decode",
    "paged_attention",
    "quantize_int8",
    "rms_norm",
    "rms_norm_backward",
    "rope",
    "rope_kv_write",
    "silu",
    "softmax",
    "softmax_backward",
    "swiglu",
    "swiglu_backward",
]
