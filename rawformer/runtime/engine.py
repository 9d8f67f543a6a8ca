"""The serving engine: requests in, streamed outputs back, continuous batching in between.

    engine = Engine(model, tokenizer, max_num_seqs=64, adaptive="latency", target_ms=50)
    rid = engine.add_request("Hello", max_new_tokens=32, temperature=0.8, seed=1, stop=["\\n"],
                             on_output=print)                    # callback per step with the text delta
    while engine.has_unfinished:
        for out in engine.step():                                # or: for out in engine.iterate(): ...
            ...
    finals = engine.generate(["a", "b"], max_new_tokens=8)      # add + step until done, in order

Threads: `add_request` and `abort` may be called from any thread; they only put the request (or the abort)
into an inbox under a lock. `step()` (the scheduler, the pool, the model) runs on one thread: the caller's,
or the engine's own after `start()` (a loop that sleeps on a condition variable while there is no work and
steps while there is). Callbacks run on the stepping thread: they must be quick (the server's hand the
output to its asyncio loop with call_soon_threadsafe).

The queue is bounded: add_request raises QueueFull when `max_queue` requests are already waiting (requests
not yet running); after `stop()` it raises EngineClosed. `metrics()` returns gauges, counters and latency
histograms (time to first token, end-to-end, step) plus the adaptive controller's state; `prometheus()`
renders them as Prometheus text.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from rawformer.memory import KVPool
from rawformer.runtime.adaptive import AdaptiveBatcher
from rawformer.runtime.generate import _model_limit, encode_prompts, make_pool
from rawformer.runtime.metrics import STEP_BUCKETS, Histogram, TokenRate, prometheus_text
from rawformer.runtime.sampler import SamplingParams
from rawformer.runtime.scheduler import Request, RequestOutput, Scheduler

__all__ = ["Engine", "EngineClosed", "QueueFull"]


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: retry later (the server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine was stopped (the server answers 503)."""


