"""Load balancing on 2+ ranks, rank 1 slowed 2x (it sleeps twice as long per sample): after the first
re-balance the step time falls by >= 25%, and every step's gradient equals the single-process one.
Run: mpiexec -n R python tests/distributed/balance_check.py"""

from __future__ import annotations

import time

import common
import numpy as np

import rawformer.distributed as dist
from rawformer.distributed.balance import LoadBalancer

STEPS, EVERY, BATCH, COST = 6, 3, 24, 0.008  # COST: seconds per sample of the simulated device

groups = dist.init()
rank = groups.rank
params = common.make_params(seed=0)
dp = dist.DataParallel(params, timeout=60)
lb = LoadBalancer(BATCH, every=EVERY)
x, c = common.data(STEPS, BATCH)
step_s, grad_diff = [], 0.0
for s in range(STEPS):
    groups.world.barrier()
    t_step = time.perf_counter()
    lo, hi = lb.slice
    dp.begin_step(sync=True, weight=lb.weight)
    t = time.perf_counter()
    time.sleep(COST * lb.share * (2.0 if rank == 1 else 1.0))  # the device's work (rank 1 is 2x slower)
    common.loss_fn(params, x[s, lo:hi], c[s, lo:hi]).backward()
    lb.record(time.perf_counter() - t)
    dp.finish()
    step_s.append(time.perf_counter() - t_step)
    if rank == 0:
        ref = common.reference_grads(x[s], c[s], seed=0)
        grad_diff = max(grad_diff, common.max_diff({k: p.grad for k, p in params.items()}, ref))
    for p in params.values():
        p.grad = None  # no update: every step's gradient is checked at the same weights
    lb.end_step()
if rank == 0:
    before, after = float(np.median(step_s[:EVERY])), float(np.median(step_s[EVERY:]))
    common.result(
        check="balance",
        shares=lb.history,
        before_s=before,
        after_s=after,
        improvement=1 - after / before,
        grad_diff=grad_diff,
    )
