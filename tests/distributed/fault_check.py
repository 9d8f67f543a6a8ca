"""Faults: `train MODE CKPT` runs DP SGD with a checkpoint after every step (rank 0, atomic) and rank 1 dies
(MODE=kill: SIGKILL) or hangs (MODE=hang) at step FAIL_AT; `resume CKPT` continues from the checkpoint to
STEPS on however many ranks it is given and compares with one process.
Run: mpiexec -n R python tests/distributed/fault_check.py train kill /tmp/ckpt.npz"""

from __future__ import annotations

import os
import signal
import sys
import time

import common

import rawformer.distributed as dist
from rawformer.distributed import faults

STEPS, FAIL_AT, BATCH, LR, TIMEOUT = 6, 3, 24, 0.1, 3.0

what = sys.argv[1]
mode, path = (sys.argv[2], sys.argv[3]) if what == "train" else ("none", sys.argv[2])
groups = dist.init()
rank, size = groups.rank, groups.size
params = common.make_params(seed=0)
first = 0
if what == "resume":
    arrays, meta = faults.load_checkpoint(path)
    for k, p in params.items():
        p.data[...] = arrays[k]
    first = meta["step"]
dp = dist.DataParallel(params, timeout=TIMEOUT)
dp.broadcast_parameters()
x, c = common.data(STEPS, BATCH)
per = BATCH // size
for s in range(first, STEPS):
    if what == "train" and s == FAIL_AT and rank == 1:
        print(f"rank 1 fails now ({mode}) at step {s}", flush=True)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    dp.begin_step(sync=True)
    common.loss_fn(
        params, x[s, rank * per : (rank + 1) * per], c[s, rank * per : (rank + 1) * per]
    ).backward()
    dp.finish()
    common.sgd(params, LR)
    if rank == 0:
        faults.save_checkpoint(path, {k: p.data for k, p in params.items()}, {"step": s + 1, "ranks": size})
if rank == 0 and what == "resume":
    ref = common.reference_run(STEPS, BATCH, LR, seed=0)
    final = {k: p.data for k, p in params.items()}
    common.result(check="resume", size=size, first=first, max_diff=common.max_diff(final, ref))
