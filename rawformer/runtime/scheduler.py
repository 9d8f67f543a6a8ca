"""Iteration-level continuous batching over the paged KV pool.

Requests live in one of three queues: `waiting` (not started, FCFS), `running` (hold KV blocks; in
admission order) and `preempted` (taken off the GPU, ordered by arrival). Every `step()`:

1. decode set: the running sequences whose prompt is computed; each appends its last sampled token.
   If the pool lacks the blocks for that, the LATEST-arrived running requests are preempted (FCFS: the
   oldest keep going) until the rest fit:
     swap       pool.swap_out (K/V copied to host memory, blocks freed; swap_in later restores them),
     recompute  pool.free_sequence (the request is re-added later with prompt + generated tokens as its
                prompt: the prefill recomputes the K/V, the next token comes out of that prefill).
   `preemption="auto"` swaps while the swapped bytes stay under `swap_space_bytes`, else recomputes; a
   request that is still in its prefill is always recomputed (nothing worth keeping).
2. resume: preempted requests, oldest first, come back while the blocks are free (their decode appends
   and a watermark of free blocks kept aside); none is skipped (if the oldest cannot come back, nothing
   newer is admitted either: no starvation).
3. admit: waiting requests, FCFS, while the batch has room (`max_seqs`), the step has token budget left,
   and the free blocks (minus what this step's decode appends take, minus the watermark) hold the whole
   prompt (add_sequence reserves every prompt block at once; prefix-cached blocks are shared). While the
   batch is busy and a queue waits, admission waits for `admit_batch` free slots, so prompts are prefilled
   several at a time.
4. chunked prefill: the step's token budget minus one token per decoding sequence is spread over the
   sequences with pending prompt tokens: every one gets min(pending, C) tokens with the largest C that fits
   the budget (water filling), so a long prompt is computed over several steps while decodes go on.
5. forward: one batch (decode tokens and prefill chunks mixed; models/common.py attends with the "gather"
   path) or, with `split_prefill` (the GPU default), a decode forward (padded to a batch bucket, replayed
   as a CUDA graph, see cuda_graphs.py) then a prefill forward. One row of logits per sequence.
6. sample: every decoding sequence, and every prefilling sequence whose last prompt chunk ran, picks a token
   with its own SamplingParams and generator (rawformer.runtime.sampler: the same draws as Generator for
   the same seed), checks its stops and streams a RequestOutput to its callback; finished requests free
   their blocks at once.

Overlapped decode (`overlap_host`, the default wherever decode steps are padded to graph buckets): a pure
greedy decode step is launched before the previous step's tokens reach the host (runtime/overlap.py says how,
and what that changes); any other step first resolves the step in flight and then runs synchronously. With
`interleave_prefill`, greedy prompts admitted meanwhile are prefilled a few layers per overlapped step
(runtime/interleave.py) instead of in a synchronous step.

Per step, `last_step` (summed in `kind_totals`, `step_breakdown()`) records its kind (overlapped | graph |
eager | mixed | idle), the host time up to the launch, the time blocked on the device and the time spent on
the tokens afterwards, and for a step that did not overlap, why.

A request finishes on a stop token ("stop_token"; the token is in token_ids, not in the text), a stop string
in its text ("stop_string"; text cut before it), max_new_tokens ("length"), the longest sequence the pool and
model hold ("max_len"), abort() ("abort": its blocks are freed at once, wherever it is) or an exception in
the forward ("error": every request of that step fails, their blocks are freed, the scheduler goes on).

Text is detokenized incrementally (a window of the last few tokens per step, not the whole output), and
streamed text never shows what may still change: a trailing partial UTF-8 character ("\\ufffd") and a
suffix that could be the start of a stop string are held back until the next token decides.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.memory import KVPool, OutOfBlocks, SequenceTooLong
from rawformer.runtime.adaptive import AdaptiveBatcher
from rawformer.runtime.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs, GraphCaptureError, bucket_for
from rawformer.runtime.generate import _model_limit, _split_stop
from rawformer.runtime.interleave import InterleavedPrefill, PrefillJob
from rawformer.runtime.overlap import OverlappedDecode
from rawformer.runtime.sampler import SamplingParams, sample_tokens
from rawformer.runtime.token_feed import InFlight, TokenReadback

__all__ = ["FINISH_REASONS", "STEP_KINDS", "Request", "RequestOutput", "Scheduler", "StepStats"]

FINISH_REASONS = ("stop_token", "stop_string", "length", "max_len", "abort", "error")
PREEMPTION_MODES = ("swap", "recompute", "auto")
# overlapped: pure decode launched before the previous step's tokens were read; graph: a synchronous pure
# decode step replayed as a CUDA graph; eager: a synchronous pure decode step run op by op; mixed: a step
# with prefill tokens (its decode part may be a graph replay); idle: nothing ran (the in-flight step's
# tokens were read, or nothing could be scheduled)
STEP_KINDS = ("overlapped", "graph", "eager", "mixed", "idle")


@dataclass
class RequestOutput:
    """What one request did in one step (or its final state when `finished`).

    new_token_ids : tokens sampled this step
    new_text : text that became final this step (the stream delta; "" without a tokenizer)
    token_ids : every generated token so far
    text : the text streamed so far (final text once finished)
    """

    request_id: Hashable
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    error: str | None = None
    ttft: float | None = None  # final outputs: seconds from arrival to the first token (None: no token)
    latency: float | None = None  # final outputs: seconds from arrival to the end


@dataclass(eq=False)
class Request:
    """One request in the scheduler: what it asks for and where it stands."""

    request_id: Hashable
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 16
    stop_tokens: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    on_output: Callable[[RequestOutput], None] | None = None
    arrival: float = field(default_factory=time.perf_counter)
    # ---- state
    status: str = "new"  # new | waiting | running | preempted | finished
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""  # streamed (final) text
    stop_text: str = ""  # the text cut before a stop string
    detok: str = ""  # the text of the output tokens decoded so far (incrementally)
    _prefix_off: int = 0  # detokenization window: output[_prefix_off:_read_off] gave the last piece
    _read_off: int = 0
    seq_id: Any = None  # the pool's id while it holds a sequence
    swapped: bool = False  # preempted by swap (else by recompute)
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    rng: Any = None
    seen: Any = None  # (V,) bool on the model's device: tokens for the repetition penalty
    _incarnation: int = 0

    @property
    def finished(self) -> bool:
        return self.status == "finished"


@dataclass
class StepStats:
    """What one step did (Scheduler.last_step)."""

    seconds: float = 0.0
    decode_seqs: int = 0
    prefill_seqs: int = 0
    prefill_tokens: int = 0
    forwards: int = 0
    sampled: int = 0
    admitted: int = 0
    resumed: int = 0
    preempted: int = 0
    saturated: bool = False
    kind: str = "idle"  # one of STEP_KINDS
    graph: bool = False  # its decode forward was a CUDA graph replay
    host_s: float = 0.0  # from the step's start until its forward(s) were launched (scheduling, prepare)
    wait_s: float = 0.0  # blocked on the device: until the tokens read this step were on the host
    post_s: float = 0.0  # after that: accepting tokens, stops, detokenizing, callbacks, freeing
    sync_reason: str | None = None  # why a decode step did not overlap (None: it did, or overlap is off)
    prefill_layers: int = 0  # layers of an interleaved prefill job launched in this step

    @property
    def tokens(self) -> int:
        return self.decode_seqs + self.prefill_tokens


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may still change: a partial UTF-8 character (decoded as
    U+FFFD) and the longest suffix that is a proper prefix of a stop string."""
    keep = 0
    if text.endswith("\ufffd"):
        keep = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def water_fill(pending: Sequence[int], budget: int) -> int:
    """The largest chunk C with sum(min(p, C)) <= budget (0 when the budget is under one token each)."""
    if not pending or budget < len(pending):
        return 0
    if sum(pending) <= budget:
        return max(pending)
    lo, hi = 1, max(pending)
    while lo < hi:  # the sum is monotone in C
        mid = (lo + hi + 1) // 2
        if sum(min(p, mid) for p in pending) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler(OverlappedDecode, InterleavedPrefill):
    """Continuous batching of requests over one model and one KVPool (see the module docstring).

    Parameters
    ----------
    model : a decoder (GPT2Model, LlamaModel): forward(batch, arena, last_only=...), vocab_size, xp, ...
    pool : KVPool of the model's geometry
    tokenizer : optional (texts, stop strings, eos)
    max_num_seqs : hard cap on sequences per step (the controller moves max_seqs below it)
    max_num_batched_tokens : hard cap on tokens per step
    controller : AdaptiveBatcher (default: fixed at the two caps)
    preemption : "swap" | "recompute" | "auto"
    swap_space_bytes : host bytes swapped-out requests may hold (default 1 GiB)
    watermark : fraction of the pool's blocks kept free at admission (so running requests can grow)
    split_prefill : decode and prefill as separate forwards (default: on the GPU, where decode steps are
        CUDA graphs; one mixed forward on the CPU)
    use_graphs : CUDA graphs for pure decode forwards (default: on the GPU unless RAWFORMER_DEBUG=1)
    graph_buckets : decode batch sizes padded to on the GPU
    admit_batch : while requests wait, admit them only when this many batch slots are free (or all that
        wait fit), so one prefill forward serves several prompts (default: max_num_seqs // 8 on the GPU,
        where a forward's launch overhead is worth amortising; 1 on the CPU)
    overlap_host : overlapped greedy decode steps (module docstring; default: wherever decode steps are
        padded to buckets, i.e. on the GPU); False: every step reads its tokens before the next is prepared
    interleave_prefill : an admission during overlapped decode launches the prompts' prefill a few layers
        per decode step (runtime/interleave.py); needs overlap_host and a model with forward_layers. Off by
        default: not yet measured on the GPU
    """

    def __init__(
        self,
        model: Any,
        pool: KVPool,
        tokenizer: Any = None,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        controller: AdaptiveBatcher | None = None,
        preemption: str = "auto",
        swap_space_bytes: int = 1 << 30,
        watermark: float = 0.01,
        split_prefill: bool | None = None,
        use_graphs: bool | None = None,
        graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
        graph_backend: Any = None,
        admit_batch: int | None = None,
        overlap_host: bool | None = None,
        interleave_prefill: bool = False,
    ) -> None:
        for attr in ("forward", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype", "xp"):
            if not hasattr(model, attr):
                raise TypeError(f"Scheduler: the model has no {attr!r} (a decoder: GPT2Model, LlamaModel)")
        if not isinstance(pool, KVPool):
            raise TypeError(f"Scheduler: pool must be a KVPool, got {type(pool).__name__}")
        a = pool.arena
        want = (model.num_layers, model.num_kv_heads, model.head_dim, np.dtype(model.dtype))
        if (a.layers, a.kv_heads, a.head_dim, a.dtype) != want or a.xp is not model.xp:
            raise ValueError(
                f"Scheduler: the pool's arena ({a.layers}, {a.kv_heads}, {a.head_dim}, {a.dtype}, "
                f"{a.xp.__name__}) does not fit the model {want} on {model.xp.__name__}"
            )
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Scheduler: {name} must be a positive int, got {v!r}")
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"Scheduler: preemption must be one of {PREEMPTION_MODES}, got {preemption!r}")
        if not 0 <= watermark < 1:
            raise ValueError(f"Scheduler: watermark must be in [0, 1), got {watermark!r}")
        self.model = model
        self.pool = pool
        self.arena = a
        self.tokenizer = tokenizer
        self.xp = model.xp
        self.is_gpu = self.xp is not np
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.controller = controller or AdaptiveBatcher(
            "fixed", token_budget=max_num_batched_tokens, max_seqs=max_num_seqs,
            max_tokens=max(max_num_batched_tokens, 16), max_seqs_limit=max_num_seqs,
        )  # fmt: skip
        self.preemption = preemption
        self.swap_space_bytes = int(swap_space_bytes)
        self.watermark_blocks = int(watermark * pool.num_blocks)
        lim = _model_limit(model)
        # a lone request always fits: no sequence may outgrow the arena
        self.max_len = min(pool.max_seq_len, lim or pool.max_seq_len, pool.num_blocks * pool.block_size)
        self.eos = getattr(tokenizer, "eos_token_id", None)
        debug = os.environ.get("RAWFORMER_DEBUG", "") not in ("", "0")
        if use_graphs is None:
            use_graphs = self.is_gpu and not debug
        if use_graphs and not self.is_gpu and graph_backend is None:
            raise ValueError("Scheduler: CUDA graphs need the GPU; use_graphs=False on the CPU")
        self.pad = self.is_gpu or graph_backend is not None
        self.graphs = DecodeGraphs(self._eager, graph_backend) if use_graphs else None
        self.split_prefill = self.pad if split_prefill is None else bool(split_prefill)
        self.buckets = tuple(sorted({int(b) for b in graph_buckets}))
        if admit_batch is None:
            admit_batch = max(1, max_num_seqs // 8) if self.pad else 1
        if isinstance(admit_batch, bool) or not isinstance(admit_batch, int) or admit_batch < 1:
            raise ValueError(f"Scheduler: admit_batch must be a positive int, got {admit_batch!r}")
        self.admit_batch = admit_batch
        self.overlap_host = self.pad if overlap_host is None else bool(overlap_host)
        self._inflight: InFlight | None = None  # the overlapped step whose tokens are not read yet
        # off by default until the GPU measures it faster than synchronous admissions (runtime/interleave.py)
        self.can_interleave = self.overlap_host and hasattr(model, "forward_layers")
        if interleave_prefill and not self.can_interleave:
            raise ValueError(
                "Scheduler: interleave_prefill needs overlap_host and a model with forward_layers "
                f"(overlap_host={self.overlap_host}, {type(model).__name__})"
            )
        self.interleave_prefill = bool(interleave_prefill)
        self._job: PrefillJob | None = None  # the interleaved prefill job with layers left to launch
        self._job_done: InFlight | None = None  # a finished job: its first tokens, not read yet
        self._job_readback = TokenReadback(self.xp, self.max_num_seqs)
        self._readback = TokenReadback(self.xp, self.max_num_seqs)  # overlapped steps' ids to the host
        self.stream = self.xp.cuda.Stream(non_blocking=True) if self.is_gpu else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preempted: list[Request] = []
        self.requests: dict[Hashable, Request] = {}
        self.last_step = StepStats()
        self.totals = dict(
            steps=0, forwards=0, preempted_swap=0, preempted_recompute=0, resumed=0, admitted=0,
            prompt_tokens_computed=0, generated_tokens=0, finished=0, aborted=0, errors=0, prefill_jobs=0,
        )  # fmt: skip
        self.kind_totals: dict[str, dict[str, float]] = {}
        self.sync_reasons: dict[str, int] = {}

    # ---- requests --------------------------------------------------------------------------------------

    def validate(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Raise ValueError / SequenceTooLong for a request that could never run."""
        if not prompt:
            raise ValueError("prompt is empty: a prompt needs at least one token")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.model.vocab_size:
            raise ValueError(
                f"prompt holds token id {lo if lo < 0 else hi}, outside [0, {self.model.vocab_size})"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(prompt) > self.max_len:
            raise SequenceTooLong(f"the prompt has {len(prompt)} tokens; at most {self.max_len} fit")

    def make_request(
        self,
        request_id: Hashable,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        max_new_tokens: int = 16,
        stop: Any = None,
        ignore_eos: bool = False,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> Request:
        """A checked Request (not queued yet: pass it to add)."""
        prompt = [int(t) for t in prompt]
        self.validate(prompt, max_new_tokens)
        toks, strs = _split_stop(stop)
        if strs and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")
        if self.eos is not None and not ignore_eos:
            toks = toks | {int(self.eos)}
        return Request(
            request_id, prompt, params or SamplingParams(), int(max_new_tokens), toks, strs, on_output
        )

    def add(self, req: Request) -> None:
        """Queue a request (FCFS by the order of add calls)."""
        if req.request_id in self.requests:
            raise ValueError(f"a request {req.request_id!r} is already in the scheduler")
        if req.status != "new":
            raise ValueError(f"request {req.request_id!r} was already added")
        req.status = "waiting"
        req.rng = np.random.default_rng(req.params.seed)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: Hashable, reason: str = "abort", error: str | None = None) -> bool:
        """Cancel a request wherever it is; its blocks are freed now and its callback gets the final output
        (finish_reason `reason`). False when it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        if self._in_job(req):  # the job's remaining layers write its blocks: launch them before freeing
            self._flush_job(StepStats(), [])
        if req.status == "waiting":
            self.waiting.remove(req)
        elif req.status == "running":
            self.running.remove(req)
        elif req.status == "preempted":
            self.preempted.remove(req)
        self.totals["aborted"] += 1
        self._finish(req, reason, [], error)
        self._settle()
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.preempted)

    def counts(self) -> dict[str, int]:
        return dict(waiting=len(self.waiting), running=len(self.running), preempted=len(self.preempted))

    # ---- pool bookkeeping --------------------------------------------------------------------------------

    def _new_seq_id(self, req: Request) -> Any:
        req._incarnation += 1
        return ("sched", id(self), req.request_id, req._incarnation)

    def _release(self, req: Request) -> None:
        if req.seq_id is not None and req.seq_id in self.pool:
            self.pool.free_sequence(req.seq_id)
        req.seq_id = None
        req.swapped = False

    def _pending(self, req: Request) -> int:
        return self.pool.sequence(req.seq_id).num_pending

    def _preempt(self, req: Request, stats: StepStats) -> None:
        """Take a running request off the pool (swap or recompute) into the preempted queue."""
        self.running.remove(req)
        swap = (
            self.preemption != "recompute"
            and self._pending(req) == 0
            and req.output
            and (
                self.preemption == "swap"
                or self.pool.stats().swap_host_bytes
                + len(self.pool.sequence(req.seq_id).blocks) * self.arena.block_bytes
                <= self.swap_space_bytes
            )
        )
        if swap:
            self.pool.swap_out(req.seq_id)
            req.swapped = True
            self.totals["preempted_swap"] += 1
        else:
            self._release(req)
            self.totals["preempted_recompute"] += 1
        req.status = "preempted"
        req.preemptions += 1
        stats.preempted += 1
        self.preempted.append(req)
        self.preempted.sort(key=lambda r: r.arrival)

    def _finish(self, req: Request, reason: str, new: list[int], error: str | None = None) -> RequestOutput:
        """Free the request's blocks, mark it finished and send its final output."""
        self._release(req)
        req.status = "finished"
        req.finish_reason = reason
        req.error = error
        req.finish_time = time.perf_counter()
        self.totals["finished"] += 1
        self.requests.pop(req.request_id, None)
        return self._emit(req, new, final=True)

    # ---- text and stops --------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids)

    def _detok(self, req: Request, upto: int, final: bool = False) -> None:
        """Extend req.detok with the text of output[:upto], decoding only a short window of tokens.

        The window output[_prefix_off:upto] is decoded with and without its new tokens; the difference is
        the new text (so tokenizers whose pieces depend on the token before, e.g. a leading space, come out
        right). A piece ending in U+FFFD (a partial UTF-8 character) waits for the next token unless final."""
        if upto <= req._read_off:
            return
        out = req.output
        prefix = self._decode(out[req._prefix_off : req._read_off])
        text = self._decode(out[req._prefix_off : upto])
        if len(text) > len(prefix) and text.startswith(prefix) and (final or not text.endswith("\ufffd")):
            req.detok += text[len(prefix) :]
            req._prefix_off, req._read_off = req._read_off, upto
        elif final:  # a tokenizer whose window decode is not prefix-stable: decode everything once
            req.detok = self._decode(out[:upto])
            req._prefix_off = req._read_off = upto

    def _emit(self, req: Request, new: list[int], final: bool = False) -> RequestOutput:
        """Advance the streamed text and hand the step's output to the request's callback."""
        old = req.text
        delta = ""
        if self.tokenizer is not None:
            if final and req.finish_reason == "stop_string":
                full = req.stop_text
            elif final:
                self._detok(req, len(req.output) - (req.finish_reason == "stop_token"), final=True)
                full = req.detok
            else:  # hold back what may be the start of a stop string
                full = req.detok[: len(req.detok) - _hold_back(req.detok, req.stop_strings)]
            if full.startswith(old):  # streamed text only grows into the final text
                delta, req.text = full[len(old) :], full
            elif final:
                req.text = full
        out = RequestOutput(
            req.request_id, list(new), delta, list(req.output), req.text, final,
            req.finish_reason if final else None, len(req.prompt), req.error,
        )  # fmt: skip
        if final:
            if req.first_token_time is not None:
                out.ttft = req.first_token_time - req.arrival
            out.latency = (req.finish_time or time.perf_counter()) - req.arrival
        if req.on_output is not None:
            req.on_output(out)
        return out

    def _accept(self, req: Request, tok: int) -> bool:
        """Append a sampled token, check the stops; True when the request is done (not freed yet)."""
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output.append(tok)
        if req.seen is not None:
            req.seen[tok] = True
        if tok in req.stop_tokens:
            req.finish_reason = "stop_token"  # its text is not part of the output text
        elif self.tokenizer is not None:
            before = len(req.detok)
            self._detok(req, len(req.output))
            if req.stop_strings and len(req.detok) > before:
                # only the new text (and a stop string's length before it) can hold a new match
                start = max(0, before - max(map(len, req.stop_strings)) + 1)
                hits = [i for i in (req.detok.find(s, start) for s in req.stop_strings) if i >= 0]
                if hits:
                    req.finish_reason = "stop_string"
                    req.stop_text = req.detok[: min(hits)]
        if req.finish_reason is None and len(req.output) >= req.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason is None and len(req.prompt) + len(req.output) > self.max_len:
            req.finish_reason = "max_len"
        return req.finish_reason is not None

    # ---- sampling ----------------------------------------------------------------------------------------

    def _sample(self, logits: Any, reqs: list[Request]) -> list[int]:
        """One token per row of logits (len(reqs), V), each with its request's parameters and generator."""
        params = [r.params for r in reqs]
        greedy = all(p.greedy for p in params)
        penalized = any(p.repetition_penalty != 1 for p in params)
        if greedy and not penalized:
            return np.asarray(backend.to_numpy(self.xp.argmax(logits, axis=1))).astype(int).tolist()
        temp = np.array([p.temperature for p in params], dtype=np.float64)
        u = np.array([r.rng.random() if t > 0 else 0.0 for r, t in zip(reqs, temp, strict=True)])
        seen = None
        if penalized:
            v = self.model.vocab_size
            seen = self.xp.stack([r.seen if r.seen is not None else self.xp.zeros(v, bool) for r in reqs])
        toks = sample_tokens(
            logits, u, temp, np.array([p.top_k for p in params]), np.array([p.top_p for p in params]),
            np.array([p.repetition_penalty for p in params]), seen,
        )  # fmt: skip
        return toks.astype(int).tolist()

    # ---- the forward -----------------------------------------------------------------------------------

    def _eager(self, batch: Any) -> Any:
        return self.model.forward(batch, self.arena)

    def _width(self) -> int:
        """Block-table columns of a padded decode step: the same for every step (the longest sequence the
        scheduler admits: no table is longer), so each batch bucket captures its CUDA graph once. A width
        that grows with the sequences (powers of two) makes new (bucket, width) graphs, each an eager
        warm-up step plus a capture, in the middle of serving; the H100 static-vs-continuous run averaged
        4.3 ms per step where a replayed batch-64 step takes ~3 ms. The decode kernels read each sequence's
        context length from the device, so a wide table costs only its upload."""
        return math.ceil(self.max_len / self.pool.block_size)

    @staticmethod
    def _greedy(reqs: list[Request]) -> bool:
        """Whether every request picks the argmax (no temperature, no repetition penalty)."""
        return all(r.params.greedy and r.params.repetition_penalty == 1 for r in reqs)

    def _run_decode(self, batch: Any, n: int, greedy: bool, padded: bool) -> tuple[Any, bool]:
        """The first n rows of a decode step's logits, or with `greedy` their argmax (token ids, computed
        inside the graph where one runs); and whether a CUDA graph ran."""
        if padded:
            if self.graphs is not None and self.graphs.stats.error is None:
                try:
                    return self.graphs.run(batch, greedy=greedy)[:n], True
                except GraphCaptureError:
                    pass  # stats.error says why; eager from now on
            out = self._eager(batch)[:n]
        else:
            out = self.model.forward(batch, self.arena, last_only=True)
        return (out.argmax(axis=1) if greedy else out), False

    def _decode_forward(self, reqs: list[Request], greedy: bool) -> tuple[Any, bool]:
        """A synchronous decode forward (each request appends its last sampled token)."""
        n = len(reqs)
        ids = [r.seq_id for r in reqs]
        toks = [[r.output[-1]] for r in reqs]
        bucket = bucket_for(n, self.buckets) if self.pad else None
        width = self._width() if bucket is not None else None
        batch = self.pool.prepare(ids, toks, pad_to=bucket, block_table_width=width)
        return self._run_decode(batch, n, greedy, bucket is not None)

    def _forward(
        self, decode: list[Request], prefill: list[Request], chunk: int, stats: StepStats
    ) -> list[tuple[list[Request], Any, bool]]:
        """Run the step's forward(s); (requests, logits rows or token ids, whether token ids) triples."""
        out = []
        if decode and (self.split_prefill or not prefill):
            greedy = self._greedy(decode)
            res, stats.graph = self._decode_forward(decode, greedy)
            out.append((decode, res, greedy))
            stats.kind = "graph" if stats.graph else "eager"
            decode = []
        if decode or prefill:
            reqs = decode + prefill
            batch = self.pool.prepare(
                [r.seq_id for r in reqs], [[r.output[-1]] for r in decode] + [None] * len(prefill),
                max_prompt_tokens=chunk if prefill else None,
            )  # fmt: skip
            out.append((reqs, self.model.forward(batch, self.arena, last_only=True), False))
            stats.kind = "mixed"  # decodes alone took the branch above
        return out

    def _take(
        self,
        sampled: list[tuple[Request, int]],
        stats: StepStats,
        outputs: list[RequestOutput],
        late: bool = False,
    ) -> None:
        """Accept one sampled token per request: stops, then a final output or a streamed delta. late: the
        tokens of an overlapped step, read one step late: a request no longer running (stopped at the step
        before, or aborted, also by a callback earlier in this loop) drops its token."""
        for req, tok in sampled:
            if late and req.status != "running":
                continue
            stats.sampled += 1
            if self._accept(req, tok):
                self.running.remove(req)
                outputs.append(self._finish(req, req.finish_reason or "length", [tok]))
            else:
                outputs.append(self._emit(req, [tok]))

    def _fail(self, reqs: list[Request], exc: Exception, outputs: list[RequestOutput]) -> None:
        """A forward raised: its requests fail (their blocks are freed), the scheduler goes on."""
        msg = f"{type(exc).__name__}: {exc}"
        self.totals["errors"] += 1
        for req in reqs:
            if req.status == "running":
                self.running.remove(req)
                try:
                    outputs.append(self._finish(req, "error", [], error=msg))
                except Exception:  # its callback raised (again): it is finished and freed all the same
                    pass

    # ---- one step ----------------------------------------------------------------------------------------

    def _blocks_for_decode(self, reqs: list[Request]) -> int:
        return sum(self.pool.blocks_needed(r.seq_id, 1) for r in reqs)

    def _start(self, req: Request, tokens: list[int]) -> bool:
        """Put a request's tokens into the pool (a new prompt, or prompt + output to recompute)."""
        sid = self._new_seq_id(req)
        try:
            self.pool.add_sequence(sid, tokens)
        except OutOfBlocks:
            return False
        req.seq_id = sid
        req.status = "running"
        if req.params.repetition_penalty != 1 and req.seen is None:
            req.seen = self.xp.zeros(self.model.vocab_size, dtype=bool)
            req.seen[self.xp.asarray(np.array(req.prompt, dtype=np.int64))] = True
        self.running.append(req)
        return True

    def _prompt_fits(self, req: Request, reserve: int) -> bool:
        """Whether the free blocks hold the request's whole prompt with `reserve` blocks kept aside (this
        step's decode appends and the watermark)."""
        return math.ceil(len(req.prompt) / self.pool.block_size) + reserve <= self.pool.num_free_blocks

    def _admit_room(self, occupied: int, max_seqs: int) -> bool:
        """Whether the batch takes new requests with `occupied` slots taken: a slot is free and, while the
        batch is busy and a queue waits, admit_batch of them (or as many as wait)."""
        free = max_seqs - occupied
        return free > 0 and not (occupied and free < min(self.admit_batch, len(self.waiting)))

    def _admit_first(self, reserve: int) -> Request | None:
        """Start the first waiting request if its prompt fits (_prompt_fits); it, or None with nothing
        changed."""
        req = self.waiting[0]
        if not self._prompt_fits(req, reserve) or not self._start(req, req.prompt):
            return None
        self.waiting.popleft()
        return req

    def step(self) -> list[RequestOutput]:
        """One iteration (module docstring); the outputs of every request that sampled or finished (with
        overlapped decode: the tokens of the step launched by the previous call)."""
        t0 = time.perf_counter()
        stats = StepStats()
        outputs: list[RequestOutput] = []
        ctx = self.stream if self.stream is not None else contextlib.nullcontext()
        if self.stream is not None:
            self.stream.wait_event(self.xp.cuda.get_current_stream().record())
        with ctx:
            if self._overlapped_step(stats, outputs, t0):
                self._settle()
            else:
                self._resolve(stats, outputs)  # a synchronous step starts from every token on the host
                self._step(stats, outputs)
                if self.stream is not None:
                    self.stream.synchronize()
        stats.seconds = time.perf_counter() - t0
        self.last_step = stats
        self.totals["steps"] += 1
        self.totals["generated_tokens"] += stats.sampled
        self._record(stats)
        if stats.tokens:
            self.controller.observe(stats.seconds, stats.tokens, stats.decode_seqs + stats.prefill_seqs,
                                    stats.saturated)  # fmt: skip
        return outputs

    def _record(self, stats: StepStats) -> None:
        k = self.kind_totals.get(stats.kind)
        if k is None:
            k = self.kind_totals[stats.kind] = dict.fromkeys(
                ("steps", "graph", "seconds", "host_s", "wait_s", "post_s", "tokens"), 0
            )
        k["steps"] += 1
        k["graph"] += int(stats.graph)
        k["seconds"] += stats.seconds
        k["host_s"] += stats.host_s
        k["wait_s"] += stats.wait_s
        k["post_s"] += stats.post_s
        k["tokens"] += stats.tokens
        if stats.decode_seqs:  # by the decode batch's bucket: how the step time grows with the batch
            bucket = bucket_for(stats.decode_seqs, self.buckets) or stats.decode_seqs
            steps, secs = k.setdefault("buckets", {}).get(bucket, (0, 0.0))
            k["buckets"][bucket] = (steps + 1, secs + stats.seconds)
        if stats.sync_reason is not None:
            self.sync_reasons[stats.sync_reason] = self.sync_reasons.get(stats.sync_reason, 0) + 1

    def step_breakdown(self) -> dict[str, Any]:
        """Where the steps' time went, by kind (STEP_KINDS): steps, graph replays, total seconds and mean
        milliseconds per step of the whole step, the host part before the launch, the wait on the device
        and the work on the tokens after it, and {decode batch bucket: (steps, mean ms)}; plus why decode
        steps did not overlap (counts by reason). An overlapped step's time is mostly the wait for the step
        before it (one batch earlier)."""
        kinds = {}
        for kind, k in self.kind_totals.items():
            n = max(1, k["steps"])
            kinds[kind] = dict(
                steps=k["steps"], graph=k["graph"], seconds=k["seconds"], tokens=k["tokens"],
                ms=1e3 * k["seconds"] / n, host_ms=1e3 * k["host_s"] / n,
                wait_ms=1e3 * k["wait_s"] / n, post_ms=1e3 * k["post_s"] / n,
                buckets={b: (c, 1e3 * t / c) for b, (c, t) in sorted(k.get("buckets", {}).items())},
            )  # fmt: skip
        return dict(kinds=kinds, sync_reasons=dict(self.sync_reasons))

    def reset_stats(self) -> None:
        """Zero the totals, the per-kind step times and the sync reasons (e.g. after a warm-up)."""
        self.totals.update(dict.fromkeys(self.totals, 0))
        self.kind_totals.clear()
        self.sync_reasons.clear()

    def _step(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        t_start = time.perf_counter()
        pool = self.pool
        max_seqs = min(self.max_num_seqs, self.controller.max_seqs)
        budget = min(self.max_num_batched_tokens, self.controller.token_budget)
        # 1. decode set, preempting the latest arrivals until its appends fit
        decode = [r for r in self.running if self._pending(r) == 0]
        need = self._blocks_for_decode(decode)
        while need > pool.num_free_blocks and len(self.running) > 1:
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim, stats)
            decode = [r for r in decode if r is not victim]
            need = self._blocks_for_decode(decode)
        if len(decode) > max_seqs:  # the controller shrank the batch: the oldest decode first
            decode = sorted(decode, key=lambda r: r.arrival)[:max_seqs]
            stats.saturated = True
            need = self._blocks_for_decode(decode)
        reserve = need + self.watermark_blocks
        # 2. resume preempted requests, oldest first, none skipped
        blocked = False
        while self.preempted and len(self.running) < max_seqs:
            req = self.preempted[0]
            if req.swapped:
                n = math.ceil(pool.sequence(req.seq_id).num_tokens / pool.block_size)
                if n + 1 + reserve > pool.num_free_blocks:
                    blocked = True
                    break
                pool.swap_in(req.seq_id)
                req.swapped = False
                req.status = "running"
                self.running.append(req)
                decode.append(req)
                reserve += pool.blocks_needed(req.seq_id, 1)
            else:
                tokens = req.prompt + req.output
                if math.ceil(len(tokens) / pool.block_size) + reserve > pool.num_free_blocks:
                    blocked = True
                    break
                if not self._start(req, tokens):
                    blocked = True
                    break
            self.preempted.pop(0)
            stats.resumed += 1
            self.totals["resumed"] += 1
        # 3. admit waiting requests while the batch, the budget and the blocks allow; with a queue, only once
        # admit_batch slots are free (one prefill forward for several prompts, not one per finished request)
        prefill = [r for r in self.running if self._pending(r) > 0]
        left = budget - len(decode) - sum(self._pending(r) for r in prefill)
        if not self._admit_room(len(self.running), max_seqs):
            blocked = True
        while self.waiting and not blocked and len(self.running) < max_seqs and left > 0:
            req = self._admit_first(reserve)
            if req is None:
                break
            prefill.append(req)
            left -= self._pending(req)
            stats.admitted += 1
            self.totals["admitted"] += 1
        if self.waiting or self.preempted:
            stats.saturated = True
        # 4. chunked prefill within the budget
        # prefill keeps at least a quarter of the budget, so a batch full of decodes cannot starve it
        pbudget = max(budget - len(decode), budget // 4, 1)
        pending = [self._pending(r) for r in prefill]
        chunk = water_fill(pending, pbudget)
        if chunk == 0:
            prefill = prefill[: max(0, pbudget)]  # under one token each: the oldest get one
            pending = pending[: len(prefill)]
            chunk = 1 if prefill else 0
        if prefill and chunk < max(pending):
            stats.saturated = True
        if not decode and not prefill:
            return
        stats.decode_seqs = len(decode)
        stats.prefill_seqs = len(prefill)
        stats.prefill_tokens = sum(min(p, chunk) for p in pending)
        # 5. forward, 6. sample
        try:
            results = self._forward(decode, prefill, chunk, stats)
            stats.forwards = len(results)
            t_launch = time.perf_counter()
            stats.host_s += t_launch - t_start
            t_read = None
            for reqs, res, is_ids in results:
                ready = [i for i, r in enumerate(reqs) if self._pending(r) == 0]
                if not ready:
                    continue
                rows = res if len(ready) == len(reqs) else res[self.xp.asarray(np.array(ready))]
                if is_ids:  # a greedy decode forward: the argmax ran on the device (in the graph)
                    toks = np.asarray(backend.to_numpy(rows)).astype(int).tolist()
                else:
                    toks = self._sample(rows, [reqs[i] for i in ready])
                if t_read is None:
                    t_read = time.perf_counter()
                    stats.wait_s += t_read - t_launch
                self._take([(reqs[i], tok) for i, tok in zip(ready, toks, strict=True)], stats, outputs)
        except Exception as exc:  # the step's requests fail; the pool and the other requests go on
            self._fail(decode + prefill, exc, outputs)
            return
        if t_read is not None:
            stats.post_s += time.perf_counter() - t_read
        self.totals["forwards"] += stats.forwards
        self.totals["prompt_tokens_computed"] += stats.prefill_tokens
