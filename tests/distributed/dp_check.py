"""DP over the world: N SGD steps with 2 accumulation micro-steps per step equal one process over the same
global batch. Run: mpiexec -n R python tests/distributed/dp_check.py"""

from __future__ import annotations

import common
import numpy as np

import rawformer.distributed as dist

STEPS, BATCH, ACCUM, LR = 4, 24, 2, 0.1

groups = dist.init()
rank, size = groups.rank, groups.size
params = common.make_params(seed=rank)  # replicas start different: broadcast_parameters must fix that
dp = dist.DataParallel(params, bucket_mb=200 / 2**20, first_bucket_mb=60 / 2**20, timeout=60)
dp.broadcast_parameters()
x, c = common.data(STEPS, BATCH)
per = BATCH // (size * ACCUM)
launches = []
for s in range(STEPS):
    for m in range(ACCUM):
        dp.begin_step(sync=m == ACCUM - 1)
        lo = (m * size + rank) * per  # micro-step m, rank's slice of it
        common.loss_fn(params, x[s, lo : lo + per], c[s, lo : lo + per], scale=1.0 / ACCUM).backward()
        # buckets launched during this backward (before finish): none on the accumulation micro-step
        launches.append(sum(b.work is not None for b in dp.buckets))
    dp.finish()
    common.sgd(params, LR)
final = {k: p.data.copy() for k, p in params.items()}
gathered = groups.world.comm.gather(final, root=0)

# fp16 compression: the same steps with gradients rounded to float16 on the wire
half = common.make_params(seed=0)
dp16 = dist.DataParallel(half, fp16_compress=True, timeout=60)
for s in range(STEPS):
    dp16.begin_step(sync=True)
    lo = rank * (BATCH // size)
    common.loss_fn(half, x[s, lo : lo + BATCH // size], c[s, lo : lo + BATCH // size]).backward()
    dp16.finish()
    common.sgd(half, LR)
if rank == 0:
    ref = common.reference_run(STEPS, BATCH, LR, seed=0)
    common.result(
        check="dp",
        size=size,
        buckets=len(dp.buckets),
        launches=launches,
        max_diff=common.max_diff(final, ref),
        replica_diff=max(common.max_diff(g, final) for g in gathered),
        fp16_rel=max(float(np.abs(half[k].data - ref[k]).max() / np.abs(ref[k]).max()) for k in ref),
    )
