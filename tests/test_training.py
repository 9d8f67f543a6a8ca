"""rawformer.training: schedule, tokenizer, corpus and sampler, AdamW and the loss scaler, the loop's exact
resume, atomic checkpoints under a crash, `rawformer eval` reproducing the loop's held-out loss, the
checkpoint loading into the native GPT-2, the data-parallel calls; on the GPU the first 20 steps against the
CPU backend and a float16 run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rawformer.export.tokenizer import ByteTokenizer
from rawformer.models.config import GPT2Config

from rawformer import autograd as ag
from rawformer.training import checkpoint as ckpt
from rawformer.training.amp import LossScaler, optimizer_step
from rawformer.training.config import TrainConfig
from rawformer.training.data import BatchSampler, eval_batches, load_corpus
from rawformer.training.loop import train
from rawformer.training.model import GPT
from rawformer.training.optim import AdamW, cosine_lr

TINY_MODEL = {
    "model_type": "gpt2",
    "vocab_size": 257,
    "n_positions": 32,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
}


def tiny_config(**changes) -> TrainConfig:
    base = dict(
        model=TINY_MODEL, data="stdlib", max_files=30, held_out_fraction=0.2, seq_len=32, batch_size=4,
        steps=12, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_batches=4, log_every=4, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def corpus():
    cfg = tiny_config()
    return load_corpus(cfg.data, held_out_fraction=cfg.held_out_fraction, max_files=cfg.max_files)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    """12 CPU steps with checkpoints at 6 and 12 (both kept)."""
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(checkpoint_every=6, keep_checkpoints=3), out, progress=False, corpus=corpus,
                    log=lambda _m: None)  # fmt: skip
    return out, summary


# ---- pieces ------------------------------------------------------------------------------------------------


def test_cosine_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [cosine_lr(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(9, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert cosine_lr(14, **kw) == 0.1 and cosine_lr(100, **kw) == 0.1
    values = [cosine_lr(s, **kw) for s in range(4, 14)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' + x  # ünïcode"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.decode([*ids[:3], 256, *ids[:3]], skip_special_tokens=False) == "def<|endoftext|>def"
    assert tok.decode([*ids[:3], 256]) == "def"
    assert tok.token_to_id("<|endoftext|>") == 256 and tok.vocab_size == 257
    batch, mask = tok(["ab", "abc"])
    assert batch.tolist() == [[97, 98, 256], [97, 98, 99]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def test_corpus_split_by_file(tmp_path):
    for i in range(40):
        sub = tmp_path / ("pkg" if i % 3 else "tests")
        sub.mkdir(exist_ok=True)
        (sub / f"m{i:02d}.py").write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "dep.py").write_text("installed = True\n")
    a = load_corpus(tmp_path, held_out_fraction=0.3)
    b = load_corpus(tmp_path, held_out_fraction=0.3)
    assert a.train_files + a.held_out_files == 40  # site-packages left out
    assert 0 < a.held_out_files < 40
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.held_out, b.held_out)
    held = bytes(a.held_out[a.held_out != 256].astype(np.uint8)).decode()
    train_text = bytes(a.train[a.train != 256].astype(np.uint8)).decode()
    assert not set(held.splitlines()) & set(train_text.splitlines())  # disjoint files
    assert np.count_nonzero(a.train == 256) == a.train_files  # one end-of-text per file
    c = load_corpus(tmp_path, held_out_fraction=0.3, skip_dirs=["tests"])
    assert c.train_files + c.held_out_files == 26


def test_sampler_state_resumes_the_stream():
    tokens = np.arange(1000, dtype=np.uint16) % 257
    s = BatchSampler(tokens, 16, 3, seed=5)
    s.next()
    state = json.loads(json.dumps(s.state()))  # it goes through a checkpoint's JSON metadata
    want = [s.next() for _ in range(3)]
    t = BatchSampler(tokens, 16, 3, seed=99)
    t.load(state)
    for (x, y), (x2, y2) in zip(want, [t.next() for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    windows = list(eval_batches(tokens, 16, 4, max_batches=2))
    assert [w[0].shape for w in windows] == [(4, 16), (4, 16)]
    assert windows[1][0][0, 0] == tokens[64]  # non-overlapping, stride seq_len


def test_adamw_decays_matrices_only():
    w = ag.Tensor(np.ones((3, 3)), requires_grad=True)
    b = ag.Tensor(np.ones(3), requires_grad=True)
    opt = AdamW({"w": w, "b": b}, lr=0.1, weight_decay=0.5)
    w.grad, b.grad = np.zeros((3, 3)), np.zeros(3)
    opt.step()
    np.testing.assert_allclose(w.data, 0.95)  # p (1 - lr wd), no gradient step
    np.testing.assert_array_equal(b.data, 1.0)
    assert opt.step_count == 1


def _fp16_model_and_optimizer():
    cfg = GPT2Config(**{k: v for k, v in TINY_MODEL.items() if k != "model_type"})
    model = GPT.create(cfg, seed=0, dtype=np.float16)
    return model, AdamW(model.parameters(), lr=1e-2)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_loss_scaler_skips_the_step_on_overflow():
    model, opt = _fp16_model_and_optimizer()
    assert opt.masters is not None and all(m.dtype == np.float32 for m in opt.masters.values())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 257, (2, 16)), rng.integers(0, 257, (2, 16))
    before = {n: p.data.copy() for n, p in model.params.items()}
    scaler = LossScaler(init_scale=2.0**40)  # the scaled float16 gradients overflow
    loss = model.loss(x, y, grad_scale=scaler.scale)
    loss.backward(scaler.scale)
    res = optimizer_step(opt, scaler, lr=1e-2, max_grad_norm=1.0)
    assert res.skipped and not math.isfinite(res.grad_norm)
    assert scaler.scale == 2.0**39 and scaler.skipped == 1 and opt.step_count == 0
    assert all(p.grad is None for p in model.params.values())
    for n, p in model.params.items():
        np.testing.assert_array_equal(p.data, before[n], err_msg=n)
    assert not any(np.any(m) for m in opt.exp_avg.values())
    # at a sane scale the same step goes through and moves the weights
    scaler = LossScaler(init_scale=2.0**10, growth_interval=1)
    model.loss(x, y, grad_scale=scaler.scale).backward(scaler.scale)
    res = optimizer_step(opt, scaler, lr=1e-2, max_grad_norm=1.0)
    assert not res.skipped and math.isfinite(res.grad_norm) and opt.step_count == 1
    assert scaler.scale == 2.0**11  # grown after growth_interval good steps
    assert not np.array_equal(model.params["h.0.attn.c_attn.weight"].data, before["h.0.attn.c_attn.weight"])
    np.testing.assert_array_equal(
        model.params["wte.weight"].data, opt.masters["wte.weight"].astype(np.float16)
    )


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_float16_training_recovers_from_a_huge_loss_scale(tmp_path, corpus):
    cfg = tiny_config(dtype="float16", steps=6, loss_scale=2.0**20)
    s = train(cfg, tmp_path, progress=False, corpus=corpus, log=lambda _m: None)
    assert s["skipped_steps"] >= 1  # the first steps overflow and are skipped, the scale backs off
    assert all(math.isfinite(v) for v in s["losses"]) and math.isfinite(s["held_out_loss"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["skipped"] and not log[-1]["skipped"]
    assert log[-1]["loss_scale"] < 2.0**20


# ---- the loop: resume, checkpoints, eval -------------------------------------------------------------------


def test_exact_resume(tiny_run, tmp_path, corpus):
    out, full = tiny_run
    assert full["steps"] == 12 and len(full["losses"]) == 12
    # a run that stopped after the step-6 checkpoint: only that checkpoint in its folder
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = out / "checkpoints" / "step-00000006"
    dst = resumed / "checkpoints" / src.name
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (resumed / "checkpoints" / "latest").write_text(src.name + "\n")
    again = train(tiny_config(checkpoint_every=6), resumed, resume=True, progress=False, corpus=corpus,
                  log=lambda _m: None)  # fmt: skip
    assert again["steps"] == 12 and again["steps_this_run"] == 6
    assert again["losses"] == full["losses"][6:]  # bit for bit on the CPU
    assert again["held_out_loss"] == full["held_out_loss"]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_exact_resume_with_float16_masters_and_loss_scale(tmp_path, corpus):
    cfg = tiny_config(dtype="float16", steps=4, checkpoint_every=2, keep_checkpoints=3, loss_scale=1024.0,
                      loss_scale_growth_interval=1)  # fmt: skip
    full = train(cfg, tmp_path / "a", progress=False, corpus=corpus, log=lambda _m: None)
    root = tmp_path / "b" / "checkpoints"
    root.mkdir(parents=True)
    src = tmp_path / "a" / "checkpoints" / "step-00000002"
    (root / src.name).mkdir()
    for f in src.iterdir():
        (root / src.name / f.name).write_bytes(f.read_bytes())
    (root / "latest").write_text(src.name)
    again = train(cfg, tmp_path / "b", resume=True, progress=False, corpus=corpus, log=lambda _m: None)
    assert again["losses"] == full["losses"][2:]  # masters, moments, loss scale and data position restored
    assert again["held_out_loss"] == full["held_out_loss"]


def native_logits(native, prompt):
    """The logits of a loaded native model for one prompt, through a fresh paged KV pool (NumPy)."""
    from rawformer.runtime import make_pool

    pool = make_pool(native, 64, block_size=8)
    pool.add_sequence(0, prompt)
    return native.forward(pool.prepare([0]), pool.arena)


def test_checkpoint_is_a_native_gpt2_checkpoint(tiny_run):
    from rawformer.export import load_hf

    out, _ = tiny_run
    step_dir = ckpt.resolve_checkpoint(out)
    assert step_dir.name == "step-00000012"
    native = load_hf(step_dir, dtype=np.float64, device="cpu")
    weights = ckpt.load_checkpoint(out)["weights"]
    trained = GPT(native.config, {n: w.astype(np.float64) for n, w in weights.items()})
    prompt = list(ByteTokenizer().encode("import os\nprint(")) + [256, 10]
    with ag.no_grad():
        want = trained.forward(np.array([prompt])).data
    got = native_logits(native, prompt)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_llama_trains_and_loads_as_a_native_llama(tmp_path, corpus):
    from rawformer.export import load_hf

    model = dict(model_type="llama", vocab_size=257, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)  # fmt: skip
    s = train(tiny_config(model=model, steps=4), tmp_path, progress=False, corpus=corpus, log=lambda _m: None)
    assert s["losses"][-1] < s["losses"][0]
    native = load_hf(s["checkpoint"], dtype=np.float64, device="cpu")
    from rawformer.training.model import Llama

    weights = ckpt.load_checkpoint(tmp_path)["weights"]
    trained = Llama(native.config, {n: w.astype(np.float64) for n, w in weights.items()})
    prompt = list(range(60, 80))
    with ag.no_grad():
        want = trained.forward(np.array([prompt])).data
    got = native_logits(native, prompt)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _eval_cli(path, *extra):
    from rawformer.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", str(path), "--json", "--device", "cpu", *extra])


def test_eval_reproduces_the_held_out_loss(tiny_run, capsys):
    out, summary = tiny_run
    args = _eval_cli(out)
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 12 and result["same_held_out"]
    assert result["held_out_loss"] == pytest.approx(summary["held_out_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(summary["held_out_loss"]), rel=1e-5)
    stored = json.loads((out / "summary.json").read_text())
    assert stored["held_out_loss"] == summary["held_out_loss"] and (out / "loss.png").stat().st_size > 1000


def test_train_command(tmp_path, capsys):
    from rawformer.commands import train as train_cmd

    cfg = tiny_config(steps=3, eval_batches=1).to_dict()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for needle in ("final train loss", "held-out loss", "steps 3", "train time", "checkpoint"):
        assert needle in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg, "stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_json(bad)


CFG = {"model_type": "gpt2"}
_CRASH = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from rawformer.training import checkpoint as ckpt
    calls = 0
    real = os.fsync
    def dying_fsync(fd):
        global calls
        calls += 1
        if calls == int(sys.argv[2]):
            os._exit(17)  # the process dies here, mid-checkpoint
        real(fd)
    os.fsync = dying_fsync
    big = {"w": np.full((256, 256), 2.0, np.float32)}
    ckpt.save_checkpoint(sys.argv[1], 2, model_config={"model_type": "gpt2"}, weights=big,
                         state={"exp_avg.w": np.zeros((256, 256), np.float32)}, meta={"m": 2})
    """
)


