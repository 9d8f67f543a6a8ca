"""Loading Hugging Face checkpoint directories: config.json + model.safetensors (or sharded) -> a model.

A directory holds
    config.json                          model_type "gpt2" | "llama" | "bert" | "deepseek_v2" picks the model
                                         and its config
    model.safetensors                    the weights, or
    model.safetensors.index.json         {"weight_map": {tensor name: shard file}} + the shards
                                         (model-00001-of-0000N.safetensors)
Checkpoint names become the models' names by the model file's table: a prefix of the task head class is
removed (GPT2LMHeadModel "transformer.", LlamaForCausalLM and DeepseekV2ForCausalLM "model.", BertFor*
"bert."), BERT's old "LayerNorm.gamma / beta" become ".weight / .bias"; tensors the model does not read
(causal-mask buffers, position ids, pooler, MLM head, a tied lm_head) are skipped without being read.

Everything is checked on the headers before a byte of weights is read: each tensor the model needs is there
(error naming it), has its shape, and is a float; so a bad checkpoint fails fast and leaves nothing half
built. Then each tensor is read from the memory map, converted to the target dtype on the host and moved to
the device once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from rawformer.export.safetensors import FLOAT_DTYPES, SafetensorsFile
from rawformer.models import build_model, config_from_dict, module_for
from rawformer.models.common import run_dtypes

from rawformer import backend

__all__ = ["CheckpointError", "load_hf", "read_config"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that does not fit its model: missing tensor, wrong shape, unreadable layout."""


def read_config(path: str | os.PathLike) -> Any:
    """The model config (GPT2Config, LlamaConfig or BertConfig) of a checkpoint directory's config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    with open(file, encoding="utf-8") as f:
        d = json.load(f)
    try:
        return config_from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _open_weights(root: Path) -> list[SafetensorsFile]:
    """The weight files of a directory: the shards of the index, or model.safetensors."""
    index = root / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (root / s).is_file():
                raise CheckpointError(f"{index} names shard {s!r}, which is not in {root}")
        files = [SafetensorsFile(root / s) for s in shards]
        by_name = dict(zip(shards, files, strict=True))
        for name, s in weight_map.items():
            if name not in by_name[s]:
                raise CheckpointError(f"{index} maps tensor {name!r} to {s}, which does not hold it")
        return files
    if (root / WEIGHTS_FILE).is_file():
        return [SafetensorsFile(root / WEIGHTS_FILE)]
    raise FileNotFoundError(
        f"no {WEIGHTS_FILE} or {INDEX_FILE} in {root} (only safetensors checkpoints are read: no pickles)"
    )


def _canonical(name: str, prefixes: tuple[str, ...], renames: dict[str, str]) -> str:
    for p in prefixes:
        if name.startswith(p):
            name = name[len(p) :]
            break
    for old, new in renames.items():
        if name.endswith(old):
            name = name[: -len(old)] + new
    return name


def _device(device: str) -> bool:
    """True for the GPU."""
    if device == "auto":
        return backend.cupy_module() is not None
    if device in ("gpu", "cuda"):
        backend.require_cupy()
        return True
    if device == "cpu":
        return False
    raise ValueError(f"load_hf: device must be 'auto', 'cpu' or 'gpu', got {device!r}")


def _target_dtype(dtype: Any, stored: set[str], gpu: bool) -> np.dtype:
    allowed = run_dtypes(gpu)  # the dtypes the models accept (check_weights)
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt not in allowed:
            where = "the GPU" if gpu else "the CPU"
            raise ValueError(
                f"load_hf: dtype {dt} does not run on {where} (allowed: {', '.join(map(str, allowed))})"
            )
        return dt
    if gpu:  # keep the checkpoint's precision where the GPU path has it; BF16 runs as float16
        return np.dtype(np.float32) if stored <= {"F32", "F64"} else np.dtype(np.float16)
    return np.dtype(np.float64) if stored == {"F64"} else np.dtype(np.float32)


def load_hf(path: str | os.PathLike, dtype: Any = None, device: str = "auto") -> Any:
    """Load a Hugging Face checkpoint directory as a rawformer model.

    Parameters
    ----------
    path : directory with config.json and model.safetensors (or model.safetensors.index.json + shards)
    dtype : float16 / float32 on the GPU, float32 / float64 on the CPU. None: on the GPU the checkpoint's
        float16 / float32 (BF16 -> float16), on the CPU float32 (float64 for a float64 checkpoint)
    device : "auto" (the GPU when CuPy finds one), "cpu" or "gpu"

    Returns
    -------
    GPT2Model, LlamaModel or BertModel (by config.json's model_type)

    Raises
    ------
    FileNotFoundError : no config.json / no weights file
    CheckpointError (a ValueError) : unknown model_type, a missing tensor (named), a wrong shape, a non-float
        tensor, an index naming a missing shard; nothing is built
    """
    gpu = _device(device)
    _target_dtype(dtype, set(), gpu)  # a bad dtype fails before any file is read
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_hf: {path} is not a directory")
    config = read_config(root)
    mod = module_for(config)
    expected = mod.weight_shapes(config)
    files = _open_weights(root)
    prefixes, renames = tuple(getattr(mod, "HF_PREFIXES", ())), dict(getattr(mod, "HF_RENAMES", {}))

    found: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        for name in f.keys():
            c = _canonical(name, prefixes, renames)
            if c in expected and c not in found:
                found[c] = (f, name)
    where = ", ".join(f.path.name for f in files)
    for c, shape in expected.items():
        if c not in found:
            alts = " or ".join(repr(p + c) for p in prefixes)
            raise CheckpointError(
                f"{root}: missing tensor {c!r}{' (or ' + alts + ')' if alts else ''} in {where} "
                f"for {type(config).__name__}"
            )
        f, name = found[c]
        if f.shape(name) != tuple(shape):
            raise CheckpointError(
                f"{root}: tensor {name!r} in {f.path.name} has shape {list(f.shape(name))}, the config needs "
                f"{list(shape)}"
            )
        if f.dtype(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"{root}: tensor {name!r} in {f.path.name} is {f.dtype(name)}, not a float")

    target = _target_dtype(dtype, {found[c][0].dtype(found[c][1]) for c in expected}, gpu)
    xp = backend.require_cupy() if gpu else np
    weights = {}
    for c in expected:
        f, name = found[c]
        host = np.ascontiguousarray(f.get(name), dtype=target)  # one host conversion, then one copy to device
        weights[c] = xp.asarray(host) if gpu else (host if host.flags.writeable else host.copy())
    return build_model(config, weights, xp)
