"""Data parallel: parameters broadcast from rank 0, gradients all-reduced in buckets while backward runs.

The training loop's contract (rank 0 alone writes checkpoints):

    dp = DataParallel(model.parameters(), groups.data)
    dp.broadcast_parameters()                 # once, at start: every replica starts from rank 0's weights
    for step ...:
        for micro in range(accum):
            dp.begin_step(sync=(micro == accum - 1))
            loss = model(batch[micro]); loss.backward()
        dp.finish()                           # every .grad is now the average over the data group
        optimizer.step()

How (the ideas of PyTorch DDP's reducer and Horovod's tensor fusion, written for our Tensor):

- Buckets: parameters in *reverse* order (backward produces the last layers' gradients first), packed into
  flat buffers of at most `bucket_mb` MiB; the first bucket is small (`first_bucket_mb`) so the first
  all-reduce starts early instead of waiting for 25 MB of gradients.
- Each parameter's `register_grad_ready_hook` fires when its .grad is final in this backward; the hook
  copies it into its bucket scaled by this rank's weight (1/size, or the load balancer's b_r / B), and when
  a bucket's last gradient is in, the bucket is all-reduced right away, on a side stream on the GPU: an event
  recorded on the compute stream orders the side stream after the copies, and `finish()` makes the compute
  stream wait for each bucket's completion event before the averaged values are copied back to .grad.
- The weighted sum sum_r w_r g_r with w_r = 1/size is the average; with w_r = b_r / B (rank r's micro-batch
  b_r of the global batch B, g_r the mean over its samples) it is exactly the global-batch mean gradient.
- fp16 compression: buckets are packed as float16 (after scaling, so the sum cannot overflow where the
  average does not) and all-reduced in float16 by NCCL: half the bytes. On MPI paths the values are rounded to
  float16 the same way but summed in float32 (MPI has no half-precision sum).
- Gradient accumulation: `begin_step(sync=False)` turns the hooks off: no communication on non-final
  micro-steps; the autograd accumulates into .grad, and the final micro-step reduces the accumulated sum.
- Waits go through the fault Watchdog: a peer that dies or hangs stops the job with its rank named.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.distributed import collectives, faults, groups
from rawformer.distributed.groups import Group

MIB = 1 << 20


@dataclass
class Bucket:
    """Parameters (indices into DataParallel.params) whose gradients travel together in one flat buffer."""

    index: int
    params: list[int]
    offsets: list[int]
    sizes: list[int]
    flat: Any = None  # (total,) reduction buffer: grad dtype, or float16 when compressing on NCCL
    ready: int = 0
    work: Any = None
    launched_at: float = 0.0  # perf_counter when its all-reduce was started (overlap diagnostics)

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0


def plan_buckets(
    nbytes: list[int], dtypes: list[Any], bucket_mb: float, first_bucket_mb: float
) -> list[list[int]]:
    """Group parameter indices into buckets in reverse order: the first bucket up to `first_bucket_mb` MiB,
    the rest up to `bucket_mb` MiB; a parameter larger than the cap gets a bucket of its own; a bucket holds
    one dtype.

    >>> plan_buckets([4, 4, 4, 4], ["f4"] * 4, 8 / MIB, 4 / MIB)
    [[3], [2, 1], [0]]
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    cap = first_bucket_mb * MIB
    for i in reversed(range(len(nbytes))):
        if current and (size + nbytes[i] > cap or np.dtype(dtypes[i]) != np.dtype(dtypes[current[0]])):
            buckets.append(current)
            current, size, cap = [], 0, bucket_mb * MIB
        current.append(i)
        size += nbytes[i]
    if current:
        buckets.append(current)
    return buckets


