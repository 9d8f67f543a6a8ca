"""Weight-only INT8 models -> ONNX in QDQ form -> onnxruntime and back (export/onnx_qdq.py).

For GPT-2, Llama (GQA, untied and tied heads) and BERT, per channel ("int8") and group-wise ("int8-g128",
with K not a multiple of 128 so the padded last group and the Slice are exercised): the file passes
onnx.checker's full check, holds int8 initializers + DequantizeLinear and no float copy of a quantized
matrix, runs in onnxruntime matching the native quantized model within 1e-4 (float32 activations), and
rawformer.load reads it back onto the native path with the int8 values and scales bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'rawformer[onnx]'")
from rawformer.export.onnx_export import export_onnx  # noqa: E402
from rawformer.export.onnx_import import native_logits  # noqa: E402
from rawformer.export.onnx_qdq import ort_session_options  # noqa: E402
from rawformer.models import BertConfig, GPT2Config, LlamaConfig, init_random  # noqa: E402
from rawformer.models.quantize import TiedEmbedding, quantize_model  # noqa: E402

from rawformer.loading import load  # noqa: E402
from rawformer.ops.quant import QuantizedWeight, QuantizedWeightT  # noqa: E402

# hidden sizes above 128 and not multiples of it: two groups, the second one partial
CONFIGS = {
    "gpt2": GPT2Config(vocab_size=53, n_positions=16, n_embd=136, n_layer=1, n_head=4, n_inner=200),
    "llama": LlamaConfig(
        vocab_size=47,
        hidden_size=144,
        intermediate_size=200,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
    ),  # fmt: skip
    "llama_tied": LlamaConfig(
        vocab_size=31,
        hidden_size=40,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
    ),  # fmt: skip
    "bert": BertConfig(
        vocab_size=31,
        hidden_size=132,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=260,
        max_position_embeddings=16,
    ),  # fmt: skip
}
MODES = ("int8", "int8-g128")
QUANTIZED = {"gpt2": 5, "llama": 8, "llama_tied": 8, "bert": 6}  # matrices in one layer + the lm head
RTOL = 1e-4


def model_of(name, seed=5):
    return init_random(CONFIGS[name], seed=seed, std=0.2)


def outputs(model, sess, ids):
    """(onnxruntime, native) outputs on the same ids (BERT: all-ones mask but one padded tail)."""
    if model.config.model_type == "bert":
        am = np.ones_like(ids)
        am[-1, ids.shape[1] // 2 + 1 :] = 0
        tt = np.zeros_like(ids)
        got = sess.run(None, {"input_ids": ids, "attention_mask": am, "token_type_ids": tt})[0]
        want = model.forward(ids, am, tt)
        return got[am.astype(bool)], want[am.astype(bool)]
    return sess.run(None, {"input_ids": ids})[0], native_logits(model, ids)


def rel(a, b):
    assert a.shape == b.shape
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def qweights(model):
    """Every QuantizedWeight of a model, in a fixed order (blocks, then the head)."""
    out = []
    blocks = model.layers if model.config.model_type == "bert" else model.blocks
    for blk in blocks:
        for v in vars(blk).values():
            v = v[0] if isinstance(v, tuple) else v
            if isinstance(v, QuantizedWeight):
                out.append(v)
    head = (
        getattr(model, "lm_head", None) if model.config.model_type == "llama" else getattr(model, "wte", None)
    )
    if isinstance(head, (QuantizedWeightT, TiedEmbedding)):
        out.append(head.T)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(float model, QDQ file) per family and mode, written once for the module."""
    d = tmp_path_factory.mktemp("qdq")
    return {
        (name, mode): (model_of(name), export_onnx(model_of(name), d / f"{name}-{mode}.onnx", quantize=mode))
        for name in CONFIGS
        for mode in MODES
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_qdq_file_runs_in_onnxruntime(files, name, mode):
    model, path = files[(name, mode)]
    assert getattr(model, "quantization", None) is None  # the float model given is left as it was
    qmodel = quantize_model(model_of(name), mode)
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == QUANTIZED[name]  # every projection and the head, each a DequantizeLinear
    fed = [
        n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in _dq_outputs(proto)
    ]
    assert len(fed) == len(dq)
    int8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == len(dq)
    # no float copy of a quantized matrix: the float initializers are embeddings, norms, biases, constants
    q_elems = sum(int(np.prod(t.dims)) for t in int8)
    f_elems = sum(int(np.prod(t.dims)) for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT)
    assert f_elems < q_elems
    for n in dq:  # per-axis scales in the file's float dtype, no zero point
        assert len(n.input) == 2 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    sess = ort.InferenceSession(str(path), ort_session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, seq in ((2, 6), (1, 1), (3, 9)):
        got, want = outputs(qmodel, sess, rng.integers(0, qmodel.config.vocab_size, size=(batch, seq)))
        assert rel(got, want) < RTOL
    # and not merely close to the float model: int8 rounding shows
    got, want = outputs(model, sess, rng.integers(0, qmodel.config.vocab_size, size=(2, 6)))
    assert rel(got, want) > 1e-4


def _dq_outputs(proto):
    """Values computed from a DequantizeLinear (through the reshape form)."""
    out = set()
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" or (
            n.op_type in ("Reshape", "Slice", "Transpose") and n.input[0] in out
        ):
            out.add(n.output[0])
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_keeps_int8_bit_identical(files, name, mode):
    """load(qdq.onnx) -> the native model with the file's int8 values and scales (no requantization)."""
    _, path = files[(name, mode)]
    want = quantize_model(model_of(name), mode)
    back = load(path, device="cpu")
    assert back.path_taken == "native", back.reason
    assert back.model.quantization == mode
    got_w, want_w = qweights(back.model), qweights(want)
    assert len(got_w) == len(want_w) > 0
    for g, w in zip(got_w, want_w, strict=True):
        assert g.group_size == w.group_size and g.shape == w.shape
        np.testing.assert_array_equal(g.q, w.q)
        np.testing.assert_array_equal(g.scales, w.scales)
    ids = np.random.default_rng(1).integers(0, want.config.vocab_size, size=(2, 7))
    if name == "bert":
        am, tt = np.ones_like(ids), np.zeros_like(ids)
        got = back.logits(ids, attention_mask=am, token_type_ids=tt)
        np.testing.assert_allclose(got, want.forward(ids, am, tt), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(back.logits(ids), native_logits(want, ids), rtol=1e-6, atol=1e-6)


def test_export_of_a_quantized_model(tmp_path, files):
    """An already-quantized native model exports in QDQ form without quantize=; the same int8 tensors."""
    qmodel = quantize_model(model_of("llama"), "int8-g128")
    path = export_onnx(qmodel, tmp_path / "q.onnx")
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    b_path = files[("llama", "int8-g128")][1]
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(b_path)).graph.initializer}
    q_names = [n for n, v in a.items() if v.dtype == np.int8]
    assert q_names and all(np.array_equal(a[n], b[n]) for n in q_names)
    with pytest.raises(ValueError, match="already quantized"):
        export_onnx(qmodel, tmp_path / "x.onnx", quantize="int8")
    with pytest.raises(ValueError, match="quantize mode must be one of"):
        export_onnx(model_of("gpt2"), tmp_path / "x.onnx", quantize="int4")


