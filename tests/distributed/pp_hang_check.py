"""A pipeline stage that hangs (stage 1 of 2 sleeps in its forward): stage 0's receive times out and the
Watchdog names the stage and rank it waited for. Run: mpiexec -n 2 python pp_hang_check.py"""

from __future__ import annotations

import time

import pp_check

import rawformer.distributed as dist
from rawformer.distributed import pipeline

groups = dist.init(pp=2)
s = groups.stage
layers, _ = pp_check.make_layers()
ranges = pipeline.partition([1] * len(layers), 2)
mine = [layers[i] for i in ranges[s]]
if s == 1:
    mine.append(lambda h: time.sleep(3600) or h)  # hung: a device that never returns
stage = pipeline.AutogradStage(mine, first=s == 0, loss=pp_check.loss if s == 1 else None)
pipe = pipeline.Pipeline(stage, micro_batches=2, schedule_kind="1f1b", timeout=2.0)
pipe.run(pp_check.xs[:2] if s == 0 else None, pp_check.cs[:2] if s == 1 else None)