@pytest.mark.parametrize("crash_at", [1, 4, 7, 8])  # file, folder, before and at the `latest` switch
def test_checkpoint_survives_a_crash_mid_write(tmp_path, crash_at):
    root = tmp_path / "checkpoints"
    one = {"w": np.ones((4, 4), np.float32)}
    ckpt.save_checkpoint(
        root, 1, model_config=CFG, weights=one, state={"exp_avg.w": one["w"] * 0}, meta={"m": 1}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(root), str(crash_at)], capture_output=True, text=True
    )
    assert proc.returncode == 17, proc.stderr
    loaded = ckpt.load_checkpoint(root)  # `latest` still names a complete checkpoint
    assert loaded["meta"]["step"] == 1 and loaded["meta"]["m"] == 1
    np.testing.assert_array_equal(loaded["weights"]["w"], np.ones((4, 4), np.float32))
    # the next save after the crash works and moves `latest`
    ckpt.save_checkpoint(root, 3, model_config=CFG, weights={"w": np.zeros(2, np.float32)}, state={}, meta={})
    assert ckpt.load_checkpoint(root)["meta"]["step"] == 3
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the crashed run's temporaries are gone


def test_write_safetensors_reads_back_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones((0, 4), np.float32),
              "c": np.array([1, -2], np.int64)}  # fmt: skip
    ckpt.write_safetensors(tmp_path / "x.safetensors", arrays, {"k": "v"})
    back = st.load_file(str(tmp_path / "x.safetensors"))
    for n, a in arrays.items():
        np.testing.assert_array_equal(back[n], a)
        assert back[n].dtype == a.dtype
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


