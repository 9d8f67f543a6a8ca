"""Every op of the executor's table on one-node graphs, against onnxruntime on the same graph (CPU, float32,
odd sizes); the com.microsoft fused ops against their unfused formulas."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'rawformer[onnx]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from rawformer.export.onnx_executor import OnnxExecutor  # noqa: E402
from rawformer.export.onnx_file import read_onnx  # noqa: E402
from rawformer.export.onnx_ops import OPS  # noqa: E402

R = np.random.default_rng(7)
F = R.standard_normal((2, 3, 5)).astype(np.float32)
G = R.standard_normal((2, 3, 5)).astype(np.float32)
I64 = np.asarray
B = F > 0
U8 = R.integers(0, 256, (4, 6)).astype(np.uint8)


def i64(*v):
    return np.asarray(v, dtype=np.int64)


# (op, inputs as arrays (None = omitted), attrs, opset); constant int inputs become initializers
CASES = [
    ("Add", [F, G], {}, 18), ("Sub", [F, G[:, :1]], {}, 18), ("Mul", [F, np.float32(3)], {}, 18),
    ("Div", [F, G], {}, 18), ("Div", [i64(7, -7, 9), i64(2, 2, -4)], {}, 18),
    ("Pow", [np.abs(F), np.float32(2)], {}, 18), ("Pow", [np.abs(F), np.float32(1.7)], {}, 18),
    ("Max", [F, G, np.float32(0.1)], {}, 18), ("Min", [F, G], {}, 18),
    ("Equal", [i64(1, 2, 3), i64(1, 0, 3)], {}, 18), ("Greater", [F, G], {}, 18), ("Less", [F, G], {}, 18),
    ("GreaterOrEqual", [F, G], {}, 18), ("LessOrEqual", [F, G], {}, 18), ("And", [B, ~B[:1]], {}, 18),
    ("Or", [B, ~B], {}, 18), ("Not", [B], {}, 18), ("Neg", [F], {}, 18), ("Sqrt", [np.abs(F)], {}, 18),
    ("Reciprocal", [F], {}, 18), ("Cos", [F], {}, 18), ("Sin", [F], {}, 18), ("Tanh", [F], {}, 18),
    ("Sigmoid", [F], {}, 18), ("Erf", [F], {}, 18), ("Exp", [F], {}, 18), ("Abs", [F], {}, 18),
    ("IsNaN", [np.where(B, np.nan, F).astype(np.float32)], {}, 18), ("Identity", [F], {}, 18),
    ("Relu", [F], {}, 18), ("Where", [B, F, G], {}, 18), ("Cast", [F], {"to": TensorProto.INT64}, 18),
    ("Cast", [i64(1, 2)], {"to": TensorProto.FLOAT}, 18), ("Shape", [F], {}, 18),
    ("Shape", [F], {"start": 1, "end": -1}, 18), ("Reshape", [F, i64(0, -1)], {}, 18),
    ("Flatten", [F], {"axis": 2}, 18), ("Transpose", [F], {"perm": [2, 0, 1]}, 18),
    ("Squeeze", [F[:, :1], i64(1)], {}, 18), ("Unsqueeze", [F, i64(0, -1)], {}, 18),
    ("Concat", [F, G], {"axis": -1}, 18), ("Split", [F, i64(2, 3)], {"axis": 2}, 18),
    ("Slice", [F, i64(1, 0), i64(3, 100), i64(2, 1), i64(1, 1)], {}, 18),
    ("Slice", [F, i64(-1), i64(-1000), i64(2), i64(-2)], {}, 18),
    ("Gather", [F, i64(2, 0, -1)], {"axis": 2}, 18),
    ("Gather", [F, np.asarray(1, np.int64)], {"axis": 0}, 18),
    ("GatherElements", [F, R.integers(0, 3, (2, 3, 5))], {"axis": 1}, 18),
    ("GatherND", [F, np.asarray([[0, 1], [1, 2]], np.int64)], {}, 18),
    ("GatherND", [F, np.asarray([[1], [0]], np.int64)], {"batch_dims": 1}, 18),
    ("Expand", [F[:, :1], i64(2, 4, 5)], {}, 18), ("Expand", [F[:1, :1, :1], i64(3, 1)], {}, 18),
    ("Tile", [F, i64(1, 2, 1)], {}, 18), ("Range", [np.int64(2), np.int64(11), np.int64(3)], {}, 18),
    ("ConstantOfShape", [i64(2, 3)], {"value": numpy_helper.from_array(np.asarray([7], np.int64))}, 18),
    ("CumSum", [F, np.int64(1)], {}, 18), ("CumSum", [F, np.int64(2)], {"exclusive": 1, "reverse": 1}, 18),
    ("Trilu", [F, np.int64(1)], {"upper": 1}, 18), ("Trilu", [F], {"upper": 0}, 18),
    ("MatMul", [F, G.transpose(0, 2, 1).copy()], {}, 18), ("MatMul", [F, G[0].T.copy()], {}, 18),
    ("Gemm", [F[0], G[0], np.ones(3, np.float32)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 18),
    ("Gemm", [F[0].T.copy(), G[1].T[:, :2].copy()], {"transA": 1}, 18),
    ("ReduceMean", [F, i64(-1)], {}, 18), ("ReduceMean", [F], {"axes": [1], "keepdims": 0}, 17),
    ("ReduceSum", [F, i64(0, 2)], {"keepdims": 0}, 18), ("ReduceMax", [F, i64(1)], {}, 18),
    ("Softmax", [F], {"axis": -1}, 18), ("Softmax", [F], {"axis": 1}, 18), ("LogSoftmax", [F], {}, 18),
    ("LayerNormalization", [F, G[0, 0], G[1, 1]], {"epsilon": 1e-3}, 18),
    ("LayerNormalization", [F, G[0]], {"axis": 1}, 18), ("Gelu", [F], {}, 20),
    ("Gelu", [F], {"approximate": "tanh"}, 20), ("Pad", [F, i64(0, 1, 0, 0, 2, 1)], {}, 18),
    ("ArgMax", [F], {"axis": 2, "keepdims": 0}, 18), ("Mod", [i64(7, -7), i64(3, 3)], {}, 18),
    ("ScatterND", [F, np.asarray([[1, 0], [0, 2]], np.int64), G[:2, 0]], {}, 18),
    ("IsInf", [np.where(B, np.inf, -np.inf).astype(np.float32)], {"detect_negative": 0}, 18),
    ("Size", [F], {}, 18), ("Xor", [B, ~B[:1]], {}, 18), ("Sum", [F, G, F], {}, 18),
    ("ReduceMin", [F, i64(2)], {"keepdims": 0}, 18), ("ReduceProd", [F, i64(1)], {}, 18),
    ("Log", [np.abs(F) + 0.1], {}, 18), ("Floor", [F * 3], {}, 18), ("Ceil", [F * 3], {}, 18),
    ("Sign", [F], {}, 18), ("CastLike", [F, i64(1)], {}, 18),
    ("QuantizeLinear", [F * 40, np.float32(0.5), np.uint8(128)], {}, 18),
    ("QuantizeLinear", [F * 40, np.asarray([0.3, 0.5, 0.7], np.float32), np.zeros(3, np.int8)], {}, 18),
    ("DequantizeLinear", [R.integers(-128, 128, (4, 6)).astype(np.int8), np.float32(0.02)], {}, 18),
    ("DequantizeLinear", [U8, np.linspace(0.1, 1, 6).astype(np.float32),
                          np.full(6, 100, np.uint8)], {"axis": 1}, 18),
]  # fmt: skip


def _model(op, arrays, attrs, opset, domain=""):
    inputs, inits, names = [], [], []
    for j, a in enumerate(arrays):
        if a is None:
            names.append("")
            continue
        a = np.asarray(a)
        n = f"in{j}"
        names.append(n)
        if a.dtype == np.int64 and op not in ("Equal", "Div", "Mod", "Cast", "GatherElements", "GatherND"):
            inits.append(numpy_helper.from_array(a, n))  # shapes / axes / indices: constants, as exporters do
        else:
            t = helper.np_dtype_to_tensor_dtype(a.dtype)
            inputs.append((helper.make_tensor_value_info(n, t, list(a.shape)), a))
    outs = 2 if op == "Split" else 1
    node = helper.make_node(op, names, [f"out{k}" for k in range(outs)], name="n", domain=domain, **attrs)
    g = helper.make_graph(
        [node], "g", [vi for vi, _ in inputs],
        [helper.make_empty_tensor_value_info(f"out{k}") for k in range(outs)], inits,
    )  # fmt: skip
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=ops, ir_version=10), {vi.name: a for vi, a in inputs}


def _run_both(tmp_path, model, feeds):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    got = OnnxExecutor(read_onnx(path)).run(feeds)
    return list(got.values()), want


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_op_matches_onnxruntime(tmp_path, case):
    op, arrays, attrs, opset = case
    model, feeds = _model(op, arrays, attrs, opset)
    got, want = _run_both(tmp_path, model, feeds)
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype.kind == "f":
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
        else:
            np.testing.assert_array_equal(g, w)


def test_issue_op_list_is_covered():
    """The ops the issue names, all in the table."""
    names = (
        "Add And Cast Concat Constant ConstantOfShape Cos CumSum Div Equal Erf Expand Flatten Gather "
        "GatherElements GatherND Gelu Gemm GreaterOrEqual Identity IsNaN LayerNormalization LessOrEqual "
        "MatMul Max Mul Neg Not Pow Range Reciprocal ReduceMean Reshape Shape Sigmoid Sin Slice Softmax "
        "Split Sqrt Squeeze Sub Tanh Transpose Trilu Unsqueeze Where"
    ).split()
    assert [n for n in names if ("", n) not in OPS] == []
    ms = ["SkipLayerNormalization", "FastGelu", "BiasGelu", "Attention", "EmbedLayerNormalization"]
    assert [n for n in ms if ("com.microsoft", n) not in OPS] == []


def _gelu(x, tanh):
    if tanh:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


@pytest.mark.parametrize("op", ["FastGelu", "BiasGelu", "Gelu"])
def test_ms_gelus(tmp_path, op):
    bias = R.standard_normal(5).astype(np.float32)
    args = [F] if op == "Gelu" else [F, bias]
    model, feeds = _model(op, args, {}, 17, domain="com.microsoft")
    got, want = _run_both(tmp_path, model, feeds)
    ref = _gelu(F.astype(np.float64) + (0 if op == "Gelu" else bias), op == "FastGelu")
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_ms_skip_layer_norm(tmp_path):
    gamma, beta, bias = (R.standard_normal(5).astype(np.float32) for _ in range(3))
    model, feeds = _model(
        "SkipLayerNormalization", [F, G, gamma, beta, bias], {"epsilon": 1e-5}, 17, "com.microsoft"
    )
    got, want = _run_both(tmp_path, model, feeds)
    h = F.astype(np.float64) + G + bias
    ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "index", "raw", "causal"])
def test_ms_attention(tmp_path, mask_kind):
    b, s, h, heads = 2, 7, 12, 3
    x = R.standard_normal((b, s, h)).astype(np.float32)
    w = (R.standard_normal((h, 3 * h)) * 0.3).astype(np.float32)
    bias = R.standard_normal(3 * h).astype(np.float32)
    args, attrs = [x, w, bias], {"num_heads": heads}
    lens = np.asarray([7, 4], np.int32)
    if mask_kind == "index":
        args.append(lens)
    elif mask_kind == "raw":
        args.append((np.arange(s)[None] < lens[:, None]).astype(np.int32))
    elif mask_kind == "causal":
        attrs["unidirectional"] = 1
    model, feeds = _model("Attention", args, attrs, 17, "com.microsoft")
    got, want = _run_both(tmp_path, model, feeds)
    qkv = x.astype(np.float64) @ w + bias
    q, k, v = (qkv[..., i * h : (i + 1) * h].reshape(b, s, heads, -1).transpose(0, 2, 1, 3) for i in range(3))
    sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(h // heads)
    if mask_kind in ("index", "raw"):
        sc = sc + np.where(np.arange(s)[None] < lens[:, None], 0, -10000.0)[:, None, None, :]
    if mask_kind == "causal":
        sc = np.where(np.tril(np.ones((s, s), bool)), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    ref = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_ms_embed_layer_norm(tmp_path):
    ids = np.asarray([[1, 4, 2, 0], [3, 3, 1, 2]], np.int32)
    seg = np.asarray([[0, 0, 1, 1], [0, 1, 1, 1]], np.int32)
    mask = np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    word, pos, typ = (R.standard_normal((n, 6)).astype(np.float32) for n in (5, 4, 2))
    gamma, beta = R.standard_normal(6).astype(np.float32), R.standard_normal(6).astype(np.float32)
    model, feeds = _model(
        "EmbedLayerNormalization", [ids, seg, word, pos, typ, gamma, beta, mask], {"epsilon": 1e-6}, 17,
        "com.microsoft",
    )  # fmt: skip
    model.graph.output.append(helper.make_empty_tensor_value_info("out1"))
    model.graph.node[0].output.append("out1")
    got, want = _run_both(tmp_path, model, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
