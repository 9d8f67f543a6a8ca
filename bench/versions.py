"""Sweep the numbered kernel variants (`version=`) of one op over the benchmark shapes.

The launchers pick a default variant by row length; this script times every variant that accepts a shape, so
the defaults can be set from measurements instead of reasoning. Same timing method as bench/kernels.py
(harness.py: CUDA events, warm-up, median, inputs rotated over > 4x L2), bytes counted as the minimum.

    python bench/versions.py                       softmax, layer_norm, rms_norm forward and backward
    python bench/versions.py --ops softmax --shapes 4096x32000,1024x131072 --dtype float16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {"float16": ["32768x1024", "8192x4096", "4096x32000", "1024x131072"], "float32": ["16384x8192"]}


def _cases(rf, cp, op: str, rows: int, cols: int, dtype: str, n_sets: int):
    """(name, bytes, [calls per rotation set], versions) for one op and direction."""
    rng = cp.random.default_rng(0)
    x = [rng.standard_normal((rows, cols), dtype=cp.float32).astype(dtype) for _ in range(n_sets)]
    dy = [rng.standard_normal((rows, cols), dtype=cp.float32).astype(dtype) for _ in range(n_sets)]
    w = (1 + 0.1 * rng.standard_normal(cols, dtype=cp.float32)).astype(dtype)
    b = (0.1 * rng.standard_normal(cols, dtype=cp.float32)).astype(dtype)
    out = [cp.empty_like(a) for a in x]
    item = np.dtype(dtype).itemsize
    n = rows * cols * item
    if op == "softmax":
        y = [rf.softmax(a) for a in x]
        yield "softmax fwd", 2 * n, lambda i, v: rf.softmax(x[i], out=out[i], version=v), (1, 2, 3, 4, 5)
        yield (
            "softmax bwd",
            3 * n,
            lambda i, v: rf.softmax_backward(dy[i], y[i], out=out[i], version=v),
            (1, 2, 3, 4),
        )
    elif op == "layer_norm":
        stats = [rf.layer_norm(a, w, b, return_stats=True)[1:] for a in x]
        yield (
            "layer_norm fwd",
            2 * n,
            lambda i, v: rf.layer_norm(x[i], w, b, out=out[i], version=v),
            (1, 2, 3, 4),
        )
        yield (
            "layer_norm bwd",
            3 * n,
            lambda i, v: rf.layer_norm_backward(dy[i], x[i], w, *stats[i], version=v),
            (1, 2, 3, 4),
        )
    elif op == "rms_norm":
        rstd = [rf.rms_norm(a, w, return_stats=True)[1] for a in x]
        yield "rms_norm fwd", 2 * n, lambda i, v: rf.rms_norm(x[i], w, out=out[i], version=v), (1, 2, 3, 4)
        yield (
            "rms_norm bwd",
            3 * n,
            lambda i, v: rf.rms_norm_backward(dy[i], x[i], w, rstd[i], version=v),
            (1, 2, 3, 4),
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", default="softmax,layer_norm,rms_norm")
    parser.add_argument("--shapes", default=None, help="comma list of RxC (default: the bench shapes)")
    parser.add_argument("--dtype", default=None, choices=["float16", "float32"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    cp = harness.require_gpu("bench/versions.py")
    import rawformer as rf

    clock = harness.CudaClock(cp)
    device = harness.device_header(cp)
    ceiling = harness.measure_copy_ceiling(cp, clock)["ceiling_gbps"]
    print(f"{device['gpu']}: copy ceiling {ceiling:.0f} GB/s")
    dtypes = [args.dtype] if args.dtype else list(SHAPES)
    for dtype in dtypes:
        shapes = args.shapes.split(",") if args.shapes else SHAPES[dtype]
        for shape in shapes:
            rows, cols = (int(s) for s in shape.split("x"))
            n_sets = harness.rotation_sets(2 * rows * cols * np.dtype(dtype).itemsize, device["l2_bytes"])
            for op in args.ops.split(","):
                for name, nbytes, call, versions in _cases(rf, cp, op, rows, cols, dtype, n_sets):
                    cells = []
                    for v in (None, *versions):
                        try:
                            call(0, v)
                        except ValueError:
                            continue  # this variant does not take the shape
                        calls = [lambda i=i, v=v, call=call: call(i, v) for i in range(n_sets)]
                        t = harness.time_calls(calls, clock, reps=args.reps)
                        gb = harness.gbps(nbytes, t.median)
                        cells.append(
                            f"{'default' if v is None else f'v{v}'} {gb:6.0f} GB/s {100 * gb / ceiling:5.1f}%"
                        )
                    print(f"{name:<15} {shape:>12} {dtype:<8} | " + " | ".join(cells), flush=True)
            cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
