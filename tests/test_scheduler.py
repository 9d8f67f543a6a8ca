"""Continuous batching (rawformer.runtime.scheduler / engine / adaptive) on the CPU with tiny random models.

The yardstick everywhere: a request's greedy tokens are those of the same request run alone through
rawformer.runtime.generate — whatever the batch around it, the pool size (preemption by swap or recompute),
the token budget (chunked prefill) or the forward layout (one mixed forward, or split decode / prefill with
padded buckets and a stand-in graph backend). The pool's invariants are checked after every step and its
free-block count returns to the start.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from graph_standin import ReplayCapture
from rawformer.export.tokenizer import ByteTokenizer
from rawformer.models import GPT2Config, LlamaConfig, init_random

from rawformer.memory import KVArena, KVPool, SequenceTooLong
from rawformer.runtime import Generator, generate
from rawformer.runtime.adaptive import AdaptiveBatcher
from rawformer.runtime.engine import Engine, EngineClosed, QueueFull
from rawformer.runtime.metrics import Histogram, prometheus_text
from rawformer.runtime.sampler import SamplingParams
from rawformer.runtime.scheduler import Scheduler, _hold_back, water_fill

STD = 0.3  # peaked logits: greedy choices far from ties
GPT2_TINY = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LLAMA_TINY = LlamaConfig(
    vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0, max_position_embeddings=128,
)  # fmt: skip
BYTE_GPT = GPT2Config(vocab_size=257, n_positions=96, n_embd=32, n_layer=2, n_head=4)
CONFIGS = {"gpt2": GPT2_TINY, "llama": LLAMA_TINY}


def model_of(kind, dtype=np.float64, seed=0):
    cfg = BYTE_GPT if kind == "bytes" else CONFIGS[kind]
    return init_random(cfg, seed, dtype, np, std=STD)


def pool_of(model, num_blocks, block_size=8):
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, block_size,
        num_blocks=num_blocks, xp=np,
    )  # fmt: skip
    return KVPool(arena)


def workload(n, vocab, seed=0, longest=30, most_new=20):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, int(rng.integers(1, longest))).tolist() for _ in range(n)]
    news = [int(rng.integers(1, most_new)) for _ in range(n)]
    return prompts, news


def alone(model, prompts, news):
    return [generate(model, [p], n).token_ids[0] for p, n in zip(prompts, news, strict=True)]


def drain(sch, check=True, limit=10_000, before=None):
    """Step until no work is left (before(sch) ahead of every step); the final outputs by request id."""
    finals = {}
    for _ in range(limit):
        if not sch.has_work:
            return finals
        if before is not None:
            before(sch)
        for o in sch.step():
            if o.finished:
                finals[o.request_id] = o
        if check:
            sch.pool.check()
    raise AssertionError("the scheduler did not finish in time")


# ---- greedy equality under every schedule --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "blocks,preemption,budget",
    [(64, "auto", 64), (12, "swap", 16), (12, "recompute", 7), (10, "auto", 5)],
)
def test_greedy_equals_alone_under_pressure(kind, blocks, preemption, budget):
    model = model_of(kind)
    prompts, news = workload(16, model.vocab_size)
    expected = alone(model, prompts, news)
    pool = pool_of(model, blocks)
    sch = Scheduler(model, pool, max_num_seqs=8, max_num_batched_tokens=budget, preemption=preemption)
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        sch.add(sch.make_request(i, p, max_new_tokens=n))
    finals = drain(sch)
    assert [finals[i].token_ids for i in range(16)] == expected
    assert all(finals[i].finish_reason == "length" for i in range(16))
    assert pool.num_free_blocks == blocks and len(pool) == 0
    t = sch.totals
    if blocks < 20:  # the small pools must have preempted, in the mode asked for
        assert t["preempted_swap"] + t["preempted_recompute"] > 0 and t["resumed"] > 0
        if preemption == "swap":
            assert t["preempted_swap"] > 0
        if preemption == "recompute":
            assert t["preempted_swap"] == 0
    if budget < 30:  # prompts longer than the budget were chunked
        assert t["prompt_tokens_computed"] >= sum(len(p) for p in prompts)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_split_prefill_with_padded_buckets_and_graphs(kind):
    """The GPU layout on the CPU: decode forwards padded to buckets and 'replayed', prefill apart."""
    model = model_of(kind)
    prompts, news = workload(10, model.vocab_size, seed=3)
    expected = alone(model, prompts, news)
    pool = pool_of(model, 40)
    sch = Scheduler(model, pool, max_num_seqs=6, max_num_batched_tokens=24, use_graphs=True,
                    graph_backend=ReplayCapture())  # fmt: skip
    assert sch.split_prefill and sch.pad
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        sch.add(sch.make_request(i, p, max_new_tokens=n))
    finals = drain(sch)
    assert [finals[i].token_ids for i in range(10)] == expected
    st = sch.graphs.stats
    assert st.error is None and st.replays > 0 and st.captures >= 1
    assert sch.totals["forwards"] > sch.totals["steps"]  # some steps ran decode and prefill forwards


def test_chunked_prefill_mixes_with_decode():
    model = model_of("gpt2")
    pool = pool_of(model, 64)
    sch = Scheduler(model, pool, max_num_seqs=4, max_num_batched_tokens=8)
    long_prompt = list(range(1, 41))  # 40 tokens: 5+ steps of prefill at budget 8
    sch.add(sch.make_request("short", [3, 4], max_new_tokens=12))
    sch.step()  # the short prompt's prefill
    sch.add(sch.make_request("long", long_prompt, max_new_tokens=3))
    mixed = 0
    finals = {}
    while sch.has_work:
        for o in sch.step():
            if o.finished:
                finals[o.request_id] = o
        st = sch.last_step
        assert st.tokens <= 8
        mixed += st.decode_seqs > 0 and st.prefill_tokens > 0
        pool.check()
    assert mixed >= 4  # the long prompt was computed in chunks while "short" kept decoding
    assert finals["short"].token_ids == generate(model, [[3, 4]], 12).token_ids[0]
    assert finals["long"].token_ids == generate(model, [long_prompt], 3).token_ids[0]


def test_admissions_wait_for_a_batch_of_free_slots():
    model = model_of("gpt2")
    prompts, news = workload(12, model.vocab_size, seed=21)
    sch = Scheduler(model, pool_of(model, 64), max_num_seqs=4, max_num_batched_tokens=64, admit_batch=3)
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        sch.add(sch.make_request(i, p, max_new_tokens=n))
    finals = {}
    while sch.has_work:
        waiting, busy = len(sch.waiting), bool(sch.running)
        for o in sch.step():
            if o.finished:
                finals[o.request_id] = o
        n = sch.last_step.admitted
        assert n == 0 or not busy or n >= min(3, waiting)
    assert [finals[i].token_ids for i in range(12)] == alone(model, prompts, news)
    with pytest.raises(ValueError, match="admit_batch"):
        Scheduler(model, pool_of(model, 8), admit_batch=0)


def test_water_fill_and_hold_back():
    assert water_fill([], 10) == 0
    assert water_fill([5, 3], 100) == 5
    assert water_fill([10, 10, 2], 12) == 5  # 5 + 5 + 2
    assert water_fill([4, 4, 4], 2) == 0  # under one token each
    assert sum(min(p, water_fill([7, 1, 30], 20)) for p in [7, 1, 30]) <= 20
    assert _hold_back("abc", ("cd",)) == 1
    assert _hold_back("ab\ufffd", ()) == 1
    assert _hold_back("abc", ("xyz",)) == 0


# ---- sampling, stops, streaming ------------------------------------------------------------------------


class WordTokenizer:
    """Sentencepiece-like: token t is a word, decode joins words with spaces and drops the leading one (so
    decoding a suffix alone loses the space before it)."""

    eos_token_id = None
    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]

    def decode(self, ids):
        return "".join(" " + self.words[i % 7] for i in ids).lstrip(" ")


def test_incremental_detokenization():
    model = model_of("gpt2")
    for tok, ids in [
        (
            ByteTokenizer(),
            list("h\u00e9llo w\u00f6rld \u20ac \U0001f600!".encode()),
        ),  # 2-, 3- and 4-byte characters
        (WordTokenizer(), [0, 1, 2, 3, 0, 4, 5, 6]),
    ]:
        sch = Scheduler(model, pool_of(model, 8), tok)
        req = sch.make_request("r", [1], max_new_tokens=100)
        seen = []
        for t in ids:
            req.output.append(t)
            sch._detok(req, len(req.output))
            seen.append(req.detok)
            full = tok.decode(req.output)
            assert full.startswith(req.detok) and "\ufffd" not in req.detok  # never shows a partial character
        assert req.detok == tok.decode(ids)
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # only grows


def test_sampling_per_request_matches_generator_seeds():
    model = model_of("llama")
    prompts, news = workload(6, model.vocab_size, seed=5, most_new=12)
    params = [
        dict(temperature=0.9, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=11),
        dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.3, seed=None),
        dict(temperature=1.2, top_k=5, top_p=0.9, repetition_penalty=1.1, seed=12),
        dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None),
        dict(temperature=0.7, top_k=3, top_p=1.0, repetition_penalty=1.0, seed=13),
        dict(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=2.0, seed=14),
    ]
    expected = []
    for p, n, kw in zip(prompts, news, params, strict=True):
        gen = Generator(model, pool_of(model, 32))
        expected.append(gen.generate([p], n, **{**kw, "seed": [kw["seed"]]}).token_ids[0])
    engine = Engine(model, pool=pool_of(model, 24), max_num_seqs=4, max_num_batched_tokens=16)
    rids = [engine.add_request(p, n, **kw) for p, n, kw in zip(prompts, news, params, strict=True)]
    finals = {o.request_id: o for o in engine.iterate() if o.finished}
    assert [finals[r].token_ids for r in rids] == expected


def test_stop_strings_tokens_and_streamed_text():
    model = model_of("bytes", seed=1)  # its free run from "Hello": ',,ee$e,,,666l,,6666el...'
    tok = ByteTokenizer()
    free = Engine(model, tok, pool=pool_of(model, 64)).generate(["Hello"], 40, ignore_eos=True)[0]
    text = free.text
    assert len(free.token_ids) == 40
    stop = "66l"  # "66" streams and is held back until "l" decides
    assert 5 < text.find(stop) < 30
    streamed = []
    engine = Engine(model, tok, pool=pool_of(model, 64))
    engine.add_request("Hello", 40, stop=[stop], ignore_eos=True, on_output=lambda o: streamed.append(o))
    list(engine.iterate())
    final = streamed[-1]
    assert final.finished and final.finish_reason == "stop_string"
    assert final.text == text[: text.find(stop)] and stop not in final.text
    assert "".join(o.new_text for o in streamed) == final.text  # the deltas add up, nothing taken back
    assert all(stop not in "".join(o.new_text for o in streamed[: i + 1]) for i in range(len(streamed)))
    # a stop token: the first generated token of the free run
    first = free.token_ids[3]
    out = Engine(model, tok, pool=pool_of(model, 64)).generate(["Hello"], 40, stop=first, ignore_eos=True)[0]
    assert (
        out.finish_reason == "stop_token"
        and out.token_ids == free.token_ids[: free.token_ids.index(first) + 1]
    )


def test_max_len_and_bad_requests():
    model = model_of("gpt2")  # n_positions 64
    engine = Engine(model, pool=pool_of(model, 16))
    out = engine.generate([list(range(1, 61))], 20)[0]
    assert out.finish_reason == "max_len" and 60 + len(out.token_ids) == 65
    with pytest.raises(SequenceTooLong):
        engine.add_request(list(range(1, 70)), 4)
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([1, 200], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1], 0)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], 4, temperature=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], 4, stop=["x"])
    with pytest.raises(TypeError, match="non-empty"):
        engine.add_request([], 4)


# ---- cancellation, FCFS, errors ------------------------------------------------------------------------


def test_abort_frees_blocks_everywhere():
    model = model_of("gpt2")
    pool = pool_of(model, 10)
    sch = Scheduler(model, pool, max_num_seqs=4, max_num_batched_tokens=64, preemption="swap")
    got = []
    for i in range(6):
        sch.add(sch.make_request(i, [i + 1] * 20, max_new_tokens=30, on_output=got.append))
    for _ in range(12):
        sch.step()
    states = {r.request_id: r.status for r in sch.requests.values()}
    assert "running" in states.values() and ("waiting" in states.values() or "preempted" in states.values())
    for rid in list(sch.requests):
        assert sch.abort(rid)
    assert not sch.abort(0) and not sch.has_work
    pool.check()
    assert pool.num_free_blocks == 10 and len(pool) == 0 and pool.stats().swap_host_bytes == 0
    finals = [o for o in got if o.finished]
    assert sorted(o.request_id for o in finals) == list(range(6))
    assert all(o.finish_reason == "abort" for o in finals)


def test_fcfs_admission_and_finish_order():
    model = model_of("gpt2")
    sch = Scheduler(model, pool_of(model, 32), max_num_seqs=1, max_num_batched_tokens=64)
    for i in range(5):
        sch.add(sch.make_request(i, [i + 1, 2, 3], max_new_tokens=3))
    order = [rid for rid, o in drain(sch).items()]
    assert order == list(range(5))


class FailingModel:
    """The model, except that forward raises when a sequence's context reaches `at` tokens."""

    def __init__(self, model, at):
        self.m, self.at = model, at

    def __getattr__(self, name):
        return getattr(self.m, name)

    def forward(self, batch, arena, last_only=False):
        if int(batch.max_context) >= self.at:
            raise RuntimeError("injected failure")
        return self.m.forward(batch, arena, last_only=last_only)

    def forward_layers(self, batch, arena, last_only=False):  # an interleaved prefill fails the same way
        if int(batch.max_context) >= self.at:
            raise RuntimeError("injected failure")
        return (yield from self.m.forward_layers(batch, arena, last_only=last_only))


