"""Text generation over the paged KV cache: ragged batches, prefill then decode, stops, CUDA graphs.

    gen = Generator(model, pool, tokenizer)               # or rawformer.runtime.generate(model, ...)
    out = gen.generate(["Hello", "The sky is"], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0,
                       stop=["\\n", eos_id])
    out.token_ids[i], out.texts[i], out.results[i].finish_reason

One call runs its requests in waves of at most `max_batch` sequences. A wave:

1. adds every prompt to the pool (`add_sequence`: blocks for the prompt; full blocks of a prompt prefix
   already in the prefix cache are shared and not recomputed);
2. prefill: `pool.prepare(ids)` over the pending prompt tokens (ragged, packed; groups of at most
   `max_prefill_tokens` tokens), `model.forward(batch, arena, last_only=True)`, one sampled token each;
3. decode: while a sequence is unfinished, one step feeds every unfinished sequence its last token
   (`pool.prepare(ids, [[tok], ...])`), runs the forward (a CUDA graph on the GPU, see cuda_graphs.py) and
   samples the next token; a finished sequence leaves the batch and frees its blocks at once. Greedy waves
   on the GPU run `_decode_fed` instead: the host prepares and launches step n+1 before it reads step n's
   tokens (they reach step n+1 on the device), so its own work overlaps the GPU's; the results are the
   same (`overlap_host=False` turns it off).

A sequence finishes on a stop token ("stop_token"; the token is in token_ids, not in the text), a stop string
in its decoded text ("stop_string"; the text is cut before it), max_new_tokens ("length"), or when feeding
its last token would pass the longest sequence the pool and the model hold ("max_len").

Errors leave the pool as it was: every sequence of the call is freed whatever happens (the pool's free
block count returns to its value before the call). Running out of KV blocks raises OutOfBlocks saying how
many blocks the step needed and how many were free; a prompt longer than the pool / model can hold raises
SequenceTooLong (a ValueError) before anything is allocated.

On the GPU every decode step is padded to a bucket of sequences (1, 2, 4, ...) with a fixed block-table
width for the whole wave, with or without graphs: the eager path (use_graphs=False) runs exactly the
shapes the graphs run, so the tokens are identical.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.memory import Int8KVArena, KVArena, KVPool, OutOfBlocks, SequenceTooLong
from rawformer.memory.pool import UNKNOWN_TOKEN
from rawformer.runtime.cuda_graphs import (
    DEFAULT_BUCKETS,
    DecodeGraphs,
    GraphCaptureError,
    GraphStats,
    bucket_for,
)
from rawformer.runtime.sampler import Sampler, SamplingParams
from rawformer.runtime.token_feed import InFlight, TokenReadback, decodes_again, feed_tokens

__all__ = ["Generation", "GenerationResult", "Generator", "embed", "encode_prompts", "generate", "make_pool"]


@dataclass
class GenerationResult:
    """One request's outcome.

    prompt_ids : the prompt's token ids
    token_ids : the generated token ids (a stop token included)
    text : the decoded generated text (None without a tokenizer); cut before a stop string, without a
        stop token
    finish_reason : "stop_token" | "stop_string" | "length" | "max_len"
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str


