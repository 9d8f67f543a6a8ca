"""`rawformer bench`: throughput and latency of the engine on a synthetic mixed workload.

Every request arrives at once (an offline batch): prompts of random tokens with lengths drawn uniformly from
--prompt-len, outputs of --new-tokens tokens (uniform), greedy, no stop. Continuous batching (the Engine)
runs them; with --static the same workload also runs as static batches (rawformer.runtime.Generator: waves of
--max-num-seqs requests, each wave held until its longest request ends) and the ratio is printed.

Reported: generated tokens / wall second, request latency p50 / p99 and time to first token p50 / p99 (from
the moment all requests were queued), steps, preemptions, the adaptive controller's final knobs, and where
the continuous run's time went: steps by kind (overlapped / graph / eager / mixed, see
rawformer.runtime.scheduler) with their mean milliseconds split into host (before the launch), wait (on the
device) and tokens (stops, streaming), and why decode steps did not overlap.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rawformer.commands._model import add_model_args, engine_args, load_model, make_engine, progress

EPILOG = """examples:
  rawformer bench --random gpt2-tiny-bytes --requests 64
  rawformer bench --random llama-1b --requests 256 --prompt-len 16,512 --new-tokens 16,512 --static
  rawformer bench --model ckpt/ --adaptive latency --target-ms 30"""


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return a, b


def mixed_workload(
    n: int,
    vocab: int,
    prompt_len: tuple[int, int],
    new_tokens: tuple[int, int],
    seed: int = 0,
    max_len: int = 0,
) -> list[tuple[list[int], int]]:
    """n (prompt ids, new tokens) pairs, lengths uniform in the ranges, within max_len tokens in all."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        m = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        if max_len:
            p = min(p, max_len - 1)
            m = max(1, min(m, max_len - p))
        out.append((rng.integers(0, vocab, p).tolist(), m))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_continuous(
    engine: Any, work: list[tuple[list[int], int]], progress: Callable[[int], None] | None = None
) -> dict:
    """All requests queued at once, stepped to the end; throughput and latencies."""
    t0 = time.perf_counter()
    rids = [engine.add_request(p, m, ignore_eos=True) for p, m in work]
    finals: dict = {}
    for o in engine.iterate():
        if o.finished:
            finals[o.request_id] = o
            if progress:
                progress(1)
    wall = time.perf_counter() - t0
    outs = [finals[r] for r in rids]
    gen = sum(len(o.token_ids) for o in outs)
    sch = engine.scheduler
    lat = [o.latency for o in outs]
    ttft = [o.ttft for o in outs if o.ttft is not None]
    t = sch.totals
    return dict(
        mode="continuous", requests=len(work), generated_tokens=gen, seconds=wall, tokens_per_s=gen / wall,
        latency_p50=percentile(lat, 50), latency_p99=percentile(lat, 99),
        ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
        steps=t["steps"], preemptions=t["preempted_swap"] + t["preempted_recompute"],
        prefill_jobs=t["prefill_jobs"],
        adaptive=engine.controller.state(), breakdown=sch.step_breakdown(),
        token_ids=[o.token_ids for o in outs],
    )  # fmt: skip


def format_breakdown(b: dict) -> list[str]:
    """Lines of a continuous run's step breakdown (Scheduler.step_breakdown): steps by kind, mean ms per step
    and its parts (host before the launch, waiting on the device, the tokens after), why steps were
    synchronous."""
    lines = []
    total = sum(k["seconds"] for k in b["kinds"].values()) or 1.0
    for kind, k in sorted(b["kinds"].items(), key=lambda kv: -kv[1]["seconds"]):
        per = k["tokens"] / max(1, k["steps"])
        lines.append(
            f"  {kind:<10} {k['steps']:6d} steps ({k['graph']} graph) {k['seconds']:7.3f} s "
            f"({100 * k['seconds'] / total:4.1f}%): {k['ms']:.3f} ms/step = host {k['host_ms']:.3f} + wait "
            f"{k['wait_ms']:.3f} + tokens {k['post_ms']:.3f} (+ rest), {per:.1f} tokens/step"
        )
        if k.get("buckets"):
            by = ", ".join(f"{b}: {c} x {ms:.3f} ms" for b, (c, ms) in k["buckets"].items())
            lines.append(f"  {'':<10} by decode batch bucket: {by}")
    if b["sync_reasons"]:
        reasons = sorted(b["sync_reasons"].items())
        lines.append("  not overlapped: " + ", ".join(f"{r} {n}" for r, n in reasons))
    return lines