def test_a_failing_forward_fails_its_step_only():
    model = model_of("gpt2")
    pool = pool_of(model, 32)
    sch = Scheduler(FailingModel(model, at=12), pool, max_num_seqs=4, max_num_batched_tokens=64)
    sch.add(sch.make_request("a", [1, 2, 3], max_new_tokens=20))
    sch.add(sch.make_request("b", [4, 5], max_new_tokens=4))
    finals = drain(sch)
    assert finals["a"].finish_reason == "error" and "injected failure" in finals["a"].error
    assert finals["b"].finish_reason == "length"
    assert pool.num_free_blocks == 32 and sch.totals["errors"] == 1
    sch.add(sch.make_request("c", [7], max_new_tokens=3))
    assert drain(sch)["c"].token_ids == generate(model, [[7]], 3).token_ids[0]


# ---- overlapped decode (the host one step ahead of the device) ---------------------------------------


def mid_run_stop(run):
    """A stop token that ends a request's free run mid-way: its first token after two others that is new."""
    return next((t for j, t in enumerate(run) if j >= 2 and t not in run[:j]), None)


def streamed_once(outs, final):
    """Each token streamed exactly once, in order, and one final output that ends the stream."""
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert [t for o in outs for t in o.new_token_ids] == final.token_ids
    assert "".join(o.new_text for o in outs) == final.text


