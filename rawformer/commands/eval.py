"""`rawformer eval [MODEL]`: held-out loss and perplexity of a trained model on its training corpus.

MODEL is one of
    a `rawformer train` checkpoint   a step directory (config.json + model.safetensors + state.safetensors),
                                     a checkpoints folder or a train output folder (their latest checkpoint);
                                     the training config stored in it gives the data settings
    a .onnx file                     an exported model (rawformer.load must recognise it: GPT-2 / Llama);
                                     the data settings come from FILE.json beside it (its "train_config")
                                     or from --config
    a name                           a model of the package's models/ folder ("stdlib-gpt")
    nothing                          the bundled model (the package's models/ folder)

The data settings (corpus, held-out split, sequence length, batch size, number of evaluation batches) are
those of training, so the number printed is the held-out loss `rawformer train` reported when the corpus is
the same. The corpus is the interpreter's standard library: another Python version has other files, hence
another held-out set; the output names the Python version and a crc32 of the held-out tokens.

Two implementations compute the loss (--impl):
    model   the training model (rawformer.training.model) over rawformer's ops: on the CPU those are the
            float64 NumPy references (exact but slow: ~14 s per 64 x 256 batch of the bundled model on two
            cores, most of it in the float64 GELU)
    numpy   a float32 NumPy forward of GPT-2 (matmuls in float32, softmax / log-softmax with the max
            subtracted, the loss summed in float64): ~1 s per batch; agrees with `model` to ~1e-6
    auto    numpy for a GPT-2 .onnx / bundled model on the CPU in float32, model otherwise (checkpoints
            keep the training model, whose numbers `rawformer train` printed)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["gpt2_loss_numpy", "load_eval_model", "register", "resolve_model", "run"]

EPILOG = """examples:
  rawformer eval                               the bundled model, on this interpreter's stdlib
  rawformer eval stdlib-gpt --json             the same by name, one JSON object
  rawformer eval models/stdlib-gpt.onnx --impl model   through the training model's ops (slow on the CPU)
  rawformer eval runs/tiny                     the latest checkpoint of a `rawformer train` run
  rawformer eval model.onnx --config stdlib-gpt"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="held-out loss and perplexity of a trained checkpoint or exported model",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint / train output folder, .onnx file or bundled model name "
                   "(default: the bundled model)")  # fmt: skip
    p.add_argument("--config", default=None, metavar="JSON",
                   help="training config giving the data settings (default: the model's own)")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="compute dtype")
    p.add_argument("--impl", choices=["auto", "model", "numpy"], default="auto",
                   help="training model over rawformer ops, or float32 NumPy GPT-2 (see above)")  # fmt: skip
    p.add_argument("--eval-batches", type=int, default=None, help="override the number of batches")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


# ---- which model -------------------------------------------------------------------------------------------


def _package_models() -> Path | None:
    """The package's models/ folder (rawformer.models), None when it cannot be found."""
    import importlib.resources

    try:
        root = Path(str(importlib.resources.files("rawformer.models")))
    except (ModuleNotFoundError, TypeError):
        return None
    return root if root.is_dir() else None


def resolve_model(name: str | None) -> Path:
    """The checkpoint directory or .onnx file meant by `name` (module docstring); FileNotFoundError if
    there is none."""
    from rawformer.commands._model import bundled_model

    if name is None:
        found = bundled_model()
        if found is None:
            raise FileNotFoundError("eval: no MODEL given and the package has no bundled model")
        return found
    p = Path(name)
    if p.exists():
        return p
    root = _package_models()
    if root is not None and p.parent == Path("."):
        for cand in (root / name, root / f"{name}.onnx"):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"eval: {name} is neither a path nor a model of the package's models/ folder")


