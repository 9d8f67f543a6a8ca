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


def drain(sch, check=True, limit=10_000):
    finals = {}
    for _ in range(limit):
        if not sch.has_work:
            return finals
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