def run_sched(model, pool, work, overlap, stops=None, drive=None, **kw):
    """Every request of work through a Scheduler with the stand-in graph backend; (finals, streamed outputs
    per request, scheduler)."""
    kw = dict(dict(max_num_seqs=6, max_num_batched_tokens=24), **kw)
    sch = Scheduler(model, pool, use_graphs=True, graph_backend=ReplayCapture(), overlap_host=overlap, **kw)
    streams = {}
    for i, (p, n) in enumerate(work):
        streams[i] = []
        stop = None if stops is None else stops[i]
        sch.add(sch.make_request(i, p, max_new_tokens=n, stop=stop, on_output=streams[i].append))
    finals = drain(sch) if drive is None else drive(sch)
    return finals, streams, sch


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "blocks,preemption,budget", [(64, "auto", 24), (14, "swap", 16), (14, "recompute", 16)]
)
def test_overlapped_decode_equals_synchronous(kind, blocks, preemption, budget):
    """Stop tokens that end requests mid-batch (seen one step late), ragged max_new_tokens, a request that
    reaches the longest sequence, admissions between decode steps and preemption in the small pools: the
    overlapped scheduler gives every request the tokens and finish reason of the synchronous one (and of the
    request run alone where no stop ends it early), streams each token once, and leaves the pool whole."""
    model = model_of(kind)
    prompts, news = workload(14, model.vocab_size, seed=7, most_new=24)
    limit = min(64 if kind == "gpt2" else 128, blocks * 8)  # the model's or the pool's longest sequence
    prompts[3], news[3] = [t % model.vocab_size for t in range(1, limit - 6)], 30  # reaches it
    free = alone(model, prompts, news)
    # stop tokens from the free runs: requests 0, 4, 8 stop mid-run (a token that comes after a few others)
    stops = [None] * 14
    for i in (0, 4, 8):
        stops[i] = mid_run_stop(free[i])
    work = list(zip(prompts, news, strict=True))
    results = {}
    for overlap in (False, True):
        pool = pool_of(model, blocks)
        finals, streams, sch = run_sched(
            model, pool, work, overlap, stops, preemption=preemption, max_num_batched_tokens=budget
        )
        assert pool.num_free_blocks == blocks and len(pool) == 0 and pool.stats().swap_host_bytes == 0
        pool.check()
        assert sch._inflight is None  # nothing left running on the device
        for i in range(14):
            streamed_once(streams[i], finals[i])
        results[overlap] = [(finals[i].token_ids, finals[i].finish_reason) for i in range(14)]
        kinds = sch.step_breakdown()["kinds"]
        if overlap:
            assert kinds["overlapped"]["steps"] > 0 and kinds["overlapped"]["graph"] > 0
            assert "admit" in sch.sync_reasons
            if blocks < 20:
                assert sch.totals["preempted_swap"] + sch.totals["preempted_recompute"] > 0
                assert "blocks" in sch.sync_reasons or "resume" in sch.sync_reasons
        else:
            assert "overlapped" not in kinds and not sch.sync_reasons
        assert sch.graphs.stats.error is None
    assert results[True] == results[False]
    reasons = [r for _, r in results[True]]
    assert reasons[3] == "max_len" and reasons.count("stop_token") >= 2, reasons
    assert len(prompts[3]) + len(results[True][3][0]) == limit + 1
    for i, (toks, reason) in enumerate(results[True]):
        if reason == "length":
            assert toks == free[i]
        else:
            assert toks == free[i][: len(toks)] and (reason == "max_len" or toks[-1] == stops[i])


