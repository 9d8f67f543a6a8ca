"""Native models -> ONNX -> onnxruntime, for GPT-2, Llama (GQA, tied and untied) and BERT: the file passes
onnx.checker's full check, runs in onnxruntime with any batch and sequence, matches the native model within
1e-4 (float32), and loads back through rawformer.load onto the native path. External data and the
per-weight hook a quantising exporter plugs into."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'rawformer[onnx]'")
from rawformer.export.onnx_export import GraphBuilder, export_onnx  # noqa: E402
from rawformer.export.onnx_import import native_logits  # noqa: E402
from rawformer.models import BertConfig, GPT2Config, LlamaConfig, init_random, llama_inv_freq  # noqa: E402

from rawformer.loading import load  # noqa: E402

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=53, n_positions=32, n_embd=24, n_layer=2, n_head=3),
    "gpt2_erf": GPT2Config(
        vocab_size=29, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=20, activation_function="gelu"
    ),  # fmt: skip
    "llama": LlamaConfig(
        vocab_size=47,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
    ),  # fmt: skip
    "llama_tied": LlamaConfig(
        vocab_size=31,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
    ),  # fmt: skip
    "bert": BertConfig(
        vocab_size=31,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=32,
    ),  # fmt: skip
}
RTOL = 1e-4


def run_both(model, path, rng, batch=2, seq=6):
    """(onnxruntime output, native output, rows that count) on the same random inputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cfg = model.config
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq))
    if cfg.model_type == "bert":
        am = np.ones_like(ids)
        am[-1, seq // 2 + 1 :] = 0
        tt = (np.arange(seq)[None] >= seq // 3).astype(np.int64).repeat(batch, 0)
        got = sess.run(None, {"input_ids": ids, "attention_mask": am, "token_type_ids": tt})[0]
        return got, model.forward(ids, am, tt), am.astype(bool)
    return sess.run(None, {"input_ids": ids})[0], native_logits(model, ids), np.ones((batch, seq), bool)


def rel(a, b, rows):
    assert a.shape == b.shape
    return float(np.abs(np.asarray(a, np.float64) - b)[rows].max() / np.abs(b).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(tmp_path, name):
    rng = np.random.default_rng(3)
    model = init_random(CONFIGS[name], seed=5, std=0.2)
    path = export_onnx(model, tmp_path / f"{name}.onnx")  # runs checker.check_model(full_check=True)
    proto = onnx.load(str(path))
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version == 17
    assert all(n.domain == "" for n in proto.graph.node)
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert all(d == ["batch", "sequence"] for d in dims)
    for batch, seq in ((2, 6), (1, 1), (3, 11)):  # dynamic batch and sequence
        got, want, rows = run_both(model, path, rng, batch, seq)
        assert rel(got, want, rows) < RTOL
    back = load(path, device="cpu")  # the exported layout is recognised again
    assert back.path_taken == "native", back.reason
    assert back.config == model.config or name.startswith("llama")
    if name.startswith("llama"):
        c, b = model.config, back.config
        fields = ("num_attention_heads", "kv_heads", "rope_theta", "tie_word_embeddings", "attention_bias")
        assert [getattr(b, f) for f in fields] == [getattr(c, f) for f in fields]


@pytest.mark.parametrize("opset", [18, 20])
def test_later_opsets(tmp_path, opset):
    rng = np.random.default_rng(4)
    model = init_random(CONFIGS["llama"], seed=1, std=0.2)
    path = export_onnx(model, tmp_path / "m.onnx", opset=opset)
    got, want, rows = run_both(model, path, rng)
    assert rel(got, want, rows) < RTOL


def test_external_data(tmp_path):
    rng = np.random.default_rng(5)
    model = init_random(CONFIGS["gpt2"], seed=2, std=0.2)
    path = export_onnx(model, tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    got, want, rows = run_both(model, path, rng)
    assert rel(got, want, rows) < RTOL
    assert load(path, device="cpu").path_taken == "native"  # our reader follows the (checked) locations


def test_float16_file(tmp_path):
    model = init_random(CONFIGS["gpt2"], seed=2, std=0.2)
    path = export_onnx(model, tmp_path / "h.onnx", dtype=np.float16)
    t = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert t["wte.weight"] == onnx.TensorProto.FLOAT16


def test_builder_weight_hook(tmp_path):
    """A quantising exporter overrides GraphBuilder.weight per role; here: int8 + DequantizeLinear for every
    linear matrix (QDQ), the rest as is. The file checks and runs, close to the float model."""

    class Int8Builder(GraphBuilder):
        roles: list[str] = []

        def weight(self, name, array, role):
            self.roles.append(role)
            if role != "linear":
                return super().weight(name, array, role)
            w = np.asarray(array, np.float32)
            scale = np.float32(np.abs(w).max() / 127)
            q = self.tensor(name + "_q", np.round(w / scale).astype(np.int8))
            return self.op("DequantizeLinear", q, self.const(scale, np.float32), self.const(0, np.int8))

    model = init_random(CONFIGS["gpt2"], seed=2, std=0.2)
    b = Int8Builder()
    path = export_onnx(model, tmp_path / "q.onnx", builder=b)
    assert {"linear", "embedding", "norm", "bias"} <= set(b.roles)
    got, want, rows = run_both(model, path, np.random.default_rng(1))
    assert 0 < rel(got, want, rows) < 0.05
    # rawformer's executor runs the QDQ file too (the structure has no constant weights: not native)
    q = load(path, device="cpu")
    assert q.path_taken == "executor"
    ids = np.random.default_rng(2).integers(0, 53, size=(2, 5))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input_ids": ids})[0]
    assert rel(q.logits(ids), ref, np.ones((2, 5), bool)) < RTOL


def test_export_errors(tmp_path):
    with pytest.raises(TypeError, match="not a native model"):
        export_onnx(object(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(init_random(CONFIGS["gpt2"]), tmp_path / "x.onnx", opset=16)


def test_cli_export(tmp_path, capsys):
    from rawformer.cli import main

    out = tmp_path / "tiny.onnx"
    args = ["export", "--random", "gpt2-tiny-bytes", "--out", str(out), "--verify", "--opset", "18"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "(ok)" in text and out.is_file()
    # an exported file exports again (ONNX -> native -> ONNX)
    again = tmp_path / "again.onnx"
    assert main(["export", "--model", str(out), "-o", str(again), "--verify"]) == 0
    assert main(["export", "--model", str(tmp_path / "none.onnx"), "-o", str(again)]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_export_gpu_model(tmp_path, cp, name):
    """A model living on the GPU (CuPy weights, float32) exports the same file as its CPU twin."""
    cfg = CONFIGS[name]
    gpu = init_random(cfg, seed=5, std=0.2, xp=cp)
    cpu = init_random(cfg, seed=5, std=0.2)
    got, want, rows = run_both(cpu, export_onnx(gpu, tmp_path / "g.onnx"), np.random.default_rng(3))
    assert rel(got, want, rows) < RTOL


def test_scaled_rope_round_trip(tmp_path):
    """Llama 3 rope scaling: the exported inv_freq table is not theta's; the import keeps the graph's table
    (and the theta of its unscaled high frequencies) and stays on the native path."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}  # fmt: skip
    cfg = LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      rope_theta=5e5, rope_scaling=scaling)  # fmt: skip
    model = init_random(cfg, seed=2, std=0.2)
    path = export_onnx(model, tmp_path / "l3.onnx")
    back = load(path, device="cpu")
    assert back.path_taken == "native" and back.config.rope_theta == 5e5
    np.testing.assert_array_equal(back.model.inv_freq, model.inv_freq)
    assert not np.allclose(llama_inv_freq(back.config), model.inv_freq)  # the graph's table, not theta's
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 40))
    np.testing.assert_allclose(back.logits(ids), native_logits(model, ids), rtol=1e-5, atol=1e-5)
