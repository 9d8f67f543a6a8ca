"""Gradients as bucket views (DataParallel on CPU ranks): every .grad is its slot of a bucket's flat buffer;
zero_grad (None) -> re-attached and zeroed at the next begin_step; accumulation over micro-steps in place;
a .grad put there by the caller (before begin_step, or between begin_step and backward) is copied into the
bucket, not lost; an unused parameter counts as zeros; fp16 compression of float32 gradients keeps the
packing path (no views). Every averaged gradient is compared with one process over the global batch.
Also the one-rank all-reduce of the host-staged backend on NumPy arrays (a no-op / a copy).
Run: mpiexec -n R python dp_views_check.py"""

from __future__ import annotations

import common
import numpy as np

import rawformer.distributed as dist
from rawformer import autograd as ag
from rawformer.distributed import collectives

BATCH, ACCUM = 24, 2

groups = dist.init()
rank, size = groups.rank, groups.size
x, c = common.data(3, BATCH)
per = BATCH // size


def model() -> dict[str, ag.Tensor]:
    params = common.make_params(seed=0)
    # first in model order, so in the last bucket: never used by the loss, reduced by finish()
    return {"unused": ag.Tensor(np.ones((3, 4), dtype=np.float32), requires_grad=True), **params}


def mine(s: int, m: int = 0, accum: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rank's slice of micro-step m of step s (the global batch cut into accum * size slices)."""
    n = BATCH // (accum * size)
    lo = (m * size + rank) * n
    return x[s, lo : lo + n], c[s, lo : lo + n]


def ref_grads(s: int) -> dict[str, np.ndarray]:
    g = common.reference_grads(x[s], c[s], seed=0)
    return {"unused": np.zeros((3, 4), dtype=np.float32), **g}


def diff(params: dict[str, ag.Tensor], ref: dict[str, np.ndarray], extra: dict | None = None) -> float:
    extra = extra or {}
    return max(float(np.abs(params[k].grad - ref[k] - extra.get(k, 0)).max()) for k in ref)


def views_of(dp: dist.DataParallel, params: dict[str, ag.Tensor]) -> bool:
    """Every .grad is its own slot of its bucket's flat buffer."""
    ok = True
    for b in dp.buckets:
        for k, i in enumerate(b.params):
            g = dp.params[i].grad
            ok &= g is b.slots[k] and np.shares_memory(g, b.flat)
            ok &= b.offsets[k] * b.flat.itemsize % 256 == 0
    return bool(ok)


report: dict = {"size": size}
params = model()
dp = dist.DataParallel(params, bucket_mb=200 / 2**20, first_bucket_mb=60 / 2**20, timeout=60)
report["buckets"] = len(dp.buckets)
report["all_views"] = all(b.views for b in dp.buckets)

# 1. None -> attached (one memset per bucket) and zeroed; the averaged gradient; still views after finish
for p in params.values():
    p.grad = np.full(p.shape, np.nan, dtype=np.float32)  # garbage in the buffers: must be zeroed
dp.begin_step(True)
for b in dp.buckets:
    b.flat[...] = np.nan
for p in params.values():
    p.grad = None  # zero_grad after begin_step: the hooks and finish() re-attach
dp.begin_step(True)
report["attached_zero"] = views_of(dp, params) and all(not b.flat.any() for b in dp.buckets)
common.loss_fn(params, *mine(0)).backward()
dp.finish()
report["step_diff"] = diff(params, ref_grads(0))
report["views_after_finish"] = views_of(dp, params)

# 2. zero_grad -> None -> re-attached; accumulation over two micro-steps in the bucket
for p in params.values():
    p.grad = None
for m in range(ACCUM):
    dp.begin_step(m == ACCUM - 1)
    report[f"views_micro{m}"] = views_of(dp, params)
    common.loss_fn(params, *mine(1, m, ACCUM), scale=1.0 / ACCUM).backward()
dp.finish()
report["accum_diff"] = diff(params, ref_grads(1))

# 3. foreign gradients: one set before begin_step (with the others None: a bucket of mixed states), one set
# between begin_step and backward (the hook copies it in), one on the unused parameter (finish copies it)
for p in params.values():
    p.grad = None
rs = np.random.default_rng(42)  # the same on every rank: each adds it, the average keeps it
foreign = {k: rs.standard_normal(params[k].shape).astype(np.float32) for k in ("w1", "b2", "unused")}
params["w1"].grad = foreign["w1"].copy()
params["unused"].grad = foreign["unused"].copy()
dp.begin_step(True)
params["b2"].grad = foreign["b2"].copy()
common.loss_fn(params, *mine(2)).backward()
dp.finish()
report["foreign_diff"] = diff(params, ref_grads(2), foreign)
report["views_after_foreign"] = views_of(dp, params)

# 4. fp16 compression of float32 gradients: packed, not views; .grad its own array, half-precision values
half = model()
dp16 = dist.DataParallel(half, fp16_compress=True, timeout=60)
dp16.begin_step(True)
common.loss_fn(half, *mine(0)).backward()
dp16.finish()
ref = ref_grads(0)
report["fp16_views"] = any(b.views for b in dp16.buckets)
report["fp16_shares"] = any(np.shares_memory(p.grad, b.flat) for p in half.values() for b in dp16.buckets)
report["fp16_rel"] = max(
    float(np.abs(half[k].grad - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30)) for k in ref
)

# 5. the host-staged backend on NumPy arrays: one rank is a no-op in place and a copy out of place
staged = groups.world.collectives("host-staged")
a = np.full(5, rank + 1.0, dtype=np.float32)
staged.allreduce(a).wait()
out = np.full(5, -1.0, dtype=np.float32)
src = np.full(5, rank + 1.0, dtype=np.float32)
staged.allreduce(src, out=out).wait()
total = size * (size + 1) / 2
report["staged_wrong"] = int(
    np.count_nonzero(a != total) + np.count_nonzero(out != total) + np.count_nonzero(src != rank + 1)
)
report["staged_local"] = isinstance(staged.allreduce(a), collectives._Done) if size == 1 else None

gathered = groups.world.comm.gather(report, root=0)
if rank == 0:
    common.result(check="dp_views", ranks=gathered)
