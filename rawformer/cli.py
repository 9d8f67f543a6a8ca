"""The `rawformer` command.

rawformer info     backend, device, versions
rawformer demo     run every fused op on each backend present and compare with its float64 reference
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

import numpy as np

from rawformer import backend

_VERSIONED = ("numpy", "cupy", "numba", "numba-cuda", "mpi4py", "onnx", "onnxruntime")


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
    for dist in _VERSIONED:
        rows[dist] = _version(dist)
    return rows


def _cmd_info(args: argparse.Namespace) -> int:
    rows = info()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from rawformer import demo

    demo.run(rows=args.rows, cols=args.cols, dtype=np.dtype(args.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rawformer",
        description="A transformer runtime on hand-written CUDA kernels, with a NumPy path for every op.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="print the backend, the device and library versions")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser(
        "demo",
        help="run every fused op on each backend present, timed, against its float64 reference",
        description="Runs softmax, layer_norm, rms_norm, GELU, SwiGLU and their backwards on the CPU (NumPy) "
        "and, when a GPU is present, the CUDA and Numba kernels; prints time and max error per op.",
    )
    p.add_argument("--rows", type=int, default=512, help="rows of the test matrix (default 512)")
    p.add_argument("--cols", type=int, default=1000, help="row length (default 1000: not a power of two)")
    p.add_argument("--dtype", default="float32", choices=["float16", "float32"], help="input dtype")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RuntimeError, ValueError, TypeError) as exc:
        print(f"rawformer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