class Engine:
    """Continuous-batching inference over one decoder model (see the module docstring).

    Parameters
    ----------
    model : GPT2Model / LlamaModel (NumPy or CuPy)
    tokenizer : optional: encode / decode (text prompts, texts, stop strings), eos_token_id
    pool : KVPool (default: make_pool(model, kv_tokens))
    kv_tokens : tokens the default pool holds (default: max_num_seqs x the model length, at most 64k)
    max_num_seqs : most sequences in one step
    max_num_batched_tokens : most tokens in one step (decode tokens + prefill chunks)
    max_queue : most requests waiting to start (QueueFull beyond)
    adaptive : "fixed" | "latency" | "throughput" (rawformer.runtime.adaptive)
    target_ms : the controller's step-latency target (latency) or ceiling (throughput)
    preemption, swap_space_bytes, use_graphs, split_prefill, admit_batch, overlap_host, interleave_prefill,
    graph_backend :
        see Scheduler (overlap_host: greedy decode steps launched before the previous step's tokens are
        read; streamed outputs then come one step after the device computed them; interleave_prefill:
        prompts admitted meanwhile prefilled a few layers per decode step)
    name : the model's name (the server's /v1/models)
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        pool: KVPool | None = None,
        kv_tokens: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_queue: int = 256,
        adaptive: str = "fixed",
        target_ms: float | None = None,
        preemption: str = "auto",
        swap_space_bytes: int = 1 << 30,
        use_graphs: bool | None = None,
        split_prefill: bool | None = None,
        admit_batch: int | None = None,
        overlap_host: bool | None = None,
        interleave_prefill: bool = False,
        graph_backend: Any = None,
        name: str = "rawformer",
    ) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"Engine: max_queue must be an int >= 0, got {max_queue!r}")
        if pool is None:
            limit = _model_limit(model) or 4096
            tokens = kv_tokens if kv_tokens is not None else min(max_num_seqs * limit, 65536)
            pool = make_pool(model, tokens, block_size=block_size)
        gpu = getattr(model, "xp", None) is not None and model.xp.__name__ == "cupy"
        if target_ms is None:
            target_ms = (50.0 if gpu else 500.0) if adaptive == "latency" else (500.0 if gpu else 5000.0)
        controller = AdaptiveBatcher(
            adaptive, target_ms=target_ms,
            token_budget=max_num_batched_tokens if adaptive == "fixed" else min(256, max_num_batched_tokens),
            max_seqs=max_num_seqs if adaptive == "fixed" else min(8, max_num_seqs),
            min_tokens=min(16, max_num_batched_tokens), max_tokens=max_num_batched_tokens,
            max_seqs_limit=max_num_seqs,
        )  # fmt: skip
        self.scheduler = Scheduler(
            model, pool, tokenizer, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            controller=controller, preemption=preemption, swap_space_bytes=swap_space_bytes,
            use_graphs=use_graphs, split_prefill=split_prefill, admit_batch=admit_batch,
            overlap_host=overlap_host, interleave_prefill=interleave_prefill, graph_backend=graph_backend,
        )  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.controller = controller
        self.name = name
        self.max_queue = max_queue
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[Hashable] = []
        self._unfinished: set[Hashable] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.closed = False
        self.last_error: str | None = None
        self.started = time.time()
        # metrics (engine thread writes, readers take _lock)
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.step_hist = Histogram(STEP_BUCKETS)
        self.rate = TokenRate()
        self.counts = dict(
            requests=0, finished=0, aborted=0, errors=0, rejected=0, prompt_tokens=0, generated=0
        )
        self.finish_reasons: dict[str, int] = {}

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Any,
        max_new_tokens: int = 16,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Any = None,
        ignore_eos: bool = False,
        request_id: Hashable | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> Hashable:
        """Queue one request; returns its id. Thread-safe.

        prompt : a str (needs the tokenizer) or a list of token ids
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed : as Generator.generate (seed:
            this request's generator, None = fresh entropy)
        stop : a stop token id / string or a list of both (the tokenizer's eos is added unless ignore_eos)
        on_output : called with a RequestOutput after every step that sampled for the request, and once
            with finished=True (on the stepping thread)

        Raises ValueError / TypeError for a bad request, QueueFull, EngineClosed.
        """
        ids = encode_prompts(prompt, self.tokenizer)
        if len(ids) != 1:
            raise ValueError(f"add_request takes one prompt, got {len(ids)}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = self.scheduler.make_request(rid, ids[0], params, max_new_tokens, stop, ignore_eos, on_output)
        with self._lock:
            if self.closed:
                raise EngineClosed("the engine is stopped")
            if rid in self._unfinished:
                raise ValueError(f"a request {rid!r} is already running")
            if self.queue_depth_locked() >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self._unfinished.add(rid)
            self._inbox.append(req)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += len(req.prompt)
            self._lock.notify_all()
        return rid

    def queue_depth_locked(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def abort(self, request_id: Hashable) -> None:
        """Cancel a request (thread-safe): it finishes with reason "abort" at the next step and its blocks
        are freed then."""
        with self._lock:
            if request_id in self._unfinished:
                self._aborts.append(request_id)
                self._lock.notify_all()

    @property
    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._unfinished)

    # ---- stepping --------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Take the inbox, run one scheduler step, record metrics; the outputs of this step."""
        sch = self.scheduler
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        outputs: list[RequestOutput] = []
        for req in inbox:
            sch.add(req)
        for rid in aborts:
            req = sch.requests.get(rid)
            if req is not None:
                # the callback gets the final output from the scheduler; collect it for step()'s caller
                cb = req.on_output
                got: list[RequestOutput] = []
                req.on_output = lambda o, cb=cb, got=got: (got.append(o), cb(o) if cb else None)
                sch.abort(rid)
                outputs += got
        if sch.has_work:
            outputs += sch.step()
            st = sch.last_step
            with self._lock:
                self.step_hist.observe(st.seconds)
                self.rate.add(st.tokens)
        self._account(outputs)
        return outputs

    def _account(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            for o in outputs:
                self.counts["generated"] += len(o.new_token_ids)
                if not o.finished:
                    continue
                self._unfinished.discard(o.request_id)
                self.counts["finished"] += 1
                self.finish_reasons[o.finish_reason or "?"] = self.finish_reasons.get(o.finish_reason, 0) + 1
                if o.finish_reason == "abort":
                    self.counts["aborted"] += 1
                elif o.finish_reason == "error":
                    self.counts["errors"] += 1
                if o.latency is not None and o.finish_reason not in ("abort", "error"):
                    self.e2e.observe(o.latency)
                if o.ttft is not None:
                    self.ttft.observe(o.ttft)

    def iterate(self) -> Iterator[RequestOutput]:
        """Step until every request is done, yielding each step's outputs (foreground use)."""
        while self.has_unfinished:
            yield from self.step()

    def generate(
        self, prompts: Any, max_new_tokens: int | Sequence[int] = 16, **kw: Any
    ) -> list[RequestOutput]:
        """Add every prompt (keyword arguments as add_request) and step until all are done; the final
        outputs in prompt order. Not for use while the background loop runs."""
        if self._thread is not None:
            raise RuntimeError("Engine.generate steps in the foreground; the background loop is running")
        ids = encode_prompts(prompts, self.tokenizer)
        news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(ids)
        if len(news) != len(ids):
            raise ValueError(f"max_new_tokens has {len(news)} values for {len(ids)} prompts")
        rids = [self.add_request(p, n, **kw) for p, n in zip(ids, news, strict=True)]
        finals: dict[Hashable, RequestOutput] = {}
        for out in self.iterate():
            if out.finished:
                finals[out.request_id] = out
        return [finals[r] for r in rids]

    # ---- the background loop ------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Run the step loop on a daemon thread (the server's mode)."""
        if self._thread is not None:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="rawformer-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._inbox or self._aborts or self.scheduler.has_work):
                    self._lock.wait(1.0)
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # a bug, not a model error (those fail their requests only)
                self.last_error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                self._fail_all("error")
        self._fail_all("abort")

    def _fail_all(self, reason: str) -> None:
        """Finish every request (their callbacks get a final output), freeing their blocks."""
        sch = self.scheduler
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._aborts = []
        for req in inbox:
            sch.add(req)
        outs: list[RequestOutput] = []
        error = self.last_error if reason == "error" else None
        for rid in list(sch.requests):
            req = sch.requests[rid]
            cb = req.on_output
            req.on_output = lambda o, cb=cb: (outs.append(o), cb(o) if cb else None)
            sch.abort(rid, reason, error)
        self._account(outs)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running finish with reason "abort"."""
        with self._lock:
            self.closed = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._fail_all("abort")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- metrics ---------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Name -> (value, help) for gauges and counters, (Histogram, help) for histograms."""
        ps = self.pool.stats()
        sch = self.scheduler
        with self._lock:
            c = dict(self.counts)
            m: dict[str, Any] = {
                "queue_depth": (self.queue_depth_locked(), "requests waiting to start"),
                "running": (len(sch.running), "requests holding KV blocks"),
                "preempted": (len(sch.preempted), "requests preempted (swapped or to recompute)"),
                "kv_blocks_used": (ps.blocks_used, "KV blocks in use"),
                "kv_blocks_capacity": (ps.num_blocks, "KV blocks in the pool"),
                "kv_bytes_used": (ps.bytes_used, "KV cache bytes in use"),
                "kv_swap_host_bytes": (ps.swap_host_bytes, "bytes of swapped-out KV on the host"),
                "tokens_per_second": (self.rate.rate(), "tokens processed per second (last 10 s)"),
                "requests_total": (c["requests"], "requests accepted"),
                "requests_finished_total": (c["finished"], "requests finished (any reason)"),
                "requests_aborted_total": (c["aborted"], "requests cancelled"),
                "requests_failed_total": (c["errors"], "requests failed by an error"),
                "requests_rejected_total": (c["rejected"], "requests refused: queue full"),
                "prompt_tokens_total": (c["prompt_tokens"], "prompt tokens accepted"),
                "generated_tokens_total": (c["generated"], "tokens generated"),
                "preemptions_total": (
                    sch.totals["preempted_swap"] + sch.totals["preempted_recompute"],
                    "requests preempted",
                ),
                "steps_total": (sch.totals["steps"], "scheduler steps"),
                "time_to_first_token_seconds": (self.ttft, "time from arrival to the first token"),
                "request_latency_seconds": (self.e2e, "time from arrival to the last token"),
                "step_latency_seconds": (self.step_hist, "wall time of one scheduler step"),
            }
        st = self.controller.state()
        m["adaptive_token_budget"] = (st["token_budget"], f"per-step token budget ({st['mode']} mode)")
        m["adaptive_max_seqs"] = (st["max_seqs"], f"per-step batch size limit ({st['mode']} mode)")
        m["adaptive_target_ms"] = (st["target_ms"], "step latency target / ceiling of the controller")
        m["adaptive_step_ms"] = (st["ema_step_ms"], "moving average of the step latency")
        return m

    def prometheus(self) -> str:
        return prometheus_text(self.metrics())

    def summary(self) -> dict[str, Any]:
        """Plain numbers (JSON-friendly) of metrics() with p50/p99 of the histograms."""
        out: dict[str, Any] = {}
        for k, (v, _) in self.metrics().items():
            if isinstance(v, Histogram):
                out[k] = dict(count=v.count, p50=v.quantile(0.5), p99=v.quantile(0.99))
            else:
                out[k] = v
        out["adaptive"] = self.controller.state()
        out["steps"] = self.scheduler.step_breakdown()
        return out
