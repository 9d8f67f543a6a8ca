"""`rawformer.load(..., quantize=...)` and `--quantize` on the model commands: weight-only INT8 applied to the
native model after it is built (models.quantize_model), for ONNX files and checkpoint directories; clear
errors for the executor path, models without a quantization plan, unknown modes and double quantization."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
st = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install 'rawformer[hf]'")
from rawformer.export.onnx_export import export_onnx  # noqa: E402
from rawformer.export.onnx_import import native_logits  # noqa: E402
from rawformer.models import (  # noqa: E402  # noqa: E402
    BertConfig,
    DeepseekV2Config,
    GPT2Config,
    LlamaConfig,
    deepseek,
    init_random,
    llama,
)
from rawformer.models.common import random_weights  # noqa: E402
from rawformer.models.quantize import quantize_model  # noqa: E402
from test_loading import write_dir  # noqa: E402

from rawformer import cli  # noqa: E402
from rawformer.loading import load  # noqa: E402
from rawformer.ops.quant import QuantizedWeight  # noqa: E402

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=41, n_positions=16, n_embd=136, n_layer=1, n_head=4, n_inner=72),
    "llama": LlamaConfig(
        vocab_size=37,
        hidden_size=144,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),  # fmt: skip
    "bert": BertConfig(
        vocab_size=29,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=16,
    ),  # fmt: skip
}


def quantized_matrices(model):
    blocks = model.layers if model.config.model_type == "bert" else model.blocks
    out = [v[0] if isinstance(v, tuple) else v for b in blocks for v in vars(b).values()]
    return [w for w in out if isinstance(w, QuantizedWeight)]


def outputs(model, ids):
    if model.config.model_type == "bert":
        return model.forward(ids, np.ones_like(ids), np.zeros_like(ids))
    return native_logits(model, ids)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    return {
        name: export_onnx(init_random(cfg, seed=3, std=0.2), d / f"{name}.onnx")
        for name, cfg in CONFIGS.items()
    }


@pytest.mark.parametrize("mode", ["int8", "int8-g128"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_onnx_with_quantize(onnx_files, name, mode):
    """load(float.onnx, quantize=mode) == quantize_model(the same model, mode): int8 values and outputs."""
    got = load(onnx_files[name], device="cpu", quantize=mode)
    assert got.path_taken == "native" and got.model.quantization == mode
    want = quantize_model(init_random(CONFIGS[name], seed=3, std=0.2), mode)
    gw, ww = quantized_matrices(got.model), quantized_matrices(want)
    assert len(gw) == len(ww) == (4 if name != "llama" else 5)
    for g, w in zip(gw, ww, strict=True):
        assert g.group_size == (None if mode == "int8" else 128)
        np.testing.assert_array_equal(g.q, w.q)
        np.testing.assert_array_equal(g.scales, w.scales)
    ids = np.random.default_rng(0).integers(0, CONFIGS[name].vocab_size, size=(2, 5))
    np.testing.assert_allclose(outputs(got.model, ids), outputs(want, ids), rtol=1e-6, atol=1e-6)
    # and the float load stays float
    assert getattr(load(onnx_files[name], device="cpu").model, "quantization", None) is None


def test_load_checkpoint_dir_with_quantize(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 37, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "tie_word_embeddings": False}  # fmt: skip
    w = random_weights(llama.weight_shapes(LlamaConfig.from_dict(cfg)), 1, np.float32, np, 0.3)
    write_dir(tmp_path, cfg, w)
    got = load(tmp_path, device="cpu", quantize="int8")
    assert got.path_taken == "hf" and got.model.quantization == "int8"
    assert type(got.model.lm_head).__name__ == "QuantizedWeightT"  # the untied head too
    want = quantize_model(load(tmp_path, device="cpu").model, "int8")
    ids = np.random.default_rng(1).integers(0, 37, size=(1, 6))
    np.testing.assert_allclose(native_logits(got.model, ids), native_logits(want, ids), rtol=1e-6, atol=1e-6)


def test_no_quantization_plan(tmp_path):
    """DeepSeek-V2 (MLA + MoE) has no quantization plan: a ValueError naming it, not a half-quantized
    model."""
    cfg = {"model_type": "deepseek_v2", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48,
           "moe_intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "q_lora_rank": None,
           "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
           "n_routed_experts": None, "n_shared_experts": None, "num_experts_per_tok": None}  # fmt: skip
    w = random_weights(deepseek.weight_shapes(DeepseekV2Config.from_dict(cfg)), 1, np.float32, np, 0.3)
    write_dir(tmp_path, cfg, w)
    assert load(tmp_path, device="cpu").path_taken == "hf"  # it loads unquantized
    with pytest.raises(ValueError, match="DeepseekV2Model has no quantization plan"):
        load(tmp_path, device="cpu", quantize="int8")


def test_quantize_errors(onnx_files, tmp_path):
    path = onnx_files["gpt2"]
    with pytest.raises(ValueError, match="quantize mode must be one of int8, int8-g128"):
        load(path, device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="needs the native path; native=False"):
        load(path, device="cpu", quantize="int8", native=False)
    # a graph that is not a known family runs in the executor: quantize is refused, saying why
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Cast", ["input_ids"], ["logits"], to=onnx.TensorProto.FLOAT)], "g",
        [h.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "sequence"])],
    )  # fmt: skip
    other = tmp_path / "other.onnx"
    onnx.save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(other))
    assert load(other, device="cpu").path_taken == "executor"
    with pytest.raises(ValueError, match="runs in the graph executor"):
        load(other, device="cpu", quantize="int8")
    # an INT8 (QDQ) file: its own mode again is fine, another one is refused
    qdq = export_onnx(init_random(CONFIGS["gpt2"], seed=3, std=0.2), tmp_path / "q.onnx", quantize="int8")
    assert load(qdq, device="cpu", quantize="int8").model.quantization == "int8"
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        load(qdq, device="cpu", quantize="int8-g128")


def test_commands_take_quantize(tmp_path, capsys):
    args = ["--random", "gpt2-tiny-bytes", "--device", "cpu", "--quantize", "int8"]
    assert cli.main(["generate", *args, "Hello", "--max-tokens", "4"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Hello") and "(4 tokens, length)" in cap.err
    assert cli.main(["bench", *args, "--requests", "2", "--prompt-len", "2,4", "--new-tokens", "2,3"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    # a model file: quantized at load (the byte-level vocabulary gets the ByteTokenizer)
    path = export_onnx(init_random(GPT2Config(vocab_size=257, n_positions=32, n_embd=32, n_layer=1, n_head=2),
                                   seed=1, std=0.3), tmp_path / "bytes.onnx")  # fmt: skip
    assert cli.main(["generate", "--model", str(path), "--device", "cpu", "--quantize", "int8-g128", "ab",
                     "--max-tokens", "3"]) == 0  # fmt: skip
    assert "(3 tokens, length)" in capsys.readouterr().err
    for name in ("serve", "generate", "bench"):
        with pytest.raises(SystemExit):
            cli.main([name, "-h"])
        assert "--quantize {int8,int8-g128}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["generate", *args[:-1], "int4", "x"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int8-g128"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_load_quantize_on_the_gpu(onnx_files, cp, name, mode):
    """load(..., quantize=mode) on the GPU in float16: CuPy QuantizedWeights, logits within float16
    tolerance of the CPU quantized model, and greedy tokens that mostly agree."""
    gpu = load(onnx_files[name], device="gpu", dtype=np.float16, quantize=mode)
    cpu = load(onnx_files[name], device="cpu", quantize=mode)
    assert gpu.model.quantization == mode
    assert all(cp.get_array_module(w.q) is cp for w in quantized_matrices(gpu.model))
    ids = np.random.default_rng(2).integers(0, CONFIGS[name].vocab_size, size=(2, 7))
    got, want = cp.asnumpy(gpu.logits(ids)).astype(np.float64), cpu.logits(ids)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2
