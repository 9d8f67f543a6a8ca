"""ONNX operators over NumPy / CuPy arrays: a table of functions named after the ONNX op types.

    OPS[(domain, op_type)] = Op(fn, min_opset)          fn(node, *inputs) -> output or tuple of outputs

`node` is an executor Node (attributes in node.attrs, the opset of its domain in node.opset, the executor's
settings in node.ctx). Inputs arrive as NumPy or CuPy arrays (None for an omitted optional input).

Where values live: shape arithmetic (Shape, Range, Gather on shapes, the masks built from them) stays in
NumPy on the host even when the model runs on the GPU, so a step never waits on tiny device copies; an op
whose inputs mix the two moves the host ones to the device (`_common`). Ops that need values on the host
(Reshape's shape, Slice's starts, Expand's shape, ...) read them with `_ints`.

Fused ops map onto rawformer's kernels where they fit: Softmax (last axis) -> rf.softmax,
LayerNormalization / SkipLayerNormalization -> rf.layer_norm / rf.add_layer_norm, Gelu / FastGelu /
BiasGelu -> rf.gelu, com.microsoft Attention -> rf.attention. On NumPy inputs those run the float64
references, cast back to the input dtype. QuantizeLinear / DequantizeLinear (per tensor, per axis) run QDQ
files such as a quantising exporter writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import rawformer as rf
from rawformer import backend
from rawformer.ops.activations import _erf as _erf_f64  # the float64 reference erf (NumPy has none)

__all__ = ["OPS", "Op", "OnnxOpError"]

MS = "com.microsoft"


class OnnxOpError(ValueError):
    """An op given inputs or attributes it does not support (names the node)."""


@dataclass(frozen=True)
class Op:
    fn: Callable[..., Any]
    min_opset: int = 1  # the first opset whose semantics fn implements


OPS: dict[tuple[str, str], Op] = {}


def op(
    *names: str, domain: str = "", min_opset: int = 1
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def reg(fn: Callable[..., Any]) -> Callable[..., Any]:
        for n in names:
            OPS[(domain, n)] = Op(fn, min_opset)
        return fn

    return reg


# ---- helpers -----------------------------------------------------------------------------------------------


def _mod(*arrays: Any) -> Any:
    """cupy if any array is a CuPy array, else numpy."""
    for a in arrays:
        if a is not None and backend.is_cupy(a):
            return backend.require_cupy()
    return np


def _common(*arrays: Any) -> tuple[Any, list[Any]]:
    """(xp, arrays on xp's device)."""
    xp = _mod(*arrays)
    return xp, [None if a is None else (xp.asarray(a) if xp is not np else a) for a in arrays]


def _ints(a: Any) -> list[int]:
    """An int tensor's values on the host, as a list (shapes, axes, starts)."""
    return [int(v) for v in np.asarray(backend.to_numpy(a)).reshape(-1)]


def _scalar(a: Any) -> Any:
    return np.asarray(backend.to_numpy(a)).reshape(-1)[0].item()


def _axis(axis: int, rank: int, node: Any) -> int:
    if not -rank <= axis < max(rank, 1):
        raise OnnxOpError(f"node {node.name!r} ({node.op_type}): axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def _float_dtype(node: Any, onnx_type: int) -> np.dtype:
    """The NumPy dtype of ONNX type code `onnx_type` (bfloat16 computes as float32). Casts to float keep
    float32 even when the executor runs its weights in float16: what a graph casts up it wants precise."""
    from rawformer.export.onnx_file import ONNX_DTYPES

    if onnx_type == 16:  # bfloat16 computes in float32
        onnx_type = 1
    if onnx_type not in ONNX_DTYPES:
        raise OnnxOpError(f"node {node.name!r} ({node.op_type}): unsupported data type {onnx_type}")
    return ONNX_DTYPES[onnx_type]


# ---- elementwise -------------------------------------------------------------------------------------------


def _binary(f: Callable[[Any, Any, Any], Any]) -> Callable[..., Any]:
    def run(node: Any, a: Any, b: Any) -> Any:
        xp, (a, b) = _common(a, b)
        return f(xp, a, b)

    return run


def _match_float(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """Mixed float16 / float32 operands (an executor running weights in float16 next to float32 rotary or
    mask arithmetic) compute in float32, like ONNX's own upcasts; other dtypes are left to xp's rules."""
    if a.dtype != b.dtype and a.dtype.kind == "f" and b.dtype.kind == "f":
        t = np.promote_types(a.dtype, b.dtype)
        return a.astype(t, copy=False), b.astype(t, copy=False)
    if a.dtype != b.dtype and {a.dtype.kind, b.dtype.kind} <= {"i", "u"}:
        return a, b.astype(a.dtype, copy=False)
    return a, b


def _arith(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    def g(xp: Any, a: Any, b: Any) -> Any:
        a, b = _match_float(xp, a, b)
        out = f(a, b)
        # NumPy scalars promote int64 op int64 fine; keep a's dtype like ONNX (both inputs share it)
        return out.astype(a.dtype, copy=False) if a.dtype.kind in "iuf" and out.dtype != a.dtype else out

    return g


op("Add")(_binary(_arith(lambda a, b: a + b)))
op("Sub")(_binary(_arith(lambda a, b: a - b)))
op("Mul")(_binary(_arith(lambda a, b: a * b)))


@op("Div")
def _div(node: Any, a: Any, b: Any) -> Any:
    xp, (a, b) = _common(a, b)
    a, b = _match_float(xp, a, b)
    if a.dtype.kind in "iu":  # ONNX integer division truncates toward zero
        q = xp.abs(a) // xp.maximum(xp.abs(b), 1)
        return (q * xp.sign(a) * xp.sign(b)).astype(a.dtype)
    return a / b


@op("Pow")
def _pow(node: Any, a: Any, b: Any) -> Any:
    xp, (a, b) = _common(a, b)
    if a.dtype.kind == "f":
        if a.dtype == np.float16:  # x^2 of float16 activations overflows past 256: powers run in float32
            a = a.astype(np.float32)
        b = b.astype(a.dtype) if b.dtype.kind == "f" else b
        if b.ndim == 0 or b.size == 1:
            e = float(_scalar(b))
            if e == 2.0:
                return a * a
            if e == 0.5:
                return xp.sqrt(a)
        return xp.power(a, b).astype(a.dtype, copy=False)
    return xp.power(a, b).astype(a.dtype)


@op("Mod")
def _modulo(node: Any, a: Any, b: Any) -> Any:
    xp, (a, b) = _common(a, b)
    if node.attrs.get("fmod", 0):
        return xp.fmod(a, b)
    return xp.mod(a, b)


def _variadic(name: str) -> Callable[..., Any]:
    def run(node: Any, *xs: Any) -> Any:
        xp, xs2 = _common(*xs)
        out = xs2[0]
        for x in xs2[1:]:
            out, x = _match_float(xp, out, x)
            out = getattr(xp, name)(out, x)
        return out

    return run


op("Max")(_variadic("maximum"))
op("Min")(_variadic("minimum"))
op("Sum")(_variadic("add"))


def _compare(name: str) -> Callable[..., Any]:
    def run(node: Any, a: Any, b: Any) -> Any:
        xp, (a, b) = _common(a, b)
        a, b = _match_float(xp, a, b)
        return getattr(xp, name)(a, b)

    return run


for _n, _f in {
    "Equal": "equal", "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal",
    "LessOrEqual": "less_equal", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
}.items():  # fmt: skip
    op(_n)(_compare(_f))


def _unary(f: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def run(node: Any, x: Any) -> Any:
        return f(_mod(x), x)

    return run


for _n, _f in {
    "Neg": lambda xp, x: -x, "Not": lambda xp, x: xp.logical_not(x), "Abs": lambda xp, x: xp.abs(x),
    "Sqrt": lambda xp, x: xp.sqrt(x), "Exp": lambda xp, x: xp.exp(x), "Log": lambda xp, x: xp.log(x),
    "Cos": lambda xp, x: xp.cos(x), "Sin": lambda xp, x: xp.sin(x), "Tanh": lambda xp, x: xp.tanh(x),
    "Floor": lambda xp, x: xp.floor(x), "Ceil": lambda xp, x: xp.ceil(x), "Sign": lambda xp, x: xp.sign(x),
    "IsNaN": lambda xp, x: xp.isnan(x), "Relu": lambda xp, x: xp.maximum(x, 0).astype(x.dtype),
    "Reciprocal": lambda xp, x: (1 / x).astype(x.dtype), "Identity": lambda xp, x: x,
    "Sigmoid": lambda xp, x: (1 / (1 + xp.exp(-x))).astype(x.dtype),
}.items():  # fmt: skip
    op(_n)(_unary(_f))


@op("IsInf")
def _isinf(node: Any, x: Any) -> Any:
    xp = _mod(x)
    pos, neg = node.attrs.get("detect_positive", 1), node.attrs.get("detect_negative", 1)
    return xp.isinf(x) & (((x > 0) & bool(pos)) | ((x < 0) & bool(neg)))


@op("Erf")
def _erf(node: Any, x: Any) -> Any:
    if backend.is_cupy(x):
        from cupyx.scipy.special import erf

        return erf(x.astype(np.float32) if x.dtype == np.float16 else x).astype(x.dtype)
    return _erf_f64(x).astype(x.dtype)


@op("Dropout")
def _dropout(node: Any, x: Any, *rest: Any) -> Any:  # inference: the identity
    return x, _mod(x).ones(x.shape, dtype=bool)


@op("Where")
def _where(node: Any, c: Any, a: Any, b: Any) -> Any:
    xp, (c, a, b) = _common(c, a, b)
    a, b = _match_float(xp, a, b)
    return xp.where(c, a, b)


@op("Cast")
def _cast(node: Any, x: Any) -> Any:
    return x.astype(_float_dtype(node, node.attrs["to"]), copy=False)


@op("CastLike")
def _cast_like(node: Any, x: Any, like: Any) -> Any:
    return x.astype(like.dtype, copy=False)


# ---- shapes and movement -----------------------------------------------------------------------------------


@op("Shape")
def _shape(node: Any, x: Any) -> Any:
    dims = list(x.shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
    return np.asarray(dims[slice(start, end)], dtype=np.int64)


@op("Size")
def _size(node: Any, x: Any) -> Any:
    return np.asarray(int(np.prod(x.shape, dtype=np.int64)), dtype=np.int64)


@op("Reshape")
def _reshape(node: Any, x: Any, shape: Any) -> Any:
    dims = _ints(shape)
    if not node.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def _flatten(node: Any, x: Any) -> Any:
    axis = _axis(node.attrs.get("axis", 1), x.ndim + 1, node)
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(lead, -1)


@op("Transpose")
def _transpose(node: Any, x: Any) -> Any:
    perm = node.attrs.get("perm") or list(range(x.ndim))[::-1]
    return x.transpose(perm)


def _axes_of(node: Any, axes_input: Any) -> list[int] | None:
    if "axes" in node.attrs:  # before opset 13 (18 for reductions): an attribute
        return list(node.attrs["axes"])
    return None if axes_input is None else _ints(axes_input)


@op("Squeeze")
def _squeeze(node: Any, x: Any, axes: Any = None) -> Any:
    ax = _axes_of(node, axes)
    if ax is None:
        return x.reshape([d for d in x.shape if d != 1])
    return _mod(x).squeeze(x, axis=tuple(_axis(a, x.ndim, node) for a in ax))


@op("Unsqueeze")
def _unsqueeze(node: Any, x: Any, axes: Any = None) -> Any:
    ax = _axes_of(node, axes) or []
    rank = x.ndim + len(ax)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank, node) for a in ax):
        shape.insert(a, 1)
    return x.reshape(shape)


@op("Concat")
def _concat(node: Any, *xs: Any) -> Any:
    xp, xs2 = _common(*xs)
    xs2 = [x for x in xs2 if x is not None]
    axis = _axis(node.attrs["axis"], xs2[0].ndim, node)
    t = xs2[0].dtype
    for x in xs2[1:]:
        t = np.promote_types(t, x.dtype) if x.dtype.kind == t.kind else t
    return xp.concatenate([x.astype(t, copy=False) for x in xs2], axis=axis)


@op("Split")
def _split(node: Any, x: Any, split: Any = None) -> tuple[Any, ...]:
    axis = _axis(node.attrs.get("axis", 0), x.ndim, node)
    sizes = list(node.attrs["split"]) if "split" in node.attrs else (None if split is None else _ints(split))
    n = len(node.outputs)
    if sizes is None:
        num = node.attrs.get("num_outputs", n)
        chunk = -(-x.shape[axis] // num)  # the last part is smaller when it does not divide (opset 18)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(num)]
    bounds = np.cumsum([0, *sizes])
    idx = [slice(None)] * x.ndim
    out = []
    for i in range(len(sizes)):
        idx[axis] = slice(int(bounds[i]), int(bounds[i + 1]))
        out.append(x[tuple(idx)])
    return tuple(out)


@op("Slice", min_opset=10)
def _slice(node: Any, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    st, en = _ints(starts), _ints(ends)
    ax = list(range(len(st))) if axes is None else _ints(axes)
    sp = [1] * len(st) if steps is None else _ints(steps)
    idx = [slice(None)] * x.ndim
    for s, e, a, p in zip(st, en, ax, sp, strict=True):
        a = _axis(a, x.ndim, node)
        n = x.shape[a]
        # clamp the int64 sentinels (+-2^63) the exporters use for "to the end"
        s, e = max(min(s, n), -n - 1), max(min(e, n), -n - 1)
        idx[a] = slice(s, e if e >= -n else None, p) if p < 0 else slice(s, e, p)
    return x[tuple(idx)]


@op("Gather")
def _gather(node: Any, data: Any, indices: Any) -> Any:
    axis = _axis(node.attrs.get("axis", 0), data.ndim, node)
    xp, (data, indices) = _common(data, indices)
    ind = indices.astype(np.int64, copy=False)
    ind = xp.where(ind < 0, ind + data.shape[axis], ind)
    if axis == 0:
        return data[ind]
    return xp.take(data, ind, axis=axis)


@op("GatherElements")
def _gather_elements(node: Any, data: Any, indices: Any) -> Any:
    axis = _axis(node.attrs.get("axis", 0), data.ndim, node)
    xp, (data, indices) = _common(data, indices)
    ind = indices.astype(np.int64, copy=False)
    ind = xp.where(ind < 0, ind + data.shape[axis], ind)
    return xp.take_along_axis(data, ind, axis=axis)


@op("GatherND")
def _gather_nd(node: Any, data: Any, indices: Any) -> Any:
    b = node.attrs.get("batch_dims", 0)
    xp, (data, indices) = _common(data, indices)
    ind = indices.astype(np.int64, copy=False)
    k = ind.shape[-1]
    batch = data.shape[:b]
    nb = int(np.prod(batch, dtype=np.int64))
    d = data.reshape(nb, *data.shape[b:])  # (nb, ...)
    i = ind.reshape(nb, -1, k)  # (nb, n, k)
    i = xp.where(i < 0, i + xp.asarray(d.shape[1 : 1 + k]), i)
    coords = tuple(i[..., j] for j in range(k))
    bidx = xp.arange(nb)[:, None]
    out = d[(bidx, *coords)]  # (nb, n, rest...)
    return out.reshape(*ind.shape[:-1], *data.shape[b + k :])


@op("ScatterND")
def _scatter_nd(node: Any, data: Any, indices: Any, updates: Any) -> Any:
    xp, (data, indices, updates) = _common(data, indices, updates)
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise OnnxOpError(f"node {node.name!r} (ScatterND): only reduction='none' is supported")
    out = data.copy()
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).astype(np.int64)
    out[tuple(idx[:, j] for j in range(k))] = updates.reshape(-1, *data.shape[k:])
    return out


@op("Expand")
def _expand(node: Any, x: Any, shape: Any) -> Any:
    xp = _mod(x)
    target = np.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return xp.broadcast_to(x, target)


@op("Tile")
def _tile(node: Any, x: Any, reps: Any) -> Any:
    return _mod(x).tile(x, _ints(reps))


@op("Range")
def _range(node: Any, start: Any, limit: Any, delta: Any) -> Any:
    s, lim, d = (np.asarray(backend.to_numpy(a)) for a in (start, limit, delta))
    return np.arange(s.item(), lim.item(), d.item(), dtype=s.dtype)


@op("ConstantOfShape")
def _constant_of_shape(node: Any, shape: Any) -> Any:
    v = node.attrs.get("value")
    value = np.zeros(1, np.float32) if v is None else v
    out = np.full(_ints(shape), value.reshape(-1)[0], dtype=value.dtype)
    return out if out.dtype.kind != "f" or out.size < 4096 else node.ctx.to_device(out)


@op("Constant")
def _constant(node: Any) -> Any:
    a = node.attrs
    if "value" in a:
        return a["value"]
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):  # fmt: skip
        if key in a:
            return np.asarray(a[key], dtype=dt)
    raise OnnxOpError(f"node {node.name!r} (Constant): no supported value attribute ({sorted(a)})")


@op("CumSum")
def _cumsum(node: Any, x: Any, axis: Any) -> Any:
    xp = _mod(x)
    ax = _axis(int(_scalar(axis)), x.ndim, node)
    y = xp.flip(x, ax) if node.attrs.get("reverse", 0) else x
    out = xp.cumsum(y, axis=ax, dtype=x.dtype)
    if node.attrs.get("exclusive", 0):
        out = out - y
    return xp.flip(out, ax) if node.attrs.get("reverse", 0) else out


@op("Trilu")
def _trilu(node: Any, x: Any, k: Any = None) -> Any:
    xp = _mod(x)
    kk = 0 if k is None else int(_scalar(k))
    return xp.triu(x, kk) if node.attrs.get("upper", 1) else xp.tril(x, kk)


@op("Pad")
def _pad(node: Any, x: Any, pads: Any = None, value: Any = None, axes: Any = None) -> Any:
    xp = _mod(x)
    if node.attrs.get("mode", "constant") not in ("constant", b"constant"):
        raise OnnxOpError(f"node {node.name!r} (Pad): only mode='constant' is supported")
    p = list(node.attrs["pads"]) if pads is None else _ints(pads)
    ax = list(range(x.ndim)) if axes is None else [_axis(a, x.ndim, node) for a in _ints(axes)]
    n = len(ax)
    width = [(0, 0)] * x.ndim
    for i, a in enumerate(ax):
        width[a] = (p[i], p[i + n])
    if any(lo < 0 or hi < 0 for lo, hi in width):
        raise OnnxOpError(f"node {node.name!r} (Pad): negative pads are not supported")
    v = 0 if value is None else _scalar(value)
    return xp.pad(x, width, constant_values=v)


# ---- quantisation (QDQ) ----------------------------------------------------------------------------------


def _q_axis(node: Any, x: Any, scale: Any) -> tuple[Any, ...] | None:
    """The shape scale / zero point broadcast to: per tensor (None) or per axis (1-D along `axis`)."""
    if scale.ndim == 0 or scale.size == 1:
        return None
    if node.attrs.get("block_size", 0):
        raise OnnxOpError(f"node {node.name!r} ({node.op_type}): blocked quantisation is not supported")
    axis = _axis(node.attrs.get("axis", 1), x.ndim, node)
    shape = [1] * x.ndim
    shape[axis] = scale.size
    return tuple(shape)


@op("DequantizeLinear")
def _dequantize(node: Any, x: Any, scale: Any, zero_point: Any = None) -> Any:
    """y = (x - zero_point) * scale, per tensor or per axis; y has scale's dtype."""
    xp, (x, scale, zero_point) = _common(x, scale, zero_point)
    shape = _q_axis(node, x, scale)
    s = scale if shape is None else scale.reshape(shape)
    y = x.astype(np.float32)
    if zero_point is not None:
        y = y - (
            zero_point.astype(np.float32) if shape is None else zero_point.reshape(shape).astype(np.float32)
        )
    return (y * s.astype(np.float32)).astype(scale.dtype)


@op("QuantizeLinear")
def _quantize(node: Any, x: Any, scale: Any, zero_point: Any = None) -> Any:
    """y = saturate(round_half_even(x / scale) + zero_point) in zero_point's type (uint8 without one)."""
    xp, (x, scale, zero_point) = _common(x, scale, zero_point)
    shape = _q_axis(node, x, scale)
    s = scale if shape is None else scale.reshape(shape)
    out_t = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
    if out_t.kind not in "iu":
        raise OnnxOpError(f"node {node.name!r} (QuantizeLinear): output type {out_t} is not supported")
    y = xp.rint(x.astype(np.float32) / s.astype(np.float32))
    if zero_point is not None:
        y = y + (zero_point if shape is None else zero_point.reshape(shape)).astype(np.float32)
    info = np.iinfo(out_t)
    return xp.clip(y, info.min, info.max).astype(out_t)


# ---- linear algebra and reductions -------------------------------------------------------------------------


def _matmul_operands(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """Float16 weights with float32 activations: the product runs in float16 (like a float16 ONNX model)."""
    if a.dtype != b.dtype and a.dtype.kind == "f" and b.dtype.kind == "f":
        low = np.dtype(np.float16) if np.float16 in (a.dtype, b.dtype) else np.promote_types(a.dtype, b.dtype)
        return a.astype(low, copy=False), b.astype(low, copy=False)
    return a, b


@op("MatMul")
def _matmul(node: Any, a: Any, b: Any) -> Any:
    xp, (a, b) = _common(a, b)
    a, b = _matmul_operands(xp, a, b)
    return xp.matmul(a, b)


@op("Gemm")
def _gemm(node: Any, a: Any, b: Any, c: Any = None) -> Any:
    xp, (a, b, c) = _common(a, b, c)
    a, b = _matmul_operands(xp, a, b)
    at = a.T if node.attrs.get("transA", 0) else a
    bt = b.T if node.attrs.get("transB", 0) else b
    y = xp.matmul(at, bt)
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * y.dtype.type(alpha)
    if c is not None:
        y = y + (c.astype(y.dtype, copy=False) if beta == 1.0 else c.astype(y.dtype) * y.dtype.type(beta))
    return y


def _reduce(name: str) -> Callable[..., Any]:
    def run(node: Any, x: Any, axes: Any = None) -> Any:
        xp = _mod(x)
        ax = _axes_of(node, axes)
        keep = bool(node.attrs.get("keepdims", 1))
        if not ax:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.ndim))
        t = tuple(_axis(a, x.ndim, node) for a in ax)
        if name == "mean" and x.dtype == np.float16:  # accumulate half in float32
            return xp.mean(x.astype(np.float32), axis=t, keepdims=keep).astype(x.dtype)
        if name == "sumsquare":
            return xp.sum(x * x, axis=t, keepdims=keep)
        return getattr(xp, name)(x, axis=t, keepdims=keep).astype(x.dtype, copy=False)

    return run


for _n, _f in {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
               "ReduceProd": "prod", "ReduceSumSquare": "sumsquare"}.items():  # fmt: skip
    op(_n)(_reduce(_f))


@op("ArgMax")
def _argmax(node: Any, x: Any) -> Any:
    xp = _mod(x)
    ax = _axis(node.attrs.get("axis", 0), x.ndim, node)
    if node.attrs.get("select_last_index", 0):
        y = x.shape[ax] - 1 - xp.argmax(xp.flip(x, ax), axis=ax)
    else:
        y = xp.argmax(x, axis=ax)
    y = y.astype(np.int64)
    return xp.expand_dims(y, ax) if node.attrs.get("keepdims", 1) else y


# ---- fused: softmax, norms, gelu, attention ----------------------------------------------------------------


def _rf_float(x: Any) -> bool:
    """Arrays the rf ops take: float16 / float32 (float64 on the CPU)."""
    gpu = backend.is_cupy(x)
    return x.dtype in ((np.float16, np.float32) if gpu else (np.float16, np.float32, np.float64))


def _softmax_any(node: Any, x: Any, log: bool) -> Any:
    axis = node.attrs.get("axis", -1 if node.opset >= 13 else 1)
    if node.opset < 13:  # the old semantics: flatten to 2-D at `axis`, softmax over the second part
        ax = _axis(axis, x.ndim, node)
        y = _softmax_any(_Last(node), x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1), log)
        return y.reshape(x.shape)
    ax = _axis(axis, x.ndim, node)
    if _rf_float(x) and x.size:
        xc = _mod(x).ascontiguousarray(x)
        return rf.log_softmax(xc, ax) if log else rf.softmax(xc, ax)
    xp = _mod(x)
    z = x - x.max(axis=ax, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=ax, keepdims=True)
    return (z - xp.log(s)) if log else e / s


class _Last:
    """A node view with axis -1 and a new opset: what the opset < 13 softmax reduces to."""

    def __init__(self, node: Any) -> None:
        self.name, self.op_type, self.attrs, self.opset = node.name, node.op_type, {"axis": -1}, 13


@op("Softmax")
def _softmax(node: Any, x: Any) -> Any:
    return _softmax_any(node, x, log=False)


@op("LogSoftmax")
def _log_softmax(node: Any, x: Any) -> Any:
    return _softmax_any(node, x, log=True)


def _norm_params(x: Any, *params: Any) -> list[Any] | None:
    """The norm's scale / bias as (cols,) arrays of x's dtype on x's device, or None when they do not fit
    the rf op (a different shape): then the generic formula runs."""
    xp = _mod(x)
    out = []
    for p in params:
        if p is None:
            out.append(None)
            continue
        p = xp.asarray(p).reshape(-1) if p.size == x.shape[-1] else None
        if p is None:
            return None
        out.append(xp.ascontiguousarray(p.astype(x.dtype, copy=False)))
    return out


@op("LayerNormalization", min_opset=17)
def _layer_norm(node: Any, x: Any, scale: Any, bias: Any = None) -> Any:
    xp, (x, scale, bias) = _common(x, scale, bias)
    axis = _axis(node.attrs.get("axis", -1), x.ndim, node)
    eps = float(node.attrs.get("epsilon", 1e-5))
    want_stats = len(node.outputs) > 1
    params = _norm_params(x, scale, bias) if axis == x.ndim - 1 and _rf_float(x) else None
    if params is not None and not want_stats:
        return rf.layer_norm(xp.ascontiguousarray(x), params[0], params[1], eps)
    ax = tuple(range(axis, x.ndim))
    xf = x.astype(np.float32) if x.dtype == np.float16 else x
    mean = xf.mean(axis=ax, keepdims=True)
    c = xf - mean
    rstd = 1 / xp.sqrt((c * c).mean(axis=ax, keepdims=True) + eps)
    y = c * rstd * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), mean, rstd


@op("SimplifiedLayerNormalization")
@op("SimplifiedLayerNormalization", domain=MS)
def _rms_norm(node: Any, x: Any, scale: Any) -> Any:
    xp, (x, scale) = _common(x, scale)
    eps = float(node.attrs.get("epsilon", 1e-5))
    params = (
        _norm_params(x, scale) if node.attrs.get("axis", -1) in (-1, x.ndim - 1) and _rf_float(x) else None
    )
    if params is None:
        raise OnnxOpError(
            f"node {node.name!r} (SimplifiedLayerNormalization): only the last axis is supported"
        )
    return rf.rms_norm(xp.ascontiguousarray(x), params[0], eps)


@op("SkipLayerNormalization", domain=MS)
@op("SkipSimplifiedLayerNormalization", domain=MS)
def _skip_layer_norm(node: Any, x: Any, skip: Any, gamma: Any, beta: Any = None, bias: Any = None) -> Any:
    """h = x + skip (+ bias); y = layer_norm(h) (rms_norm for the Simplified form). Outputs (y, mean,
    inv_std, h): the statistics are not produced (None), h is."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    if simplified:  # its inputs are (x, skip, gamma, bias)
        beta, bias = None, beta
    xp, (x, skip, gamma, beta, bias) = _common(x, skip, gamma, beta, bias)
    eps = float(node.attrs.get("epsilon", 1e-12))
    if bias is not None:
        x = x + bias.astype(x.dtype, copy=False)
    params = _norm_params(x, gamma, beta)
    if params is None or skip.shape != x.shape:
        skip = xp.broadcast_to(skip, x.shape)
    xc, sc = xp.ascontiguousarray(x), xp.ascontiguousarray(skip.astype(x.dtype, copy=False))
    if simplified:
        y, h = rf.add_rms_norm(xc, sc, params[0], eps)
    else:
        y, h = rf.add_layer_norm(xc, sc, params[0], params[1], eps)
    return y, None, None, h


def _gelu(x: Any, bias: Any, approximate: str) -> Any:
    xp, (x, bias) = _common(x, bias)
    if bias is not None:
        bias = xp.ascontiguousarray(bias.astype(x.dtype, copy=False).reshape(-1))
        if bias.size != x.shape[-1]:
            x, bias = x + bias.reshape(x.shape[-1:] if bias.size == 1 else bias.shape), None
    return rf.gelu(xp.ascontiguousarray(x), bias, approximate=approximate)


@op("Gelu", min_opset=20)
def _gelu_onnx(node: Any, x: Any) -> Any:
    a = node.attrs.get("approximate", "none")
    return _gelu(x, None, a.decode() if isinstance(a, bytes) else a)


@op("Gelu", domain=MS)
@op("BiasGelu", domain=MS)
def _bias_gelu(node: Any, x: Any, bias: Any = None) -> Any:
    return _gelu(x, bias, "none")


@op("FastGelu", domain=MS)
def _fast_gelu(node: Any, x: Any, bias: Any = None) -> Any:
    return _gelu(x, bias, "tanh")


@op("EmbedLayerNormalization", domain=MS)
def _embed_layer_norm(
    node: Any, ids: Any, segment: Any, word: Any, pos: Any, seg_emb: Any, gamma: Any, beta: Any,
    mask: Any = None, position_ids: Any = None,
) -> Any:  # fmt: skip
    """layer_norm(word[ids] + pos[positions] + seg_emb[segment]); outputs (y, mask_index, embedding_sum),
    mask_index the number of real tokens of each row (int32 (B,): keys j < mask_index attend)."""
    xp, (ids, segment, word, pos, seg_emb, gamma, beta, mask, position_ids) = _common(
        ids, segment, word, pos, seg_emb, gamma, beta, mask, position_ids
    )
    b, s = ids.shape
    positions = xp.arange(s)[None] if position_ids is None else position_ids.astype(np.int64)
    x = word[ids.astype(np.int64)] + pos[positions]
    if segment is not None and seg_emb is not None:
        x = x + seg_emb[segment.astype(np.int64)]
    x = xp.ascontiguousarray(x.astype(word.dtype, copy=False))
    params = _norm_params(x, gamma, beta)
    y = rf.layer_norm(x, params[0], params[1], float(node.attrs.get("epsilon", 1e-12)))
    if mask is None:
        index = xp.full((b,), s, dtype=np.int32)
    else:
        index = (mask != 0).sum(axis=1).astype(np.int32)
    return y, index, x


def _attention_mask(xp: Any, mask_index: Any, b: int, s_q: int, s_k: int, filter_value: float) -> Any:
    """com.microsoft Attention's mask_index as an additive float32 mask broadcastable to (B, H, S_q, S_k)."""
    m = mask_index
    keys = xp.arange(s_k)
    if m.ndim == 1 and m.shape[0] == b:  # end positions (right padding)
        keep = keys[None, :] < m[:, None]
        keep = keep[:, None, None, :]
    elif m.ndim == 1 and m.shape[0] == 2 * b:  # end and start positions
        keep = (keys[None, :] < m[:b, None]) & (keys[None, :] >= m[b:, None])
        keep = keep[:, None, None, :]
    elif m.ndim == 2:  # raw (B, S_k) 0 / 1
        keep = (m != 0)[:, None, None, :]
    elif m.ndim == 3:  # (B, S_q, S_k)
        keep = (m != 0)[:, None]
    else:
        keep = m != 0  # (B, H, S_q, S_k)
    return xp.where(keep, 0.0, filter_value).astype(np.float32)


@op("Attention", domain=MS)
def _ms_attention(
    node: Any, x: Any, weights: Any, bias: Any = None, mask_index: Any = None, past: Any = None,
    attention_bias: Any = None, past_sequence_length: Any = None,
) -> Any:  # fmt: skip
    """Multi-head self-attention of (B, S, H_in) with fused q|k|v weights (H_in, 3 H) -> (B, S, H)."""
    if past is not None:
        raise OnnxOpError(f"node {node.name!r} (com.microsoft Attention): the past input is not supported")
    xp, (x, weights, bias, mask_index, attention_bias) = _common(x, weights, bias, mask_index, attention_bias)
    heads = int(node.attrs["num_heads"])
    sizes = node.attrs.get("qkv_hidden_sizes")
    b, s, _ = x.shape
    w, bb = _matmul_operands(xp, x, weights)
    qkv = xp.matmul(w, bb)  # (B, S, q + k + v)
    if bias is not None:
        qkv = qkv + bias.astype(qkv.dtype, copy=False)
    hq, hk, hv = list(sizes) if sizes else [qkv.shape[-1] // 3] * 3
    q = qkv[..., :hq].reshape(b, s, heads, hq // heads)  # (B, S, nh, d)
    k = qkv[..., hq : hq + hk].reshape(b, s, heads, hk // heads)
    v = qkv[..., hq + hk : hq + hk + hv].reshape(b, s, heads, hv // heads)
    filt = float(node.attrs.get("mask_filter_value", -10000.0))
    mask = None if mask_index is None else _attention_mask(xp, mask_index, b, s, s, filt)
    if attention_bias is not None:
        ab = attention_bias.astype(np.float32)
        mask = ab if mask is None else mask + ab
    if mask is not None:
        mask = xp.ascontiguousarray(xp.broadcast_to(mask, (b, mask.shape[1], s, s)).astype(q.dtype))
    scale = node.attrs.get("scale")
    if hk != hq or hv != hq:
        raise OnnxOpError(f"node {node.name!r} (com.microsoft Attention): unequal q / k / v sizes {sizes}")
    out = rf.attention(
        q, k, v, causal=bool(node.attrs.get("unidirectional", 0)), mask=mask,
        scale=None if scale is None or scale == 0 else float(scale),
    )  # fmt: skip
    return out.reshape(b, s, hv)
