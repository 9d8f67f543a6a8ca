"""`rawformer train --config CONFIG.json [--out DIR]`: train a GPT by a JSON config (rawformer.training).

Under mpirun / mpiexec with more than one process the run is data parallel (rawformer.distributed, imported
only then); rank 0 prints, writes checkpoints, log.jsonl, loss.png and summary.json into --out.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

_WORLD_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def mpi_world_size() -> int:
    """Processes in this MPI job, from the launcher's environment (1 when not launched by MPI)."""
    for name in _WORLD_ENV:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GPT from a JSON config (checkpoints, loss curve, held-out loss)",
        description="Trains the GPT-2-layout model of a training config on the byte-level standard-library "
        "corpus (or a folder of .py files); data parallel under mpirun.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="a training config JSON file, or a shipped one by name: tiny, gpt2-small, stdlib-gpt",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default=None, help="override the device")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None, help="override the dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rawformer.training.config import TrainConfig
    from rawformer.training.loop import train

    config = TrainConfig.from_json(args.config)
    changes = {k: v for k, v in (("steps", args.steps), ("device", args.device), ("dtype", args.dtype)) if v}
    if changes:
        config = config.replace(**changes)
        config.__post_init__()
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem

    dp_factory = None
    if mpi_world_size() > 1:
        from rawformer import distributed  # only a multi-process job needs MPI

        # before anything is allocated: picks this rank's GPU by its local rank
        groups = distributed.init(use_gpu={"cpu": False, "gpu": True}.get(config.device))
        dp_factory = distributed.DataParallel
        if groups.data.rank != 0:
            args.no_progress = True
    summary = train(config, out, dp_factory=dp_factory, resume=args.resume, progress=not args.no_progress)
    if summary["rank"] == 0:
        print(f"python {platform.python_version()} stdlib corpus; config {args.config}")
        print(f"steps {summary['steps']}  train time {summary['train_time_s']:.1f} s")
        print(f"final train loss {summary['final_train_loss']:.4f}")
        print(
            f"held-out loss {summary['held_out_loss']:.4f}  perplexity {summary['held_out_perplexity']:.4f}"
        )
        print(f"checkpoint {summary['checkpoint']}")
    return 0
