"""The `rawformer` command: the dispatcher, every command's help, plan's numbers, generate / bench / demo on a
random tiny byte-level GPT-2, the model demo in-process, and `rawformer serve` as a real process."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from rawformer.export.tokenizer import ByteTokenizer
from rawformer.models import GPT2Config, init_random

from rawformer import cli, demo
from rawformer.commands import COMMANDS, plan
from rawformer.commands._model import preset_config


def test_dispatcher_lists_the_installed_commands(capsys):
    names = cli.available()
    assert {"info", "generate", "serve", "bench", "plan", "demo"} <= set(names)
    assert names == [c for c in COMMANDS if c in names]  # in the documented order
    with pytest.raises(SystemExit) as e:
        cli.main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(n in out for n in names) and "start here" in out
    for name in names:  # every command teaches: a description and, for the model ones, examples
        with pytest.raises(SystemExit):
            cli.main([name, "-h"])
        text = capsys.readouterr().out
        assert text.startswith("usage: rawformer " + name)
        if name in ("generate", "serve", "bench", "plan", "demo"):
            assert "examples:" in text


def test_plan_numbers_from_the_config():
    cfg = preset_config("llama-1b")  # 22 layers, 4 kv heads x 64
    budget = 10 * 2**30
    rows = {r["cache"]: r for r in plan.plan(cfg, budget, 16, [512, 2048])}
    fp16 = 2 * 22 * 4 * 64 * 2
    assert rows["fp16"]["token_bytes"] == fp16 and rows["int8"]["token_bytes"] == 2 * 22 * 4 * 66
    assert rows["mla"]["token_bytes"] == 22 * (512 + 64) * 2 and "hypothetical" in rows["mla"]["note"]
    blocks = budget // (fp16 * 16)
    assert rows["fp16"]["blocks"] == blocks
    assert rows["fp16"]["max_seqs"] == {512: blocks // 32, 2048: blocks // 128}
    assert rows["fp16"]["contiguous_seqs"] == budget // (fp16 * 2048)
    # weights from the config: the 1.1B model in fp16
    assert 2.0e9 < plan.weight_bytes(cfg, 2) < 2.3e9
    # an MLA config: the latent row is the planner's, the fp16 row every head's K and V
    from rawformer.models import DeepseekV2Config

    from rawformer.memory import planner

    ds = DeepseekV2Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, q_lora_rank=None, n_routed_experts=None,
        intermediate_size=96, max_position_embeddings=256,
    )  # fmt: skip
    rows = {r["cache"]: r for r in plan.plan(ds, budget, 16, [256])}
    assert rows["mla"]["token_bytes"] == planner.kv_bytes_per_token(ds) == 3 * (32 + 8) * 2
    assert rows["fp16"]["token_bytes"] == planner.mha_bytes_per_token(ds) == 3 * 4 * (24 + 12) * 2
    assert rows["int8"]["token_bytes"] == 3 * 4 * (24 + 2 + 12 + 2)


def test_plan_command_output(capsys, tmp_path):
    cfg = {
        "model_type": "gpt2",
        "n_layer": 3,
        "n_head": 2,
        "n_embd": 64,
        "n_positions": 256,
        "vocab_size": 300,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["plan", "--config", str(tmp_path), "--kv-budget", "0.01", "--contexts", "100,256"]) == 0
    out = capsys.readouterr().out
    tb = 2 * 3 * 2 * 32 * 2
    blocks = int(0.01 * 2**30) // (tb * 16)
    line = next(ln for ln in out.splitlines() if ln.startswith("fp16"))
    assert line.split()[1:6] == [str(tb), str(blocks), str(blocks * 16), str(blocks // 7), str(blocks // 16)]
    assert cli.main(["plan", "--config", str(tmp_path), "--kv-budget", "0.01", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["blocks"] == blocks and data["kv_budget_bytes"] == int(0.01 * 2**30)
    assert cli.main(["plan"]) == 1  # no config: a clear error, not a traceback
    assert "--preset" in capsys.readouterr().err


def test_generate_bench_and_demo_commands(capsys):
    args = ["--random", "gpt2-tiny-bytes", "--device", "cpu"]
    assert cli.main(["generate", *args, "Hello", "--max-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Hello") and "(5 tokens, length)" in cap.err
    assert cli.main(["generate", *args, "Hi", "--max-tokens", "4", "--stream", "--temperature", "0.9"]) == 0
    assert (
        cli.main(
            ["bench", *args, "--requests", "6", "--prompt-len", "2,9", "--new-tokens", "2,6", "--static"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        re.search(r"continuous .* tokens/s", out) and "static" in out and "6/6 requests with identical" in out
    )
    assert cli.main(["demo", *args, "--max-tokens", "6", "--prompt", "ab", "--prompt", "cd"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "KV cache: peak" in out and "paged_attention" in out
    assert cli.main(["demo", "--ops", "--rows", "5", "--cols", "17"]) == 0
    assert "softmax" in capsys.readouterr().out
    assert cli.main(["generate", "--model", "/nonexistent/model.onnx", "x"]) == 1


def test_model_demo_streams_and_reports():
    model = init_random(GPT2Config(vocab_size=257, n_positions=128, n_embd=32, n_layer=2, n_head=4), 1,
                        np.float32, np, std=0.3)  # fmt: skip
    buf = io.StringIO()
    res = demo.run_model(model, ByteTokenizer(), ["one", "two", "three"], 10, stagger=2, out=buf)
    text = buf.getvalue()
    assert res["generated"] == 30 and res["tokens_per_s"] > 0
    assert 0 < res["kv_peak_bytes"] < res["kv_contiguous_bytes"]
    assert {"gemm", "kv_write", "paged_attention", "attention", "layer_norm"} <= set(res["ops"])
    for i, p in enumerate(["one", "two", "three"]):
        assert f"[{i}] {p!r} -> " in text
    # the ops are unwrapped again afterwards
    import rawformer as rf
    from rawformer import ops

    assert rf.softmax is ops.softmax and rf.paged_attention is ops.paged_attention


def test_serve_command_runs_a_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawformer", "serve", "--random", "gpt2-tiny-bytes", "--device", "cpu",
         "--port", "0", "--name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        end = time.monotonic() + 60
        while time.monotonic() < end and "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"no 'serving' line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        base = f"http://127.0.0.1:{m.group(1)}"
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
        body = json.dumps({"prompt": "Hi", "max_tokens": 4, "temperature": 0, "model": "tiny"}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as r:
            data = json.load(r)
        assert data["model"] == "tiny" and data["usage"]["completion_tokens"] <= 4
        assert not math.isnan(data["created"])
    finally:
        proc.terminate()
        proc.wait(10)