def test_overlapped_step_accounting():
    """Steps by kind: a pure-decode stretch overlaps (one step in flight, its tokens read by the next call),
    the step that admits runs synchronously; the per-kind times add up to the steps' times."""
    model = model_of("llama")
    pool = pool_of(model, 64)
    sch = Scheduler(model, pool, max_num_seqs=4, max_num_batched_tokens=64, use_graphs=True,
                    graph_backend=ReplayCapture())  # fmt: skip
    assert sch.overlap_host  # the default where decode steps are padded to buckets
    sch.add(sch.make_request("a", [1, 2, 3], max_new_tokens=6))
    sch.add(sch.make_request("b", [4, 5], max_new_tokens=9))
    got = [sch.step()]  # admit + prefill: "a" and "b" sample their first token (synchronous)
    assert sch.last_step.kind == "mixed" and len(got[0]) == 2
    got.append(sch.step())  # the first overlapped step: nothing was in flight, no tokens come back
    assert sch.last_step.kind == "overlapped" and got[-1] == [] and sch._inflight is not None
    got.append(sch.step())
    assert sch.last_step.kind == "overlapped" and [o.request_id for o in got[-1]] == ["a", "b"]
    sch.add(sch.make_request("c", [6], max_new_tokens=2))
    got.append(sch.step())  # admission: the in-flight tokens first, then a synchronous mixed step
    st = sch.last_step
    assert st.kind == "mixed" and st.sync_reason == "admit" and st.admitted == 1 and sch._inflight is None
    assert [o.request_id for o in got[-1]] == ["a", "b", "a", "b", "c"]
    rows = 2 + 2 + 2  # the decode rows of the two overlapped steps and of the mixed one
    while sch.has_work:
        got.append(sch.step())
        rows += sch.last_step.decode_seqs
    # counts are known ahead: no request is launched past its max_new_tokens (without stops, no waste);
    # every token but the first (from the prefill) is one decode row
    assert rows == (6 - 1) + (9 - 1) + (2 - 1)
    finals = {o.request_id: o for step in got for o in step if o.finished}
    assert finals["a"].token_ids == generate(model, [[1, 2, 3]], 6).token_ids[0]
    assert finals["b"].token_ids == generate(model, [[4, 5]], 9).token_ids[0]
    assert finals["c"].token_ids == generate(model, [[6]], 2).token_ids[0]
    b = sch.step_breakdown()
    assert sum(k["steps"] for k in b["kinds"].values()) == sch.totals["steps"]
    for k in b["kinds"].values():
        assert 0 <= k["host_ms"] + k["wait_ms"] + k["post_ms"] <= k["ms"] + 1e-6
    assert sch.totals["generated_tokens"] == 6 + 9 + 2
    assert pool.num_free_blocks == 64
    sch.reset_stats()
    assert sch.totals["steps"] == 0 and sch.step_breakdown() == dict(kinds={}, sync_reasons={})


def test_interleave_prefill_needs_overlap_and_forward_layers():
    model = model_of("llama")
    with pytest.raises(ValueError, match="interleave_prefill needs overlap_host"):
        Scheduler(model, pool_of(model, 16), interleave_prefill=True)  # the CPU default: no overlap
    sch = Scheduler(model, pool_of(model, 16), use_graphs=True, graph_backend=ReplayCapture())
    assert sch.can_interleave and not sch.interleave_prefill  # off unless asked for


DEEP_LLAMA = LlamaConfig(
    vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0, max_position_embeddings=128,
)  # fmt: skip