class DataParallel:
    """Bucketed, overlapped gradient averaging over a data-parallel group.

    Parameters
    ----------
    params : dict[str, Tensor] or iterable of Tensor
        The model's parameters, in model order (first layer first). Each has `.data` (NumPy or CuPy, all of
        one kind), `.grad` (same shape and dtype, or None) and `register_grad_ready_hook(fn)`.
    group : Group, optional
        The data-parallel group (default: that of `groups.current()`, i.e. of `rawformer.distributed.init()`).
    bucket_mb, first_bucket_mb : float
        Bucket caps in MiB (defaults 25 and 1, as PyTorch DDP).
    fp16_compress : bool
        All-reduce gradients in float16 (see the module docstring).
    timeout : float
        Seconds a wait may take before the Watchdog stops the job.
    kind : str, optional
        Collectives backend (default: collectives.default_kind of the parameters).
    watchdog : faults.Watchdog, optional
        Share one watchdog with other components (default: one over `group`).
    """

    def __init__(
        self,
        params: Any,
        group: Group | None = None,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        fp16_compress: bool = False,
        timeout: float = faults.DEFAULT_TIMEOUT_S,
        kind: str | None = None,
        watchdog: faults.Watchdog | None = None,
    ):
        if isinstance(params, dict):
            self.names, self.params = list(params), list(params.values())
        else:
            self.params = list(params)
            self.names = [f"param{i}" for i in range(len(self.params))]
        if not self.params:
            raise ValueError("params is empty: DataParallel needs at least one parameter")
        for i, p in enumerate(self.params):
            if not hasattr(p, "data") or not hasattr(p, "register_grad_ready_hook"):
                raise TypeError(f"params[{i}] ({type(p).__name__}) has no .data / register_grad_ready_hook")
        if not (bucket_mb > 0 and first_bucket_mb > 0):
            raise ValueError(f"bucket sizes must be > 0 MiB, got {bucket_mb=} {first_bucket_mb=}")
        gpu = [backend.is_cupy(p.data) for p in self.params]
        if any(gpu) and not all(gpu):
            raise TypeError("params mix NumPy and CuPy arrays: put the whole model on one device")
        self.on_gpu = gpu[0]
        self.xp = sys.modules["cupy"] if self.on_gpu else np
        self.group = group if group is not None else groups.current().data
        group = self.group
        self.kind = kind or collectives.default_kind(self.params[0].data)
        self.comms = group.collectives(self.kind)
        self.fp16_compress = bool(fp16_compress)
        self.watchdog = watchdog or faults.Watchdog(group, timeout)
        if self.kind == "nccl":
            self.watchdog.on_abort.append(self.comms.abort)
        self.side = self.xp.cuda.Stream(non_blocking=True) if self.on_gpu else None

        nbytes = [p.data.nbytes for p in self.params]
        dtypes = [p.data.dtype for p in self.params]
        self.buckets: list[Bucket] = []
        self._where: list[tuple[int, int]] = [(-1, -1)] * len(self.params)  # param -> (bucket, slot)
        for b, members in enumerate(plan_buckets(nbytes, dtypes, bucket_mb, first_bucket_mb)):
            sizes = [int(self.params[i].data.size) for i in members]
            offsets = list(np.cumsum([0, *sizes[:-1]]).astype(int))
            bucket = Bucket(b, members, offsets, sizes)
            wire = np.float16 if self.fp16_compress else dtypes[members[0]]
            if self.fp16_compress and self.kind != "nccl":
                wire = np.float32  # rounded to float16 when packed, summed in float32 (see the docstring)
            bucket.flat = self.xp.zeros(sum(sizes), dtype=wire)
            self.buckets.append(bucket)
            for slot, i in enumerate(members):
                self._where[i] = (b, slot)
        for i, p in enumerate(self.params):
            p.register_grad_ready_hook(functools.partial(self._grad_ready, i))

        self.sync = False  # hooks act only between begin_step(sync=True) and finish()
        self._pending: set[int] = set()  # parameters whose gradient this step has not packed yet
        self.weight = 1.0 / group.size
        self.step = 0
        self.wait_s = 0.0  # host time the last finish() spent waiting for the buckets
        # exposed communication of the last step: how long after the end of backward the last bucket's
        # all-reduce finished (GPU: CUDA events on the streams; CPU: the host wait)
        self.exposed_s = 0.0
        faults.rank_table(group)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.size

    # ---- the contract ------------------------------------------------------------------------------------

    def broadcast_parameters(self) -> None:
        """Every replica's .data <- group rank 0's (once, before training; one broadcast per bucket)."""
        for b in self.buckets:
            flat = self.xp.empty(b.numel, dtype=self.params[b.params[0]].data.dtype)
            for i, off, n in zip(b.params, b.offsets, b.sizes, strict=True):
                flat[off : off + n] = self.params[i].data.ravel()
            self.watchdog.wait(self.comms.broadcast(flat, root=0), "the parameter broadcast")
            if self.on_gpu:
                self.xp.cuda.get_current_stream().synchronize()
            for i, off, n in zip(b.params, b.offsets, b.sizes, strict=True):
                self.params[i].data[...] = flat[off : off + n].reshape(self.params[i].data.shape)

    def begin_step(self, sync: bool, weight: float | None = None) -> None:
        """Call before each micro-step's backward. sync=False: accumulate locally, no communication;
        sync=True (the final micro-step): reduce as gradients become ready.

        weight : this rank's share of the global gradient, w_r (default 1/size); the ranks' weights must sum
        to 1 (load balancing: w_r = b_r / B).
        """
        if weight is not None and not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        self.sync = bool(sync)
        self.weight = 1.0 / self.group.size if weight is None else float(weight)
        for b in self.buckets:
            b.ready, b.work = 0, None
        self._pending = {i for i in range(len(self.params))} if self.sync else set()

    def finish(self) -> None:
        """After the final micro-step's backward: wait for every bucket and write the averaged gradients
        back to .grad. Buckets whose hooks did not all fire (unused parameters) are reduced here (a missing
        .grad counts as zeros)."""
        if not self.sync:
            raise RuntimeError("finish() needs a preceding begin_step(sync=True) (the final micro-step)")
        for i in sorted(self._pending):
            self._grad_ready(i)
        self.watchdog.arrive(self.step)
        t0 = time.perf_counter()
        cur = self.xp.cuda.get_current_stream() if self.on_gpu else None
        backward_done = None
        if cur is not None:  # reached on the GPU when the backward's kernels (and the packing) have run
            backward_done = self.xp.cuda.Event()
            backward_done.record(cur)
        for b in self.buckets:
            what = f"the gradient all-reduce of bucket {b.index} ({b.numel} values, {self.group.name} group)"
            self.watchdog.wait(b.work, what)
            if cur is not None and hasattr(b.work, "event"):
                cur.wait_event(b.work.event)
        self.wait_s = time.perf_counter() - t0
        self.exposed_s = self.wait_s
        if backward_done is not None and all(hasattr(b.work, "event") for b in self.buckets):
            backward_done.synchronize()
            get = self.xp.cuda.get_elapsed_time
            self.exposed_s = max(0.0, *(get(backward_done, b.work.event) / 1e3 for b in self.buckets))
        for b in self.buckets:
            for i, off, n in zip(b.params, b.offsets, b.sizes, strict=True):
                p = self.params[i]
                view = b.flat[off : off + n].reshape(p.data.shape)
                if p.grad is None:
                    p.grad = view.astype(p.data.dtype)
                else:
                    p.grad[...] = view
        self.sync = False
        self.step += 1

    # ---- hooks -------------------------------------------------------------------------------------------

    def _grad_ready(self, i: int, *_: Any) -> None:
        """Hook: parameter i's gradient is final; pack it, and launch its bucket when that is complete."""
        if not self.sync or i not in self._pending:
            return
        self._pending.discard(i)
        b_idx, slot = self._where[i]
        b = self.buckets[b_idx]
        off, n = b.offsets[slot], b.sizes[slot]
        grad = self.params[i].grad
        dst = b.flat[off : off + n]
        if grad is None:
            dst[...] = 0
        elif self.fp16_compress and b.flat.dtype != np.float16:  # MPI: float16 values, float32 sum
            dst[...] = (grad.ravel() * self.weight).astype(np.float16)
        elif grad.dtype == dst.dtype:
            self.xp.multiply(grad.ravel(), self.weight, out=dst)
        else:  # float32 gradients packed as float16 for NCCL
            dst[...] = grad.ravel() * self.weight
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)
        elif not self.on_gpu:
            for other in self.buckets:  # MPI progresses only inside MPI calls: poke the ones in flight
                if other.work is not None:
                    other.work.done()

    def _launch(self, b: Bucket) -> None:
        b.launched_at = time.perf_counter()
        if not self.on_gpu:
            b.work = self.comms.allreduce(b.flat)
            return
        ready = self.xp.cuda.Event(block=False, disable_timing=True)
        ready.record(self.xp.cuda.get_current_stream())
        self.side.wait_event(ready)  # the side stream starts after the packing copies
        with self.side:
            # NCCL: queued on the side stream; MPI paths: the stream is synchronised and MPI runs on the host
            b.work = self.comms.allreduce(b.flat, stream=self.side)
