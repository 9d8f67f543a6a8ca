"""`rawformer info`: the backend, the device and the versions of the libraries rawformer uses."""

from __future__ import annotations

import argparse
import importlib.metadata

from rawformer import backend

VERSIONED = ("numpy", "cupy", "numba", "numba-cuda", "mpi4py", "onnx", "onnxruntime", "aiohttp", "tqdm")


def _version(dist: str) -> str:
    for name in (dist, f"{dist}-cuda13x", f"{dist}-cuda12x"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def info() -> dict[str, str]:
    """What rawformer runs on here, as printable key/value pairs."""
    rows = {"rawformer": importlib.metadata.version("rawformer")}
    try:
        rows["backend"] = backend.name()
    except (RuntimeError, ValueError) as exc:
        rows["backend"] = f"error: {exc}"
    dev = backend.device_info()
    if dev:
        rows["device"] = dev["name"]
        rows["compute capability"] = dev["compute_capability"]
        rows["multiprocessors"] = str(dev["multiprocessors"])
        rows["L2 cache"] = f"{dev['l2_bytes'] / 2**20:.0f} MiB"
        rows["memory"] = f"{dev['memory_free'] / 2**30:.1f} GiB free of {dev['memory_total'] / 2**30:.1f} GiB"
    else:
        rows["device"] = "none (CPU only: CuPy missing or no CUDA device)"
    for dist in VERSIONED:
        rows[dist] = _version(dist)
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print the backend, the device and library versions",
        description="Prints which backend rawformer picked (RAWFORMER_BACKEND=cpu|gpu overrides it), the GPU "
        "it found (name, compute capability, memory) and the versions of the optional libraries.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = info()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0
