"""PP over the world (one pipeline of R stages): GPipe and 1F1B, the losses and every parameter gradient equal
the single-process model's. Run: mpiexec -n R python tests/distributed/pp_check.py [plan]
PP_GPU=1: parameters and activations on the GPU (CuPy), sent through the collectives of CuPy arrays."""

from __future__ import annotations

import os
import sys

import common
import numpy as np

import rawformer.distributed as dist
from rawformer import autograd as ag
from rawformer.distributed import pipeline

DIMS = [7, 11, 13, 9, 17, 8, 12, 10, 6]  # 8 layers of different sizes: the split by parameter count matters
MICRO, PER = 5, 3  # micro-batches, samples per micro-batch
GPU = bool(os.environ.get("PP_GPU"))


def dev(a: np.ndarray) -> object:
    """The array where this run keeps it (the GPU with PP_GPU=1)."""
    if not GPU:
        return a
    import cupy

    return cupy.asarray(a)


def host(a: object) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def make_layers(seed: int = 5) -> tuple[list, list[dict[str, ag.Tensor]]]:
    rng = np.random.default_rng(seed)
    params = []
    for a, b in zip(DIMS[:-1], DIMS[1:], strict=True):
        params.append(
            {
                "w": ag.Tensor(
                    dev((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)), requires_grad=True
                ),
                "b": ag.Tensor(dev((rng.standard_normal(b) * 0.1).astype(np.float32)), requires_grad=True),
            }
        )
    layers = [lambda h, p=p: ag.gelu(ag.linear(h, p["w"], p["b"])) for p in params]
    return layers, params


def loss(y: ag.Tensor, c: np.ndarray) -> ag.Tensor:
    flat = ag.reshape(y, (1, y.size))
    return ag.mul(ag.sum(ag.linear(flat, ag.Tensor(dev(c).reshape(-1, 1)))), 1.0 / y.shape[0])


rng = np.random.default_rng(3)
xs = [rng.standard_normal((PER, DIMS[0])).astype(np.float32) for _ in range(MICRO)]
cs = [rng.standard_normal((PER, DIMS[-1])).astype(np.float32) for _ in range(MICRO)]


def main() -> None:
    groups = dist.init(pp=int(dist.mpi().COMM_WORLD.Get_size()), use_gpu=GPU)
    p, s = groups.pipeline.size, groups.stage
    plan = [int(k) for k in sys.argv[1].split(",")] if len(sys.argv) > 1 else None
    counts = [d["w"].size + d["b"].size for d in make_layers()[1]]
    ranges = pipeline.partition(counts, p, plan)
    report = {}
    for kind in pipeline.SCHEDULES:
        layers, params = make_layers()
        mine = ranges[s]
        stage = pipeline.AutogradStage(
            [layers[i] for i in mine], first=s == 0, loss=loss if s == p - 1 else None
        )
        pipe = pipeline.Pipeline(stage, micro_batches=MICRO, schedule_kind=kind, timeout=60)
        losses = pipe.run([dev(x) for x in xs] if s == 0 else None, cs if s == p - 1 else None)
        grads = {f"{i}.{k}": host(params[i][k].grad) for i in mine for k in ("w", "b")}
        all_grads = groups.world.comm.gather(grads, root=0)
        last_losses = groups.world.comm.bcast([float(v) for v in losses] if s == p - 1 else None, root=p - 1)
        spans = pipe.gather_timeline()
        if s == 0:
            merged = {k: v for g in all_grads for k, v in g.items()}
            # the reference: the whole model in one process, one backward over each micro-batch, seed 1/m
            ref_layers, ref_params = make_layers()
            ref_losses = []
            for x, c in zip(xs, cs, strict=True):
                h = ag.Tensor(dev(x))
                for f in ref_layers:
                    h = f(h)
                out = loss(h, c)
                ref_losses.append(float(host(out.data)))
                out.backward(1.0 / MICRO)
            ref = {
                f"{i}.{k}": host(ref_params[i][k].grad) for i in range(len(ref_layers)) for k in ("w", "b")
            }
            report[kind] = {
                "grad_diff": max(float(np.abs(merged[k] - ref[k]).max()) for k in ref),
                "grads_seen": len(merged),
                "loss_diff": max(abs(a - b) for a, b in zip(last_losses, ref_losses, strict=True)),
                "bubble": pipeline.bubble_fraction(spans, p),
                "theory": pipeline.theoretical_bubble(p, MICRO),
                "peak_in_flight": pipe.in_flight_peak,
            }
            if os.environ.get("PNG_DIR"):  # the timeline of this step, as the user would see it
                png = os.path.join(os.environ["PNG_DIR"], f"pp{p}_{kind}.png")
                report[kind]["png"] = pipeline.plot_timeline(
                    spans, p, MICRO, png, title=f"{kind}, {p} stages"
                )["path"]
    if s == 0:
        common.result(check="pp", stages=p, ranges=[[r.start, r.stop] for r in ranges], **report)


if __name__ == "__main__":
    main()