def test_interleaved_prefill_step_by_step():
    """An admission while decode overlaps: the prompt's prefill is launched one layer per step (on the CPU,
    where no event says the device is busy) beside the decode steps of the running requests, its request
    takes no decode row until the head has run, then its first token is fed on the device and read one step
    later, as an in-flight token. Every request gets the tokens it gets alone."""
    model = init_random(DEEP_LLAMA, 0, np.float64, np, std=STD)
    pool = pool_of(model, 64)
    sch = Scheduler(model, pool, max_num_seqs=4, max_num_batched_tokens=64, use_graphs=True,
                    graph_backend=ReplayCapture(), interleave_prefill=True)  # fmt: skip
    assert sch.overlap_host and sch.can_interleave
    sch.add(sch.make_request("a", [1, 2, 3], max_new_tokens=12))
    sch.add(sch.make_request("b", [4, 5], max_new_tokens=14))
    got = [sch.step(), sch.step(), sch.step()]  # mixed (nothing runs yet: synchronous), then overlapped
    assert [sch.last_step.kind, sch.kind_totals["mixed"]["steps"]] == ["overlapped", 1]
    sch.add(sch.make_request("c", list(range(7, 20)), max_new_tokens=5))
    got.append(sch.step())  # admits c into a job and launches its first layer after the decode step
    st = sch.last_step
    assert st.kind == "overlapped" and st.admitted == 1 and st.prefill_tokens == 13
    assert st.decode_seqs == 2 and st.prefill_layers == 1 and sch._job is not None
    c = sch.requests["c"]
    assert c.status == "running" and sch._in_job(c)
    for left in (3, 2, 1, 0):  # one layer per step, the decode batch without c
        got.append(sch.step())
        assert sch.last_step.kind == "overlapped" and sch.last_step.decode_seqs == 2
        assert sch.last_step.prefill_layers == 1 and c.output == []
        assert (sch._job.left if sch._job is not None else 0) == left
    assert sch._job is None and sch._job_done is not None  # the head ran: c's first token is on its way
    got.append(sch.step())  # c's first token fed on the device (row 2) and read while this step runs
    assert sch.last_step.decode_seqs == 3 and len(c.output) == 1
    assert [o.request_id for o in got[-1]].count("c") == 1 and sch._job_done is None
    while sch.has_work:
        got.append(sch.step())
    finals = {o.request_id: o for step in got for o in step if o.finished}
    assert finals["a"].token_ids == generate(model, [[1, 2, 3]], 12).token_ids[0]
    assert finals["b"].token_ids == generate(model, [[4, 5]], 14).token_ids[0]
    assert finals["c"].token_ids == generate(model, [list(range(7, 20))], 5).token_ids[0]
    assert sch.totals["prefill_jobs"] == 1 and "admit" not in sch.sync_reasons
    assert sch.totals["prompt_tokens_computed"] == 3 + 2 + 13 and pool.num_free_blocks == 64
    assert sch._inflight is None and sch._job is None and sch._job_done is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_interleaved_prefill_equals_synchronous_admission(kind):
    """Many admissions while decode overlaps (a queue longer than the batch, ragged lengths, requests that
    end after their first token, sampled requests that must be admitted synchronously, a prompt longer than
    the budget, prompts that share a prefix with the prefix cache on): with interleaved prefill, every request
    gets the tokens of the synchronous admissions and of the request run alone, and the pool is whole."""
    model = model_of(kind)
    prompts, news = workload(24, model.vocab_size, seed=29, most_new=16)
    news[5] = news[11] = 1  # finish on the token the job computes
    prompts[9] = prompts[2] + [1, 2, 3]  # shares a prefix with an earlier prompt
    prompts[14] = [t % model.vocab_size for t in range(40)]  # longer than the budget of 32: chunked
    news[14] = 4
    free = alone(model, prompts, news)
    results = {}
    for interleave in (False, True):
        pool = pool_of(model, 64)  # prefix caching on (the default)
        sch = Scheduler(model, pool, max_num_seqs=6, max_num_batched_tokens=32, use_graphs=True,
                        graph_backend=ReplayCapture(), interleave_prefill=interleave,
                        admit_batch=2)  # fmt: skip
        streams = {}
        for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
            streams[i] = []
            params = SamplingParams(temperature=0.7, seed=i) if i in (7, 19) else None
            sch.add(sch.make_request(i, p, params, max_new_tokens=n, on_output=streams[i].append))
        finals = drain(sch)
        for i in range(24):
            streamed_once(streams[i], finals[i])
        results[interleave] = [finals[i].token_ids for i in range(24)]
        assert pool.num_free_blocks == 64 and len(pool) == 0 and pool.stats().prefix_hit_blocks > 0
        assert sch._inflight is None and sch._job is None and sch._job_done is None
        assert (sch.totals["prefill_jobs"] > 2) == interleave, sch.totals
    assert results[True] == results[False]
    for i in range(24):
        if i not in (7, 19):
            assert results[True][i] == free[i], i


def test_abort_during_interleaved_prefill():
    """Aborting a request whose prompt is half launched (its remaining layers are launched first, so its
    blocks are written before anyone reuses them) and one whose first token is still on the device: both end
    with "abort", the others keep their tokens, the pool is whole."""
    model = init_random(DEEP_LLAMA, 0, np.float64, np, std=STD)
    prompts, news = workload(10, model.vocab_size, seed=31, most_new=20)
    news = [max(n, 6) for n in news]
    expected = alone(model, prompts, news)
    aborted = {}

    def abort_two(sch):
        job, done = sch._job, sch._job_done
        if job is not None and 0 < job.left < model.num_layers and "mid" not in aborted:
            r = job.reqs[-1]
            aborted["mid"] = r.request_id
            assert sch.abort(r.request_id) and r.status == "finished"
            assert sch._job is None and sch._job_done is not None  # launched to the end
        elif done is not None and "mid" in aborted and "first" not in aborted:
            live = [r for r in done.reqs if r.status == "running"]
            if live:
                aborted["first"] = live[0].request_id
                assert sch.abort(live[0].request_id)

    pool = pool_of(model, 64)
    finals, streams, sch = run_sched(model, pool, list(zip(prompts, news, strict=True)), True,
                                     drive=lambda sch: drain(sch, before=abort_two), max_num_seqs=4,
                                     admit_batch=2, max_num_batched_tokens=64,
                                     interleave_prefill=True)  # fmt: skip
    assert sorted(aborted) == ["first", "mid"] and sch.totals["prefill_jobs"] > 0
    assert pool.num_free_blocks == 64 and len(pool) == 0 and sch._job_done is None
    for i in range(10):
        final = streams[i][-1]
        streamed_once(streams[i], final)
        if i in aborted.values():
            assert final.finish_reason == "abort" and final.token_ids == []
        else:
            assert final.token_ids == expected[i], i


def test_overlapped_abort_while_a_step_is_in_flight():
    model = model_of("gpt2")
    prompts, news = workload(8, model.vocab_size, seed=13, most_new=30)
    news = [max(n, 12) for n in news]
    expected = alone(model, prompts, news)
    aborted = {}

    def drive(sch):
        finals = {}
        while sch.has_work:
            inf = sch._inflight
            if inf is not None and len(aborted) < 2:
                live = [r for r in inf.reqs if r.status == "running" and len(r.output) >= 3]
                if live:  # its next token is on the device: discarded
                    r = live[-1]
                    aborted[r.request_id] = list(r.output)
                    assert sch.abort(r.request_id) and r.status == "finished"
                    if sch.waiting:  # and one that has not started
                        w = sch.waiting[-1]
                        aborted[w.request_id] = []
                        assert sch.abort(w.request_id)
            for o in sch.step():
                if o.finished:
                    finals[o.request_id] = o
            sch.pool.check()
        return finals

    pool = pool_of(model, 64)
    finals, streams, sch = run_sched(model, pool, list(zip(prompts, news, strict=True)), True,
                                     drive=drive, max_num_seqs=4, admit_batch=1)  # fmt: skip
    assert aborted and pool.num_free_blocks == 64 and len(pool) == 0
    assert len(aborted) == 2 and sorted(finals) == sorted(set(range(8)) - set(aborted))
    finals = {i: streams[i][-1] for i in range(8)}  # an abort's final output goes to the callback
    for i in range(8):
        streamed_once(streams[i], finals[i])
        if i in aborted:
            assert finals[i].finish_reason == "abort" and finals[i].token_ids == aborted[i]
            assert expected[i][: len(aborted[i])] == aborted[i]
        else:
            assert finals[i].token_ids == expected[i]
    assert sch.step_breakdown()["kinds"]["overlapped"]["steps"] > 0


