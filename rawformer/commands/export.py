"""`rawformer export`: a model (ONNX file, HF checkpoint directory or random preset) -> a standard ONNX file.

    rawformer export --model checkpoint-dir --out model.onnx
    rawformer export --random gpt2-tiny-bytes --out tiny.onnx --opset 18 --verify
    rawformer export --model big-llama --out llama.onnx --dtype float16 --external-data
    rawformer export --model ckpt --out llama-int8.onnx --quantize int8 --verify

The model is loaded on the CPU as a native rawformer model (an ONNX file must be recognised: GPT-2, Llama or
BERT), written with standard ai.onnx ops (rawformer.export.onnx_export), checked with onnx.checker
(full_check) and, with --verify, run in onnxruntime against the native model. --quantize writes weight-only
INT8 in QDQ form (int8 initializers + DequantizeLinear, rawformer.export.onnx_qdq), which rawformer.load
reads back as an INT8 native model; an INT8 .onnx file given as --model is written in QDQ form again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    from rawformer.commands._model import PRESETS

    p = sub.add_parser(
        "export",
        help="write a model as a standard ONNX file (opset 17+, dynamic batch / sequence)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="a .onnx file or a Hugging Face checkpoint directory")
    src.add_argument(
        "--random", metavar="NAME", choices=sorted(PRESETS), help=f"random weights: {', '.join(PRESETS)}"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (--random)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ai.onnx opset, >= 17 (default 17)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weights in the file")
    p.add_argument("--external-data", action="store_true",
                   help="weights in FILE.data beside the file (automatic above ~2 GB)")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker's full check")
    p.add_argument("--verify", action="store_true", help="run the file in onnxruntime and compare (1e-4)")
    p.add_argument("--quantize", choices=["int8", "int8-g128"], default=None,
                   help="weight-only INT8 in QDQ form: per channel (int8) or per 128 inputs")  # fmt: skip
    p.set_defaults(func=run)


def _native(args: argparse.Namespace) -> Any:
    if args.random:
        from rawformer.commands._model import preset_config
        from rawformer.models import init_random

        return init_random(preset_config(args.random), args.seed, np.float32, np)
    import rawformer.loading

    loaded = rawformer.loading.load(args.model, dtype=np.float32, device="cpu")
    if loaded.path_taken == "executor":
        raise ValueError(f"{args.model}: only GPT-2, Llama and BERT models export ({loaded.reason})")
    return loaded.model


def _quantized(model: Any, mode: str | None) -> Any:
    """The model to export and compare with: quantized in `mode` (a model already in it is kept)."""
    done = getattr(model, "quantization", None)
    if mode is None or done == mode:
        return model
    if done:
        raise ValueError(f"--quantize {mode}: the model is already quantized ({done})")
    from rawformer.models.quantize import quantize_model

    return quantize_model(model, mode)


def verify(model: Any, path: Path, rng: np.random.Generator | None = None) -> float:
    """Max |onnxruntime - native| / max |native| on random token ids (2 x 7)."""
    import onnxruntime as ort

    from rawformer.export.onnx_import import native_logits

    rng = rng or np.random.default_rng(0)
    cfg = model.config
    seq = min(7, getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 7))
    ids = rng.integers(0, cfg.vocab_size, size=(2, seq))
    opts = None
    if getattr(model, "quantization", None):  # onnxruntime's fused int8 MatMul in float32, as the model
        from rawformer.export.onnx_qdq import ort_session_options

        opts = ort_session_options()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if cfg.model_type == "bert":
        ones, zeros = np.ones_like(ids), np.zeros_like(ids)
        got = sess.run(None, {"input_ids": ids, "attention_mask": ones, "token_type_ids": zeros})[0]
        want = model.forward(ids, ones, zeros)
    else:
        got, want = sess.run(None, {"input_ids": ids})[0], native_logits(model, ids)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def run(args: argparse.Namespace) -> int:
    from rawformer.export.onnx_export import export_onnx

    t0 = time.perf_counter()
    model = _quantized(_native(args), args.quantize)
    out = Path(args.out)
    path = export_onnx(
        model, out, opset=args.opset, dtype=np.dtype(args.dtype), external_data=args.external_data or None,
        check=not args.no_check,
    )  # fmt: skip
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    extra = f" + {data.name} ({data.stat().st_size / 2**20:.1f} MiB)" if data.exists() else ""
    checked = "not checked" if args.no_check else "checked"
    weights = (
        f"{args.dtype} + {model.quantization} QDQ" if getattr(model, "quantization", None) else args.dtype
    )
    print(
        f"wrote {path} ({size / 2**20:.1f} MiB{extra}), {model.config.model_type}, opset {args.opset}, "
        f"{weights}, {checked}, {time.perf_counter() - t0:.1f} s"
    )
    if args.verify:
        err = verify(model, path)
        ok = err <= (1e-4 if args.dtype == "float32" else 2e-2)
        print(f"onnxruntime vs native: max relative error {err:.2e} ({'ok' if ok else 'MISMATCH'})")
        return 0 if ok else 1
    return 0
