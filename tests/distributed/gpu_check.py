"""The GPU paths on however many ranks mpirun gives (one GPU per rank; the CI GPU test runs one rank):
collectives through NCCL and host-staged MPI (and CUDA-aware MPI where the MPI reports it), and
DataParallel on CuPy parameters against one process on the same GPU. Run: mpirun -n 1 python gpu_check.py"""

from __future__ import annotations

import os
import time

import common
import cupy as cp
import numpy as np

import rawformer.distributed as dist
from rawformer import autograd as ag
from rawformer.distributed import collectives

STEPS, BATCH, LR = 3, 24, 0.1

groups = dist.init(use_gpu=True)
world, rank, size = groups.world, groups.rank, groups.size
report: dict = {"size": size, "cuda_aware_mpi": collectives.cuda_aware_mpi()}
# GPU_KINDS=host-staged: several ranks sharing one GPU (NCCL wants a GPU per rank)
kinds = os.environ.get("GPU_KINDS", "").split(",") if os.environ.get("GPU_KINDS") else ["nccl", "host-staged"]
kinds += ["mpi-cuda"] if report["cuda_aware_mpi"] and "nccl" in kinds else []
for kind in kinds:
    comms = world.collectives(kind)
    bad = 0
    for dtype in (cp.float32, cp.float16):
        for n in (1, 1000, 65537):
            a = cp.full(n, rank + 1, dtype=dtype)
            comms.allreduce(a).wait()
            cp.cuda.get_current_stream().synchronize()
            bad += int(cp.count_nonzero(a != size * (size + 1) // 2))
            out = cp.full(n, -1, dtype=dtype)
            b = cp.full(n, rank + 1, dtype=dtype)
            comms.allreduce(b, out=out).wait()
            cp.cuda.get_current_stream().synchronize()
            bad += int(cp.count_nonzero(out != size * (size + 1) // 2))
            c = cp.arange(n, dtype=dtype) if rank == 0 else cp.zeros(n, dtype=dtype)
            comms.broadcast(c, root=0).wait()
            cp.cuda.get_current_stream().synchronize()
            bad += int(cp.count_nonzero(c != cp.arange(n, dtype=dtype)))
    report[f"{kind}_wrong"] = world.comm.allreduce(bad)

x, c = common.data(STEPS, BATCH)


def on_gpu(seed: int) -> dict:
    params = common.make_params(seed=seed)
    for p in params.values():
        p.data = cp.asarray(p.data)
    return params


# the reference: one process on this GPU (the same kernels), one backward over the global batch per step
ref_params = on_gpu(0)
for s in range(STEPS):
    common.loss_fn(ref_params, cp.asarray(x[s]), cp.asarray(c[s])).backward()
    for p in ref_params.values():
        p.data -= np.float32(LR) * p.grad
        p.grad = None
ref = {k: cp.asnumpy(p.data) for k, p in ref_params.items()}

per = BATCH // size
for kind, fp16 in (("nccl", False), ("nccl", True), ("host-staged", False)):
    if kind not in kinds:
        continue
    params = on_gpu(0)
    dp = dist.DataParallel(params, bucket_mb=200 / 2**20, first_bucket_mb=60 / 2**20, kind=kind,
                           fp16_compress=fp16, timeout=60)  # fmt: skip
    dp.broadcast_parameters()
    early = []
    for s in range(STEPS):
        dp.begin_step(True)
        lo = rank * per
        common.loss_fn(params, cp.asarray(x[s, lo : lo + per]), cp.asarray(c[s, lo : lo + per])).backward()
        early.append(sum(b.work is not None for b in dp.buckets))  # launched during backward
        dp.finish()
        for p in params.values():
            p.data -= np.float32(LR) * p.grad
            p.grad = None
    final = {k: cp.asnumpy(p.data) for k, p in params.items()}
    name = f"{kind}{'_fp16' if fp16 else ''}"
    report[f"dp_{name}_rel"] = max(float(np.abs(final[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    report[f"dp_{name}_early"] = early
    report[f"dp_{name}_buckets"] = len(dp.buckets)

# finish() on NCCL does not block the host: a 0.5 s spin kernel is queued after backward, and an unused
# parameter (first in model order: the last bucket) makes finish() itself launch that bucket's all-reduce,
# which must wait for the spin on the GPU, not on the host
SPIN_NS = 500_000_000
spin = cp.RawKernel(
    r"""
extern "C" __global__ void spin_ns(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}""",
    "spin_ns",
)
if "nccl" in kinds:
    params = {"unused": ag.Tensor(cp.ones((3, 4), dtype=cp.float32), requires_grad=True), **on_gpu(0)}
    dp = dist.DataParallel(params, bucket_mb=200 / 2**20, first_bucket_mb=60 / 2**20, kind="nccl", timeout=60)
    lo = rank * per
    xs, cs = cp.asarray(x[0, lo : lo + per]), cp.asarray(c[0, lo : lo + per])
    spin((1,), (1,), (np.uint64(1000),))  # compiled before anything is timed
    for _ in range(2):  # warm-up; the timed finish() checks the last one's events (complete by then)
        for p in params.values():
            p.grad = None
        dp.begin_step(True)
        common.loss_fn(params, xs, cs).backward()
        dp.finish()
    report["finish_views"] = all(
        dp.params[i].grad is b.slots[k] for b in dp.buckets for k, i in enumerate(b.params)
    )
    cp.cuda.Device().synchronize()
    for p in params.values():
        p.grad = None
    dp.begin_step(True)
    common.loss_fn(params, xs, cs).backward()
    spin((1,), (1,), (np.uint64(SPIN_NS),))
    t0 = time.perf_counter()
    dp.finish()
    report["finish_ms"] = (time.perf_counter() - t0) * 1e3
    after = cp.cuda.Event(disable_timing=True)
    after.record()  # on the compute stream, behind finish()'s waits for the bucket events
    report["finish_returned_before_spin"] = not after.done
    grads = {k: cp.asnumpy(p.grad) for k, p in params.items()}  # ordered after the all-reduces
    ref_params = on_gpu(0)  # one process over the global batch, on this GPU
    common.loss_fn(ref_params, cp.asarray(x[0]), cp.asarray(c[0])).backward()
    ref_grads = {k: cp.asnumpy(p.grad) for k, p in ref_params.items()}
    ref_grads["unused"] = np.zeros((3, 4), dtype=np.float32)
    report["finish_grad_rel"] = max(
        float(np.abs(grads[k] - ref_grads[k]).max() / max(np.abs(ref_grads[k]).max(), 1e-30))
        for k in ref_grads
    )
    report["finish_unused_zero"] = not grads["unused"].any()
    report["finish_exposed_ms"] = dp.exposed_s * 1e3
if rank == 0:
    common.result(check="gpu", **report)