def test_executor_runs_the_qdq_file(files):
    """rawformer's own graph executor runs the QDQ file (both forms) and agrees with onnxruntime."""
    for mode in MODES:
        _, path = files[("llama", mode)]
        ex = load(path, device="cpu", native=False)
        assert ex.path_taken == "executor"
        ids = np.random.default_rng(2).integers(0, 47, size=(2, 5))
        sess = ort.InferenceSession(str(path), ort_session_options(), providers=["CPUExecutionProvider"])
        assert rel(ex.logits(ids), sess.run(None, {"input_ids": ids})[0]) < RTOL


@pytest.mark.parametrize("opset", [17, 19])
def test_float16_file_round_trip(tmp_path, opset):
    """A float16 QDQ file: float16 scales from opset 19 (DequantizeLinear-19), float32 scales + a Cast to
    float16 before; either way the int8 values and scales come back bit-identical, and onnxruntime runs it."""
    model = init_random(CONFIGS["gpt2"], seed=5, std=0.2)
    path = export_onnx(model, tmp_path / "h.onnx", quantize="int8", dtype=np.float16, opset=opset)
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    scale_type = onnx.TensorProto.FLOAT16 if opset >= 19 else onnx.TensorProto.FLOAT
    assert dq and all(inits[n.input[1]].data_type == scale_type for n in dq)
    sess = ort.InferenceSession(str(path), ort_session_options(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(6).integers(0, 53, size=(2, 5))
    quantized = quantize_model(model, "int8")  # the model the file was exported from, quantized once
    assert rel(sess.run(None, {"input_ids": ids})[0], native_logits(quantized, ids)) < 2e-2
    back = load(path, device="cpu")
    assert back.path_taken == "native" and back.model.quantization == "int8"
    for g, w in zip(qweights(back.model), qweights(quantized), strict=True):
        np.testing.assert_array_equal(g.q, w.q)
        np.testing.assert_array_equal(g.scales, w.scales)


def test_scales_that_are_not_float16_stay_float(tmp_path):
    """A QDQ file whose scales are not float16 values imports as float weights (no requantization): the
    native path still, unquantized, and equal to the file's dequantized math."""
    path = export_onnx(model_of("llama"), tmp_path / "q.onnx", quantize="int8")  # (GPT-2 cannot: its head
    # must be the table or an int8 copy of it)
    proto = onnx.load(str(path))
    for t in proto.graph.initializer:
        if t.name.endswith("_scale"):
            s = onnx.numpy_helper.to_array(t) * np.float32(1 + 2**-20)  # between two float16 values
            t.CopyFrom(onnx.numpy_helper.from_array(s.astype(np.float32), t.name))
    odd = tmp_path / "odd.onnx"
    onnx.save_model(proto, str(odd))
    back = load(odd, device="cpu")
    assert back.path_taken == "native" and getattr(back.model, "quantization", None) is None
    ids = np.random.default_rng(4).integers(0, 47, size=(2, 5))
    sess = ort.InferenceSession(str(odd), ort_session_options(), providers=["CPUExecutionProvider"])
    assert rel(sess.run(None, {"input_ids": ids})[0], back.logits(ids)) < RTOL


def test_cli_export_quantize(tmp_path, capsys):
    from rawformer.cli import main

    out = tmp_path / "tiny-int8.onnx"
    args = ["export", "--random", "gpt2-tiny-bytes", "--out", str(out), "--quantize", "int8", "--verify"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "int8 QDQ" in text and "(ok)" in text
    back = load(out, device="cpu")
    assert back.path_taken == "native" and back.model.quantization == "int8"
    # an INT8 file exports again as it is (the same int8 values), and refuses another mode
    again = tmp_path / "again.onnx"
    assert main(["export", "--model", str(out), "-o", str(again), "--verify"]) == 0
    assert "int8 QDQ" in capsys.readouterr().out
    assert main(["export", "--model", str(out), "-o", str(again), "--quantize", "int8-g128"]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_qdq_file_on_the_gpu(files, cp, name, mode):
    """A QDQ file loaded on the GPU (float16): CuPy QuantizedWeights with the file's int8 values, outputs
    within float16 tolerance of the CPU (float64 reference) import."""
    _, path = files[(name, mode)]
    gpu = load(path, device="gpu", dtype=np.float16)
    cpu = load(path, device="cpu")
    assert gpu.path_taken == "native" and gpu.model.quantization == mode
    for g, c in zip(qweights(gpu.model), qweights(cpu.model), strict=True):
        np.testing.assert_array_equal(cp.asnumpy(g.q), c.q)
        np.testing.assert_array_equal(cp.asnumpy(g.scales), c.scales)
    ids = np.random.default_rng(5).integers(0, cpu.config.vocab_size, size=(2, 7))
    if name == "bert":
        am, tt = np.ones_like(ids), np.zeros_like(ids)
        got = cp.asnumpy(gpu.logits(ids, attention_mask=am, token_type_ids=tt))
        want = cpu.logits(ids, attention_mask=am, token_type_ids=tt)
    else:
        got, want = cp.asnumpy(gpu.logits(ids)), cpu.logits(ids)
    assert np.isfinite(got).all() and rel(got, want) < 2e-2


def test_external_data_round_trip(tmp_path):
    """int8 initializers in the external data file come back bit-identical too."""
    model = model_of("llama")
    path = export_onnx(model, tmp_path / "ext.onnx", quantize="int8-g128", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > path.stat().st_size
    back = load(path, device="cpu")
    assert back.path_taken == "native" and back.model.quantization == "int8-g128"
    for g, w in zip(qweights(back.model), qweights(quantize_model(model, "int8-g128")), strict=True):
        np.testing.assert_array_equal(g.q, w.q)
        np.testing.assert_array_equal(g.scales, w.scales)
