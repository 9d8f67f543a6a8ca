"""What the model-running commands share: the model arguments, loading with a progress bar, the tokenizer.

A model is given as one of
    --model PATH     a .onnx file or a Hugging Face checkpoint directory (rawformer.load), with its
                     tokenizer.json beside it (a byte-level model, vocabulary 257, gets the ByteTokenizer)
    --random NAME    random weights of a known shape (PRESETS): benchmarks and trying the engine out
Without either, the bundled model of the package (rawformer/models/, see bundled_model()) is used when it
is there.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

PRESETS = {
    # a tiny byte-level GPT-2 (random weights: the text is noise; it shows the machinery)
    "gpt2-tiny-bytes": dict(kind="gpt2", vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=4),
    "gpt2-small": dict(kind="gpt2"),  # 124M
    "llama-1b": dict(  # ~1.1B, TinyLlama's shape
        kind="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
MODEL_SUFFIXES = (".onnx",)


def preset_config(name: str) -> Any:
    """The model config of a PRESETS entry."""
    from rawformer.models import GPT2Config, LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    kind = d.pop("kind")
    return GPT2Config(**d) if kind == "gpt2" else LlamaConfig(**d)


def bundled_model() -> Path | None:
    """The model shipped in the package's models/ folder: the first *.onnx file or checkpoint directory
    (config.json + *.safetensors) found there, by name; None when there is none."""
    try:
        root = Path(str(importlib.resources.files("rawformer.models")))
    except (ModuleNotFoundError, TypeError):
        return None
    if not root.is_dir():
        return None
    found = sorted(root.rglob("*.onnx"))
    found += sorted(p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    return found[0] if found else None


class _NoBar:
    """What a tqdm bar offers the commands, doing nothing (tqdm is optional)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def progress(**kw: Any) -> Any:
    """A tqdm progress bar (on stderr) when tqdm is installed, else a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(**kw)


def add_model_args(p: argparse.ArgumentParser, default_random: str | None = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a .onnx file or a Hugging Face checkpoint directory "
                   "(default: the bundled model, when the package has one)")  # fmt: skip
    g.add_argument("--random", metavar="NAME", choices=sorted(PRESETS), default=default_random,
                   help=f"random weights of a known shape instead: {', '.join(PRESETS)}")  # fmt: skip
    g.add_argument("--dtype", choices=["float16", "float32", "float64"], default=None,
                   help="weights dtype (default: float16 on the GPU, float32 on the CPU)")  # fmt: skip
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto = the GPU when CuPy finds one (default)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (--random)")
    g.add_argument("--quantize", choices=["int8", "int8-g128"], default=None,
                   help="weight-only INT8 of the projections and the lm head: per output channel (int8) or "
                   "one scale per 128 inputs (int8-g128); a QDQ .onnx file is INT8 already")  # fmt: skip


def _xp(device: str) -> Any:
    from rawformer import backend

    if device == "cpu":
        return np
    cp = backend.cupy_module()
    if cp is None and device == "gpu":
        raise RuntimeError("--device gpu: no CUDA GPU / CuPy here")
    return cp if cp is not None else np


def tokenizer_for(path: Path | None, vocab_size: int) -> Any:
    """tokenizer.json beside / inside the model, else the ByteTokenizer for a byte-level vocabulary, else
    None (token ids only)."""
    if path is not None:
        for cand in (path / "tokenizer.json", path.parent / "tokenizer.json"):
            if cand.is_file():
                from rawformer.export import load_tokenizer

                return load_tokenizer(cand)
    if vocab_size == 257:
        from rawformer.export.tokenizer import ByteTokenizer

        return ByteTokenizer()
    return None


def load_model(args: argparse.Namespace, quiet: bool = False) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from the model arguments, with a progress bar over the stages."""
    xp = _xp(args.device)
    gpu = xp is not np
    dtype = np.dtype(args.dtype or ("float16" if gpu else "float32"))
    path = Path(args.model) if getattr(args, "model", None) else None
    if path is None and not getattr(args, "random", None):
        path = bundled_model()
        if path is None:
            raise ValueError(
                "no model: pass --model PATH or --random NAME (the package has no bundled model)"
            )
    with progress(total=3, desc="loading", unit="step", disable=quiet, leave=False) as bar:
        if path is None:
            from rawformer.models import init_random

            bar.set_postfix_str(f"random {args.random}")
            cfg = preset_config(args.random)
            bar.update(1)
            model = init_random(
                cfg, args.seed, dtype, xp, std=0.02 if args.random != "gpt2-tiny-bytes" else 0.3
            )
            if getattr(args, "quantize", None):
                from rawformer.models.quantize import quantize_model

                quantize_model(model, args.quantize)
            name = args.random
        else:
            if importlib.util.find_spec("rawformer.loading") is None:
                raise RuntimeError("loading a model file needs rawformer.loading (rawformer.load)")
            import rawformer.loading

            bar.set_postfix_str(path.name)
            bar.update(1)
            loaded = rawformer.loading.load(
                path, dtype=dtype, device="gpu" if gpu else "cpu", quantize=getattr(args, "quantize", None)
            )
            if loaded.path_taken == "executor" or not loaded.is_decoder:
                raise ValueError(
                    f"{path}: not a decoder rawformer runs natively ({loaded.reason or loaded.family})"
                )
            model = loaded.model
            name = path.stem if path.is_file() else path.name
        bar.update(1)
        tok = tokenizer_for(path, model.vocab_size)
        bar.update(1)
    return model, tok, name


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences per step (default 64)")
    g.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="most tokens per step: decode tokens + prefill chunks (default 2048)")  # fmt: skip
    g.add_argument("--kv-tokens", type=int, default=None,
                   help="tokens the KV pool holds (default: max-num-seqs x length, <= 64k)")  # fmt: skip
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--adaptive", choices=["fixed", "latency", "throughput"], default="fixed",
                   help="tune the step budget online: hold a step latency (latency), or grow while tokens/s "
                   "rises (throughput); fixed = the two limits above (default)")  # fmt: skip
    g.add_argument("--target-ms", type=float, default=None,
                   help="the adaptive controller's step latency target / ceiling")  # fmt: skip
    g.add_argument("--preemption", choices=["auto", "swap", "recompute"], default="auto",
                   help="when KV blocks run out: swap to host, recompute later, or auto")  # fmt: skip


def make_engine(args: argparse.Namespace, model: Any, tok: Any, name: str, **kw: Any) -> Any:
    from rawformer.runtime.engine import Engine

    return Engine(
        model, tok, kv_tokens=args.kv_tokens, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, adaptive=args.adaptive, target_ms=args.target_ms,
        preemption=args.preemption, name=name, **kw,
    )  # fmt: skip
