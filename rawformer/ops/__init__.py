"""Public fused ops. Each module holds one family: its launchers and the NumPy references beside them."""

from rawformer.ops.activations import gelu, gelu_backward, silu, swiglu, swiglu_backward
from rawformer.ops.attention import attention
from rawformer.ops.norms import (
    add_layer_norm,
    add_rms_norm,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from rawformer.ops.paged_attention import paged_attention
from rawformer.ops.rope import kv_write, rope, rope_kv_write
from rawformer.ops.softmax import log_softmax, log_softmax_backward, softmax, softmax_backward

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "gelu",
    "gelu_backward",
    "kv_write",
    "layer_norm",
    "layer_norm_backward",
    "log_softmax",
    "log_softmax_backward",
    "paged_attention",
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
