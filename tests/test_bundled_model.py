"""The bundled model (models/stdlib-gpt.onnx, the package's rawformer.models folder) on the CPU: it loads on
the native path with the byte tokenizer, generates deterministic Python-looking text that the file run in
onnxruntime agrees with, and `rawformer eval` reproduces the held-out loss its card (models/stdlib-gpt.md)
states for this machine's stdlib."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from rawformer.export.tokenizer import ByteTokenizer

import rawformer
from rawformer.commands._model import bundled_model, tokenizer_for

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL = MODELS / "stdlib-gpt.onnx"
CARD = MODELS / "stdlib-gpt.md"
PROMPT = "def "


@pytest.fixture(scope="module")
def loaded():
    return rawformer.load(MODEL, device="cpu")


def test_file_is_small_and_the_package_finds_it():
    assert MODEL.stat().st_size <= 10_000_000
    assert (MODELS / "stdlib-gpt.json").is_file() and CARD.is_file()
    found = bundled_model()
    assert found is not None and found.name == MODEL.name  # the editable install's models/ folder


def test_loads_on_the_native_path_with_the_byte_tokenizer(loaded):
    assert loaded.path_taken == "native" and loaded.family == "gpt2" and loaded.reason is None
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (257, 256, 192, 5, 3)
    assert cfg.gelu_approximate == "tanh"
    assert isinstance(tokenizer_for(MODEL, loaded.model.vocab_size), ByteTokenizer)
    assert loaded.model.dtype == np.float32  # the file stores float32; the CPU keeps it


def test_greedy_text_is_deterministic_python_and_matches_onnxruntime(loaded):
    ort = pytest.importorskip("onnxruntime")
    tok = ByteTokenizer()
    first = loaded.generate(PROMPT, max_new_tokens=200, tokenizer=tok, stop="\n\n").results[0]
    again = loaded.generate(PROMPT, max_new_tokens=200, tokenizer=tok, stop="\n\n").results[0]
    assert first.token_ids == again.token_ids
    # it stops at the blank line that ends the function, well before the token budget
    assert first.finish_reason == "stop_string" and 16 <= len(first.token_ids) < 200
    text = first.text
    assert isinstance(text, str) and "\ufffd" not in text and text.isascii()
    assert all(t < ByteTokenizer.EOT for t in first.token_ids)  # bytes, no end-of-text inside
    code = PROMPT + text
    assert re.match(r"def \w+\(.*\):\n", code), code  # a def line, then an indented body
    assert all(line.startswith("    ") for line in code.splitlines()[1:] if line), code
    # the same greedy tokens from the file itself, run in onnxruntime over the whole sequence each step
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    seq = tok.encode(PROMPT)
    for want in first.token_ids[:48]:
        logits = sess.run(None, {"input_ids": np.asarray([seq], dtype=np.int64)})[0]
        got = int(np.argmax(logits[0, -1]))
        assert got == want
        seq.append(got)


def test_numpy_eval_path_matches_the_training_model():
    """`rawformer eval`'s float32 NumPy forward against the training model over rawformer's ops (float64
    references on the CPU) on a few held-out windows."""
    from rawformer.commands.eval import gpt2_loss_numpy, load_eval_model
    from rawformer.training.data import eval_batches, load_corpus
    from rawformer.training.model import model_class

    ev = load_eval_model(MODEL, None)
    t = ev["train_config"]
    assert (t.seq_len, t.batch_size, t.eval_batches, t.held_out_fraction) == (256, 64, 8, 0.05)
    assert t.data == "stdlib" and t.data_seed == 1
    corpus = load_corpus(t.data, held_out_fraction=t.held_out_fraction)
    x, y = next(eval_batches(corpus.held_out, 256, 3, 1))
    cfg = ev["model_config"]
    model = model_class(cfg)(cfg, {k: np.asarray(v, np.float32) for k, v in ev["weights"].items()})
    want = float(model.loss(x, y).item())
    got = gpt2_loss_numpy(cfg, ev["weights"], x, y, rows=2) / y.size
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)


def _card_cpu_number() -> tuple[float, int, str]:
    """(held-out loss, held-out crc32, python version) of the card's CPU reproduction line."""
    m = re.search(
        r"CPU held-out loss: ([0-9.]+) \(python ([0-9.]+), held-out crc32 (\d+)\)", CARD.read_text("utf-8")
    )
    assert m, "the card has no 'CPU held-out loss: X (python V, held-out crc32 C)' line"
    return float(m.group(1)), int(m.group(3)), m.group(2)


def test_eval_reproduces_the_cards_cpu_number(capsys):
    from rawformer.commands import eval as eval_cmd

    want, crc, version = _card_cpu_number()
    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "stdlib-gpt", "--json", "--device", "cpu"])  # by name, as documented
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["checkpoint"]).name == MODEL.name and result["impl"] == "numpy"
    assert result["tokens"] == 8 * 64 * 256
    if result["held_out_crc32"] != crc:
        pytest.skip(
            f"this interpreter's stdlib (python {result['python']}, held-out crc32 "
            f"{result['held_out_crc32']}) is not the card's (python {version}, crc32 {crc}): other files"
        )
    assert result["held_out_loss"] == pytest.approx(want, rel=1e-3)