@dataclass
class Generation:
    """The results of one generate call, in request order, and what the call did."""

    results: list[GenerationResult]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[list[int]]:
        return [r.token_ids for r in self.results]

    @property
    def texts(self) -> list[str | None]:
        return [r.text for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> GenerationResult:
        return self.results[i]


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new: int
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    seq_id: Any = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None


def _model_limit(model: Any) -> int | None:
    """The longest sequence the model can position (GPT-2: n_positions; Llama: max_position_embeddings)."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def make_pool(
    model: Any,
    max_tokens: int,
    *,
    block_size: int = 16,
    prefix_caching: bool = True,
    max_seq_len: int | None = None,
    kv_int8: bool = False,
) -> KVPool:
    """A KVPool with an arena for `max_tokens` tokens of `model` (its layers, kv heads, head dim, dtype and
    device), at least one sequence of the model's full length. kv_int8: an Int8KVArena (int8 K / V and an
    fp16 scale per token and head, read by the INT8 attention kernels) instead of the float cache."""
    limit = _model_limit(model)
    if max_seq_len is None:
        max_seq_len = min(limit, max(max_tokens, 1)) if limit else max(max_tokens, 1)
    blocks = max(math.ceil(max_tokens / block_size), math.ceil(max_seq_len / block_size))
    if hasattr(model, "make_arena"):  # a model with a cache of its own layout (MLA: latents + rope keys)
        if kv_int8:
            raise ValueError(
                f"make_pool: kv_int8 needs a K/V cache; {type(model).__name__} has its own layout"
            )
        arena = model.make_arena(block_size, num_blocks=blocks)
    else:
        arena = (Int8KVArena if kv_int8 else KVArena)(
            model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, block_size,
            num_blocks=blocks, xp=model.xp,
        )  # fmt: skip
    return KVPool(arena, max_seq_len=max_seq_len, prefix_caching=prefix_caching)


def _per_request(value: Any, n: int, name: str) -> list[Any]:
    """A scalar for every request, or one value per request."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _split_stop(stop: Any, name: str = "stop") -> tuple[frozenset[int], tuple[str, ...]]:
    """Stop tokens (ints) and stop strings (strs) of `stop`: one of them or a list mixing both."""
    if stop is None:
        return frozenset(), ()
    items = [stop] if isinstance(stop, (str, int, np.integer)) else list(stop)
    toks, strs = set(), []
    for s in items:
        if isinstance(s, str):
            if not s:
                raise ValueError(f"{name}: an empty stop string")
            strs.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0:
            toks.add(int(s))
        else:
            raise TypeError(f"{name}: a stop is a token id (int >= 0) or a string, got {s!r}")
    return frozenset(toks), tuple(strs)


