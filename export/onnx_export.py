"""Native models -> ONNX: standard ai.onnx ops only (opset 17+), dynamic batch and sequence, external data
for large models; the file passes onnx.checker (full_check) and runs in onnxruntime.

    export_onnx(model, "gpt2.onnx")                           # GPT2Model / LlamaModel / BertModel
    export_onnx(model, "big.onnx", external_data=True)        # weights in big.onnx.data beside it

Graphs (no KV cache: each call computes the whole sequence):
    GPT-2, Llama   input_ids int64 (batch, sequence)  ->  logits (batch, sequence, vocab)
    BERT           input_ids, attention_mask, token_type_ids int64 (batch, sequence)
                   ->  last_hidden_state (batch, sequence, hidden)
Attention is spelled out (MatMul, scale, additive causal / padding mask, Softmax, MatMul); GQA repeats the
kv heads with Expand; RoPE is cos / sin of positions x inv_freq with the NeoX rotate-half; GELU and SiLU are
written with Tanh / Erf / Sigmoid (Gelu only arrives in opset 20). The layout follows the HF exports, so
the files are recognised again by rawformer.load (a round trip lands on the native path).

Weights: every weight goes through `GraphBuilder.weight(name, array, role)`, which adds an initializer and
returns the value name the consumer reads. A quantising exporter subclasses GraphBuilder and overrides
`weight` per role ("linear" for matrices of MatMul / Gemm, "embedding", "norm", "bias") to emit, say,
an int8 initializer + DequantizeLinear (QDQ) and return the dequantised value's name; nothing else changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rawformer.export.onnx_file import require_onnx

from rawformer import backend

__all__ = ["DEFAULT_OPSET", "EXTERNAL_THRESHOLD", "GraphBuilder", "export_onnx"]

DEFAULT_OPSET = 17
EXTERNAL_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with room for the graph itself
ALIGN = 64  # byte alignment of each tensor in the external data file (memory-mappable, vector loads)


class GraphBuilder:
    """Accumulates nodes and initializers of one graph; names are unique by construction.

    Parameters
    ----------
    opset : ai.onnx opset (>= 17)
    dtype : float dtype of weights and activations in the file (float32 or float16)
    """

    def __init__(self, opset: int = DEFAULT_OPSET, dtype: Any = np.float32) -> None:
        self.onnx = require_onnx()
        if opset < 17:
            raise ValueError(f"export: opset must be >= 17 (LayerNormalization), got {opset}")
        self.opset = opset
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"export: dtype must be float32 or float16, got {self.dtype}")
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    # ---- values ------------------------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer holding `array` as is; returns its name."""
        a = np.ascontiguousarray(array)
        self.initializers.append(self.onnx.numpy_helper.from_array(a, name))
        return name

    def weight(self, name: str, array: Any, role: str) -> str:
        """A model weight in the file's dtype; returns the value the consumer reads. Override per role for
        quantised export (see the module docstring). role: "linear" (an (in, out) MatMul matrix or the
        (out, in) matrix of a transB Gemm), "embedding", "norm", "bias"."""
        return self.tensor(name, np.asarray(backend.to_numpy(array), dtype=self.dtype))

    def const(self, value: Any, dtype: Any = None) -> str:
        a = np.asarray(value, dtype=dtype if dtype is not None else self.dtype)
        return self.tensor(self.fresh("const"), a)

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name (a list of names when outputs > 1)."""
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            self.onnx.helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type), **attrs)
        )
        return outs if outputs > 1 else outs[0]

    # ---- building blocks ---------------------------------------------------------------------------------

    def linear(self, x: str, w: Any, b: Any, name: str) -> str:
        """x @ w (+ b); w (in, out)."""
        y = self.op("MatMul", x, self.weight(name + ".weight", w, "linear"))
        return y if b is None else self.op("Add", y, self.weight(name + ".bias", b, "bias"))

    def layer_norm(self, x: str, w: Any, b: Any, eps: float, name: str) -> str:
        scale, bias = self.weight(name + ".weight", w, "norm"), self.weight(name + ".bias", b, "norm")
        return self.op(
            "LayerNormalization", x, scale, bias, axis=-1, epsilon=float(eps),
        )  # fmt: skip

    def rms_norm(self, x: str, w: Any, eps: float, name: str) -> str:
        """x * 1 / sqrt(mean(x^2) + eps) * w."""
        ms = self.reduce_mean(self.op("Mul", x, x))
        r = self.op("Reciprocal", self.op("Sqrt", self.op("Add", ms, self.const(eps))))
        return self.op("Mul", self.op("Mul", x, r), self.weight(name + ".weight", w, "norm"))

    def reduce_mean(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.ints(-1), keepdims=1)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1)

    def gelu(self, x: str, approximate: str) -> str:
        half_x = self.op("Mul", x, self.const(0.5))
        if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            x3 = self.op("Mul", self.op("Mul", x, x), x)
            inner = self.op("Add", x, self.op("Mul", x3, self.const(0.044715)))
            t = self.op("Tanh", self.op("Mul", inner, self.const(math.sqrt(2.0 / math.pi))))
        else:  # 0.5 x (1 + erf(x / sqrt 2))
            t = self.op("Erf", self.op("Mul", x, self.const(1.0 / math.sqrt(2.0))))
        return self.op("Mul", half_x, self.op("Add", t, self.const(1.0)))

    def heads(self, x: str, n: int, d: int) -> str:
        """(B, S, n d) -> (B, n, S, d)."""
        return self.op("Transpose", self.op("Reshape", x, self.ints(0, 0, n, d)), perm=[0, 2, 1, 3])

    def attention(self, q: str, k: str, v: str, d: int, mask: str, hidden: int) -> str:
        """softmax(q k^T / sqrt d + mask) v over (B, nh, S, d) heads -> (B, S, hidden)."""
        kt = self.op("Transpose", k, perm=[0, 1, 3, 2])  # (B, nh, d, S)
        s = self.op("Mul", self.op("MatMul", q, kt), self.const(1.0 / math.sqrt(d)))  # (B, nh, S, S)
        p = self.op("Softmax", self.op("Add", s, mask), axis=-1)
        o = self.op("Transpose", self.op("MatMul", p, v), perm=[0, 2, 1, 3])  # (B, S, nh, d)
        return self.op("Reshape", o, self.ints(0, 0, hidden))

    def seq_len(self, ids: str) -> tuple[str, str]:
        """(S as a 1-element int64 tensor, positions int64 (S,)) of an ids input (B, S)."""
        s1 = self.op("Slice", self.op("Shape", ids), self.ints(1), self.ints(2))  # (1,)
        s0 = self.op("Squeeze", s1, self.ints(0))  # scalar S
        pos = self.op("Range", self.const(0, np.int64), s0, self.const(1, np.int64))
        return s1, pos

    def first_rows(self, table: str, s1: str) -> str:
        """table[:S] (position embeddings). A Slice, not Gather(Range): onnxruntime's extended optimizer
        rewrites Gather(Range) into a Slice that breaks once it has also shared scalar and 1-D constants."""
        return self.op("Slice", table, self.ints(0), s1, self.ints(0))

    def causal_mask(self, s1: str) -> str:
        """(S, S) additive: 0 on and below the diagonal, -inf above."""
        square = self.op("Concat", s1, s1, axis=0)
        ones = self.op(
            "ConstantOfShape", square, value=self.onnx.numpy_helper.from_array(np.ones(1, np.float32))
        )
        upper = self.op(
            "Cast", self.op("Trilu", ones, self.const(1, np.int64), upper=1), to=self.onnx.TensorProto.BOOL
        )
        return self.op("Where", upper, self.const(-np.inf), self.const(0.0))


def _np(a: Any) -> np.ndarray:
    return np.asarray(backend.to_numpy(a))


def _cols(w: Any, lo: int, hi: int) -> Any:
    """Output columns lo:hi of an (in, out) matrix: a float array, or a QuantizedWeight's channels (their
    int8 rows and scales, exact: quantization is per output channel)."""
    from rawformer.ops.quant import QuantizedWeight

    if isinstance(w, QuantizedWeight):
        q, s = _np(w.q), _np(w.scales)
        return QuantizedWeight(q[lo:hi].copy(), s[lo:hi].copy(), w.in_features, w.group_size)
    return _np(w)[:, lo:hi]


def _tied_head(table: Any) -> Any:
    """The int8 head of a quantized tied embedding (models.quantize.TiedEmbedding), else None."""
    head = getattr(table, "head", None)
    return None if head is None else head.T  # the (V, H) handle a transB Gemm reads


def _gpt2(b: GraphBuilder, m: Any) -> tuple[list[str], list[tuple[str, str]]]:
    cfg = m.config
    h, nh, d = cfg.n_embd, cfg.n_head, cfg.head_dim
    ids = "input_ids"
    s1, _ = b.seq_len(ids)
    qhead = _tied_head(m.wte)
    wte = b.weight("wte.weight", m.wte if qhead is None else m.wte.table, "embedding")
    x = b.op("Add", b.op("Gather", wte, ids), b.first_rows(b.weight("wpe.weight", m.wpe, "embedding"), s1))
    mask = b.causal_mask(s1)
    for i, blk in enumerate(m.blocks):
        p = f"h.{i}."
        hn = b.layer_norm(x, *blk.ln_1, cfg.layer_norm_epsilon, p + "ln_1")
        qkv = b.linear(hn, *blk.c_attn, p + "attn.c_attn")
        q, k, v = b.op("Split", qkv, b.ints(h, h, h), axis=-1, outputs=3)
        a = b.attention(b.heads(q, nh, d), b.heads(k, nh, d), b.heads(v, nh, d), d, mask, h)
        x = b.op("Add", x, b.linear(a, *blk.attn_proj, p + "attn.c_proj"))
        hn = b.layer_norm(x, *blk.ln_2, cfg.layer_norm_epsilon, p + "ln_2")
        f = b.gelu(b.linear(hn, *blk.c_fc, p + "mlp.c_fc"), cfg.gelu_approximate)
        x = b.op("Add", x, b.linear(f, *blk.mlp_proj, p + "mlp.c_proj"))
    x = b.layer_norm(x, *m.ln_f, cfg.layer_norm_epsilon, "ln_f")
    if qhead is not None:  # quantized: the head is an int8 copy of the table, the lookups read the table
        wte = b.weight("lm_head.weight", qhead, "linear")
    return _head(b, x, wte, h, ids), [(ids, "int64")]


def _head(b: GraphBuilder, x: str, table: str, h: int, ids: str) -> list[str]:
    """logits = x @ table^T through a transB Gemm on (B S, H) rows: the (V, H) table is stored once."""
    rows = b.op("Reshape", x, b.ints(-1, h))
    y = b.op("Gemm", rows, table, transB=1)
    shape = b.op("Concat", b.op("Shape", ids), b.ints(-1), axis=0)
    return [b.op("Reshape", y, shape)]


def _llama(b: GraphBuilder, m: Any) -> tuple[list[str], list[tuple[str, str]]]:
    cfg = m.config
    h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, m.head_dim
    eps = cfg.rms_norm_eps
    ids = "input_ids"
    s1, pos = b.seq_len(ids)
    embed = b.weight("embed_tokens.weight", m.embed, "embedding")
    x = b.op("Gather", embed, ids)
    mask = b.causal_mask(s1)
    # rope tables: angle (S, d/2) = pos x inv_freq, NeoX halves -> cos / sin (1, 1, S, d), in float32
    inv = b.tensor("rotary_emb.inv_freq", _np(m.inv_freq).astype(np.float32))  # (d/2,)
    ang = b.op("Mul", b.op("Unsqueeze", b.op("Cast", pos, to=1), b.ints(1)), inv)  # (S, 1) x (d/2,)
    ang = b.op("Concat", ang, ang, axis=-1)
    cos = b.op("Unsqueeze", b.op("Cos", ang), b.ints(0, 1))
    sin = b.op("Unsqueeze", b.op("Sin", ang), b.ints(0, 1))
    if b.dtype != np.float32:
        cos, sin = (b.op("Cast", t, to=b.onnx.helper.np_dtype_to_tensor_dtype(b.dtype)) for t in (cos, sin))
    half = d // 2

    def rope(t: str) -> str:  # t * cos + rotate_half(t) * sin, rotate_half(t) = (-t2, t1)
        t1 = b.op("Slice", t, b.ints(0), b.ints(half), b.ints(-1))
        t2 = b.op("Slice", t, b.ints(half), b.ints(d), b.ints(-1))
        rot = b.op("Concat", b.op("Neg", t2), t1, axis=-1)
        return b.op("Add", b.op("Mul", t, cos), b.op("Mul", rot, sin))

    def repeat_kv(
        t: str,
    ) -> str:  # (B, nkv, S, d) -> (B, nh, S, d): kv head j serves q heads j r .. j r + r-1
        if nkv == nh:
            return t
        e = b.op("Expand", b.op("Unsqueeze", t, b.ints(2)), b.ints(1, 1, nh // nkv, 1, 1))
        return b.op("Reshape", e, b.ints(0, nh, -1, d))

    for i, blk in enumerate(m.blocks):
        p = f"layers.{i}."
        hn = b.rms_norm(x, blk.ln_1, eps, p + "input_layernorm")
        bias = None if blk.b_qkv is None else _np(blk.b_qkv)
        cols = np.cumsum([0, nh * d, nkv * d, nkv * d])
        qkv = []
        for j, n in enumerate("qkv"):
            bj = None if bias is None else bias[cols[j] : cols[j + 1]]
            qkv.append(b.linear(hn, _cols(blk.w_qkv, cols[j], cols[j + 1]), bj, p + f"self_attn.{n}_proj"))
        q = rope(b.heads(qkv[0], nh, d))
        k = repeat_kv(rope(b.heads(qkv[1], nkv, d)))
        v = repeat_kv(b.heads(qkv[2], nkv, d))
        a = b.attention(q, k, v, d, mask, nh * d)
        x = b.op("Add", x, b.linear(a, blk.w_o, blk.b_o, p + "self_attn.o_proj"))
        hn = b.rms_norm(x, blk.ln_2, eps, p + "post_attention_layernorm")
        gate = b.linear(hn, blk.w_gate, blk.b_gate, p + "mlp.gate_proj")
        up = b.linear(hn, blk.w_up, blk.b_up, p + "mlp.up_proj")
        g = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
        x = b.op("Add", x, b.linear(g, blk.w_down, blk.b_down, p + "mlp.down_proj"))
    x = b.rms_norm(x, m.norm, eps, "norm")
    from rawformer.ops.quant import QuantizedWeightT

    quantized_head = isinstance(m.lm_head, QuantizedWeightT)  # an int8 copy even when tied
    tied = cfg.tie_word_embeddings and not quantized_head
    table = embed if tied else b.weight("lm_head.weight", m.lm_head, "linear")
    return _head(b, x, table, h, ids), [(ids, "int64")]


def _bert(b: GraphBuilder, m: Any) -> tuple[list[str], list[tuple[str, str]]]:
    cfg = m.config
    h, nh, d, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.layer_norm_eps
    ids, am, tt = "input_ids", "attention_mask", "token_type_ids"
    s1, _ = b.seq_len(ids)
    e = "embeddings."
    x = b.op("Add", b.op("Gather", b.weight(e + "word_embeddings.weight", m.word, "embedding"), ids),
             b.first_rows(b.weight(e + "position_embeddings.weight", m.pos, "embedding"), s1))  # fmt: skip
    x = b.op("Add", x, b.op("Gather", b.weight(e + "token_type_embeddings.weight", m.types, "embedding"), tt))
    x = b.layer_norm(x, *m.ln_emb, eps, e + "LayerNorm")
    # key padding mask (B, 1, 1, S): 0 for real tokens, the float minimum for padding (as HF: a row of only
    # padding stays finite)
    keep = b.op("Cast", b.op("Unsqueeze", am, b.ints(1, 2)), to=b.onnx.TensorProto.BOOL)
    mask = b.op("Where", keep, b.const(0.0), b.const(np.finfo(b.dtype).min))
    for i, lyr in enumerate(m.layers):
        p = f"encoder.layer.{i}."
        bias = _np(lyr.b_qkv)
        qkv = [
            b.heads(
                b.linear(
                    x,
                    _cols(lyr.w_qkv, j * h, (j + 1) * h),
                    bias[j * h : (j + 1) * h],
                    p + f"attention.self.{n}",
                ),
                nh,
                d,
            )
            for j, n in enumerate(("query", "key", "value"))
        ]
        a = b.attention(*qkv, d, mask, h)
        a = b.linear(a, lyr.w_o, lyr.b_o, p + "attention.output.dense")
        x = b.layer_norm(b.op("Add", a, x), *lyr.ln_1, eps, p + "attention.output.LayerNorm")
        f = b.gelu(b.linear(x, lyr.w_i, lyr.b_i, p + "intermediate.dense"), cfg.gelu_approximate)
        f = b.linear(f, lyr.w_out, lyr.b_out, p + "output.dense")
        x = b.layer_norm(b.op("Add", f, x), *lyr.ln_2, eps, p + "output.LayerNorm")
    return [x], [(ids, "int64"), (am, "int64"), (tt, "int64")]


_BUILD = {"gpt2": (_gpt2, "logits"), "llama": (_llama, "logits"), "bert": (_bert, "last_hidden_state")}


def _externalise(model: Any, path: Path, location: str) -> None:
    """Move every initializer's bytes into `location` beside `path` (aligned), leaving references behind."""
    onnx = require_onnx()
    offset = 0
    with open(path.parent / location, "wb") as f:
        for t in model.graph.initializer:
            if len(t.raw_data) < 1024:  # small constants stay inline
                continue
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = t.raw_data
            f.write(data)
            onnx.external_data_helper.set_external_data(t, location, offset=offset, length=len(data))
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += len(data)


