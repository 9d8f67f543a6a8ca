"""Overlapped greedy decode for the Scheduler (a mixin: the methods run on the Scheduler's state).

Overlapped decode (`overlap_host`, the default wherever decode steps are padded to graph buckets): a step
that is pure decode (every running request has its prompt computed, all greedy without repetition penalty,
the blocks for their appends free, nothing to admit or resume) is prepared and launched BEFORE the previous
step's tokens reach the host. Its new tokens enter the pool as UNKNOWN_TOKEN and are copied on the device
from the previous step's argmax (the greedy graph's output) into batch.tokens; then the previous step's
tokens are read (pinned buffer + event) while this one runs, accepted, stop-checked and streamed. So the
host's work (scheduling, prepare, launch, stops, callbacks) leaves the device's critical path. Which
requests run the step is decided before the previous tokens are known: max_new_tokens and the longest
sequence depend only on counts (a request that reaches them is not launched again); a stop token or string
shows one step late: the request is finished when its tokens are read, its blocks freed, and the token the
launched step computes for it is discarded. Any other step (admission, prefill chunks, preemption,
resumption, sampled requests, a batch outside the buckets) first resolves the step in flight and then runs
synchronously (runtime/scheduler.py); abort() of a request in flight finishes it at once (its in-flight
token is discarded). Outputs therefore reach callbacks one step after the device computed them; each token
exactly once, in order.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rawformer.memory.pool import UNKNOWN_TOKEN
from rawformer.runtime.cuda_graphs import bucket_for
from rawformer.runtime.token_feed import InFlight, decodes_again, feed_tokens

if TYPE_CHECKING:
    from rawformer.runtime.scheduler import Request, RequestOutput, StepStats

__all__ = ["OverlappedDecode"]


class OverlappedDecode:
    """The Scheduler's overlapped decode steps (see the module docstring). Scheduler inherits these; they
    read and write its queues, pool, graphs and `_inflight`."""

    def _runs_again(self, req: Request) -> bool:
        """Whether a request with a token in flight decodes another step, from counts alone (the count checks
        of `_accept`)."""
        return decodes_again(len(req.prompt), len(req.output) + 1, req.max_new_tokens, self.max_len)

    def _would_admit(self, occupied: int, need: int, max_seqs: int, budget: int) -> bool:
        """Whether the synchronous path would admit the first waiting request now (its admission rules, with
        `occupied` batch slots and `need` blocks for the decode appends)."""
        return (
            budget - occupied > 0
            and self._admit_room(occupied, max_seqs)
            and self._prompt_fits(self.waiting[0], need + self.watermark_blocks)
        )

    def _no_overlap(self, stats: StepStats, reason: str) -> bool:
        stats.sync_reason = reason
        return False

    def _overlapped_step(self, stats: StepStats, outputs: list[RequestOutput], t0: float) -> bool:
        """Launch a pure decode step, then read the tokens of the step in flight (module docstring). False,
        with nothing done, when this step has to run synchronously (stats.sync_reason says why)."""
        if not self.overlap_host or not self.running:
            return False
        inf = self._inflight
        prev = inf.rows if inf is not None else {}
        done = self._job_done  # a finished prefill job: its requests' first tokens, still on the device
        first = done.rows if done is not None else {}
        fed: list[Request] = []  # their new token is the in-flight step's output, still on the device
        fresh: list[Request] = []  # their new token is the finished job's output, still on the device
        known: list[Request] = []  # their new token is output[-1] (read by a synchronous step)
        finishing = 0
        for r in self.running:
            if self._in_job(r):
                continue  # its prompt is being computed (runtime/interleave.py)
            if not self._greedy([r]):
                return self._no_overlap(stats, "sampling")  # sampling reads the logits on the host
            src = prev if id(r) in prev else first if id(r) in first else None
            if src is not None:
                if self._runs_again(r):
                    (fed if src is prev else fresh).append(r)
                else:
                    finishing += 1
            elif self._pending(r):
                return self._no_overlap(stats, "prefill")
            else:
                known.append(r)
        if self.preempted:
            return self._no_overlap(stats, "resume")
        fed.sort(key=lambda r: prev[id(r)])  # rows unchanged where nobody dropped out: a plain copy
        fresh.sort(key=lambda r: first[id(r)])
        launch = fed + fresh + known
        if not launch:
            return self._no_overlap(stats, "drain")
        max_seqs = min(self.max_num_seqs, self.controller.max_seqs)
        budget = min(self.max_num_batched_tokens, self.controller.token_budget)
        if len(launch) > max_seqs:
            return self._no_overlap(stats, "max_seqs")
        bucket = bucket_for(len(launch), self.buckets) if self.pad else None
        if self.pad and bucket is None:
            return self._no_overlap(stats, "bucket")
        pool = self.pool
        need = self._blocks_for_decode(launch)
        if need > pool.num_free_blocks:
            return self._no_overlap(stats, "blocks")  # preemption: the synchronous path decides
        # admission: a prefill job launched over the next steps, or (no interleaving, or a request it cannot
        # take) the synchronous path; while a job runs, the waiting requests wait for it
        occupied = len(self.running) - finishing
        if self.waiting and self._job is None and self._would_admit(occupied, need, max_seqs, budget):
            if not self.interleave_prefill or not self._start_job(
                stats, outputs, occupied, need, max_seqs, budget
            ):
                return self._no_overlap(stats, "admit")
        n, k, f = len(launch), len(fed), len(fresh)
        stats.kind = "overlapped"
        stats.decode_seqs = n
        stats.saturated = bool(self.waiting or self.preempted)
        try:
            batch = pool.prepare(
                [r.seq_id for r in launch], [[UNKNOWN_TOKEN]] * (k + f) + [[r.output[-1]] for r in known],
                pad_to=bucket, block_table_width=self._width() if bucket is not None else None,
                unknown_tokens=True,
            )  # fmt: skip
            if k:  # the in-flight step's argmax -> this step's input ids, on the device, in stream order
                feed_tokens(batch.tokens, inf.ids, [prev[id(r)] for r in fed], self.xp)
            if f:  # the finished job's argmax -> the next rows
                feed_tokens(batch.tokens[k:], done.ids, [first[id(r)] for r in fresh], self.xp)
            ids, stats.graph = self._run_decode(batch, n, True, bucket is not None)
            nxt = self._readback.start(launch, ids)
        except Exception as exc:  # the in-flight tokens are good: read them, then fail this step's requests
            stats.host_s = time.perf_counter() - t0
            self._resolve(stats, outputs)
            self._fail(launch, exc, outputs)
            return True
        stats.host_s = time.perf_counter() - t0
        stats.forwards = 1
        self.totals["forwards"] += 1
        # the new step is in flight before the old one's tokens are read (whatever their callbacks do)
        self._inflight = nxt
        self._job_done = None
        # the device runs the step before this one: meanwhile the host launches prefill layers
        self._advance_job(inf.event if inf is not None else None, stats, outputs)
        if inf is not None:
            self._read(inf, stats, outputs)  # while the device runs the step just launched
        if done is not None:
            self._read(done, stats, outputs)
        return True

    def _resolve(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """Read and accept the tokens of the step in flight and of a prefill job (its remaining layers
        launched first), if any: nothing is in flight afterwards."""
        inf, self._inflight = self._inflight, None
        if inf is not None:
            self._read(inf, stats, outputs)
        self._flush_job(stats, outputs)
        done, self._job_done = self._job_done, None
        if done is not None:
            self._read(done, stats, outputs)

    def _read(self, inf: InFlight, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """Read the tokens of a launched step and accept them: stops, streaming, finishing."""
        t = time.perf_counter()
        toks = inf.tokens()
        t1 = time.perf_counter()
        stats.wait_s += t1 - t
        try:
            self._take(list(zip(inf.reqs, toks, strict=True)), stats, outputs, late=True)
        except Exception as exc:  # a callback raised: the step's requests fail, as in a synchronous step
            self._fail(inf.reqs, exc, outputs)
        stats.post_s += time.perf_counter() - t1

    def _settle(self) -> None:
        """Drop a step in flight (or a finished prefill job's first tokens) none of whose requests is still
        running (they stopped one step late or were aborted), once the device is done with it: its blocks
        are free and may go to other work, e.g. a Generator on another stream sharing the pool, which stream
        order does not protect."""
        for name in ("_inflight", "_job_done"):
            inf = getattr(self, name)
            if inf is None or any(r.status == "running" for r in inf.reqs):
                continue
            setattr(self, name, None)
            if inf.event is not None:
                inf.event.synchronize()