def test_overlapped_with_sampled_requests_and_stop_strings():
    """A sampled request keeps the batch synchronous while it runs (the same draws as Generator for its
    seed); once it ends, the greedy ones overlap. Stop strings (held back while they may still match)
    stream the same text as the synchronous scheduler."""
    model = model_of("bytes", seed=1)
    tok = ByteTokenizer()
    prompts = [list(b"Hello"), list(b"abc"), list(b"xyz!"), list(b"Hello")]
    free = Engine(model, tok, pool=pool_of(model, 64)).generate([prompts[0]], 40, ignore_eos=True)[0].text
    stop = free[10:13]
    kws = [dict(stop=[stop]), dict(temperature=0.9, seed=5), dict(), dict(stop=[stop])]
    news = [40, 6, 30, 25]
    out = {}
    for overlap in (False, True):
        engine = Engine(model, tok, pool=pool_of(model, 64), max_num_seqs=4, use_graphs=True,
                        graph_backend=ReplayCapture(), overlap_host=overlap)  # fmt: skip
        streams = {i: [] for i in range(4)}
        rids = [
            engine.add_request(p, n, ignore_eos=True, on_output=streams[i].append, **kw)
            for i, (p, n, kw) in enumerate(zip(prompts, news, kws, strict=True))
        ]
        finals = {o.request_id: o for o in engine.iterate() if o.finished}
        for i, r in enumerate(rids):
            streamed_once(streams[i], finals[r])
        out[overlap] = [(finals[r].token_ids, finals[r].text, finals[r].finish_reason) for r in rids]
        steps = engine.summary()["steps"]
        assert ("overlapped" in steps["kinds"]) == overlap
        if overlap:
            assert steps["sync_reasons"].get("sampling", 0) > 0
        assert engine.pool.num_free_blocks == 64
    assert out[True] == out[False]
    assert out[True][0][2] == "stop_string" and out[True][0][1] == free[:10]
    gen = Generator(model, pool_of(model, 32))
    assert out[True][1][0] == gen.generate([prompts[1]], 6, temperature=0.9, seed=[5]).token_ids[0]


def test_overlapped_engine_aborts_from_callbacks_and_threads():
    """Aborts that arrive while a step is in flight, from a streaming callback (the stepping thread) and
    from client threads, against the background loop: the others' tokens are unchanged, the pool whole."""
    model = model_of("gpt2", dtype=np.float32)
    prompts, news = workload(16, model.vocab_size, seed=17, most_new=30)
    news = [max(n, 8) for n in news]
    expected = alone(model, prompts, news)
    engine = Engine(model, pool=pool_of(model, 48), max_num_seqs=6, use_graphs=True,
                    graph_backend=ReplayCapture(), max_queue=64)  # fmt: skip
    assert engine.scheduler.overlap_host
    streams = {i: [] for i in range(16)}
    finals = {}
    done = threading.Event()
    lock = threading.Lock()
    rids = [None] * 16

    def on_output(i):
        def cb(o):
            streams[i].append(o)
            if i % 5 == 0 and len(o.token_ids) == 3 and not o.finished:
                engine.abort(o.request_id)  # processed at the next step, with a step in flight
            if o.finished:
                with lock:
                    finals[i] = o
                    if len(finals) == 16:
                        done.set()

        return cb

    engine.start()
    for i in range(16):
        rids[i] = engine.add_request(prompts[i], news[i], on_output=on_output(i))
    threading.Timer(0.01, engine.abort, (rids[7],)).start()
    assert done.wait(30), "not every request finished"
    engine.stop()
    for i in range(16):
        streamed_once(streams[i], finals[i])
        if finals[i].finish_reason == "abort":
            assert i % 5 == 0 or i == 7
            assert finals[i].token_ids == expected[i][: len(finals[i].token_ids)]
        else:
            assert finals[i].token_ids == expected[i]
    # aborted after their third token, with the fourth on the device: it is never streamed
    assert all(finals[i].finish_reason == "abort" and len(finals[i].token_ids) == 3 for i in (0, 5, 10, 15))
    assert engine.summary()["kv_blocks_used"] == 0 and engine.pool.num_free_blocks == 48
    assert engine.summary()["steps"]["kinds"]["overlapped"]["steps"] > 0


def test_overlapped_with_the_adaptive_controller():
    """The latency controller shrinking the batch under a running one (an unreachable target: it shrinks
    every step): the steps over the limit run synchronously, the tokens stay those of each request alone."""
    model = model_of("llama", dtype=np.float32)
    prompts, news = workload(16, model.vocab_size, seed=23, most_new=30)
    engine = Engine(model, pool=pool_of(model, 30), max_num_seqs=8, adaptive="latency", target_ms=1e-3,
                    use_graphs=True, graph_backend=ReplayCapture())  # fmt: skip
    outs = engine.generate(prompts, news)
    assert [o.token_ids for o in outs] == alone(model, prompts, news)
    s = engine.summary()
    assert s["steps"]["kinds"]["overlapped"]["steps"] > 0
    assert "max_seqs" in s["steps"]["sync_reasons"], s["steps"]["sync_reasons"]
    assert engine.pool.num_free_blocks == 30 and s["adaptive"]["max_seqs"] < 8


