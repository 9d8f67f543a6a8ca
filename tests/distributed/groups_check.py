"""Groups and pipeline x data parallel on 4 ranks (pp=2, dp=2): the (dp, pp) layout of the groups, and two
2-stage pipelines, each on half the micro-batches, whose stage gradients DataParallel averages over the data
group: every gradient equals one process's over all micro-batches. Run: mpiexec -n 4 python groups_check.py"""

from __future__ import annotations

import common
import numpy as np
import pp_check

import rawformer.distributed as dist
from rawformer import autograd as ag
from rawformer.distributed import pipeline

groups = dist.init(pp=2)
rank, s, d = groups.rank, groups.stage, groups.dp_index
layout = {
    "rank": rank,
    "stage": s,
    "dp_index": d,
    "data": groups.data.world_ranks,
    "pipeline": groups.pipeline.world_ranks,
    "data_rank": groups.data.rank,
    "pipe_rank": groups.pipeline.rank,
    "local": [groups.local_rank, groups.local_size],
}
layouts = groups.world.comm.gather(layout, root=0)

micro = pp_check.MICRO
xs, cs = pp_check.xs + pp_check.xs[::-1], pp_check.cs + pp_check.cs[::-1]  # 2m micro-batches
mine = slice(d * micro, (d + 1) * micro)
layers, params = pp_check.make_layers()
counts = [q["w"].size + q["b"].size for q in params]
ranges = pipeline.partition(counts, 2)
stage_params = {f"{i}.{k}": params[i][k] for i in ranges[s] for k in ("w", "b")}
dp = dist.DataParallel(stage_params, groups.data, bucket_mb=0.001, first_bucket_mb=0.0005, timeout=60)
stage = pipeline.AutogradStage(
    [layers[i] for i in ranges[s]], first=s == 0, loss=pp_check.loss if s == 1 else None
)
pipe = pipeline.Pipeline(stage, groups.pipeline, micro_batches=micro, schedule_kind="1f1b", timeout=60, dp=dp)
pipe.run(xs[mine] if s == 0 else None, cs[mine] if s == 1 else None)
grads = groups.world.comm.gather({k: t.grad for k, t in stage_params.items()}, root=0)
if rank == 0:
    ref_layers, ref_params = pp_check.make_layers()
    for x, c in zip(xs, cs, strict=True):
        h = ag.Tensor(x)
        for f in ref_layers:
            h = f(h)
        pp_check.loss(h, c).backward(1.0 / (2 * micro))
    ref = {f"{i}.{k}": ref_params[i][k].grad for i in range(len(ref_layers)) for k in ("w", "b")}
    diff = max(float(np.abs(g[k] - ref[k]).max()) for g in grads for k in g)
    common.result(
        check="groups", layouts=layouts, grad_diff=diff, grads_seen=sorted({k for g in grads for k in g})
    )