class RecordingDP:
    """A data-parallel stand-in for one rank: records the loop's calls (the real one needs MPI ranks)."""

    rank, world_size = 0, 1

    def __init__(self, params):
        self.params, self.calls, self.ready = params, [], 0
        for p in params.values():
            p.register_grad_ready_hook(self._ready)

    def _ready(self, t):
        self.ready += 1

    def broadcast_parameters(self):
        self.calls.append("broadcast")

    def begin_step(self, sync):
        self.calls.append(f"begin({sync})")

    def finish(self):
        assert self.ready == 2 * len(self.params)  # every grad-ready hook fired, in both micro-steps
        self.ready = 0
        self.calls.append("finish")

    def synchronize(self):
        self.calls.append("sync")


def test_data_parallel_calls(tmp_path, corpus):
    made = []
    train(tiny_config(steps=2, grad_accum=2), tmp_path, progress=False, corpus=corpus, log=lambda _m: None,
          dp_factory=lambda params: made.append(RecordingDP(params)) or made[-1])  # fmt: skip
    step = ["begin(False)", "begin(True)", "finish", "sync"]
    assert made[0].calls == ["broadcast", *step, *step]


def test_two_ranks_train_like_one_process_with_the_global_batch(tmp_path):
    """`mpiexec -n 2 rawformer train` (data parallel through rawformer.distributed) ends where one process
    with twice the batch does: the same held-out loss, and `rawformer eval` of its checkpoint agrees."""
    pytest.importorskip("mpi4py")
    import shutil

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    cfg = tiny_config(steps=3, eval_batches=2).to_dict()
    (tmp_path / "dp.json").write_text(json.dumps(cfg))
    (tmp_path / "one.json").write_text(json.dumps({**cfg, "batch_size": 2 * cfg["batch_size"]}))
    cli = [sys.executable, "-m", "rawformer", "train", "--no-progress", "--config"]
    dp = subprocess.run([mpiexec, "-n", "2", *cli, str(tmp_path / "dp.json"), "--out", str(tmp_path / "dp")],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert dp.returncode == 0, dp.stdout + dp.stderr
    one = subprocess.run([*cli, str(tmp_path / "one.json"), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    a = json.loads((tmp_path / "dp" / "summary.json").read_text())
    b = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 3
    assert abs(a["held_out_loss"] - b["held_out_loss"]) < 1e-5


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_first_20_steps_match_the_cpu(cp, tmp_path, corpus):
    cfg = tiny_config(steps=20, eval_batches=2, model={**TINY_MODEL, "n_embd": 64, "n_head": 2})
    cpu = train(cfg, tmp_path / "cpu", progress=False, corpus=corpus, log=lambda _m: None)
    gpu = train(
        cfg.replace(device="gpu"), tmp_path / "gpu", progress=False, corpus=corpus, log=lambda _m: None
    )
    diff = np.abs(np.array(gpu["losses"]) - np.array(cpu["losses"]))
    assert diff.max() < 1e-4, f"losses differ by {diff.max():.2e}: {gpu['losses']} vs {cpu['losses']}"
    assert abs(gpu["held_out_loss"] - cpu["held_out_loss"]) < 1e-4


@pytest.mark.gpu
def test_gpu_float16_training(cp, tmp_path, corpus):
    cfg = tiny_config(
        steps=30, dtype="float16", device="gpu", model={**TINY_MODEL, "n_embd": 128, "n_head": 2}
    )
    s = train(cfg, tmp_path, progress=False, corpus=corpus, log=lambda _m: None)
    assert all(math.isfinite(v) for v in s["losses"])
    assert np.mean(s["losses"][-5:]) < np.mean(s["losses"][:5]) - 0.5
    assert os.path.exists(Path(s["checkpoint"]) / "model.safetensors")
    args = _eval_cli(tmp_path, "--device", "gpu")
    assert args.func(args) == 0


def test_shipped_configs_resolve_by_name(tmp_path):
    from rawformer.training.config import TrainConfig, config_path

    for name in ("tiny", "gpt2-small", "stdlib-gpt", "stdlib-gpt.json"):
        assert config_path(name).is_file()
        assert TrainConfig.from_json(name).steps > 0
    own = tmp_path / "tiny.json"  # a file of that name wins over the shipped one
    own.write_text(config_path("tiny").read_text())
    assert config_path(own) == own
    with pytest.raises(FileNotFoundError, match="not a shipped one"):
        config_path("no-such-config")