def test_overlapped_callback_that_raises():
    """A streaming callback that raises while the next step is in flight fails its step's requests (as a
    synchronous step does); the requests admitted later run on and the pool is whole."""
    model = model_of("llama")
    pool = pool_of(model, 48)
    sch = Scheduler(model, pool, max_num_seqs=2, max_num_batched_tokens=64, use_graphs=True,
                    graph_backend=ReplayCapture(), admit_batch=2)  # fmt: skip
    seen = []

    def bad(o):
        seen.append(o)
        if len(o.token_ids) == 4 and not o.finished:
            raise RuntimeError("callback failed")

    sch.add(sch.make_request("bad", [1, 2], max_new_tokens=10, on_output=bad))
    sch.add(sch.make_request("ok", [3, 4, 5], max_new_tokens=10))
    sch.add(sch.make_request("later", [6], max_new_tokens=7))
    finals = drain(sch)
    assert finals["bad"].finish_reason == "error" and "callback failed" in finals["bad"].error
    assert finals["ok"].finish_reason == "error"  # its tokens were read in the same step
    assert finals["later"].token_ids == generate(model, [[6]], 7).token_ids[0]
    assert seen[-1].finished and [t for o in seen for t in o.new_token_ids] == finals["bad"].token_ids
    assert pool.num_free_blocks == 48 and len(pool) == 0 and sch._inflight is None
    assert sch.step_breakdown()["kinds"]["overlapped"]["steps"] > 0


def test_overlapped_failing_forward_and_unpadded_overlap():
    """overlap_host without buckets (eager, unpadded decode) and a forward that raises while a step is in
    flight: the in-flight tokens are kept, the failing step's requests end with "error", the rest go on."""
    model = model_of("gpt2")
    pool = pool_of(model, 32)
    sch = Scheduler(FailingModel(model, at=12), pool, max_num_seqs=4, max_num_batched_tokens=64,
                    overlap_host=True)  # fmt: skip
    assert not sch.pad and sch.overlap_host
    streams = {"a": [], "b": []}
    sch.add(sch.make_request("a", [1, 2, 3], max_new_tokens=20, on_output=streams["a"].append))
    sch.add(sch.make_request("b", [4, 5], max_new_tokens=4, on_output=streams["b"].append))
    finals = drain(sch)
    assert finals["a"].finish_reason == "error" and "injected failure" in finals["a"].error
    assert finals["b"].finish_reason == "length"
    assert finals["b"].token_ids == generate(model, [[4, 5]], 4).token_ids[0]
    a = finals["a"].token_ids
    assert a == generate(model, [[1, 2, 3]], 20).token_ids[0][: len(a)]
    assert len(finals["a"].token_ids) >= 12 - 3 - 1  # every token computed before the failure was kept
    for r in "ab":
        streamed_once(streams[r], finals[r])
    assert pool.num_free_blocks == 32 and sch.totals["errors"] == 1
    assert sch.step_breakdown()["kinds"]["overlapped"]["graph"] == 0
    sch.add(sch.make_request("c", [7], max_new_tokens=5))
    assert drain(sch)["c"].token_ids == generate(model, [[7]], 5).token_ids[0]


# ---- the engine: threads, queue bound, metrics ---------------------------------------------------------


def test_engine_background_threads_and_queue_bound():
    model = model_of("gpt2", dtype=np.float32)
    prompts, news = workload(24, model.vocab_size, seed=9)
    expected = alone(model, prompts, news)
    engine = Engine(model, pool=pool_of(model, 24), max_num_seqs=8, max_queue=64, adaptive="latency")
    done = threading.Event()
    finals = {}
    lock = threading.Lock()

    def on_output(o):
        if o.finished:
            with lock:
                finals[o.request_id] = o
                if len(finals) == 24:
                    done.set()

    engine.start()
    ids = [None] * 24

    def client(k):
        for i in range(k, 24, 4):
            ids[i] = engine.add_request(prompts[i], news[i], on_output=on_output)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert done.wait(30), "not every request finished"
    assert [finals[r].token_ids for r in ids] == expected
    m = engine.summary()
    assert m["requests_finished_total"] == 24 and m["kv_blocks_used"] == 0 and m["queue_depth"] == 0
    assert m["request_latency_seconds"]["count"] == 24 and m["adaptive"]["mode"] == "latency"
    text = engine.prometheus()
    assert "# TYPE rawformer_request_latency_seconds histogram" in text
    assert 'rawformer_time_to_first_token_seconds_bucket{le="+Inf"} 24' in text
    engine.stop()
    assert not engine.running
    with pytest.raises(EngineClosed):
        engine.add_request([1], 2)
    # the queue bound (nothing steps: requests stay queued)
    small = Engine(model, pool=pool_of(model, 8), max_queue=3)
    for _ in range(3):
        small.add_request([1, 2], 2)
    with pytest.raises(QueueFull):
        small.add_request([1, 2], 2)
    assert small.summary()["requests_rejected_total"] == 1
    small.step()  # admitted: the queue has room again
    assert small.summary()["queue_depth"] == 0 and small.summary()["running"] == 3
    assert len(small.generate([[5]], 2)) == 1  # the queued ones run too
    assert not small.has_unfinished


# ---- the adaptive controller ---------------------------------------------------------------------------


def test_adaptive_latency_mode_tracks_the_target():
    c = AdaptiveBatcher("latency", target_ms=50, token_budget=256, max_seqs=16, max_tokens=4096)
    for _ in range(20):  # steps at 120 ms: shrink
        c.observe(0.120, c.token_budget, c.max_seqs, saturated=True)
    assert c.token_budget < 64 and c.max_seqs < 4 and c.decreases > 0
    low = c.token_budget
    for _ in range(40):  # 10 ms and saturated: grow again
        c.observe(0.010, c.token_budget, c.max_seqs, saturated=True)
    assert c.token_budget > low and c.increases > 0
    before = (c.token_budget, c.max_seqs)
    for _ in range(10):  # fast but not saturated: nothing to gain, no change
        c.observe(0.010, 5, 1, saturated=False)
    assert (c.token_budget, c.max_seqs) == before
    # a simulated device: latency grows with the batch; the controller settles near the target
    c = AdaptiveBatcher("latency", target_ms=40, token_budget=16, max_seqs=64, max_tokens=4096)
    for _ in range(300):
        c.observe((5 + 0.1 * c.token_budget) / 1e3, c.token_budget, 8, saturated=True)
    assert 25 <= c.last_step_ms <= 50