def export_onnx(
    model: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dtype: Any = None,
    external_data: bool | None = None, builder: GraphBuilder | None = None, check: bool = True,
    quantize: str | None = None,
) -> Path:  # fmt: skip
    """Write a native model as an ONNX file.

    Parameters
    ----------
    model : GPT2Model, LlamaModel or BertModel (NumPy or CuPy weights)
    path : the .onnx file to write (its folder must exist)
    opset : ai.onnx opset, >= 17
    dtype : float32 or float16 in the file (default: float16 for a float16 model, else float32)
    external_data : weights in `<name>.data` beside the file; None: when they pass ~2 GB (protobuf's limit)
    builder : a GraphBuilder (subclass) to use, e.g. a quantising one; its opset / dtype win
    check : run onnx.checker.check_model(full_check=True) on the written file
    quantize : None, "int8" or "int8-g128": write weight-only INT8 in QDQ form (export/onnx_qdq.py) of a
        quantized copy of the model (models.quantize_model; the model itself is not changed). A model that
        is already quantized is written in QDQ form without it.

    Returns
    -------
    the path written
    """
    onnx = require_onnx()
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in _BUILD:
        raise TypeError(
            f"export_onnx: not a native model (GPT2Model, LlamaModel, BertModel): {type(model).__name__}"
        )
    if dtype is None:
        dtype = np.float16 if np.dtype(model.dtype) == np.float16 else np.float32
    done = getattr(model, "quantization", None)
    if quantize is not None:
        if done:
            raise ValueError(f"export_onnx: the model is already quantized ({done}); leave quantize=None")
        from rawformer.export.onnx_qdq import quantized_copy

        model = quantized_copy(model, quantize)
    if builder is None and (quantize or done):
        from rawformer.export.onnx_qdq import QdqBuilder

        builder = QdqBuilder(opset, dtype)
    b = builder or GraphBuilder(opset, dtype)
    build, out_name = _BUILD[family]
    outputs, inputs = build(b, model)
    b.nodes.append(onnx.helper.make_node("Identity", [outputs[0]], [out_name], name="output"))
    elem = onnx.helper.np_dtype_to_tensor_dtype(b.dtype)
    g_in = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["batch", "sequence"])
        for n, _ in inputs
    ]
    last = "vocab" if out_name == "logits" else "hidden"
    g_out = [onnx.helper.make_tensor_value_info(out_name, elem, ["batch", "sequence", last])]
    graph = onnx.helper.make_graph(b.nodes, f"rawformer_{family}", g_in, g_out, b.initializers)
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", b.opset)], producer_name="rawformer",
        ir_version=min(onnx.IR_VERSION, 10),
    )  # fmt: skip
    out = Path(path)
    size = sum(len(t.raw_data) for t in graph.initializer)
    if external_data or (external_data is None and size > EXTERNAL_THRESHOLD):
        _externalise(proto, out, out.name + ".data")
    onnx.save_model(proto, str(out))
    if check:
        onnx.checker.check_model(str(out), full_check=True)
    return out