def load_eval_model(path: Path, config: str | None) -> dict[str, Any]:
    """Weights and settings of an evaluable model.

    Returns {"source", "kind" ("checkpoint" / "onnx"), "model_config" (native config), "weights" (HF names,
    host float arrays), "train_config" (TrainConfig), "step" (int or None), "trained_on" (the held-out
    fingerprint of training, {} when unknown)}."""
    from rawformer.models.config import config_from_dict
    from rawformer.training.config import TrainConfig

    if path.suffix.lower() == ".onnx":
        from rawformer.export.onnx_file import read_onnx
        from rawformer.export.onnx_import import recognise

        mcfg, match = recognise(read_onnx(path))
        sidecar = path.with_suffix(".json")
        meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        if config is None and "train_config" not in meta:
            raise ValueError(f"eval: {path} has no {sidecar.name} beside it; pass --config (training config)")
        tcfg = TrainConfig.from_json(config) if config else TrainConfig.from_dict(meta["train_config"])
        return dict(
            source=path, kind="onnx", model_config=mcfg, weights=dict(match.weights), train_config=tcfg,
            step=meta.get("step"), trained_on=meta.get("trained_on", {}),
        )  # fmt: skip
    from rawformer.training.checkpoint import load_checkpoint, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    if (step_dir / "state.safetensors").is_file():
        ck = load_checkpoint(step_dir)
        meta, weights, mjson = ck["meta"], ck["weights"], ck["config"]
    else:  # an exported step directory (config.json + model.safetensors only): --config gives the data
        from rawformer.export.safetensors import SafetensorsFile

        st = SafetensorsFile(step_dir / "model.safetensors")
        meta, weights = {}, {n: np.array(st.get(n)) for n in st.keys()}
        mjson = json.loads((step_dir / "config.json").read_text(encoding="utf-8"))
    if config is None and "config" not in meta:
        raise ValueError(f"eval: {step_dir} stores no training config; pass --config")
    tcfg = TrainConfig.from_json(config) if config else TrainConfig.from_dict(meta["config"])
    return dict(
        source=step_dir, kind="checkpoint", model_config=config_from_dict(mjson), weights=weights,
        train_config=tcfg, step=meta.get("step"), trained_on=meta.get("corpus", {}),
        eval_batch_size=meta.get("eval_batch_size"),
    )  # fmt: skip


# ---- the float32 NumPy forward -----------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, -1, keepdims=True)
    return xc * (1.0 / np.sqrt(var + np.float32(eps))) * w + b


def _gelu(u: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":  # 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (u + np.float32(0.044715) * (u * u * u))
        return np.float32(0.5) * u * (np.float32(1.0) + np.tanh(inner))
    from rawformer.ops.activations import gelu_ref  # erf form: the float64 reference (rarely used)

    return gelu_ref(u, None, "none").astype(np.float32)


def gpt2_loss_numpy(
    config: Any, weights: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, rows: int = 16
) -> float:
    """Summed next-token cross-entropy (nats) of a GPT-2 (HF names) over ids / targets (B, T), in float32.

    The forward of rawformer.training.model.GPT in plain NumPy float32, `rows` sequences at a time (bounded
    memory): pre-LN blocks, causal softmax attention scaled by 1/sqrt(head_dim), tied head; per row
    loss = logsumexp(logits) - logits[target], summed in float64."""
    if config.model_type != "gpt2":
        raise ValueError(f"the NumPy eval path is GPT-2 only, got {config.model_type}")
    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    b_all, t = ids.shape
    nh, hd, eps, h = config.n_head, config.head_dim, config.layer_norm_epsilon, config.n_embd
    scale = np.float32(1.0 / math.sqrt(hd))
    future = np.triu(np.ones((t, t), dtype=bool), 1)
    total = 0.0
    for r0 in range(0, b_all, rows):
        x_ids, y = ids[r0 : r0 + rows], targets[r0 : r0 + rows]
        b = x_ids.shape[0]
        x = w["wte.weight"][x_ids] + w["wpe.weight"][:t]  # (b, t, h)
        for i in range(config.n_layer):
            p = f"h.{i}."
            a = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # (b, t, 3h)
            q, k, v = (z.reshape(b, t, nh, hd).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=-1))
            s = (q @ k.transpose(0, 1, 3, 2)) * scale  # (b, nh, t, t)
            s[..., future] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
            x = x + (a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"])
            a = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            m = _gelu(a @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], config.gelu_approximate)
            x = x + (m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"])
        x = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps).reshape(b * t, h)
        logits = x @ w["wte.weight"].T  # (b t, V)
        mx = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(-1)) + mx[:, 0]
        picked = np.take_along_axis(logits, y.reshape(-1, 1), axis=1)[:, 0]
        total += float(np.sum(lse.astype(np.float64) - picked.astype(np.float64)))
    return total


