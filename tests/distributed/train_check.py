"""The training loop (rawformer.training.loop.train) with DataParallel on R CPU ranks against one process over
the same global batch: each step's loss averaged over the ranks (each logs its own slice's) equals the one
process's loss, step after step (so the weights the steps produced agree too).
Run: mpiexec -n R python train_check.py OUT_DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import common

import rawformer.distributed as dist
from rawformer.training.config import TrainConfig
from rawformer.training.loop import train

GLOBAL_BATCH = 4
groups = dist.init()
rank, size = groups.rank, groups.size
out = Path(sys.argv[1])
config = TrainConfig(
    model={
        "model_type": "gpt2",
        "vocab_size": 257,
        "n_layer": 1,
        "n_embd": 32,
        "n_head": 2,
        "n_positions": 32,
    },
    max_files=4,
    seq_len=16,
    batch_size=GLOBAL_BATCH // size,
    steps=3,
    warmup_steps=1,
    device="cpu",
    eval_batches=1,
    log_every=1,
)
quiet = lambda _msg: None
multi = train(config, out / "dp", dp_factory=dist.DataParallel, progress=False, log=quiet)
per_rank = groups.world.comm.gather(multi["losses"], root=0)
if rank == 0:
    mean = [sum(step) / size for step in zip(*per_rank, strict=True)]
    one = train(config.replace(batch_size=GLOBAL_BATCH), out / "one", progress=False, log=quiet)
    common.result(
        check="train",
        size=size,
        losses=mean,
        one=one["losses"],
        max_diff=max(abs(a - b) for a, b in zip(mean, one["losses"], strict=True)),
    )