def test_adaptive_throughput_mode_stops_growing_at_the_plateau():
    c = AdaptiveBatcher("throughput", target_ms=1000, token_budget=32, max_seqs=4, max_tokens=1 << 16,
                        max_seqs_limit=1024, window=4)  # fmt: skip
    # tokens/s = min(budget, 512) * 100: grows until 512, flat after
    for _ in range(400):
        b = c.token_budget
        c.observe(b / (min(b, 512) * 100.0), b, c.max_seqs, saturated=True)
    assert 400 <= c.token_budget <= 1100, c.token_budget
    fixed = AdaptiveBatcher("fixed", token_budget=100, max_seqs=5)
    fixed.observe(10.0, 100, 5, True)
    assert (fixed.token_budget, fixed.max_seqs) == (100, 5)
    with pytest.raises(ValueError, match="mode"):
        AdaptiveBatcher("fast")


def test_histogram_and_prometheus_text():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    assert h.counts == [1, 2, 1] and h.count == 4 and abs(h.sum - 6.05) < 1e-12
    assert 0.1 <= h.quantile(0.5) <= 1.0
    text = prometheus_text({"x_total": (3, "things"), "lat": (h, "latency")})
    assert "# TYPE rawformer_x_total counter" in text and 'rawformer_lat_bucket{le="1"} 3' in text
    assert 'rawformer_lat_bucket{le="+Inf"} 4' in text and "rawformer_lat_count 4" in text


# ---- the GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("preemption,blocks", [("auto", 64), ("swap", 12), ("recompute", 12)])
def test_gpu_continuous_batching_equals_cpu(cp, kind, preemption, blocks):
    """fp32 on the GPU (decode steps as CUDA graphs, prefill apart, preemption when the pool is small): the
    same greedy tokens as each request run alone on the CPU reference."""
    cpu = model_of(kind)
    gpu = init_random(CONFIGS[kind], 0, np.float32, cp, std=STD)
    prompts, news = workload(16, cpu.vocab_size, seed=11)
    expected = alone(cpu, prompts, news)
    arena = KVArena(gpu.num_layers, gpu.num_kv_heads, gpu.head_dim, gpu.dtype, 8, num_blocks=blocks, xp=cp)
    pool = KVPool(arena)
    sch = Scheduler(gpu, pool, max_num_seqs=8, max_num_batched_tokens=16, preemption=preemption)
    assert sch.graphs is not None and sch.split_prefill
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        sch.add(sch.make_request(i, p, max_new_tokens=n))
    finals = drain(sch)
    assert [finals[i].token_ids for i in range(16)] == expected
    assert sch.graphs.stats.error is None and sch.graphs.stats.replays > 0
    assert pool.num_free_blocks == blocks
    if blocks < 20:
        assert sch.totals["preempted_swap"] + sch.totals["preempted_recompute"] > 0


@pytest.mark.gpu
def test_gpu_engine_sampling_matches_generator(cp):
    gpu = init_random(LLAMA_TINY, 0, np.float32, cp, std=STD)
    prompts, news = workload(4, gpu.vocab_size, seed=12)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    expected = [
        Generator(gpu, make_pool_gpu(gpu, cp)).generate([p], n, seed=[s], **kw).token_ids[0]
        for s, (p, n) in enumerate(zip(prompts, news, strict=True))
    ]
    engine = Engine(gpu, pool=make_pool_gpu(gpu, cp), max_num_seqs=4)
    rids = [
        engine.add_request(p, n, seed=s, **kw) for s, (p, n) in enumerate(zip(prompts, news, strict=True))
    ]
    finals = {o.request_id: o for o in engine.iterate() if o.finished}
    assert [finals[r].token_ids for r in rids] == expected


def make_pool_gpu(model, cp, blocks=64):
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, 8, num_blocks=blocks, xp=cp
    )
    return KVPool(arena)


@pytest.mark.gpu
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_overlapped_decode_stops_and_aborts(cp, kind, interleave):
    """fp32 on the GPU with real CUDA graphs: overlapped decode (pinned reads, tokens fed on the device),
    with or without interleaved prefill (events, detached batches), with stop tokens mid-batch and an abort
    while a step is in flight gives the synchronous scheduler's tokens, which equal the CPU reference run
    alone; the pool is whole and nothing stays in flight."""
    cpu = model_of(kind)
    gpu = init_random(CONFIGS[kind], 0, np.float32, cp, std=STD)
    prompts, news = workload(12, cpu.vocab_size, seed=19, most_new=24)
    free = alone(cpu, prompts, news)
    stops = [None] * 12
    for i in (1, 5, 9):
        stops[i] = mid_run_stop(free[i])
    results = {}
    for overlap in (False, True):
        pool = make_pool_gpu(gpu, cp, blocks=64)
        sch = Scheduler(gpu, pool, max_num_seqs=8, max_num_batched_tokens=32, overlap_host=overlap,
                        interleave_prefill=overlap and interleave)  # fmt: skip
        streams = {i: [] for i in range(12)}
        for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
            sch.add(sch.make_request(i, p, max_new_tokens=n, stop=stops[i], on_output=streams[i].append))
        aborted = None
        while sch.has_work:
            inf = sch._inflight
            if overlap and aborted is None and inf is not None:
                live = [r for r in inf.reqs if r.status == "running" and len(r.output) >= 2]
                if live:
                    aborted = live[0].request_id
                    sch.abort(aborted)
            sch.step()
            pool.check()
        assert pool.num_free_blocks == 64 and len(pool) == 0 and sch._inflight is None
        assert sch._job is None and sch._job_done is None
        assert (sch.totals["prefill_jobs"] > 0) == (overlap and interleave)
        finals = {i: streams[i][-1] for i in range(12)}
        for i in range(12):
            streamed_once(streams[i], finals[i])
        results[overlap] = (finals, aborted)
        if overlap:
            kinds = sch.step_breakdown()["kinds"]
            assert kinds["overlapped"]["steps"] > 0 and kinds["overlapped"]["graph"] > 0
            assert sch.graphs.stats.error is None
    sync, _ = results[False]
    over, aborted = results[True]
    assert aborted is not None and over[aborted].finish_reason == "abort"
    for i in range(12):
        toks = over[i].token_ids
        if i == aborted:
            assert toks == sync[i].token_ids[: len(toks)]
        else:
            assert (toks, over[i].finish_reason) == (sync[i].token_ids, sync[i].finish_reason)
        assert toks == free[i][: len(toks)]
        if over[i].finish_reason == "length":
            assert toks == free[i]
