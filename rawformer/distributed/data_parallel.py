"""Data parallel: parameters broadcast from rank 0, gradients all-reduced in buckets while backward runs.

The training loop's contract (rank 0 alone writes checkpoints):

    dp = DataParallel(model.parameters(), groups.data)
    dp.broadcast_parameters()                 # once, at start: every replica starts from rank 0's weights
    for step ...:
        for micro in range(accum):
            dp.begin_step(sync=(micro == accum - 1))
            loss = model(batch[micro]); loss.backward()
        dp.finish()                           # every .grad is now the average over the data group
        optimizer.step()                      # (on the GPU: queued after the all-reduces, see below)
        optimizer.zero_grad()

How (the ideas of PyTorch DDP's reducer and Horovod's tensor fusion, written for our Tensor):

- Buckets: parameters in *reverse* order (backward produces the last layers' gradients first), laid out in
  flat buffers of at most `bucket_mb` MiB; the first bucket is small (`first_bucket_mb`) so the first
  all-reduce starts early instead of waiting for 25 MB of gradients. Each parameter's slot starts on a
  256-byte boundary (a view of the bucket is aligned like a fresh allocation).
- Gradients as bucket views (DDP's gradient_as_bucket_view): each parameter's `.grad` *is* its slot of the
  bucket (`Tensor.use_grad_buffer`), so backward accumulates straight into the buffer that is all-reduced:
  no packing copy and no copy back. `begin_step` re-attaches every parameter whose `.grad` is None
  (optimizer.zero_grad) or some other array (copied in, so nothing accumulated is lost); a bucket whose
  parameters all have no gradient is zeroed with one memset, not one fill per parameter.
- Each parameter's `register_grad_ready_hook` fires when its .grad is final in this backward; the hook only
  counts. When a bucket's last gradient is in, the bucket is scaled by this rank's weight (one kernel,
  skipped when the weight is exactly 1, as on one rank) and all-reduced in place at once: on the GPU on a
  side stream, ordered after the compute stream by an event recorded there.
- The weighted sum sum_r w_r g_r with w_r = 1/size is the average; with w_r = b_r / B (rank r's micro-batch
  b_r of the global batch B, g_r the mean over its samples) it is exactly the global-batch mean gradient.
- fp16 compression of float32 gradients: those buckets are not views: the hook packs the gradient, scaled,
  as float16 and NCCL all-reduces float16 (half the bytes); `finish()` copies the sums back to .grad. On MPI
  paths the values are rounded to float16 the same way but summed in float32 (MPI has no half-precision
  sum). Scaling before the sum keeps it from overflowing where the average does not.
- Gradient accumulation: `begin_step(sync=False)` turns the hooks off: no communication on non-final
  micro-steps; backward accumulates into the views, and the final micro-step reduces the accumulated sum.

Never blocking the host on the GPU (NCCL): `finish()` launches the buckets whose hooks did not fire, makes
the compute stream wait for every bucket's completion event and returns at once; whatever runs next on the
compute stream (the optimizer, a `.get()` of a gradient) sees the averaged gradients, while the host goes on
launching kernels. Work on *another* stream must wait for the compute stream itself. Two things that used to
need the host to wait are deferred:

- Hang detection: the Watchdog checks the bucket events of the *previous* step at the next `finish()` (one
  step late; they are normally long complete, so the check costs one event query per bucket). A peer that
  dies inside step s's all-reduce is named at step s + 1's finish(), or by `synchronize()`, which waits for
  the last step's all-reduces through the Watchdog (call it before a checkpoint and at the end of training).
- `exposed_s` (how long after the end of backward the last bucket's all-reduce completed: the communication
  that overlap did not hide) is computed from the last step's CUDA events when read, waiting for them.

On the CPU (MPI on NumPy arrays), and on the GPU with the MPI-based backends, the host does wait in
`finish()` as before: MPI progresses only inside MPI calls, and host-staged results are copied back by the
host. Every wait goes through the fault Watchdog: a peer that dies or hangs stops the job with its rank
named.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.distributed import collectives, faults, groups
from rawformer.distributed.groups import Group

MIB = 1 << 20
ALIGN_BYTES = 256  # every parameter's slot in a bucket starts on this boundary


@dataclass
class Bucket:
    """Parameters (indices into DataParallel.params) whose gradients travel together in one flat buffer."""

    index: int
    params: list[int]
    offsets: list[int]
    sizes: list[int]
    flat: Any = None  # (total,) reduction buffer: grad dtype, or float16 / float32 when compressing
    views: bool = False  # the parameters' .grad are views of `flat` (else packed into it and copied back)
    ready: int = 0
    work: Any = None
    launched_at: float = 0.0  # perf_counter when its all-reduce was started (overlap diagnostics)
    # GPU: the compute-stream event the side stream waits on (reused), and the all-reduce's completion event
    ready_event: Any = None
    done_event: Any = None
    slots: list[Any] = field(default_factory=list)  # views: each parameter's (shape-d) view of `flat`

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


def aligned_offsets(sizes: list[int], itemsize: int, align_bytes: int = ALIGN_BYTES) -> list[int]:
    """Element offsets of consecutive slots of `sizes` elements, each starting on an `align_bytes` boundary.

    >>> aligned_offsets([3, 70, 1], 4)
    [0, 64, 192]
    """
    step = max(1, align_bytes // itemsize)
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += -(-n // step) * step
    return offsets


class DataParallel:
    """Bucketed, overlapped gradient averaging over a data-parallel group.

    Parameters
    ----------
    params : dict[str, Tensor] or iterable of Tensor
        The model's parameters, in model order (first layer first). Each has `.data` (NumPy or CuPy, all of
        one kind), `.grad` (same shape and dtype, or None) and `register_grad_ready_hook(fn)`; with
        `use_grad_buffer(view)` (autograd Tensors) the gradients live in the buckets (module docstring).
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
            dtype = np.dtype(dtypes[members[0]])
            wire = np.dtype(np.float16) if self.fp16_compress else dtype
            if self.fp16_compress and self.kind != "nccl":
                wire = np.dtype(np.float32)  # rounded to float16 when packed, summed in float32 (docstring)
            sizes = [int(self.params[i].data.size) for i in members]
            offsets = aligned_offsets(sizes, wire.itemsize)
            bucket = Bucket(b, members, offsets, sizes)
            bucket.flat = self.xp.zeros(bucket.numel, dtype=wire)
            # views need the wire to be the gradient's own dtype and no rounding on the way (MPI fp16 path)
            bucket.views = (
                wire == dtype
                and not (self.fp16_compress and dtype != np.float16)
                and all(hasattr(self.params[i], "use_grad_buffer") for i in members)
            )
            if bucket.views:
                bucket.slots = [
                    bucket.flat[off : off + n].reshape(self.params[i].data.shape)
                    for i, off, n in zip(members, offsets, sizes, strict=True)
                ]
            if self.on_gpu:
                bucket.ready_event = self.xp.cuda.Event(block=False, disable_timing=True)
            self.buckets.append(bucket)
            for slot, i in enumerate(members):
                self._where[i] = (b, slot)
        for i, p in enumerate(self.params):
            p.register_grad_ready_hook(functools.partial(self._grad_ready, i))

        self.sync = False  # hooks act only between begin_step(sync=True) and finish()
        self._pending: set[int] = set()  # parameters whose gradient this step has not counted yet
        self.weight = 1.0 / group.size
        self.step = 0
        self.wait_s = 0.0  # host time the last finish() spent waiting for the buckets
        self._exposed = 0.0  # exposed_s once known (CPU: the host wait; GPU: from the events, when read)
        # GPU: the last finish()'s (backward-done event, [(bucket index, step, work)]), until checked
        self._last: tuple[Any, list[tuple[int, int, Any]]] | None = None
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
            flat = self.xp.zeros(b.numel, dtype=self.params[b.params[0]].data.dtype)
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

        Every parameter whose .grad is not its bucket view (None after zero_grad, or an array put there) is
        attached to it again (see the module docstring).
        """
        if weight is not None and not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        self.sync = bool(sync)
        self.weight = 1.0 / self.group.size if weight is None else float(weight)
        cur = self.xp.cuda.get_current_stream() if self.on_gpu else None
        for b in self.buckets:
            if cur is not None and b.done_event is not None:
                cur.wait_event(b.done_event)  # a step abandoned before finish(): its all-reduce may still run
            b.ready, b.work, b.done_event = 0, None, None
            if b.views:
                self._attach(b)
        self._pending = set(range(len(self.params))) if self.sync else set()

    def finish(self) -> None:
        """After the final micro-step's backward: every .grad holds the weighted sum over the group.

        Buckets whose hooks did not all fire (unused parameters) are reduced here (a missing .grad counts
        as zeros). NCCL: returns without waiting; the compute stream waits for the all-reduces (module
        docstring). MPI paths: waits on the host."""
        if not self.sync:
            raise RuntimeError("finish() needs a preceding begin_step(sync=True) (the final micro-step)")
        for i in sorted(self._pending):
            self._grad_ready(i)
        self.watchdog.arrive(self.step)
        t0 = time.perf_counter()
        if self.on_gpu:
            self._finish_gpu()
        else:
            for b in self.buckets:
                self.watchdog.wait(b.work, self._what(b, self.step))
            self._unpack()
            self._exposed = time.perf_counter() - t0
        self.wait_s = time.perf_counter() - t0
        self.sync = False
        self.step += 1

    def synchronize(self) -> None:
        """Block until the last step's all-reduces are complete, through the Watchdog (a dead or hung peer
        stops the job, named). On the GPU finish() does not wait: call this before a checkpoint is written
        and at the end of training; on the CPU finish() has waited already."""
        if self._last is None:
            return
        for b_idx, step, work in self._last[1]:
            self.watchdog.wait(work, self._what(self.buckets[b_idx], step))

    @property
    def exposed_s(self) -> float:
        """Exposed communication of the last step: how long after the end of its backward the last bucket's
        all-reduce completed (GPU: from the CUDA events on the two streams, waiting for them when read;
        CPU: the host's wait in finish())."""
        last = self._last
        if last is not None and last[0] is not None and all(hasattr(w, "event") for *_, w in last[1]):
            self.synchronize()
            done = last[0]
            done.synchronize()
            get = self.xp.cuda.get_elapsed_time
            self._exposed = max(0.0, *(get(done, w.event) / 1e3 for *_, w in last[1]))
            self._last = (None, last[1])  # measured once; the works stay for the next finish's check
        return self._exposed

    # ---- internals ---------------------------------------------------------------------------------------

    def _what(self, b: Bucket, step: int) -> str:
        return (
            f"the gradient all-reduce of bucket {b.index} ({b.numel} values, {self.group.name} group) of "
            f"step {step}"
        )

    def _attach(self, b: Bucket) -> None:
        """Make every parameter's .grad in bucket b its view of b.flat again (keeping any value it holds)."""
        stale = [k for k, i in enumerate(b.params) if self.params[i].grad is not b.slots[k]]
        if not stale:
            return
        fresh = all(self.params[i].grad is None for i in b.params)  # then every slot is stale
        if fresh:
            b.flat.fill(0)  # one memset for the bucket (this waits, on the stream, for the last all-reduce)
        for k in stale:
            self.params[b.params[k]].use_grad_buffer(b.slots[k], keep=not fresh)

    def _finish_gpu(self) -> None:
        """The GPU side of finish(): the compute stream waits for every bucket, the host only for MPI."""
        cur = self.xp.cuda.get_current_stream()
        if self._last is not None:  # the previous step's all-reduces: complete long ago, unless a peer hung
            self.synchronize()
        backward_done = self.xp.cuda.Event(block=False)  # timed: exposed_s
        backward_done.record(cur)
        t0 = time.perf_counter()
        host = False
        for b in self.buckets:
            if not hasattr(b.work, "event"):  # MPI-based backends: progress and copy back on the host
                self.watchdog.wait(b.work, self._what(b, self.step))
                host = True
            cur.wait_event(b.done_event)
            b.done_event = None  # waited for: begin_step has nothing left to order
        self._unpack()
        self._last = (backward_done, [(b.index, self.step, b.work) for b in self.buckets])
        if host:
            self._exposed = time.perf_counter() - t0

    def _unpack(self) -> None:
        """Packed (fp16-compressed) buckets: the sums back into .grad (views need nothing)."""
        for b in self.buckets:
            if b.views:
                continue
            for i, off, n in zip(b.params, b.offsets, b.sizes, strict=True):
                p = self.params[i]
                view = b.flat[off : off + n].reshape(p.data.shape)
                if p.grad is None:
                    p.grad = view.astype(p.data.dtype)
                else:
                    p.grad[...] = view

    # ---- hooks -------------------------------------------------------------------------------------------

    def _grad_ready(self, i: int, *_: Any) -> None:
        """Hook: parameter i's gradient is final; count it (packing it where the bucket is no view), and
        launch its bucket when that is complete."""
        if not self.sync or i not in self._pending:
            return
        self._pending.discard(i)
        b_idx, slot = self._where[i]
        b = self.buckets[b_idx]
        grad = self.params[i].grad
        if b.views:
            if grad is not b.slots[slot]:  # set to None or replaced since begin_step: back into the bucket
                self.params[i].use_grad_buffer(b.slots[slot], keep=True)
        else:
            off, n = b.offsets[slot], b.sizes[slot]
            dst = b.flat[off : off + n]
            if grad is None:
                dst[...] = 0
            elif self.fp16_compress and b.flat.dtype != np.float16:  # MPI: float16 values, float32 sum
                dst[...] = (grad.ravel() * self.weight).astype(np.float16)
            elif grad.dtype == dst.dtype:  # parameters without use_grad_buffer
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

    def _scale(self, b: Bucket) -> None:
        """flat *= this rank's weight (views only: packed buckets were scaled while packing)."""
        if b.views and self.weight != 1.0:
            self.xp.multiply(b.flat, b.flat.dtype.type(self.weight), out=b.flat)

    def _launch(self, b: Bucket) -> None:
        b.launched_at = time.perf_counter()
        if not self.on_gpu:
            self._scale(b)
            b.work = self.comms.allreduce(b.flat)
            return
        b.ready_event.record(self.xp.cuda.get_current_stream())
        self.side.wait_event(b.ready_event)  # the side stream starts after the bucket's gradients are written
        with self.side:
            self._scale(b)
            # NCCL: queued on the side stream; MPI paths: the stream is synchronised and MPI runs on the host
            b.work = self.comms.allreduce(b.flat, stream=self.side)
            if hasattr(b.work, "event"):
                b.done_event = b.work.event
            else:  # the stream's work (the scaling; host-staged reads flat after syncing it) is ordered too
                b.done_event = self.xp.cuda.Event(block=False, disable_timing=True)
                b.done_event.record(self.side)
