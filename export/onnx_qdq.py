"""Weight-only INT8 models <-> ONNX in QDQ form: int8 initializers + scales + DequantizeLinear feeding MatMul.

    export_onnx(model, "q.onnx", quantize="int8")        # quantizes a copy of a float model, then writes it
    export_onnx(quantized_model, "q.onnx")                # a model already through models.quantize_model
    rawformer.load("q.onnx")                              # back onto the native path, int8 values as stored

What a quantized linear looks like in the file (W~ = the matrix a models.QuantizedWeight stands for, K inputs,
N outputs, q its int8 values, s its float16 scales written in the file's float dtype, exactly):

    per channel ("int8")       DequantizeLinear(q^T (K, N) int8, s (N,), axis=1) -> MatMul
                               (a transB Gemm, the lm head: q (N, K), axis=0)
    group-wise ("int8-g128")   the reshape form, valid from opset 17 (no opset 21 block_size):
                               DequantizeLinear(q' (N G, 128) int8, s (N G,), axis=0)
                               -> Reshape (N, G 128) -> Slice [:, :K] (when 128 does not divide K)
                               -> Transpose -> MatMul
                               q' is q zero padded to G = ceil(K / 128) whole groups, row (n, g) of q' holds
                               group g of output n, so a per-axis scale along axis 0 is one scale per group.
                               (the Gemm head has no Transpose.)
Blocked DequantizeLinear (opset 21 block_size) would say the same in one node, but the reshape form runs on
every opset >= 17 and in rawformer's own graph executor, which the importer's probe run needs.
There are no zero points (symmetric INT8); int8 values stay int8 and the scales are those of the native
model, so onnxruntime's DequantizeLinear rebuilds W~ exactly (|q| <= 127 times an fp16 scale is exact in
fp32) and the file matches the native quantized model to float rounding.

onnxruntime: from its "extended" optimization level on, onnxruntime fuses DequantizeLinear(int8) -> MatMul
into its MatMulNBits kernel, whose default accuracy level (4) also rounds the activations to int8 (~1e-2
relative error against the weight-only model). `ort_session_options()` sets
session.qdq_matmulnbits_accuracy_level = 1 (float32 compute), which keeps the fusion and matches the native
model to 1e-6; the group-wise form is not fused and matches either way.

Import (export/onnx_import.py): `fold_dq` follows a linear's weight back through Transpose / Slice / Reshape
to a DequantizeLinear of an int8 initializer, giving the float weight (for the structural match and the probe)
and, element by element, its int8 value and scale; `quantized_from` turns those into a QuantizedWeight when
the scales are per channel or per 128-group and exactly float16 (else the float weight is used); and
`attach_quantized` puts them into the built native model: the int8 values are the file's, bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from rawformer.export.onnx_export import GraphBuilder

from rawformer import backend
from rawformer.ops.quant import QuantizedWeight, QuantizedWeightT, padded_k

__all__ = [
    "QdqBuilder",
    "attach_quantized",
    "fold_dq",
    "ort_session_options",
    "quantized_copy",
    "quantized_from",
]

GROUP = 128  # the only group size models.quantize offers ("int8-g128")
_MODES = {None: "int8", GROUP: "int8-g128"}


# ---- export ------------------------------------------------------------------------------------------------


class QdqBuilder(GraphBuilder):
    """A GraphBuilder that writes QuantizedWeight matrices as int8 initializers + DequantizeLinear (see the
    module docstring); float weights go through unchanged."""

    def weight(self, name: str, array: Any, role: str) -> str:
        if isinstance(array, QuantizedWeight):  # (K, N) of a MatMul
            return self._dq(name, array, transposed=False)
        if isinstance(array, QuantizedWeightT):  # (N, K) of a transB Gemm (the lm head)
            return self._dq(name, array.base, transposed=True)
        return super().weight(name, array, role)

    def _dq(self, name: str, qw: QuantizedWeight, transposed: bool) -> str:
        # DequantizeLinear's output has the scale's type; float16 scales need opset 19: before it, float32
        # scales (exact) and a Cast of the dequantized matrix to float16
        cast = self.dtype == np.float16 and self.opset < 19
        y = self._dq_float(name, qw, transposed, np.float32 if cast else self.dtype)
        return self.op("Cast", y, to=self.onnx.TensorProto.FLOAT16) if cast else y

    def _dq_float(self, name: str, qw: QuantizedWeight, transposed: bool, scale_dtype: Any) -> str:
        q = np.asarray(backend.to_numpy(qw.q))  # (N, Kp)
        s = np.asarray(backend.to_numpy(qw.scales)).astype(scale_dtype)  # from float16: exact
        k, n = qw.in_features, qw.out_features
        if qw.group_size is None:
            if transposed:
                x = self.tensor(name + "_quantized", np.ascontiguousarray(q[:, :k]))
                return self.op("DequantizeLinear", x, self.tensor(name + "_scale", s), axis=0)
            x = self.tensor(name + "_quantized", np.ascontiguousarray(q[:, :k].T))
            return self.op("DequantizeLinear", x, self.tensor(name + "_scale", s), axis=1)
        g = qw.group_size
        groups = s.shape[1]
        full = np.zeros((n, groups * g), np.int8)
        full[:, :k] = q[:, :k]
        x = self.tensor(name + "_quantized", full.reshape(n * groups, g))
        y = self.op("DequantizeLinear", x, self.tensor(name + "_scale", s.reshape(-1)), axis=0)
        y = self.op("Reshape", y, self.ints(n, groups * g))
        if groups * g != k:
            y = self.op("Slice", y, self.ints(0), self.ints(k), self.ints(1))
        return y if transposed else self.op("Transpose", y, perm=[1, 0])


def quantized_copy(model: Any, mode: str) -> Any:
    """A copy of `model` quantized with models.quantize_model(mode); `model` itself is left as it is (the
    copy shares its float arrays, the blocks are new objects)."""
    from rawformer.models.quantize import _BLOCK_MATRICES, quantize_model

    kind = type(model).__name__
    if kind not in _BLOCK_MATRICES:
        raise TypeError(f"export: no quantization plan for {kind}")
    c = copy.copy(model)
    attr = _BLOCK_MATRICES[kind][0]
    setattr(c, attr, [copy.copy(b) for b in getattr(model, attr)])
    return quantize_model(c, mode)


def ort_session_options(accuracy_level: int = 1) -> Any:
    """onnxruntime.SessionOptions under which its fused int8 MatMul computes in float32 (level 1), as the
    weight-only model does; level 4 (onnxruntime's default) quantizes the activations too."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(accuracy_level)))
    return so


# ---- import ------------------------------------------------------------------------------------------------


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ints(g: Any, name: str) -> list[int] | None:
    v = g.const(name) if name else None
    return None if v is None or v.dtype.kind not in "iu" else [int(i) for i in np.asarray(v).reshape(-1)]


def _apply(node: Any, g: Any, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
    """The same Transpose / Reshape / Slice on each array; None when an argument is not constant."""
    t = node.op_type
    if t == "Cast":  # the int8 values and scales stay what they are; fold_dq applies the type
        return arrays
    if t == "Transpose":
        perm = _attr(node, "perm", None)
        return [a.transpose(perm) if perm else a.T for a in arrays]
    if t == "Reshape":
        shape = _ints(g, node.input[1]) if len(node.input) > 1 else None
        if shape is None:
            return None
        shape = [arrays[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [a.reshape(shape) for a in arrays]
    if t == "Slice":
        ins = list(node.input) + [""] * (5 - len(node.input))
        starts, ends = _ints(g, ins[1]), _ints(g, ins[2])
        axes = _ints(g, ins[3]) if ins[3] else list(range(len(starts or [])))
        steps = _ints(g, ins[4]) if ins[4] else [1] * len(starts or [])
        if starts is None or ends is None or axes is None or steps is None:
            return None
        idx = [slice(None)] * arrays[0].ndim
        if not len(axes) == len(starts) == len(ends) == len(steps):
            return None
        for a, b, e, s in zip(axes, starts, ends, steps, strict=True):
            idx[a] = slice(b, e, s)
        return [a[tuple(idx)] for a in arrays]
    return None


def fold_dq(g: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None] | None:
    """(float value, int8 value, scale, group hint) of `name` when it is a DequantizeLinear of an int8
    initializer with a per-axis constant scale and no (or a zero) zero point, seen through at most 5
    Transpose / Reshape / Slice / Cast nodes; the int8 value and the scale are given element by element,
    in the value's shape; the hint is 128 for the group-wise reshape form (rows of 128 int8 values, one scale
    each), else None. None otherwise (per-tensor or blocked scales included: those stay on the float /
    executor paths)."""
    chain = []
    cur = name
    for _ in range(5):
        p = g.producer.get(cur)
        if p is None:
            return None
        if p.op_type == "DequantizeLinear":
            break
        if p.op_type not in ("Transpose", "Reshape", "Slice", "Cast") or not p.input:
            return None
        chain.append(p)
        cur = p.input[0]
    else:
        return None
    x = g.m.initializers.get(p.input[0])
    s = g.const(p.input[1]) if len(p.input) > 1 else None
    if x is None or x.dtype != np.int8 or s is None or s.dtype.kind != "f" or s.ndim != 1 or s.size < 2:
        return None
    if _attr(p, "block_size", 0):
        return None
    if len(p.input) > 2 and p.input[2]:
        zp = g.const(p.input[2])
        if zp is None or np.any(zp != 0):
            return None
    axis = _attr(p, "axis", 1)
    if not -x.ndim <= axis < x.ndim or x.shape[axis] != s.size:
        return None
    shape = [1] * x.ndim
    shape[axis % x.ndim] = s.size
    scale = np.broadcast_to(s.reshape(shape), x.shape)
    arrays: list[np.ndarray] | None = [x, scale]
    for node in reversed(chain):
        arrays = _apply(node, g, arrays)
        if arrays is None:
            return None
    q, sc = arrays
    hint = GROUP if chain and axis % x.ndim == 0 and x.ndim == 2 and x.shape[1] == GROUP else None
    out = s.dtype
    casts = [c for c in chain if c.op_type == "Cast"]
    if casts:  # the nearest Cast to the consumer says the value's type
        import onnx

        out = onnx.helper.tensor_dtype_to_np_dtype(_attr(casts[0], "to", 1))
        if np.dtype(out).kind != "f":
            return None
    return (q.astype(np.float32) * sc.astype(np.float32)).astype(out), q, sc, hint


def quantized_from(
    q_kn: np.ndarray, s_kn: np.ndarray, group_hint: int | None = None
) -> QuantizedWeight | None:
    """The QuantizedWeight of a (K, N) int8 matrix and its element-wise scales, when they are one scale per
    output channel or per 128 inputs of a channel and every scale is exactly a float16; else None. Scales
    that fit both (K <= 128, or equal group scales) give the hinted kind (group_hint 128: group-wise)."""
    if q_kn.ndim != 2:
        return None
    k, n = q_kn.shape
    s = np.asarray(s_kn).T  # (N, K)
    s16 = s.astype(np.float16)
    if not np.array_equal(s16.astype(s.dtype), s) or not np.all(np.isfinite(s16)):
        return None
    q = np.zeros((n, padded_k(k)), np.int8)
    q[:, :k] = q_kn.T
    per_channel = bool(np.all(s16 == s16[:, :1]))
    if per_channel and group_hint is None:
        return QuantizedWeight(q, np.ascontiguousarray(s16[:, 0]), k, None)
    firsts = s16[:, ::GROUP]  # (N, G): the first scale of every group
    if np.array_equal(np.repeat(firsts, GROUP, axis=1)[:, :k], s16):
        return QuantizedWeight(q, np.ascontiguousarray(firsts), k, GROUP)
    return QuantizedWeight(q, np.ascontiguousarray(s16[:, 0]), k, None) if per_channel else None


def _on(qw: QuantizedWeight, xp: Any) -> QuantizedWeight:
    return QuantizedWeight(xp.asarray(qw.q), xp.asarray(qw.scales), qw.in_features, qw.group_size)


def _stack(parts: list[QuantizedWeight | None]) -> QuantizedWeight | None:
    """Fused q | k | v: the parts' output channels one after the other (same K and group size)."""
    if any(p is None for p in parts) or len({(p.in_features, p.group_size) for p in parts}) != 1:
        return None
    p0 = parts[0]
    return QuantizedWeight(
        np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
        p0.in_features, p0.group_size,
    )  # fmt: skip


def attach_quantized(model: Any, quant: dict[str, QuantizedWeight], xp: Any) -> Any:
    """Replace the matrices of a built native model by the QuantizedWeights an import found (`quant`: HF
    weight name -> QuantizedWeight of the (in, out) matrix, NumPy) and set model.quantization ("int8",
    "int8-g128", or "int8-mixed" when group sizes differ or some matrices stay float). Returns the model."""
    from rawformer.models.quantize import TiedEmbedding

    family = model.config.model_type
    found: list[QuantizedWeight] = []
    total = done = 0  # block matrices, and those quantized

    def put(obj: Any, attr: str, qw: QuantizedWeight | None) -> None:
        nonlocal total, done
        total += 1
        if qw is None:
            return
        done += 1
        cur = getattr(obj, attr)
        qw = _on(qw, xp)
        want = tuple((cur[0] if isinstance(cur, tuple) else cur).shape)
        if tuple(qw.shape) != want:
            raise ValueError(f"import: quantized {attr} has shape {qw.shape}, the model's is {want}")
        found.append(qw)
        setattr(obj, attr, (qw, *cur[1:]) if isinstance(cur, tuple) else qw)

    if family == "gpt2":
        for i, blk in enumerate(model.blocks):
            p = f"h.{i}."
            for attr, hf in (("c_attn", "attn.c_attn"), ("attn_proj", "attn.c_proj"), ("c_fc", "mlp.c_fc"),
                             ("mlp_proj", "mlp.c_proj")):  # fmt: skip
                put(blk, attr, quant.get(p + hf + ".weight"))
        head = quant.get("lm_head.weight")  # (a float head is quantize_model(lm_head=False): not counted)
        if head is not None:
            found.append(_on(head, xp))
            model.wte = TiedEmbedding(model.wte, found[-1])
    elif family == "llama":
        for i, blk in enumerate(model.blocks):
            a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            put(blk, "w_qkv", _stack([quant.get(a + n + "_proj.weight") for n in "qkv"]))
            put(blk, "w_o", quant.get(a + "o_proj.weight"))
            for n in ("gate", "up", "down"):
                put(blk, "w_" + n, quant.get(m + n + "_proj.weight"))
        head = quant.get("lm_head.weight")  # (a float head is quantize_model(lm_head=False): not counted)
        if head is not None:
            found.append(_on(head, xp))
            model.lm_head = found[-1].T
    elif family == "bert":
        for i, lyr in enumerate(model.layers):
            p = f"encoder.layer.{i}."
            names = ("query", "key", "value")
            put(lyr, "w_qkv", _stack([quant.get(p + "attention.self." + n + ".weight") for n in names]))
            put(lyr, "w_o", quant.get(p + "attention.output.dense.weight"))
            put(lyr, "w_i", quant.get(p + "intermediate.dense.weight"))
            put(lyr, "w_out", quant.get(p + "output.dense.weight"))
    if found:
        groups = {w.group_size for w in found}
        model.quantization = _MODES[groups.pop()] if len(groups) == 1 and done == total else "int8-mixed"
    return model
