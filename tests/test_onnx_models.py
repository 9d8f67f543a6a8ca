"""The committed ONNX fixtures (tests/fixtures/onnx, made by make_fixtures.py with torch.onnx's dynamo
exporter and onnxruntime) through rawformer.load: the native path (structure recognised, weights imported)
and the graph executor, against onnxruntime's outputs stored beside them; greedy 20-token generations against
onnxruntime-driven greedy decoding. CPU float32 within 1e-4 relative; GPU float16 tests marked gpu."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
from rawformer.export.onnx_executor import OnnxExecutor  # noqa: E402
from rawformer.export.onnx_file import read_onnx  # noqa: E402
from rawformer.export.onnx_import import NotRecognised, match_structure, native_logits, recognise  # noqa: E402
from rawformer.models import BertModel, GPT2Model, LlamaModel  # noqa: E402

from rawformer.loading import load  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "onnx"
DECODERS = {"gpt2": GPT2Model, "llama": LlamaModel}
RTOL = 1e-4  # relative to the largest |reference| value
FP16_RTOL = 2e-2


def fixture(name):
    return FIXTURES / f"{name}.onnx", dict(np.load(FIXTURES / f"{name}.npz"))


def rel_err(got, ref, rows=None):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert not np.isnan(got).any()
    d = np.abs(got - ref)
    if rows is not None:
        d = d[rows]
    return float(d.max() / np.abs(ref).max())


def bert_inputs(z):
    return {k: z[k] for k in ("attention_mask", "token_type_ids")}


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt2_o2", "llama_o2"])
@pytest.mark.parametrize("native", [None, False])
def test_decoder_logits_and_greedy(name, native):
    """The dynamo exports and their onnxruntime-optimized forms (SkipLayerNormalization + FastGelu,
    SimplifiedLayerNormalization + SkipSimplifiedLayerNormalization), both paths."""
    path, z = fixture(name)
    m = load(path, native=native, device="cpu")
    assert m.path_taken == ("native" if native is None else "executor")
    if native is None:
        family = name.split("_")[0]
        assert isinstance(m.model, DECODERS[family]) and m.family == family
        assert m.reason is None
    else:
        assert isinstance(m.model, OnnxExecutor) and m.reason == "native=False"
    assert rel_err(m.logits(z["input_ids"]), z["logits"]) < RTOL
    out = m.generate(z["prompt"], 20)
    assert [list(t) for t in out.token_ids] == z["greedy"].tolist()


@pytest.mark.parametrize("native", [None, False])
def test_bert(native):
    path, z = fixture("bert")
    m = load(path, native=native, device="cpu")
    assert m.path_taken == ("native" if native is None else "executor")
    h = m.logits(z["input_ids"], **bert_inputs(z))
    real = z["attention_mask"].astype(bool)  # padded rows of a padded sequence carry no meaning
    assert rel_err(h, z["last_hidden_state"], real) < RTOL
    if native is None:
        assert isinstance(m.model, BertModel)
        e = m.embed(z["input_ids"], z["attention_mask"], z["token_type_ids"])
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("native", [None, False])
def test_optimum_o2_fused_bert(native):
    """The onnxruntime-optimized file (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu)
    is recognised too (its fused nodes carry the weights), and runs in the executor."""
    path, z = fixture("bert_o2")
    ops = {(n.domain, n.op_type) for n in read_onnx(path).nodes}
    fused = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu")
    assert {("com.microsoft", t) for t in fused} <= ops
    m = load(path, native=native, device="cpu")
    assert m.path_taken == ("native" if native is None else "executor")
    h = m.logits(z["input_ids"], **bert_inputs(z))
    assert rel_err(h, z["last_hidden_state"], z["attention_mask"].astype(bool)) < RTOL
    if native is None:
        plain, _ = recognise(read_onnx(FIXTURES / "bert.onnx"))
        assert m.config == plain  # the same model as the unfused export


def test_unrecognised_graph_falls_back(tmp_path):
    """The config is read from the graph: the fused file with num_heads=2 imports as a 2-head model (and the
    probe confirms it computes the same). A graph of no family (GPT-2 with its Softmax turned into a
    Sigmoid) runs in the executor, and native=True says why not."""
    import onnx

    p = onnx.load(str(FIXTURES / "bert_o2.onnx"))
    for n in p.graph.node:
        for a in n.attribute:
            if a.name == "num_heads":
                a.i = 2
    onnx.save(p, str(tmp_path / "x.onnx"))
    m = load(tmp_path / "x.onnx", device="cpu")
    assert m.path_taken == "native" and m.config.num_attention_heads == 2
    p = onnx.load(str(FIXTURES / "gpt2.onnx"))
    softmaxes = [n for n in p.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for n in softmaxes:
        n.op_type = "Sigmoid"
        del n.attribute[:]
    onnx.save(p, str(tmp_path / "y.onnx"))
    m = load(tmp_path / "y.onnx", device="cpu")
    assert m.path_taken == "executor" and "not GPT-2, Llama or BERT" in m.reason
    with pytest.raises(NotRecognised, match="not GPT-2, Llama or BERT"):
        load(tmp_path / "y.onnx", native=True, device="cpu")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bert_o2", "gpt2_o2", "llama_o2"])
def test_executor_float16_weights(name):
    """The executor's float16 mode (what the GPU runs) on the CPU: weights in float16, float32 where the
    graph casts up (rotary tables, masks), mixed arithmetic in float32, products in float16."""
    path, z = fixture(name)
    ex = OnnxExecutor(path, dtype=np.float16)
    assert all(a.dtype == np.float16 for a in ex.constants.values() if a.dtype.kind == "f" and a.size >= 64)
    out = ex.run({n: z[n] for n in ex.input_names})[ex.output_names[0]]
    ref = z["logits"] if "logits" in z else z["last_hidden_state"]
    rows = z["attention_mask"].astype(bool) if "attention_mask" in z else None
    assert rel_err(out, ref, rows) < FP16_RTOL


def test_recognised_configs():
    cfg, _ = recognise(read_onnx(FIXTURES / "llama.onnx"))
    assert (cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 8, 10000.0)
    assert not cfg.tie_word_embeddings
    cfg, _ = recognise(read_onnx(FIXTURES / "gpt2.onnx"))
    assert (cfg.n_head, cfg.n_layer, cfg.n_positions, cfg.activation_function) == (4, 2, 64, "gelu_new")
    cfg, _ = recognise(read_onnx(FIXTURES / "bert.onnx"))
    assert (cfg.num_attention_heads, cfg.type_vocab_size, cfg.hidden_act) == (4, 2, "gelu")


def test_structure_not_names(tmp_path):
    """Renaming every initializer and node does not change recognition (nothing reads names)."""
    import onnx

    p = onnx.load(str(FIXTURES / "gpt2.onnx"))
    ren = {t.name: f"t{i}" for i, t in enumerate(p.graph.initializer)}
    for t in p.graph.initializer:
        t.name = ren[t.name]
    for i, n in enumerate(p.graph.node):
        n.name = f"node{i}"
        for j, x in enumerate(n.input):
            n.input[j] = ren.get(x, x)
    onnx.save(p, str(tmp_path / "anon.onnx"))
    assert match_structure(read_onnx(tmp_path / "anon.onnx")).family == "gpt2"


def test_verification_rejects_a_wrong_variant(tmp_path):
    """Different numbers in the same structure still import; a variant the native model cannot express (an
    lm head not tied to the embedding) is caught by the probe and falls back to the executor."""
    import onnx

    p = onnx.load(str(FIXTURES / "gpt2.onnx"))
    for t in p.graph.initializer:
        if t.name.endswith("ln_f.bias"):
            t.raw_data = (np.frombuffer(t.raw_data, np.float32) + 1).astype(np.float32).tobytes()
    onnx.save(p, str(tmp_path / "g.onnx"))
    assert load(tmp_path / "g.onnx", device="cpu").path_taken == "native"
    # the lm head no longer tied to the embedding (GPT2Model ties them): structure fits, numbers do not
    p = onnx.load(str(FIXTURES / "gpt2.onnx"))
    for t in p.graph.initializer:
        if list(t.dims) == [32, 97]:  # the head, stored transposed
            t.raw_data = (np.frombuffer(t.raw_data, np.float32) * 1.5).astype(np.float32).tobytes()
    onnx.save(p, str(tmp_path / "untied.onnx"))
    m = load(tmp_path / "untied.onnx", device="cpu")
    assert m.path_taken == "executor" and "not tied" in m.reason
    with pytest.raises(NotRecognised, match="not tied"):
        load(tmp_path / "untied.onnx", native=True, device="cpu")


def test_executor_profile_and_shapes():
    path, z = fixture("llama")
    ex = OnnxExecutor(path, profile=True)
    for s in (1, 3, 11):  # dynamic sequence lengths, one executor
        out = ex.run(input_ids=np.tile(z["input_ids"][:1], 2)[:, :s])["logits"]
        assert out.shape == (1, s, 101)
    assert len(ex.timings) == len(ex.nodes)
    table = ex.profile_table()
    assert table["MatMul"][0] == 19 and all(t >= 0 for _, t in table.values())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.onnx", device="cpu")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither a .onnx file nor a checkpoint directory"):
        load(tmp_path / "x.txt", device="cpu")
    with pytest.raises(ValueError, match="native=False applies to ONNX files"):
        load(tmp_path, native=False, device="cpu")


# ---- GPU: float16 through both paths -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt2_o2", "llama_o2"])
@pytest.mark.parametrize("native", [None, False])
def test_decoder_gpu_fp16(name, native):
    path, z = fixture(name)
    m = load(path, native=native, dtype="float16", device="gpu")
    assert m.path_taken == ("native" if native is None else "executor")
    lg = m.logits(z["input_ids"])
    assert rel_err(lg.get() if hasattr(lg, "get") else lg, z["logits"]) < FP16_RTOL
    m32 = load(path, native=native, dtype="float32", device="gpu")
    lg32 = m32.logits(z["input_ids"])
    assert rel_err(lg32.get() if hasattr(lg32, "get") else lg32, z["logits"]) < 1e-3
    out = m32.generate(z["prompt"], 20)
    assert [list(t) for t in out.token_ids] == z["greedy"].tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bert", "bert_o2"])
@pytest.mark.parametrize("native", [None, False])
def test_bert_gpu_fp16(name, native):
    path, z = fixture(name)
    m = load(path, native=native, dtype="float16", device="gpu")
    h = m.logits(z["input_ids"], **bert_inputs(z))
    h = h.get() if hasattr(h, "get") else h
    assert rel_err(h, z["last_hidden_state"], z["attention_mask"].astype(bool)) < FP16_RTOL


def test_graph_with_kv_cache_inputs_runs_with_an_empty_cache(tmp_path):
    """Files exported with a KV cache (optimum's with-past decoders) take past_key_values.* inputs: the
    executor path feeds an empty cache (past length 0) and runs the whole sequence."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb, head = (
        rng.standard_normal((11, 8)).astype(np.float32),
        rng.standard_normal((8, 11)).astype(np.float32),
    )
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("Reshape", ["x", "shape"], ["xh"]),
        helper.make_node("Transpose", ["xh"], ["k"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("MatMul", ["x", "head"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "with_past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 11]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", 4])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.asarray([0, 0, 2, 4], np.int64), "shape")],
    )  # fmt: skip
    path = tmp_path / "past.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    m = load(path, device="cpu")
    assert m.path_taken == "executor" and m.is_decoder
    ids = np.asarray([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(m.logits(ids), emb[ids] @ head, rtol=1e-6)
    assert len(m.generate(ids[:1], 3).token_ids[0]) == 3


def test_load_checkpoint_directory_goes_to_load_hf(tmp_path):
    """A Hugging Face checkpoint directory takes the load_hf path; logits and generate work the same way."""
    import json

    st = pytest.importorskip("safetensors.numpy", reason="needs safetensors")
    from rawformer.models import GPT2Config, gpt2, init_random
    from rawformer.models.common import random_weights

    cfg = GPT2Config(vocab_size=41, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    ref = init_random(cfg, seed=3, std=0.2)
    weights = {
        n: np.asarray(w) for n, w in random_weights(gpt2.weight_shapes(cfg), 3, np.float32, np, 0.2).items()
    }
    st.save_file({"transformer." + n: w for n, w in weights.items()}, str(tmp_path / "model.safetensors"))
    d = {"model_type": "gpt2", "vocab_size": 41, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2}
    (tmp_path / "config.json").write_text(json.dumps(d))
    m = load(tmp_path, device="cpu")
    assert m.path_taken == "hf" and m.family == "gpt2" and m.is_decoder
    ids = np.asarray([[1, 5, 9, 2]])
    np.testing.assert_allclose(m.logits(ids), native_logits(ref, ids), rtol=1e-6)
    assert len(m.generate(ids, 4).token_ids[0]) == 4