def encode_prompts(prompts: Any, tokenizer: Any = None) -> list[list[int]]:
    """Token-id lists of prompts: a str, a list of ids, a list of strs / id lists, or an int array (B, L)."""
    if isinstance(prompts, np.ndarray) or backend.is_cupy(prompts):
        arr = backend.to_numpy(prompts)
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise TypeError(f"prompts: an int array must be 1-D or 2-D, got {arr.dtype} {arr.shape}")
        return [arr.tolist()] if arr.ndim == 1 else [row.tolist() for row in arr]
    if isinstance(prompts, str):
        prompts = [prompts]
    elif (
        isinstance(prompts, (list, tuple))
        and prompts
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts)
    ):
        prompts = [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(
            f"prompts must be a str, a list of token ids, or a non-empty list of those, got {prompts!r}"
        )
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer")
            out.append(list(tokenizer.encode(p)))
        else:
            arr = np.asarray(backend.to_numpy(p) if backend.is_cupy(p) else p)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise TypeError(f"prompt {i}: expected token ids (a 1-D int sequence), got {p!r}")
            out.append([int(t) for t in arr])
    return out


class Generator:
    """Generation with a decoder model over a KVPool (see the module docstring).

    Parameters
    ----------
    model : GPT2Model or LlamaModel (anything with forward(batch, arena, last_only=...), num_layers,
        num_kv_heads, head_dim, vocab_size, dtype, xp)
    pool : KVPool over an arena of the model's geometry (default: make_pool(model, max_batch x the model's
        length, capped at 64k tokens))
    tokenizer : optional; needed for text prompts, texts and stop strings (encode / decode)
    use_graphs : CUDA graphs for decode steps (default: on the GPU unless RAWFORMER_DEBUG=1; an error on
        the CPU)
    graph_buckets : batch sizes decode steps are padded to (default 1, 2, 4, ..., 256)
    max_batch : sequences decoded together (more prompts run in waves)
    max_prefill_tokens : prompt tokens per prefill forward (longer batches are split between sequences)
    overlap_host : greedy decode with the host one step ahead of the device (`_decode_fed`); False: the host
        reads each step's tokens before preparing the next (for comparisons)
    """

    def __init__(
        self,
        model: Any,
        pool: KVPool | None = None,
        tokenizer: Any = None,
        *,
        use_graphs: bool | None = None,
        graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_batch: int = 64,
        max_prefill_tokens: int = 16384,
        graph_backend: Any = None,
        overlap_host: bool = True,
    ) -> None:
        for attr in ("forward", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype", "xp"):
            if not hasattr(model, attr):
                raise TypeError(f"Generator: the model has no {attr!r} (a decoder: GPT2Model, LlamaModel)")
        self.model = model
        self.xp = model.xp
        self.is_gpu = self.xp is not np
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"Generator: max_batch must be a positive int, got {max_batch!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int):
            raise ValueError(f"Generator: max_prefill_tokens must be an int, got {max_prefill_tokens!r}")
        self.max_batch = max_batch
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        if pool is None:
            limit = _model_limit(model) or 4096
            pool = make_pool(model, min(max_batch * limit, 65536))
        if not isinstance(pool, KVPool):
            raise TypeError(f"Generator: pool must be a KVPool, got {type(pool).__name__}")
        a = pool.arena
        want = (model.num_layers, model.num_kv_heads, model.head_dim, np.dtype(model.dtype))
        have = (a.layers, a.kv_heads, a.head_dim, a.dtype)
        if want != have:
            raise ValueError(
                f"Generator: the pool's arena is (layers, kv_heads, head_dim, dtype) = {have}, the model "
                f"needs {want}"
            )
        if a.xp is not self.xp:
            raise ValueError(f"Generator: the pool lives on {a.xp.__name__}, the model on {self.xp.__name__}")
        self.pool = pool
        self.arena = a
        self.tokenizer = tokenizer
        lim = _model_limit(model)
        self.max_len = min(pool.max_seq_len, lim) if lim else pool.max_seq_len
        buckets = sorted({int(b) for b in graph_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"Generator: graph_buckets must be positive ints, got {graph_buckets!r}")
        self.buckets = tuple(buckets)
        debug = os.environ.get("RAWFORMER_DEBUG", "") not in ("", "0")
        if use_graphs is None:  # a model whose step reads device values on the host cannot be captured
            use_graphs = self.is_gpu and not debug and getattr(model, "graph_capturable", True)
        if use_graphs and not self.is_gpu and graph_backend is None:
            raise ValueError(
                "Generator: CUDA graphs need the GPU (a CuPy model); use_graphs=False on the CPU"
            )
        self.use_graphs = bool(use_graphs)
        # pad decode steps to buckets whenever graphs could run (the GPU), so eager == graphs
        self.pad = self.is_gpu or graph_backend is not None
        self.graphs = DecodeGraphs(self._eager_step, graph_backend) if self.use_graphs else None
        self.overlap_host = bool(overlap_host)
        self._readback: TokenReadback | None = None  # _decode_fed's host copies of the sampled ids
        self.stream = self.xp.cuda.Stream(non_blocking=True) if self.is_gpu else None
        self._ids = itertools.count()
        self.last_stats: dict[str, Any] = {}

    # ---- the steps -------------------------------------------------------------------------------------

    def _eager_step(self, batch: Any) -> Any:
        return self.model.forward(batch, self.arena)  # one token per sequence: (S, V)

    def _decode(self, batch: Any, greedy: bool = False) -> Any:
        """Logits (bucket, V) of a padded decode step, or with `greedy` their argmax (bucket,)."""
        if self.graphs is not None and self.pad and self.graphs.stats.error is None:
            try:
                return self.graphs.run(batch, greedy=greedy)
            except GraphCaptureError as exc:
                warnings.warn(f"{exc}; decode steps run eagerly from now on", RuntimeWarning, stacklevel=3)
        logits = self._eager_step(batch)
        return logits.argmax(axis=1) if greedy else logits

    @property
    def graph_stats(self) -> GraphStats | None:
        return self.graphs.stats if self.graphs is not None else None

    # ---- inputs ----------------------------------------------------------------------------------------

    def _encode(self, prompts: Any) -> list[list[int]]:
        return encode_prompts(prompts, self.tokenizer)

    def _decode_text(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    # ---- generate --------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        max_new_tokens: int | Sequence[int] = 32,
        *,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        repetition_penalty: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] | None = None,
        stop: Any = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Generate up to max_new_tokens tokens for each prompt.

        Parameters
        ----------
        prompts : a str, a list of token ids, or a list of strs / token-id lists (ragged), or an int array
            (B, L)
        max_new_tokens : int >= 1, or one per prompt
        temperature, top_k, top_p, repetition_penalty : see rawformer.runtime.sampler; scalars or one per
            prompt (temperature 0 = greedy)
        seed : int (request i draws from the generator seeded with (seed, i)), one int per prompt, or None
        stop : a stop token id, a stop string, or a list of both (the tokenizer's eos id is added unless
            ignore_eos); a list of such per prompt is not taken (the same stops for all)
        ignore_eos : do not stop at the tokenizer's eos token

        Returns
        -------
        Generation (results in prompt order: token_ids, text, finish_reason; stats)
        """
        ids = self._encode(prompts)
        n = len(ids)
        news = _per_request(max_new_tokens, n, "max_new_tokens")
        for i, m in enumerate(news):
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
                raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r} (prompt {i})")
        temps = _per_request(temperature, n, "temperature")
        ks = _per_request(top_k, n, "top_k")
        ps = _per_request(top_p, n, "top_p")
        reps = _per_request(repetition_penalty, n, "repetition_penalty")
        if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
            seeds: list[Any] = [None if seed is None else (int(seed), i) for i in range(n)]
        else:
            seeds = _per_request(seed, n, "seed")
        params = [SamplingParams(temps[i], ks[i], ps[i], reps[i], seeds[i]) for i in range(n)]
        stop_tokens, stop_strings = _split_stop(stop)
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and not ignore_eos:
            stop_tokens = stop_tokens | {int(eos)}
        vocab = self.model.vocab_size
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompt {i} holds token id {lo if lo < 0 else hi}, outside [0, {vocab})")
            if len(p) > self.max_len:
                raise SequenceTooLong(
                    f"prompt {i} has {len(p)} tokens; at most {self.max_len} fit (pool max_seq_len="
                    f"{self.pool.max_seq_len}, model length {_model_limit(self.model)})"
                )
        reqs = [_Request(i, ids[i], int(news[i]), stop_tokens, stop_strings) for i in range(n)]
        stats: dict[str, Any] = dict(
            requests=n, prompt_tokens=sum(len(p) for p in ids), generated_tokens=0, prefill_forwards=0,
            decode_steps=0, prefill_s=0.0, decode_s=0.0, waves=0,
        )  # fmt: skip
        ctx = self.stream if self.stream is not None else contextlib.nullcontext()
        if self.stream is not None:  # our stream starts after the caller's queued work (weights, arena)
            self.stream.wait_event(self.xp.cuda.get_current_stream().record())
        with ctx:
            for start in range(0, n, self.max_batch):
                wave = reqs[start : start + self.max_batch]
                sampler = Sampler(params[start : start + self.max_batch], vocab, self.xp)
                self._run_wave(wave, sampler, stats)
                stats["waves"] += 1
        stats["generated_tokens"] = sum(len(r.tokens) for r in reqs)
        if self.graphs is not None:
            stats["graphs"] = self.graphs.stats.as_dict()
        self.last_stats = stats
        results = []
        for r in reqs:
            text = r.text
            if text is None and self.tokenizer is not None:
                keep = r.tokens[:-1] if r.finish == "stop_token" else r.tokens
                text = self._decode_text(keep)
            results.append(GenerationResult(r.prompt, r.tokens, text, r.finish or "length"))
        return Generation(results, stats)

    def _finished(self, r: _Request, tok: int) -> bool:
        """Append a sampled token and decide whether the request is done."""
        r.tokens.append(tok)
        if tok in r.stop_tokens:
            r.finish = "stop_token"
        elif r.stop_strings:
            text = self._decode_text(r.tokens) or ""
            cut = min((text.find(s) for s in r.stop_strings if s in text), default=-1)
            if cut >= 0:
                r.finish, r.text = "stop_string", text[:cut]
        if r.finish is None and len(r.tokens) >= r.max_new:
            r.finish = "length"
        if r.finish is None and len(r.prompt) + len(r.tokens) > self.max_len:
            r.finish = "max_len"  # feeding the last token would pass the longest sequence
        return r.finish is not None

    def _width(self, wave: list[_Request]) -> int:
        """Block-table columns for every decode step of a wave: the longest sequence it can reach, rounded
        up to a power of two (fewer distinct graphs across calls), within the pool's longest sequence."""
        bs = self.pool.block_size
        longest = max(min(len(r.prompt) + r.max_new - 1, self.max_len) for r in wave)
        need = max(1, math.ceil(longest / bs))
        cap = max(need, math.ceil(self.max_len / bs))
        return min(1 << (need - 1).bit_length(), cap)

    def _decode_steps(
        self, active: list[_Request], rows: dict[Any, int], width: int, sampler: Sampler
    ) -> int:
        """Decode until every request of `active` is finished: each step samples on the host (any sampling
        parameters) before the next is prepared. Returns the number of steps."""
        pool = self.pool
        step = 0
        while active:
            n = len(active)
            bucket = bucket_for(n, self.buckets) if self.pad else None
            batch = self._prepare_decode(
                step, [r.seq_id for r in active], [[r.tokens[-1]] for r in active],
                pad_to=bucket, block_table_width=width if bucket is not None else None,
            )  # fmt: skip
            idx = [rows[r.seq_id] for r in active]
            if bucket is not None and sampler.all_greedy and not sampler.penalized:
                # the argmax runs inside the step's graph: only n token ids come back
                toks = backend.to_numpy(self._decode(batch, greedy=True)[:n]).tolist()
            else:
                logits = self._decode(batch)[:n] if bucket is not None else self._eager_step(batch)
                toks = sampler(logits, idx).tolist()
            sampler.observe(idx, [[t] for t in toks])
            still = []
            for r, t in zip(active, toks, strict=True):
                if self._finished(r, t):
                    pool.free_sequence(r.seq_id)
                else:
                    still.append(r)
            active = still
            step += 1
        return step

    def _decode_fed(self, active: list[_Request], rows: dict[Any, int], width: int, sampler: Sampler) -> int:
        """Greedy decode with the host one step ahead of the device. Returns the number of steps.

        Step n+1 is prepared and launched before step n's tokens reach the host: its new tokens go into
        the pool as UNKNOWN_TOKEN and are copied on the device from step n's argmax into batch.tokens
        (stream order: step n, the upload of n+1's arrays, that copy, step n+1). While the device runs step
        n+1 the host reads step n's tokens and applies the stops, so its work (prepare, launch, stops:
        ~0.15 ms per step) leaves the device's critical path.

        Which requests run step n+1 is decided before step n's values are known. max_new_tokens and the
        longest sequence depend only on counts (known ahead); a stop token or string shows one step late,
        so a request that stopped at step n has also run step n+1: that token is discarded (never in its
        result) and its blocks are freed with the rest. Greedy tokens do not depend on the batch they run
        in (the same bucketed shapes as `_decode_steps`), so the results equal that loop's.
        """
        pool, xp = self.pool, self.xp
        inflight: InFlight | None = None  # the step whose tokens are on their way to the host
        prev_rows: dict[int, int] = {}  # id(request) -> its row in the in-flight step
        if self._readback is None:  # kept across calls: its pinned buffers are allocated once
            self._readback = TokenReadback(xp, self.max_batch)
        step = 0
        while True:
            # the requests whose last token is still on the device (in their in-flight step's row order),
            # then those whose last token the host has; only those that take another step
            fed = [r for r in active if id(r) in prev_rows and self._runs_again(r, True)]
            fed.sort(key=lambda r: prev_rows[id(r)])
            known = [r for r in active if id(r) not in prev_rows and self._runs_again(r, False)]
            launch = fed + known
            nxt = None
            if launch:
                bucket = bucket_for(len(launch), self.buckets)
                new = [[UNKNOWN_TOKEN]] * len(fed) + [[r.tokens[-1]] for r in known]
                batch = self._prepare_decode(
                    step, [r.seq_id for r in launch], new, pad_to=bucket, block_table_width=width,
                    unknown_tokens=True,
                )  # fmt: skip
                if fed:  # the previous step's argmax -> this step's input ids, on the device
                    feed_tokens(batch.tokens, inflight.ids, [prev_rows[id(r)] for r in fed], xp)
                nxt = self._readback.start(launch, self._decode(batch, greedy=True))
                step += 1
            if inflight is not None:  # step n's tokens, while step n+1 runs
                reqs = inflight.reqs
                toks = inflight.tokens()
                kept = [(r, t) for r, t in zip(reqs, toks, strict=True) if r.finish is None]
                sampler.observe([rows[r.seq_id] for r, _ in kept], [[t] for _, t in kept])
                for r, t in kept:
                    self._finished(r, t)
                for r in reqs:  # blocks a later step takes are written after this step in stream order
                    if r.finish is not None and r.seq_id in pool:
                        pool.free_sequence(r.seq_id)
            active = [r for r in active if r.finish is None]
            if nxt is None:
                break
            inflight = nxt
            prev_rows = nxt.rows
        return step

    def _prepare_decode(self, step: int, seq_ids: list[Any], new: list[list[int]], **kw: Any) -> Any:
        """pool.prepare for decode step `step`; running out of blocks says which step and what to change."""
        pool = self.pool
        try:
            return pool.prepare(seq_ids, new, **kw)
        except OutOfBlocks as e:
            raise OutOfBlocks(
                e.needed, e.free,
                f"decode step {step} of {len(seq_ids)} sequences (the pool has {pool.num_blocks} blocks of "
                f"{pool.block_size} tokens) — use a larger pool, fewer prompts or fewer new tokens",
            ) from e  # fmt: skip

    def _runs_again(self, r: _Request, in_flight: bool) -> bool:
        """Whether r decodes another step, from counts alone (its in-flight token, if any, counted; see
        `_finished`)."""
        return decodes_again(len(r.prompt), len(r.tokens) + int(in_flight), r.max_new, self.max_len)

    def _run_wave(self, wave: list[_Request], sampler: Sampler, stats: dict[str, Any]) -> None:
        pool = self.pool
        added: list[Any] = []
        sync = self.stream.synchronize if self.stream is not None else (lambda: None)
        try:
            for r in wave:
                r.seq_id = ("generate", id(self), next(self._ids))
                try:
                    pool.add_sequence(r.seq_id, r.prompt)
                except OutOfBlocks as e:
                    raise OutOfBlocks(
                        e.needed, e.free,
                        f"the prompt of request {r.index} ({len(r.prompt)} tokens; {len(added)} prompts of "
                        "this batch already hold blocks) — use a larger pool or a smaller max_batch",
                    ) from e  # fmt: skip
                added.append(r.seq_id)
            rows = {r.seq_id: i for i, r in enumerate(wave)}
            sampler.observe(range(len(wave)), [r.prompt for r in wave])
            # ---- prefill, in groups of at most max_prefill_tokens pending tokens
            t0 = time.perf_counter()
            group: list[_Request] = []
            pending = 0
            groups = []
            for r in wave:
                q = pool.sequence(r.seq_id).num_pending
                if group and pending + q > self.max_prefill_tokens:
                    groups.append(group)
                    group, pending = [], 0
                group.append(r)
                pending += q
            if group:
                groups.append(group)
            active: list[_Request] = []
            for g in groups:
                batch = pool.prepare([r.seq_id for r in g])
                logits = self.model.forward(batch, self.arena, last_only=True)  # (S, V)
                idx = [rows[r.seq_id] for r in g]
                toks = sampler(logits, idx).tolist()
                stats["prefill_forwards"] += 1
                for r, t in zip(g, toks, strict=True):
                    if self._finished(r, t):
                        pool.free_sequence(r.seq_id)
                    else:
                        active.append(r)
                sampler.observe(idx, [[t] for t in toks])
            sync()
            t1 = time.perf_counter()
            stats["prefill_s"] += t1 - t0
            # ---- decode
            width = self._width(wave)
            if self.overlap_host and self.pad and sampler.all_greedy and not sampler.penalized:
                step = self._decode_fed(active, rows, width, sampler)
                stats["overlapped_steps"] = stats.get("overlapped_steps", 0) + step
            else:
                step = self._decode_steps(active, rows, width, sampler)
            sync()
            stats["decode_steps"] += step
            stats["decode_s"] += time.perf_counter() - t1
        finally:
            try:
                sync()  # nothing of this wave is still running when the caller gets control back
            finally:
                for sid in added:
                    if sid in pool:
                        pool.free_sequence(sid)


def generate(
    model: Any,
    prompts: Any,
    max_new_tokens: int | Sequence[int] = 32,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    repetition_penalty: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] | None = None,
    stop: Any = None,
    tokenizer: Any = None,
    pool: KVPool | None = None,
    use_graphs: bool | None = None,
    ignore_eos: bool = False,
) -> Generation:
    """One-shot generation: a Generator over `pool` (default: a pool sized for these prompts) and one
    generate call. Parameters as Generator.generate; returns a Generation (token_ids, texts, results)."""
    gen_args = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        seed=seed, stop=stop, ignore_eos=ignore_eos,
    )  # fmt: skip
    if pool is None:
        ids = encode_prompts(prompts, tokenizer)
        news = _per_request(max_new_tokens, len(ids), "max_new_tokens")
        lim = _model_limit(model)
        lens = [len(p) + int(m) for p, m in zip(ids, news, strict=True)]
        max_seq = max(1, min(max(lens), lim) if lim else max(lens))
        bs = 16
        # the first wave's sequences at full length, plus a block of slack
        tokens = sum(math.ceil(min(x, max_seq) / bs) * bs for x in lens[:64]) + bs
        pool = make_pool(model, tokens, block_size=bs, max_seq_len=max_seq)
        prompts = ids
    gen = Generator(model, pool, tokenizer, use_graphs=use_graphs)
    return gen.generate(prompts, max_new_tokens, **gen_args)


def embed(model: Any, tokenizer: Any, texts: str | Sequence[str], *, normalize: bool = True) -> Any:
    """Sentence embeddings of texts with an encoder (BertModel): tokenise, pad, mean-pool over the real
    tokens, L2-normalise (normalize=True). Returns (B, H) on the model's device (float32; float64 for a
    float64 model)."""
    if not hasattr(model, "embed"):
        raise TypeError(f"embed: {type(model).__name__} is not an encoder with an embed method (BertModel)")
    if tokenizer is None:
        raise ValueError("embed: a tokenizer is needed to turn texts into token ids")
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in batch):
        raise TypeError("embed: texts must be a str or a list of strs")
    if not batch:
        raise ValueError("embed: no texts")
    ids, mask = tokenizer.pad(tokenizer.encode_batch(batch))
    xp = model.xp
    return model.embed(xp.asarray(ids), xp.asarray(mask), normalize=normalize)
