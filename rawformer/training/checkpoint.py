"""Checkpoints: safetensors files written atomically, in step directories switched by one pointer file.

    out/checkpoints/step-00000400/config.json          GPT2Config fields + model_type (a HF-style config)
                                 model.safetensors    float32 weights, rawformer.models.gpt2 names
                                 state.safetensors    AdamW moments + metadata: step, loss scaler, sampler
                                                      RNG and position, the training config
    out/checkpoints/latest                            the name of the newest complete step directory

A step directory is a checkpoint `rawformer.export.load_hf` reads as it is (config.json + model.safetensors);
`load_checkpoint` reads everything needed to resume exactly.

Atomicity: every file is written to a temporary name, flushed and fsync'ed, then renamed into place (and
the directory fsync'ed); a step directory is built under a temporary name and renamed when complete; only
then is `latest` replaced (same dance). A crash at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.export.safetensors import SafetensorsFile

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_safetensors",
]

_DTYPE_NAMES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("uint8"): "U8",
}
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: list[bytes | memoryview]) -> None:
    """Write `chunks` to `path` through a temporary file + fsync + rename (+ fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write name -> array (NumPy or CuPy; copied to the host) as one .safetensors file, atomically.

    Tensors are stored C-order little-endian in the order given; metadata values must be strings."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("write_safetensors: metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    blobs: list[memoryview] = []
    offset = 0
    for name, a in tensors.items():
        host = np.ascontiguousarray(backend.to_numpy(a))
        if host.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: tensor {name!r} has dtype {host.dtype}, not storable")
        host = host.astype(host.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _DTYPE_NAMES[host.dtype],
            "shape": list(host.shape),
            "data_offsets": [offset, offset + host.nbytes],
        }
        blobs.append(memoryview(host.reshape(-1).view(np.uint8)))
        offset += host.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes with spaces
    _atomic_write(Path(path), [len(head).to_bytes(8, "little"), head, *blobs])


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, [json.dumps(obj, indent=2, sort_keys=True).encode("utf-8") + b"\n"])


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model_config: dict[str, Any],
    weights: dict[str, Any],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` under root/step-XXXXXXXX and point root/latest at it.

    Parameters
    ----------
    root : the checkpoints folder (created)
    step : optimizer steps done
    model_config : config.json contents (with model_type)
    weights : name -> full-precision weight (model.safetensors)
    state : name -> optimizer array (state.safetensors)
    meta : JSON-able resume metadata (stored as state.safetensors' metadata "rawformer.train")
    keep : complete step directories to keep (older ones are removed after `latest` moved on)

    Returns
    -------
    the step directory
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(step):08d}"
    final = root / name
    for stale in root.glob(".*.tmp-*"):  # left by a writer that died mid-checkpoint (one writer: rank 0)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    _write_json(tmp / "config.json", model_config)
    write_safetensors(tmp / "model.safetensors", weights, {"format": "pt", "step": str(int(step))})
    meta_text = json.dumps({**meta, "step": int(step)}, sort_keys=True)
    write_safetensors(tmp / "state.safetensors", state, {"rawformer.train": meta_text})
    if final.exists():  # a checkpoint of this step already exists (a re-run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write(root / LATEST, [name.encode("utf-8") + b"\n"])
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(len(steps) - max(int(keep), 1), 0)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory root/latest names, or None when there is no complete checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.safetensors").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory meant by `path`: a step directory itself, a checkpoints folder (its latest), or a
    run's output folder (its checkpoints/latest)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {path} (no model.safetensors, no complete `latest`)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (any path `resolve_checkpoint` takes) for resuming or evaluation.

    Returns {"path": the step directory, "config": config.json dict, "weights": name -> host array,
    "state": name -> host array, "meta": the resume metadata (with "step" and the training "config")}."""
    path = resolve_checkpoint(path)
    with open(path / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    model = SafetensorsFile(path / "model.safetensors")
    state = SafetensorsFile(path / "state.safetensors")
    meta = json.loads(state.metadata.get("rawformer.train", "{}"))
    return {
        "path": path,
        "config": config,
        "weights": {n: np.array(model.get(n)) for n in model.keys()},
        "state": {n: np.array(state.get(n)) for n in state.keys()},
        "meta": meta,
    }
