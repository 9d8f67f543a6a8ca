"""Weight-only INT8 at load time: replace a built model's projection matrices by QuantizedWeights.

    model = build_model(config, weights, cp)
    quantize_model(model, "int8")        # per output channel
    quantize_model(model, "int8-g128")   # one scale per 128 inputs of a channel

Afterwards `models.common.linear` sends every quantized matrix to rf.int8_linear (INT8 GEMV for up to 8
tokens, dequantize + cuBLAS above), so the forward code is unchanged. A decode step streams 1 byte per
weight instead of 2 (plus 2 bytes per scale: 1/64 of a byte per weight at group 128).

What is quantized: every projection of every block (Llama: fused qkv, o, gate, up, down; GPT-2: c_attn,
attn.c_proj, c_fc, mlp.c_proj; BERT: fused qkv, attention output, intermediate, output), and the lm head
unless `lm_head=False`.

What stays in the model's float dtype (fp16 on the GPU), and why:
- token / position embeddings: a step reads T rows of them, not the whole table, so int8 would save memory
  but no time; an embedding row is the residual stream's start, where a rounding error feeds every layer.
  (A tied lm head gets its own int8 copy; the fp16 table stays for the lookups.)
- norm scales and biases, linear biases: N values per layer (0.1% of the bytes), and the norm scales
  multiply every activation.
- activations and the logits: fp16; the KV cache too unless the pool is an Int8KVArena (memory/int8_arena.py,
  models/int8_kv.py: INT8 K/V with a scale per token and head, read by rf.paged_attention_int8).
What is computed in fp32 whatever the storage: GEMV / GEMM accumulation, norm statistics, softmax and
attention's running max / sum, RoPE angles (fp32 inverse frequencies), the int8 -> float conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import rawformer as rf
from rawformer.ops.quant import QuantizedWeight

__all__ = ["MODES", "TiedEmbedding", "parse_mode", "quantize_model", "quantized_bytes"]

MODES = {"int8": None, "int8-g128": 128}  # mode -> group size (None: per output channel)

# per model class: (the list of blocks, the matrix attributes of a block); a tuple attribute is (w, b)
_BLOCK_MATRICES = {
    "LlamaModel": ("blocks", ("w_qkv", "w_o", "w_gate", "w_up", "w_down")),
    "GPT2Model": ("blocks", ("c_attn", "attn_proj", "c_fc", "mlp_proj")),
    "BertModel": ("layers", ("w_qkv", "w_o", "w_i", "w_out")),
}


@dataclass(frozen=True, eq=False)
class TiedEmbedding:
    """A token table whose tied lm head is quantized: rows are looked up in the fp16 `table`
    (`emb[tokens]`), `emb.T` is the INT8 head (a QuantizedWeight of the (H, V) matrix)."""

    table: Any
    head: QuantizedWeight

    def __getitem__(self, index: Any) -> Any:
        return self.table[index]

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802
        return self.head

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.table.shape)

    @property
    def dtype(self) -> Any:
        return self.table.dtype


def parse_mode(mode: str) -> int | None:
    """The group size of a mode name ("int8" -> None, "int8-g128" -> 128); ValueError for others."""
    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
    return MODES[mode]


def _quantize(w: Any, group: int | None) -> Any:
    if isinstance(w, QuantizedWeight):
        raise ValueError("the model is already quantized")
    return rf.quantize_int8(w, group_size=group)


def quantize_model(model: Any, mode: str = "int8", *, lm_head: bool = True) -> Any:
    """Quantize `model`'s projection matrices in place (see the module docstring); returns the model.

    Parameters
    ----------
    model : LlamaModel, GPT2Model or BertModel (NumPy or CuPy weights)
    mode : "int8" (per output channel) or "int8-g128" (group-wise, 128 inputs per scale)
    lm_head : also quantize the decoder's lm head (Llama, GPT-2); BERT has none
    """
    group = parse_mode(mode)
    kind = type(model).__name__
    if kind not in _BLOCK_MATRICES:
        raise TypeError(f"quantize_model: no quantization plan for {kind}")
    if getattr(model, "quantization", None):
        raise ValueError(f"quantize_model: the model is already quantized ({model.quantization})")
    blocks_attr, names = _BLOCK_MATRICES[kind]
    for blk in getattr(model, blocks_attr):
        for name in names:
            cur = getattr(blk, name)
            if isinstance(cur, tuple):  # GPT-2 keeps (w, b)
                setattr(blk, name, (_quantize(cur[0], group), *cur[1:]))
            else:
                setattr(blk, name, _quantize(cur, group))
    if lm_head and kind == "LlamaModel":
        model.lm_head = _quantize(model.lm_head.T, group).T  # linear(h, lm_head.T) gets the QuantizedWeight
    elif lm_head and kind == "GPT2Model":
        model.wte = TiedEmbedding(model.wte, _quantize(model.wte.T, group))
    model.quantization = mode
    return model


def quantized_bytes(model: Any) -> tuple[int, int]:
    """(bytes of the INT8 matrices incl. scales, their fp16 size) over every QuantizedWeight of `model`."""
    kind = type(model).__name__
    blocks_attr, names = _BLOCK_MATRICES[kind]
    found = []
    for blk in getattr(model, blocks_attr):
        for name in names:
            cur = getattr(blk, name)
            found.append(cur[0] if isinstance(cur, tuple) else cur)
    head = getattr(model, "lm_head", None) if kind == "LlamaModel" else getattr(model, "wte", None)
    if head is not None and isinstance(getattr(head, "T", None), QuantizedWeight):
        found.append(head.T)
    qs = [w for w in found if isinstance(w, QuantizedWeight)]
    return sum(w.nbytes for w in qs), sum(2 * w.in_features * w.out_features for w in qs)
