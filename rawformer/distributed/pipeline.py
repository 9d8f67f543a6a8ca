"""Pipeline parallel: layers split over the ranks of a pipeline group, micro-batches scheduled GPipe or 1F1B.

Stages. Each rank runs one stage: a contiguous run of layers, chosen by `partition` (balanced parameter
counts) or by a plan (layers per stage). A stage is any object with

    forward(x, target=None) -> (y, ctx)   y: the activation to send on; the last stage gets the micro-batch's
                                           target and returns its loss (a scalar) instead
    backward(ctx, dy) -> dx                dy: the gradient of y (the last stage gets the seed 1/m, so the
                                           m micro-batch losses add up to the mean); dx: that of x (stage 0
                                           may return None); parameter gradients accumulate in the stage

`AutogradStage` builds one from rawformer.autograd layers.

Schedules (per stage s of p, m micro-batches; F = forward, B = backward of one micro-batch):

    GPipe  F0 F1 ... F(m-1) B0 B1 ... B(m-1)     every activation of the step alive at once
    1F1B   min(p-s-1, m) warm-up forwards, then one F and one B alternating, then the remaining Bs:
           at most p-s micro-batches in flight on stage s (the memory saving), same bubble as GPipe

Both leave the same idle time with uniform stage times: bubble = (p-1) / (m+p-1) of the step.
The measured bubble is 1 - (busy time summed over stages) / (p x makespan), from the timeline every stage
records (compute spans, relative to the step's barrier: host clock on CPU, CUDA events on the GPU, read once
per step so nothing waits between actions); `plot_timeline` draws it as a PNG (matplotlib, Agg).

Communication: activations go stage s -> s+1, gradients s+1 -> s, point-to-point through the collectives
backend of the arrays (NCCL send/recv on GPU, MPI on CPU; stage 0's inputs decide, so they live where the
model does), one channel (communicator and stream) per direction, both set up on every stage before the
first step. A small header (dtype and shape) goes first over MPI, so stages need not know each other's
shapes. Sends never block the schedule; receives wait through the fault Watchdog.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.distributed import collectives, faults, groups
from rawformer.distributed.groups import Group

SCHEDULES = ("gpipe", "1f1b")
_DTYPES = ("float16", "float32", "float64", "int32", "int64", "bfloat16")
_HEADER_LEN = 10  # dtype code, ndim, up to 8 dims


# ---- partition ---------------------------------------------------------------------------------------------


def partition(param_counts: Sequence[int], stages: int, plan: Sequence[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per stage.

    With `plan` (layers per stage, summing to the layer count) the ranges follow it. Otherwise the split
    minimises the largest stage's parameter count (binary search on that maximum, greedy fill), every stage
    getting at least one layer.

    >>> partition([1, 1, 1, 1, 4], 2)
    [range(0, 4), range(4, 5)]
    """
    n = len(param_counts)
    if stages < 1 or stages > n:
        raise ValueError(f"stages must be between 1 and the number of layers ({n}), got {stages}")
    if plan is not None:
        plan = [int(k) for k in plan]
        if len(plan) != stages or any(k < 1 for k in plan) or sum(plan) != n:
            raise ValueError(f"plan {plan} must give {stages} positive layer counts summing to {n}")
        bounds = np.cumsum([0, *plan])
        return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    counts = [int(c) for c in param_counts]
    if any(c < 0 for c in counts):
        raise ValueError("param_counts must be >= 0")

    def fill(cap: int) -> list[int] | None:
        """Greedy: stage sizes (layers) under `cap` leaving enough layers for the remaining stages."""
        sizes, i = [], 0
        for s in range(stages):
            left = stages - s - 1
            total, k = 0, 0
            while i + k < n - left and (k == 0 or total + counts[i + k] <= cap):
                total += counts[i + k]
                k += 1
            if total > cap:
                return None
            sizes.append(k)
            i += k
        return sizes if i == n else None

    lo, hi = max(counts), sum(counts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    return partition(counts, stages, plan=fill(lo))


# ---- schedules ---------------------------------------------------------------------------------------------


def schedule(kind: str, stages: int, stage: int, micro_batches: int) -> list[tuple[str, int]]:
    """The actions of `stage`: a list of ('F', i) and ('B', i) over micro-batches i (see the docstring)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not in 0..{stages - 1}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    m = micro_batches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(stages - stage - 1, m)
    acts = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while b < m:
        if f < m:
            acts.append(("F", f))
            f += 1
        acts.append(("B", b))
        b += 1
    return acts


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    """(p - 1) / (m + p - 1): the idle fraction of a pipeline with uniform stage times."""
    return (stages - 1) / (micro_batches + stages - 1)


# ---- stages ------------------------------------------------------------------------------------------------


class AutogradStage:
    """A stage from rawformer.autograd layers: callables Tensor -> Tensor applied in order, and for the last
    stage `loss(y, target) -> scalar Tensor`.

    Parameters
    ----------
    layers : the stage's layers
    first : True on stage 0 (its input is data: no gradient is computed for it)
    loss : the loss, on the last stage only
    """

    def __init__(self, layers: Sequence[Callable[[Any], Any]], first: bool, loss: Callable | None = None):
        from rawformer import autograd

        self.ag, self.layers, self.first, self.loss = autograd, list(layers), first, loss

    def forward(self, x: Any, target: Any = None) -> tuple[Any, Any]:
        xt = self.ag.Tensor(x, requires_grad=not self.first)
        h = xt
        for layer in self.layers:
            h = layer(h)
        if self.loss is not None:
            h = self.loss(h, target)
        return h.data, (xt, h)

    def backward(self, ctx: Any, dy: Any) -> Any:
        xt, h = ctx
        h.backward(dy)
        return None if self.first else xt.grad


# ---- the engine --------------------------------------------------------------------------------------------


@dataclass
class Span:
    """A compute span of the timeline: stage, 'F' or 'B', micro-batch, start and end (s, from the barrier)."""

    stage: int
    op: str
    micro: int
    start: float
    end: float


class Pipeline:
    """Runs one stage of a pipeline over a pipeline group.

    Parameters
    ----------
    stage : the stage object of this rank (see the module docstring)
    group : the pipeline group (default: groups.current().pipeline); group rank = stage index
    micro_batches : m, micro-batches per step
    schedule_kind : 'gpipe' or '1f1b'
    timeout : seconds a receive may wait before the Watchdog stops the job
    dp : DataParallel over this stage's parameters and the data group (pipeline x data parallel), optional:
        its hooks then act on the stage's last backward of the step only, and `run` ends with `dp.finish()`
    """

    def __init__(
        self,
        stage: Any,
        group: Group | None = None,
        micro_batches: int = 4,
        schedule_kind: str = "1f1b",
        timeout: float = faults.DEFAULT_TIMEOUT_S,
        watchdog: faults.Watchdog | None = None,
        dp: Any = None,
    ):
        self.stage, self.dp = stage, dp
        self.group = group if group is not None else groups.current().pipeline
        self.p, self.s = self.group.size, self.group.rank
        self.m = int(micro_batches)
        self.kind = schedule_kind
        self.actions = schedule(schedule_kind, self.p, self.s, self.m)
        self.watchdog = watchdog or faults.Watchdog(self.group, timeout)
        self.comm = self.group.comm
        self.step = 0
        self.timeline: list[Span] = []
        self.in_flight_peak = 0
        faults.rank_table(self.group)

    def _world(self, stage: int) -> int:
        return self.group.world_ranks[stage]

    @property
    def is_first(self) -> bool:
        return self.s == 0

    @property
    def is_last(self) -> bool:
        return self.s == self.p - 1

    # ---- point-to-point -----------------------------------------------------------------------------------

    def _backend(self, array: Any, direction: str) -> Any:
        return self.group.collectives(self._kind, channel=direction)

    def _setup(self, inputs: Sequence[Any] | None) -> None:
        """Once: agree on the collectives kind (stage 0's inputs decide) and create both channels on every
        stage now, in the same order. Created lazily at first use instead, an NCCL communicator's set-up
        (collective over the group) would wait for stages that are themselves waiting for data through it."""
        if getattr(self, "_kind", None) is not None:
            return
        mine = collectives.default_kind(inputs[0]) if self.is_first else None
        self._kind = self.comm.bcast(mine, root=0)
        for direction in ("act", "grad"):
            comms = self.group.collectives(self._kind, channel=direction)
            if hasattr(comms, "abort"):  # a peer that died leaves NCCL kernels waiting: release them
                self.watchdog.on_abort.append(comms.abort)

    def _send(self, array: Any, peer: int, tag: int, direction: str) -> list[Any]:
        header = np.zeros(_HEADER_LEN, dtype=np.int64)
        header[0], header[1] = _DTYPES.index(str(array.dtype)), array.ndim
        header[2 : 2 + array.ndim] = array.shape
        header[9] = 1 if backend.is_cupy(array) else 0
        array = array if array.flags.c_contiguous else backend.array_module(array).ascontiguousarray(array)
        h = self.comm.Isend(header, dest=peer, tag=2 * tag)
        stream = self._stream(direction) if backend.is_cupy(array) else None
        work = self._backend(array, direction).send(array, peer, tag=2 * tag + 1, stream=stream)
        return [(h, header), (work, array)]

    def _recv(self, peer: int, tag: int, direction: str) -> Any:
        name = "activation" if direction == "act" else "gradient"
        what = f"the {name} of micro-batch {tag} from stage {peer} (rank {self._world(peer)})"
        header = np.zeros(_HEADER_LEN, dtype=np.int64)
        self.watchdog.wait(_Req(self.comm.Irecv(header, source=peer, tag=2 * tag)), what)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        shape = tuple(int(d) for d in header[2 : 2 + ndim])
        xp = sys.modules["cupy"] if header[9] else np
        buf = xp.empty(shape, dtype=dtype)
        stream = self._stream(direction) if header[9] else None
        work = self._backend(buf, direction).recv(buf, peer, tag=2 * tag + 1, stream=stream)
        self.watchdog.wait(work, what)
        if hasattr(work, "event"):
            xp.cuda.get_current_stream().wait_event(work.event)
        return buf

    def _stream(self, direction: str) -> Any:
        if not hasattr(self, "_streams"):
            cp = sys.modules["cupy"]
            self._streams = {d: cp.cuda.Stream(non_blocking=True) for d in ("act", "grad")}
        stream = self._streams[direction]
        ready = sys.modules["cupy"].cuda.Event(block=False, disable_timing=True)
        ready.record(sys.modules["cupy"].cuda.get_current_stream())
        stream.wait_event(ready)  # sends start after the compute that produced the array
        return stream

    # ---- one step -----------------------------------------------------------------------------------------

    def run(self, inputs: Sequence[Any] | None = None, targets: Sequence[Any] | None = None) -> list[Any]:
        """One training step's forward and backward over m micro-batches (parameter gradients accumulate in
        the stage; the optimizer step is the caller's).

        Parameters
        ----------
        inputs : the m micro-batch inputs (stage 0 only)
        targets : the m micro-batch targets (last stage only)

        Returns
        -------
        list : the m micro-batch losses on the last stage (as the stage returned them), [] elsewhere
        """
        if self.is_first and (inputs is None or len(inputs) != self.m):
            raise ValueError(f"stage 0 needs inputs: a list of {self.m} micro-batches")
        if self.is_last and (targets is None or len(targets) != self.m):
            raise ValueError(f"the last stage needs targets: a list of {self.m} micro-batches")
        self._setup(inputs)
        self.watchdog.arrive(self.step)
        # the timeline's common origin (and no step overlaps the previous one)
        self.watchdog.wait(_Req(self.comm.Ibarrier()), "the other stages to start the step")
        clock = _Clock(self._kind != "mpi")
        ctx: dict[int, Any] = {}
        losses: list[Any] = [None] * self.m
        sends: list[Any] = []
        peak = 0
        for op, i in self.actions:
            if op == "F":
                x = inputs[i] if self.is_first else self._recv(self.s - 1, i, "act")
                start = clock.mark()
                y, ctx[i] = self.stage.forward(x, targets[i] if self.is_last else None)
                clock.span("F", i, start)
                if self.is_last:
                    losses[i] = y
                else:
                    sends += self._send(y, self.s + 1, i, "act")
                peak = max(peak, len(ctx))
            else:
                dy = 1.0 / self.m if self.is_last else self._recv(self.s + 1, i, "grad")
                if self.dp is not None:  # gradients are all-reduced during the step's last backward only
                    self.dp.begin_step(sync=(op, i) == self.actions[-1])
                start = clock.mark()
                dx = self.stage.backward(ctx.pop(i), dy)
                clock.span("B", i, start)
                if not self.is_first:
                    sends += self._send(dx, self.s - 1, i, "grad")
            sends = [(w, buf) for w, buf in sends if not _done(w)]
        for w, _ in sends:
            self.watchdog.wait(w if hasattr(w, "done") else _Req(w), "a pipeline send to complete")
        if self.dp is not None:
            self.dp.finish()
        self.timeline = [Span(self.s, op, i, a, b) for op, i, a, b in clock.spans()]
        self.in_flight_peak = peak
        self.step += 1
        return losses if self.is_last else []

    # ---- the timeline -------------------------------------------------------------------------------------

    def gather_timeline(self) -> list[Span] | None:
        """Every stage's spans of the last step, on group rank 0 (None elsewhere)."""
        rows = [(s.stage, s.op, s.micro, s.start, s.end) for s in self.timeline]
        gathered = self.comm.gather(rows, root=0)
        if self.s != 0:
            return None
        return [Span(*r) for part in gathered for r in part]


class _Clock:
    """The timeline's clock: host time on the CPU; on the GPU, CUDA events recorded on the compute stream
    around each action (no synchronisation between actions: the host runs ahead as it would untimed), read
    once at the end of the step. The origin is taken right after the step's barrier, on both."""

    def __init__(self, gpu: bool):
        self.cp = sys.modules["cupy"] if gpu else None
        self.rows: list[tuple[str, int, Any, Any]] = []
        self.origin = self.mark()

    def mark(self) -> Any:
        if self.cp is None:
            return time.perf_counter()
        event = self.cp.cuda.Event()
        event.record()
        return event

    def span(self, op: str, micro: int, start: Any) -> None:
        self.rows.append((op, micro, start, self.mark()))

    def spans(self) -> list[tuple[str, int, float, float]]:
        """(op, micro, start s, end s) relative to the origin."""
        if self.cp is None:
            return [(op, i, a - self.origin, b - self.origin) for op, i, a, b in self.rows]
        if self.rows:
            self.rows[-1][3].synchronize()
        since = lambda e: self.cp.cuda.get_elapsed_time(self.origin, e) / 1e3  # ms -> s
        return [(op, i, since(a), since(b)) for op, i, a, b in self.rows]


class _Req:
    """An MPI request as a Work (done() polls)."""

    def __init__(self, req: Any):
        self.req = req

    def done(self) -> bool:
        return bool(self.req.Test())


def _done(w: Any) -> bool:
    return w.done() if hasattr(w, "done") else bool(w.Test())


def bubble_fraction(spans: Sequence[Span], stages: int) -> float:
    """Measured bubble: 1 - busy / (stages x makespan), makespan from the first start to the last end."""
    if not spans:
        raise ValueError("no spans")
    start = min(s.start for s in spans)
    end = max(s.end for s in spans)
    busy = sum(s.end - s.start for s in spans)
    return 1.0 - busy / (stages * (end - start))


def plot_timeline(spans: Sequence[Span], stages: int, micro_batches: int, path: str, title: str = "") -> dict:
    """Draw the schedule (one row per stage, F blue / B green, micro-batch numbers) as a PNG at `path`.

    Returns {'measured_bubble', 'theoretical_bubble', 'makespan_s', 'path'}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = bubble_fraction(spans, stages)
    theory = theoretical_bubble(stages, micro_batches)
    t0 = min(s.start for s in spans)
    makespan = max(s.end for s in spans) - t0
    fig, ax = plt.subplots(figsize=(10, 0.6 * stages + 1.4))
    for s in spans:
        color = "#4c72b0" if s.op == "F" else "#55a868"
        ax.barh(s.stage, (s.end - s.start) * 1e3, left=(s.start - t0) * 1e3, color=color, edgecolor="black")
        ax.text(
            (s.start - t0 + (s.end - s.start) / 2) * 1e3,
            s.stage,
            str(s.micro),
            ha="center",
            va="center",
            fontsize=7,
            color="white",
        )
    ax.set_yticks(range(stages), [f"stage {i}" for i in range(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{title}  bubble measured {measured:.1%}, theoretical {theory:.1%} (F blue, B green)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"measured_bubble": measured, "theoretical_bubble": theory, "makespan_s": makespan, "path": path}
