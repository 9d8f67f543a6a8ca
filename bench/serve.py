"""Serving: a load test against `rawformer serve`, continuous vs static batching, preemption under pressure.

    python bench/serve.py                      -> bench/results/<gpu>/serve.{json,md}
    python bench/serve.py --quick              -> $OUT (or bench/out): smaller workloads
    python bench/serve.py --parts load --device cpu --load-model gpt2-tiny-bytes --load-dtype float32

Three parts (--parts, default all):

load      `rawformer serve` started as a process on 127.0.0.1 (ephemeral port), --requests (200) concurrent
          requests from an aiohttp client: random token-id prompts of mixed length, mixed max_tokens, greedy,
          no stop, half of them streamed (SSE). Every request must complete (200) or be refused (429 / 503);
          a completed one must have exactly max_tokens tokens, and its tokens must equal the same request run
          alone in this process (rawformer.runtime.Generator, one request at a time, on an identical model:
          same preset, seed, dtype).
          Reported: p50 / p99 request latency, time to first streamed token, throughput (completion tokens
          per wall second). Use float32 for the equality check to be exact (float16 GEMMs of different batch
          shapes may flip a near-tie).
static    The 1B Llama config (fp16, random weights) on one mixed offline workload (--static-requests
          prompts of 16-512 tokens, outputs log-uniform in 16-1024: many short answers, a few long ones), all
          queued at
          once: static batching (rawformer.runtime.Generator: waves of --batch requests, each wave held until
          its longest request ends) vs continuous batching (rawformer.runtime.Engine, the same batch limit).
          Acceptance: continuous >= 2x static generated tokens/s. Printed too: the continuous steps by kind
          (overlapped / graph / eager / mixed: count, mean ms, host / wait / token parts, why steps were
          synchronous), the static run's decode steps, and the continuous run again with interleaved
          prefill (admitted prompts prefilled a few layers per decode step instead of in a synchronous
          step; unless --no-compare-interleave) and with overlapped decode off (unless --no-compare-sync).
pressure  The 1B config in float32: the same workload through an Engine with an ample KV pool and through
          one with a quarter of the blocks the workload wants at once (preemption by swap, then by
          recompute). Acceptance: every request's tokens are identical to the ample run's, preemptions
          happened, and the pool is whole afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import harness
import numpy as np

from rawformer.commands._model import load_model
from rawformer.commands.bench import format_breakdown, percentile, run_continuous, run_static
from rawformer.runtime import Generator, make_pool
from rawformer.runtime.generate import _model_limit

ACCEPT_SPEEDUP = 2.0


def log_uniform_workload(
    n: int, vocab: int, prompt: tuple[int, int], new: tuple[int, int], seed: int, max_len: int = 1 << 30
) -> list:
    """n (prompt ids, new tokens): prompt lengths uniform, output lengths log-uniform (a long tail), both
    within max_len tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(prompt[0], prompt[1] + 1))
        m = int(round(math.exp(rng.uniform(math.log(new[0]), math.log(new[1])))))
        p, m = min(p, max_len // 2), min(m, max_len - min(p, max_len // 2))
        out.append((rng.integers(0, vocab, p).tolist(), m))
    return out


def model_ns(preset: str, dtype: str, device: str) -> SimpleNamespace:
    return SimpleNamespace(model=None, random=preset, dtype=dtype, device=device, seed=0)


# ---- part 1: the load test -----------------------------------------------------------------------------


async def _fire(base: str, work: list, concurrency_timeout: float) -> list[dict]:
    import aiohttp

    async def one(session: Any, i: int, prompt: list[int], n: int) -> dict:
        stream = bool(i % 2)
        body = dict(
            prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True, return_token_ids=True, stream=stream
        )
        t0 = time.perf_counter()
        first = None
        async with session.post(base + "/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return dict(i=i, status=r.status, latency=time.perf_counter() - t0)
            if not stream:
                data = await r.json()
                ids = data["choices"][0]["token_ids"]
            else:
                ids = []
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    got = json.loads(line[6:])["choices"][0].get("token_ids", [])
                    if got and first is None:
                        first = time.perf_counter() - t0
                    ids += got
        return dict(i=i, status=200, ids=ids, latency=time.perf_counter() - t0, ttft=first, stream=stream)

    timeout = aiohttp.ClientTimeout(total=concurrency_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        return await asyncio.gather(*(one(s, i, p, n) for i, (p, n) in enumerate(work)))


def part_load(args: argparse.Namespace) -> tuple[dict, list]:
    cmd = [
        sys.executable,
        "-m",
        "rawformer",
        "serve",
        "--random",
        args.load_model,
        "--dtype",
        args.load_dtype,
        "--device",
        args.device,
        "--port",
        "0",
        "--max-queue",
        str(args.max_queue),
        "--max-num-seqs",
        str(args.batch),
    ]
    harness.log("load: starting", " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line, end = "", time.monotonic() + 300
        while time.monotonic() < end and "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise SystemExit(f"rawformer serve exited: {proc.stderr.read()[-2000:]}")
        port = re.search(r":(\d+) ", line)
        if port is None:
            raise SystemExit(f"rawformer serve did not report its port: {line!r}")
        base = f"http://127.0.0.1:{port.group(1)}"
        model, _, _ = load_model(model_ns(args.load_model, args.load_dtype, args.device), quiet=True)
        limit = _model_limit(model) or 1024
        rng = np.random.default_rng(1)
        work = []
        for _ in range(args.requests):
            p = int(rng.integers(4, min(256, limit // 2)))
            work.append((rng.integers(0, model.vocab_size, p).tolist(), int(rng.integers(1, 65))))
        asyncio.run(_fire(base, work[:8], 600))  # warm-up: kernels compiled, graphs captured
        t0 = time.perf_counter()
        results = asyncio.run(_fire(base, work, 600))
        wall = time.perf_counter() - t0
        import urllib.request

        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    other = [r for r in results if r["status"] not in (200, 429, 503)]
    short = [r["i"] for r in ok if len(r["ids"]) != work[r["i"]][1]]
    harness.log(f"load: {len(ok)} completed, {len(refused)} refused; checking each against a run alone")
    alone = Generator(model, make_pool(model, limit), max_batch=1)  # one request at a time, graphs reused
    differ = [
        r["i"]
        for r in ok
        if r["ids"] != alone.generate([work[r["i"]][0]], work[r["i"]][1], ignore_eos=True).token_ids[0]
    ]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(len(r["ids"]) for r in ok)
    rec = dict(
        part="load",
        model=args.load_model,
        dtype=args.load_dtype,
        requests=len(work),
        completed=len(ok),
        refused=len(refused),
        other_status=[r["status"] for r in other],
        wrong_length=short,
        differ=differ,
        seconds=wall,
        tokens=tokens,
        tokens_per_s=tokens / wall,
        latency_p50=percentile(lat, 50),
        latency_p99=percentile(lat, 99),
        ttft_p50=percentile(ttft, 50),
        ttft_p99=percentile(ttft, 99),
        kv_blocks_used_after=int(re.search(r"rawformer_kv_blocks_used (\d+)", metrics).group(1)),
    )
    harness.log(
        f"load: {len(ok)}/{len(work)} completed ({len(refused)} refused), {rec['tokens_per_s']:.0f} tok/s, "
        f"latency p50 {rec['latency_p50']:.3f} s p99 {rec['latency_p99']:.3f} s, TTFT (streamed) p50 "
        f"{rec['ttft_p50']:.3f} s p99 {rec['ttft_p99']:.3f} s; {len(differ)} differ from the run alone"
    )
    good = (
        not other and not short and len(ok) + len(refused) == len(work) and rec["kv_blocks_used_after"] == 0
    )
    exact = not differ
    verdicts = [
        harness.Verdict(
            "PASS" if good else "FAIL",
            f"load: every one of {len(work)} concurrent requests completed "
            f"or got 429/503, none lost or cut short ({len(ok)} completed, {len(refused)} refused)",
        ),
        harness.Verdict(
            "PASS" if exact else "FAIL",
            f"load: every completed greedy result equals the request run "
            f"alone ({len(ok) - len(differ)}/{len(ok)}, {args.load_dtype})",
        ),
        harness.Verdict(
            "PASS",
            f"load: p50 {rec['latency_p50']:.3f} s, p99 {rec['latency_p99']:.3f} s, "
            f"{rec['tokens_per_s']:.0f} tokens/s (reported)",
        ),
    ]
    return rec, verdicts


# ---- part 2: continuous vs static ----------------------------------------------------------------------


def _engine(model: Any, args: argparse.Namespace, kv_tokens: int, **kw: Any) -> Any:
    from rawformer.runtime.engine import Engine

    return Engine(
        model,
        None,
        kv_tokens=kv_tokens,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.budget,
        max_queue=1 << 20,
        admit_batch=args.admit_batch,
        **kw,
    )


def _run_with(engine: Any, work: list, setting: str, value: Any) -> dict:
    """The continuous run again with one Scheduler setting changed (and put back afterwards)."""
    sch = engine.scheduler
    sch.reset_stats()
    old = getattr(sch, setting)
    setattr(sch, setting, value)
    try:
        return run_continuous(engine, work)
    finally:
        setattr(sch, setting, old)


def part_static(args: argparse.Namespace) -> tuple[dict, list]:
    dtype = "float16" if args.device == "gpu" else "float32"
    model, _, _ = load_model(model_ns(args.static_model, dtype, args.device), quiet=True)
    lim = _model_limit(model) or 1 << 30
    work = log_uniform_workload(
        args.static_requests, model.vocab_size, (16, 512), (16, 1024), seed=2, max_len=lim
    )
    kv = args.batch * (512 + 1024) + 4096
    engine = _engine(model, args, kv)
    harness.log(f"static: warm-up ({args.static_model}, batch {args.batch})")
    warm = log_uniform_workload(2 * args.batch, model.vocab_size, (16, 512), (16, 64), seed=3, max_len=lim)
    run_continuous(engine, warm)
    run_static(model, engine.pool, warm, args.batch)
    engine.scheduler.reset_stats()
    harness.log(f"static: {len(work)} requests, {sum(m for _, m in work)} new tokens")
    stat = run_static(model, engine.pool, work, args.batch)
    cont = run_continuous(engine, work)
    ratio = cont["tokens_per_s"] / stat["tokens_per_s"]
    cont_ids = cont.pop("token_ids")
    same = sum(a == b for a, b in zip(cont_ids, stat.pop("token_ids"), strict=True))
    harness.log(
        f"static: static {stat['tokens_per_s']:.0f} tokens/s ({stat['seconds']:.2f} s), continuous "
        f"{cont['tokens_per_s']:.0f} tok/s ({cont['seconds']:.2f} s, {cont['steps']} steps): {ratio:.2f}x; "
        f"{same}/{len(work)} requests token-identical ({dtype})"
    )
    # where the continuous time goes (steps by kind) and the static run's split
    harness.log("static: continuous steps by kind (mean per step; host = before the launch):")
    for line in format_breakdown(cont["breakdown"]):
        harness.log(line)
    ds = max(1, stat["decode_steps"])
    harness.log(
        f"static: static runs {stat['decode_steps']} decode steps ({stat['overlapped_steps']} overlapped), "
        f"{1e3 * stat['decode_s'] / ds:.3f} ms per decode step, prefill {stat['prefill_s']:.2f} s in "
        f"{stat['prefill_forwards']} forwards"
    )
    rec = dict(
        part="static",
        model=args.static_model,
        batch=args.batch,
        static=stat,
        continuous=cont,
        speedup=ratio,
        identical=same,
    )
    if args.compare_sync and engine.scheduler.overlap_host:  # the same run with every step synchronous
        sync = _run_with(engine, work, "overlap_host", False)
        sync.pop("token_ids")
        harness.log(
            f"static: continuous without overlap {sync['tokens_per_s']:.0f} tok/s ({sync['seconds']:.2f} s, "
            f"{sync['steps']} steps); with overlap {cont['tokens_per_s']:.0f} tok/s"
        )
        for line in format_breakdown(sync["breakdown"]):
            harness.log(line)
        rec["continuous_sync"] = sync
    if args.compare_interleave and engine.scheduler.can_interleave:  # prompts prefilled between decode steps
        inter = _run_with(engine, work, "interleave_prefill", True)
        same_i = sum(a == b for a, b in zip(inter.pop("token_ids"), cont_ids, strict=True))
        harness.log(
            f"static: continuous with interleaved prefill {inter['tokens_per_s']:.0f} tok/s "
            f"({inter['seconds']:.2f} s, {inter['steps']} steps, {inter['prefill_jobs']} prefill jobs, "
            f"{inter['tokens_per_s'] / stat['tokens_per_s']:.2f}x static); with synchronous admissions "
            f"{cont['tokens_per_s']:.0f} tok/s; {same_i}/{len(work)} requests token-identical between the two"
        )
        for line in format_breakdown(inter["breakdown"]):
            harness.log(line)
        rec["continuous_interleaved"] = inter
    v = harness.Verdict(
        "PASS" if ratio >= ACCEPT_SPEEDUP else "FAIL",
        f"continuous batching >= {ACCEPT_SPEEDUP:g}x static batching throughput ({args.static_model}, "
        f"{dtype}, batch {args.batch}, {len(work)} mixed requests): {ratio:.2f}x",
    )
    return rec, [v]


# ---- part 3: preemption under block pressure --------------------------------------------------------------


def part_pressure(args: argparse.Namespace) -> tuple[dict, list]:
    model, _, _ = load_model(model_ns(args.static_model, "float32", args.device), quiet=True)
    lim = _model_limit(model) or 1 << 30
    work = log_uniform_workload(
        args.pressure_requests, model.vocab_size, (32, 256), (32, 256), seed=4, max_len=lim
    )
    ample = _engine(model, args, kv_tokens=args.batch * 512 + 4096)
    base = run_continuous(ample, work)
    want = sum(len(p) + m for p, m in work[: args.batch])
    tight_tokens = max(want // 4, 512 + 256 + 64)
    recs, verdicts = [], []
    for mode in ("swap", "recompute"):
        eng = _engine(model, args, kv_tokens=tight_tokens, preemption=mode)
        res = run_continuous(eng, work)
        same = sum(a == b for a, b in zip(res["token_ids"], base["token_ids"], strict=True))
        whole = eng.pool.num_free_blocks == eng.pool.num_blocks and len(eng.pool) == 0
        eng.pool.check()
        harness.log(
            f"pressure ({mode}): pool of {eng.pool.num_blocks} blocks, {res['preemptions']} preemptions, "
            f"{same}/{len(work)} identical to the ample pool, pool whole afterwards: {whole}"
        )
        recs.append(
            dict(
                mode=mode,
                blocks=eng.pool.num_blocks,
                preemptions=res["preemptions"],
                identical=same,
                pool_whole=whole,
                tokens_per_s=res["tokens_per_s"],
            )
        )
        ok = same == len(work) and res["preemptions"] > 0 and whole
        verdicts.append(
            harness.Verdict(
                "PASS" if ok else "FAIL",
                f"preemption by {mode} under block pressure ({args.static_model}, fp32, 1/4 of the blocks): "
                f"{same}/{len(work)} requests identical, {res['preemptions']} preemptions, pool whole: "
                f"{whole}",
            )
        )
    return dict(part="pressure", model=args.static_model, requests=len(work), runs=recs), verdicts


# ---- main ----------------------------------------------------------------------------------------------

PARTS = {"load": part_load, "static": part_static, "pressure": part_pressure}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--parts", type=harness.list_arg(list(PARTS), "part"), default=list(PARTS))
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--quick", action="store_true", help="smaller workloads; results to $OUT")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--requests", type=int, default=200, help="load: concurrent requests (default 200)")
    p.add_argument("--max-queue", type=int, default=128, help="load: the server's queue bound (default 128)")
    p.add_argument("--load-model", default="gpt2-small", help="load: preset served (default gpt2-small)")
    p.add_argument("--load-dtype", default="float32", help="load: dtype served (default float32)")
    p.add_argument("--static-model", default="llama-1b", help="static / pressure: preset (default llama-1b)")
    p.add_argument("--batch", type=int, default=64, help="sequences per step / static batch (default 64)")
    p.add_argument(
        "--admit-batch", type=int, default=None, help="continuous: Scheduler admit_batch (default)"
    )
    p.add_argument("--budget", type=int, default=4096, help="continuous: tokens per step (default 4096)")
    p.add_argument(
        "--no-compare-sync", dest="compare_sync", action="store_false",
        help="static: skip the extra continuous run with overlapped decode off",
    )  # fmt: skip
    p.add_argument(
        "--no-compare-interleave", dest="compare_interleave", action="store_false",
        help="static: skip the extra continuous run with interleaved prefill (Scheduler interleave_prefill)",
    )  # fmt: skip
    p.add_argument("--static-requests", type=int, default=256, help="static: requests (default 256)")
    p.add_argument("--pressure-requests", type=int, default=96, help="pressure: requests (default 96)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.static_requests = min(args.static_requests, 128)
        args.pressure_requests = min(args.pressure_requests, 48)
    if args.device == "gpu":
        cp = harness.require_gpu("bench/serve.py")
        device = harness.device_header(cp)
    else:
        os.environ.setdefault("RAWFORMER_BACKEND", "cpu")
        device = {"gpu": "cpu", "gpu_slug": "cpu"}
    records, verdicts = [], []
    for name in args.parts:
        rec, v = PARTS[name](args)
        records.append(rec)
        verdicts += v
    lines = harness.acceptance_lines(verdicts)
    print("\n".join(lines))
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = harness.run_header(device)
    (out_dir / "serve.json").write_text(
        json.dumps({"header": header, "records": records}, indent=1, default=str)
    )
    md = [f"# Serving ({device['gpu']}, {header['date']}, {header['commit']})", ""]
    for rec in records:
        md += [
            f"- {rec['part']}: " + json.dumps({k: v for k, v in rec.items() if k != "part"}, default=str),
            "",
        ]
    (out_dir / "serve.md").write_text("\n".join(md + lines) + "\n")
    harness.copy_to_out(out_dir, ["serve.json", "serve.md"], args.quick, args.out)
    harness.log(f"wrote {out_dir / 'serve.json'}")
    return 0 if all(v.status != "FAIL" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