def _evaluate_numpy(ev: dict[str, Any], tokens: np.ndarray, seq_len: int, batch: int, batches: int) -> tuple:
    from rawformer.training.data import eval_batches

    total, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, batch, batches):
        total += gpt2_loss_numpy(ev["model_config"], ev["weights"], x, y)
        count += y.size
    if count == 0:
        raise ValueError(f"evaluation: the held-out stream ({tokens.size} tokens) is shorter than one window")
    return total / count, count


# ---- the command -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from rawformer.training.data import load_corpus
    from rawformer.training.loop import evaluate, resolve_xp
    from rawformer.training.model import model_class

    ev = load_eval_model(resolve_model(args.checkpoint), args.config)
    tcfg, mcfg = ev["train_config"], ev["model_config"]
    xp = resolve_xp(args.device)
    impl = args.impl
    if impl == "auto":
        fast = ev["kind"] == "onnx" and xp is np and args.dtype == "float32" and mcfg.model_type == "gpt2"
        impl = "numpy" if fast else "model"
    if impl == "numpy" and (xp is not np or args.dtype != "float32"):
        raise ValueError("--impl numpy runs on the CPU in float32 (--device cpu --dtype float32)")
    corpus = load_corpus(
        tcfg.data,
        held_out_fraction=tcfg.held_out_fraction,
        skip_dirs=tcfg.skip_dirs,
        max_files=tcfg.max_files,
    )
    batches = tcfg.eval_batches if args.eval_batches is None else args.eval_batches
    eval_batch = int(ev.get("eval_batch_size") or tcfg.batch_size)  # the global batch of the run
    if impl == "numpy":
        loss, tokens = _evaluate_numpy(ev, corpus.held_out, tcfg.seq_len, eval_batch, batches)
    else:
        dtype = np.dtype(args.dtype)
        weights = {n: xp.asarray(np.asarray(w, dtype=dtype)) for n, w in ev["weights"].items()}
        model = model_class(mcfg)(mcfg, weights)
        loss, tokens = evaluate(model, corpus.held_out, tcfg.seq_len, eval_batch, batches)
    fp = corpus.fingerprint()
    trained_on = ev["trained_on"]
    if "held_out_crc32" in trained_on:
        same: bool | None = trained_on["held_out_crc32"] == fp["held_out_crc32"]
    else:  # only the Python version is known: the same version's stdlib is taken as the same files
        same = trained_on.get("python") == fp["python"] if trained_on.get("python") else None
    result = {
        "checkpoint": str(ev["source"]),
        "step": None if ev["step"] is None else int(ev["step"]),
        "held_out_loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "held_out_files": corpus.held_out_files,
        "held_out_tokens": fp["held_out_tokens"],
        "held_out_crc32": fp["held_out_crc32"],
        "python": platform.python_version(),
        "device": "gpu" if xp is not np else "cpu",
        "dtype": args.dtype,
        "impl": impl,
        "same_held_out": same,  # the held-out tokens the training run evaluated (same stdlib files)
        "trained_python": trained_on.get("python"),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{corpus.describe()} (python {result['python']}, held-out crc32 {fp['held_out_crc32']})")
        step = "" if result["step"] is None else f" (step {result['step']})"
        print(f"model {result['checkpoint']}{step}, {impl} path on the {result['device']} ({args.dtype})")
        print(f"held-out loss {loss:.4f}  perplexity {result['perplexity']:.4f}  over {tokens:,} tokens")
        if same is False:
            print(
                f"note: this held-out set differs from the one of training (python "
                f"{result['trained_python']} there, {result['python']} here: other stdlib files)"
            )
    return 0
