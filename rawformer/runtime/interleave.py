"""Interleaved prefill for the Scheduler (a mixin): admitted prompts computed a few layers per decode step.

Without it, an admission breaks the overlapped decode (runtime/overlap.py): the step in flight is read, then
one synchronous step runs the decode forward and an eager prefill forward. That prefill is host-bound for a
batch of short prompts (its launches take the host longer than the device takes to run them), and the device
idles meanwhile: on the H100 serving bench 25 such steps took 27-50 ms each, 9-20% of the run, where an
overlapped decode step takes about 2 ms.

With `interleave_prefill` (Scheduler / Engine option; it needs overlapped decode and a model with
`forward_layers`), an overlapped step that would admit starts a PrefillJob instead and keeps decoding:

1. the waiting requests it admits (FCFS, the synchronous path's rules for batch room and blocks; greedy ones
   only, whole prompts within the step's token budget) get their blocks and ONE prefill batch, copied out of
   the pool's step buffers (AttentionBatch.detached), since decode steps go on preparing batches meanwhile;
2. every overlapped step launches its decode step first, then layers of the job (the model's
   `forward_layers` generator): at least one, and more while the step launched before is still running on
   the device. The host's idle time between decode steps goes into the prefill's launches, and the device
   runs decode and prefill work back to back in stream order;
3. after the last layer the head runs and each prompt's first token is the argmax of its last row, copied to
   the host without blocking (a finished job is an InFlight, like a launched decode step). From the next step
   on its requests decode as requests with a token in flight: the step feeds their ids on the device
   (feed_tokens) and reads them while it runs.

Members of a running job take no decode step. Whatever needs every token on the host (a synchronous step) or
must free a member's blocks (abort) first launches the job's remaining layers: they write the members' K/V,
so the blocks are reused only after them, in stream order. One job runs at a time and nothing is admitted
beside it (the synchronous path launches its remaining layers first), so no prompt can hit the prefix cache
on blocks whose K/V a job has not written yet: the pool registers a prompt's blocks when it prepares them.

Off by default: the CPU tests check its tokens against synchronous admissions, but whether it is faster on
the GPU (decode steps wait behind prefill layers, and a job's slots idle until its head has run) has not been
measured yet; `python bench/serve.py --parts static` runs the continuous workload both ways.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rawformer.models.common import run_layers

if TYPE_CHECKING:
    from rawformer.runtime.scheduler import Request, RequestOutput, StepStats

__all__ = ["InterleavedPrefill", "PrefillJob"]


@dataclass
class PrefillJob:
    """Admitted prompts whose prefill forward is launched a few layers per step."""

    reqs: list[Request]
    members: set[int]  # id() of each request
    layers: Iterator[int]  # model.forward_layers(batch, arena, last_only=True) over a detached batch
    left: int  # layers not launched yet


class InterleavedPrefill:
    """The Scheduler's interleaved prefill (see the module docstring). Scheduler inherits these; they read and
    write its queues, pool, `_job` (the running job) and `_job_done` (a finished job's first tokens)."""

    def _in_job(self, req: Request) -> bool:
        job = self._job
        return job is not None and id(req) in job.members

    def _start_job(
        self, stats: StepStats, outputs: list[RequestOutput], occupied: int, need: int, max_seqs: int,
        budget: int,
    ) -> bool:  # fmt: skip
        """Admit waiting requests (FCFS) into a new job: while the batch has room (`occupied` slots taken),
        the free blocks hold the whole prompt beside this step's `need` decode blocks and the watermark, and
        the prompts fit the token budget. False, with nothing admitted, when the first waiting request cannot
        go this way (sampled, or a prompt longer than the budget: the synchronous path chunks it)."""
        pool = self.pool
        reserve = need + self.watermark_blocks
        left = max(budget - occupied, budget // 4)  # as the synchronous path: prefill keeps a quarter
        admitted: list[Request] = []
        while self.waiting and occupied + len(admitted) < max_seqs:
            if not self._greedy([self.waiting[0]]) or len(self.waiting[0].prompt) > left:
                break
            req = self._admit_first(reserve)
            if req is None:
                break
            admitted.append(req)
            left -= len(req.prompt)
        if not admitted:
            return False
        n = len(admitted)
        tokens = sum(self._pending(r) for r in admitted)
        stats.admitted += n
        stats.prefill_seqs = n
        stats.prefill_tokens = tokens
        self.totals["admitted"] += n
        self.totals["prefill_jobs"] += 1
        self.totals["prompt_tokens_computed"] += tokens
        try:
            batch = pool.prepare([r.seq_id for r in admitted], [None] * n).detached()
            layers = self.model.forward_layers(batch, self.arena, last_only=True)
        except Exception as exc:  # these requests fail; the decode step goes on
            self._fail(admitted, exc, outputs)
            return True
        self._job = PrefillJob(admitted, {id(r) for r in admitted}, layers, self.model.num_layers)
        return True

    def _advance_job(
        self, busy: Any, stats: StepStats, outputs: list[RequestOutput], to_end: bool = False
    ) -> None:
        """Launch the next layers of the running job: one, then more while `busy` (the event after the step
        launched before this one; None on the CPU) says the device has not caught up, or all with `to_end`.
        After the last layer, the head and the first tokens' read-back."""
        job = self._job
        if job is None:
            return
        n = 0
        try:
            while job.left and (to_end or n == 0 or (busy is not None and not busy.done)):
                next(job.layers)
                job.left -= 1
                n += 1
            if not job.left:
                self._job_head(job)
        except Exception as exc:  # its requests fail (their blocks are freed); the scheduler goes on
            self._job = None
            self._fail(job.reqs, exc, outputs)
        stats.prefill_layers += n

    def _job_head(self, job: PrefillJob) -> None:
        """The final norm and LM head of a job whose layers are all launched; its argmax ids go to the host
        (without blocking)."""
        logits = run_layers(job.layers)  # (S, V): the last row of each prompt
        ids = logits.argmax(axis=1)
        self._job = None
        self._job_done = self._job_readback.start(job.reqs, ids)

    def _flush_job(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """Launch every layer the running job has left, and its head (nothing is read)."""
        with self.stream if self.stream is not None else contextlib.nullcontext():
            self._advance_job(None, stats, outputs, to_end=True)