def run_static(
    model: Any,
    pool: Any,
    work: list[tuple[list[int], int]],
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Static batching: waves of `batch` requests (Generator), each held until its longest request ends."""
    from rawformer.runtime import Generator

    gen = Generator(model, pool, max_batch=batch)
    t0 = time.perf_counter()
    tokens = []
    lat = []
    keys = ("decode_steps", "overlapped_steps", "decode_s", "prefill_s", "prefill_forwards")
    parts = dict.fromkeys(keys, 0)  # the Generator's per-call stats, summed over the waves
    for s in range(0, len(work), batch):
        wave = work[s : s + batch]
        out = gen.generate([p for p, _ in wave], [m for _, m in wave], ignore_eos=True)
        for k in parts:
            parts[k] += gen.last_stats.get(k, 0)
        tokens += out.token_ids
        lat += [time.perf_counter() - t0] * len(wave)  # a wave's requests return together
        if progress:
            progress(len(wave))
    wall = time.perf_counter() - t0
    n = sum(len(t) for t in tokens)
    return dict(
        mode="static", requests=len(work), generated_tokens=n, seconds=wall, tokens_per_s=n / wall,
        latency_p50=percentile(lat, 50), latency_p99=percentile(lat, 99), **parts, token_ids=tokens,
    )  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="throughput / latency of continuous batching on a mixed workload (--static to compare)",
        description=__doc__.split("\n", 1)[1], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_args(p, default_random=None)
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=64, help="requests, all queued at once (default 64)")
    w.add_argument(
        "--prompt-len", type=parse_range, default=(8, 128), help="LO,HI prompt tokens (default 8,128)"
    )
    w.add_argument(
        "--new-tokens", type=parse_range, default=(8, 128), help="LO,HI new tokens (default 8,128)"
    )
    w.add_argument("--static", action="store_true", help="also run static batching and print the ratio")
    w.add_argument("--workload-seed", type=int, default=0, help="seed of the workload")
    engine_args(p)
    p.set_defaults(func=run)


def _print(r: dict) -> None:
    print(
        f"{r['mode']:<10} {r['requests']} requests, {r['generated_tokens']} tokens in {r['seconds']:.2f} s: "
        f"{r['tokens_per_s']:.1f} tokens/s | latency p50 {r['latency_p50']:.3f} p99 {r['latency_p99']:.3f} s"
        + (f" | TTFT p50 {r['ttft_p50']:.3f} p99 {r['ttft_p99']:.3f} s" if "ttft_p50" in r else "")
    )


def run(args: argparse.Namespace) -> int:
    from rawformer.runtime.generate import _model_limit

    model, tok, name = load_model(args)
    engine = make_engine(args, model, tok, name)
    limit = min(_model_limit(model) or 1 << 30, engine.scheduler.max_len)
    work = mixed_workload(
        args.requests, model.vocab_size, args.prompt_len, args.new_tokens, args.workload_seed, limit
    )
    with progress(total=len(work), desc="continuous", unit="req") as bar:
        cont = run_continuous(engine, work, bar.update)
    _print(cont)
    st = cont["adaptive"]
    print(
        f"           steps {cont['steps']}, preemptions {cont['preemptions']}, adaptive {st['mode']}: token "
        f"budget {st['token_budget']}, max seqs {st['max_seqs']}, step {st['ema_step_ms']:.1f} ms"
    )
    print("\n".join(format_breakdown(cont["breakdown"])))
    if args.static:
        with progress(total=len(work), desc="static", unit="req") as bar:
            stat = run_static(model, engine.pool, work, args.max_num_seqs, bar.update)
        _print(stat)
        same = sum(a == b for a, b in zip(cont["token_ids"], stat["token_ids"], strict=True))
        print(f"continuous / static throughput: {cont['tokens_per_s'] / stat['tokens_per_s']:.2f}x "
              f"({same}/{len(work)} requests with identical tokens)")  # fmt: skip
    return 0
