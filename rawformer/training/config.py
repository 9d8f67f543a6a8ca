"""Training configuration: one JSON file per run, read into `TrainConfig`; shipped ones in
rawformer/training/configs/ are found by name (`rawformer train --config stdlib-gpt`).

    {
      "model": {"model_type": "gpt2", "vocab_size": 257, "n_positions": 256, "n_embd": 256, ...},
      "data": "stdlib", "seq_len": 256, "batch_size": 32, "steps": 2000, "lr": 1e-3, "dtype": "float16", ...
    }

"model" holds the fields of rawformer.models.GPT2Config (config.json keys); everything else is a field of
TrainConfig below (unknown keys are an error, so a typo does not silently train the default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawformer.models.config import GPT2Config, LlamaConfig, config_from_dict

__all__ = ["TrainConfig"]


SHIPPED = Path(__file__).resolve().parent / "configs"  # tiny, gpt2-small, stdlib-gpt (package data)


def config_path(path: str | Path) -> Path:
    """`path` itself when it exists, else the shipped config of that name (with or without ".json")."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SHIPPED / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in SHIPPED.glob("*.json")))
    raise FileNotFoundError(f"no training config {str(path)!r}: not a file, and not a shipped one ({names})")


@dataclass
class TrainConfig:
    """Everything a training run needs (defaults: a small byte-level GPT on the standard library)."""

    model: dict[str, Any] = field(default_factory=lambda: {"model_type": "gpt2", "vocab_size": 257})
    # (config.json keys of GPT2Config, or of LlamaConfig with "model_type": "llama")
    # data
    data: str = "stdlib"  # "stdlib" (the interpreter's standard library) or a folder of *.py files
    held_out_fraction: float = 0.05  # files held out (by crc32 of the path) for evaluation
    skip_dirs: list[str] = field(default_factory=list)  # directory names left out of the corpus
    max_files: int | None = None  # only the first N files (tiny test corpora)
    seq_len: int = 256  # tokens per row
    batch_size: int = 16  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    # optimisation
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # precision and device
    dtype: str = "float32"  # "float32", or "float16" (fp16 compute, fp32 masters, dynamic loss scale)
    device: str = "auto"  # "auto", "cpu" or "gpu"
    loss_scale: float = 2.0**16  # initial dynamic loss scale (float16 only)
    loss_scale_growth_interval: int = 1000
    # seeds, evaluation, checkpoints, logging
    seed: int = 0  # weight initialisation
    data_seed: int = 1  # batch sampling
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int | None = 50  # held-out batches per evaluation (None: the whole held-out stream)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_time_s: float | None = None  # stop early (with a checkpoint) after this much training time

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"TrainConfig.dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'gpu', got {self.device!r}")
        if self.model.get("model_type", "gpt2") not in ("gpt2", "llama"):
            kind = self.model["model_type"]
            raise ValueError(f"TrainConfig.model: model_type must be 'gpt2' or 'llama', got {kind!r}")
        mcfg = self.model_config()
        longest = mcfg.n_positions if isinstance(mcfg, GPT2Config) else mcfg.max_position_embeddings
        if self.seq_len > longest:
            raise ValueError(f"TrainConfig.seq_len={self.seq_len} exceeds the model's {longest} positions")

    def model_config(self) -> GPT2Config | LlamaConfig:
        """The model's config dataclass ("model_type" defaults to "gpt2")."""
        cfg = config_from_dict({"model_type": "gpt2", **self.model})
        assert isinstance(cfg, (GPT2Config, LlamaConfig))
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown training config keys: {', '.join(unknown)} (known: {', '.join(sorted(names))})"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """A config file, or the name of one shipped in rawformer/training/configs (e.g. "stdlib-gpt")."""
        path = config_path(path)
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a training config is a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
