"""KV-cache memory: the paged pool vs a contiguous max-length cache, on a mixed serving workload.

    python bench/kv_memory.py                       -> bench/results/cpu/kv_memory.{json,md,png}
    python bench/kv_memory.py --requests 64 --out /tmp/kv     (a smaller run, results elsewhere)

The workload (seeded): `--requests` requests (256), prompt lengths drawn from [16, 2048] and output lengths
from [16, 1024] (inclusive), max length 4096. Two length distributions are run, because the saving depends
on them: `uniform` (every length equally likely) and `loguniform` (every order of magnitude equally likely:
short requests are common, long ones rare, as in real chat traffic).

What runs is the real KVPool on a NumPy arena (one tiny layer: the pool's accounting is in blocks and
slots, the same on the GPU; bytes are slots x the bytes per token of each model config). All requests are
admitted at once (the contiguous cache's best case: it needs one max-length row per request), prefilled in
one step, then decoded one token per step with `pool.prepare`, each request freed when its output is
complete, exactly as a continuous-batching server drives the pool.

Numbers, per distribution (slots; bytes for a model = slots x its token bytes):
- contiguous: requests x max_len slots, allocated up front (a static (batch, max_len) KV tensor);
- paged peak: the most blocks in use at any step x block_size (what the arena must hold);
- paged final: sum over requests of ceil(final length / block_size) blocks (if all were at full length at
  once: the paged pool's worst case for this workload);
- saved = 1 - paged / contiguous; waste = reserved slots - tokens stored, over reserved slots (at the peak,
  and the worst step).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

from rawformer.memory import KVArena, KVPool

# name -> (layers, kv_heads, head_dim, dtype): the configs of the end-to-end bench
CONFIGS: dict[str, tuple[int, int, int, str]] = {
    "gpt2-small": (12, 12, 64, "float16"),
    "llama-1b": (22, 4, 64, "float16"),  # 22 layers, 2048 hidden, GQA 32:4
}
DISTRIBUTIONS = ("uniform", "loguniform")
ACCEPT_SAVED = 0.90  # the issue: >= 90% less KV memory than the contiguous max-length cache
ACCEPT_WASTE = 0.04  # the issue: waste < 4% of reserved slots


def token_bytes(cfg: tuple[int, int, int, str]) -> int:
    layers, kv_heads, head_dim, dtype = cfg
    return 2 * layers * kv_heads * head_dim * np.dtype(dtype).itemsize


def draw_lengths(rng: np.random.Generator, n: int, lo: int, hi: int, dist: str) -> np.ndarray:
    """n integer lengths in [lo, hi]: uniform, or log-uniform (uniform in log(length))."""
    if dist == "uniform":
        return rng.integers(lo, hi + 1, n)
    if dist == "loguniform":
        x = np.exp(rng.uniform(math.log(lo), math.log(hi + 1), n))
        return np.clip(np.floor(x), lo, hi).astype(np.int64)
    raise ValueError(f"unknown distribution {dist!r}; choose from {', '.join(DISTRIBUTIONS)}")


def workload(seed: int, requests: int, prompt: tuple[int, int], output: tuple[int, int], dist: str) -> dict:
    rng = np.random.default_rng(seed)
    p = draw_lengths(rng, requests, *prompt, dist)
    o = draw_lengths(rng, requests, *output, dist)
    return {"prompt_lens": p, "output_lens": o}


def simulate(work: dict, max_len: int, block_size: int, seed: int, vocab: int = 50257) -> dict[str, Any]:
    """Run the workload through a real KVPool; per-step usage and the summary numbers (in slots)."""
    p, o = work["prompt_lens"], work["output_lens"]
    n = len(p)
    if int((p + o).max()) > max_len:
        raise ValueError(f"a request is longer than max_len={max_len}")
    contiguous_slots = n * max_len
    # the arena holds as many slots as the contiguous cache: the same memory budget
    arena = KVArena(1, 1, 1, "float16", block_size, num_blocks=contiguous_slots // block_size, xp=np)
    pool = KVPool(arena, max_seq_len=max_len, max_seqs=n, max_tokens=int(p.sum()))
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    for i in range(n):
        pool.add_sequence(i, rng.integers(0, vocab, int(p[i])))
    pool.prepare(range(n))  # the prefill step
    remaining = {i: int(o[i]) - 1 for i in range(n)}  # the prefill's logits give each request its 1st token
    steps = []  # (step, live requests, blocks used, tokens stored)

    def record(step: int) -> None:
        s = pool.stats()
        steps.append((step, s.sequences, s.blocks_used, s.tokens_stored))

    record(0)
    step = 0
    while remaining:
        done = [i for i, left in remaining.items() if left == 0]
        for i in done:
            pool.free_sequence(i)
            del remaining[i]
        if not remaining:
            break
        ids = list(remaining)
        step += 1
        pool.prepare(ids, [[int(t)] for t in rng.integers(0, vocab, len(ids))])
        for i in ids:
            remaining[i] -= 1
        record(step)
    elapsed = time.perf_counter() - t0
    pool.check()
    arr = np.array(steps, dtype=np.int64)
    used_slots = arr[:, 2] * block_size
    tokens = arr[:, 3]
    waste = np.where(used_slots > 0, (used_slots - tokens) / np.maximum(used_slots, 1), 0.0)
    peak = int(np.argmax(arr[:, 2]))
    final_slots = int(sum(math.ceil((a + b) / block_size) * block_size for a, b in zip(p, o, strict=True)))
    final_tokens = int((p + o).sum())
    # time average over decode steps: the contiguous cache holds max_len for every request still running
    live_contiguous = arr[:, 1] * max_len
    return {
        "requests": n,
        "steps": int(arr[-1, 0]),
        "contiguous_slots": contiguous_slots,
        "paged_peak_slots": int(used_slots[peak]),
        "paged_peak_tokens": int(tokens[peak]),
        "paged_final_slots": final_slots,
        "final_tokens": final_tokens,
        "saved_peak": 1 - used_slots[peak] / contiguous_slots,
        "saved_final": 1 - final_slots / contiguous_slots,
        "saved_time_avg_vs_live_rows": 1 - used_slots.sum() / max(live_contiguous.sum(), 1),
        "waste_at_peak": float(waste[peak]),
        "waste_worst_step": float(waste.max()),
        "waste_final": (final_slots - final_tokens) / final_slots,
        "contiguous_waste_at_peak": 1 - tokens[peak] / contiguous_slots,
        "mean_prompt": float(p.mean()),
        "mean_output": float(o.mean()),
        "mean_final_length": float((p + o).mean()),
        "pool_seconds": elapsed,
        "series": {"step": arr[:, 0].tolist(), "live": arr[:, 1].tolist(), "used_slots": used_slots.tolist(),
                   "tokens": tokens.tolist()},
    }  # fmt: skip


def records_for(result: dict, dist: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per model config: the slot numbers in bytes."""
    out = []
    for name, cfg in CONFIGS.items():
        tb = token_bytes(cfg)
        out.append(
            {
                "distribution": dist,
                "config": name,
                "token_bytes": tb,
                "contiguous_bytes": result["contiguous_slots"] * tb,
                "paged_peak_bytes": result["paged_peak_slots"] * tb,
                "paged_final_bytes": result["paged_final_slots"] * tb,
                **{k: v for k, v in result.items() if k != "series"},
            }
        )
    return out


def verdicts(results: dict[str, dict]) -> list[harness.Verdict]:
    out = []
    for dist, r in results.items():
        ok = r["saved_peak"] >= ACCEPT_SAVED
        out.append(
            harness.Verdict(
                "PASS" if ok else "FAIL",
                f"{dist}: paged peak uses {100 * r['saved_peak']:.1f}% less KV memory than the contiguous "
                f"max-length cache (needs >= {100 * ACCEPT_SAVED:.0f}%)",
            )
        )
        ok = r["waste_worst_step"] < ACCEPT_WASTE
        out.append(
            harness.Verdict(
                "PASS" if ok else "FAIL",
                f"{dist}: waste {100 * r['waste_at_peak']:.2f}% of reserved slots at the peak, "
                f"{100 * r['waste_worst_step']:.2f}% at the worst step (needs < {100 * ACCEPT_WASTE:.0f}%)",
            )
        )
    return out


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def table(records: list[dict]) -> list[str]:
    lines = [
        "| distribution | config | contiguous GiB | paged peak GiB | saved (peak) | paged final GiB | "
        "saved (final) | waste at peak | worst-step waste |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['distribution']} | {r['config']} | {gib(r['contiguous_bytes'])} "
            f"| {gib(r['paged_peak_bytes'])} | {100 * r['saved_peak']:.1f}% | {gib(r['paged_final_bytes'])} "
            f"| {100 * r['saved_final']:.1f}% | {100 * r['waste_at_peak']:.2f}% "
            f"| {100 * r['waste_worst_step']:.2f}% |"
        )
    return lines


def markdown(header: dict, records: list[dict], results: dict, verdict_list: list) -> str:
    a = header["workload"]
    lines = [
        "# KV memory: paged pool vs contiguous max-length cache",
        "",
        f"- date: {header['date']}, commit: {header['commit']}"
        + (" (uncommitted changes)" if header["dirty"] else ""),
        f"- workload: {a['requests']} requests, prompts {a['prompt'][0]}-{a['prompt'][1]} tokens, outputs "
        f"{a['output'][0]}-{a['output'][1]}, max length {a['max_len']}, block size {a['block_size']}, "
        f"seed {a['seed']}; lengths drawn uniform, or log-uniform (uniform in log length)",
        "- the real KVPool (NumPy arena; its accounting is the same on the GPU): all requests admitted at "
        "once, one prefill step, then one decode step per token, each request freed when done",
        "- contiguous = requests x max_len slots allocated up front; paged peak = most blocks in use at any "
        "step; paged final = every request at its final length at once; bytes = slots x 2 x layers x "
        "kv_heads x head_dim x 2 (fp16); saved vs live rows = time average against a contiguous cache that "
        "frees a request's max-length row when it finishes",
        "- a bound for any allocator: saved <= 1 - (tokens actually stored) / (requests x max_len)",
        "",
        *table(records),
        "",
        "| distribution | mean prompt | mean output | steps | peak tokens | saved vs live rows (time avg) | "
        "contiguous waste at peak | pool time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dist, r in results.items():
        lines.append(
            f"| {dist} | {r['mean_prompt']:.0f} | {r['mean_output']:.0f} | {r['steps']} "
            f"| {r['paged_peak_tokens']} | {100 * r['saved_time_avg_vs_live_rows']:.1f}% "
            f"| {100 * r['contiguous_waste_at_peak']:.1f}% | {r['pool_seconds']:.1f} |"
        )
    lines += ["", *harness.acceptance_lines(verdict_list)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (dist, r) in zip(axes[0], results.items(), strict=True):
        s = r["series"]
        ax.plot(s["step"], np.array(s["used_slots"]) / 1e3, label="paged: reserved slots")
        ax.plot(s["step"], np.array(s["tokens"]) / 1e3, "--", label="paged: tokens stored")
        ax.axhline(r["contiguous_slots"] / 1e3, color="k", label="contiguous max-length cache")
        ax.set_title(f"{dist}: saved {100 * r['saved_peak']:.1f}% at peak")
        ax.set_xlabel("decode step")
        ax.set_ylabel("thousand KV slots")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, nargs=2, default=(16, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--output", type=int, nargs=2, default=(16, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dist", type=harness.list_arg(DISTRIBUTIONS, "distribution"), default=list(DISTRIBUTIONS)
    )
    p.add_argument("--out", metavar="DIR", help="write the results here instead of bench/results/cpu")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (
        args.prompt[0] < 1
        or args.output[0] < 1
        or args.prompt[0] > args.prompt[1]
        or args.output[0] > args.output[1]
    ):
        raise SystemExit("kv_memory.py: --prompt/--output need 1 <= MIN <= MAX")
    if args.prompt[1] + args.output[1] > args.max_len:
        raise SystemExit("kv_memory.py: the longest prompt + output must fit in --max-len")
    results: dict[str, dict] = {}
    records: list[dict] = []
    for dist in args.dist:
        work = workload(args.seed, args.requests, tuple(args.prompt), tuple(args.output), dist)
        harness.log(f"{dist}: simulating {args.requests} requests ...")
        results[dist] = simulate(work, args.max_len, args.block_size, args.seed)
        records += records_for(results[dist], dist, args)
    verdict_list = verdicts(results)
    header = harness.run_header(
        {"device": "cpu (NumPy KVPool; the accounting is the same on the GPU)"},
        workload={
            "requests": args.requests,
            "prompt": list(args.prompt),
            "output": list(args.output),
            "max_len": args.max_len,
            "block_size": args.block_size,
            "seed": args.seed,
            "distributions": args.dist,
        },
        configs={
            k: {"layers": c[0], "kv_heads": c[1], "head_dim": c[2], "dtype": c[3]} for k, c in CONFIGS.items()
        },
    )
    print()
    print("\n".join(table(records)))
    print()
    for v in verdict_list:
        print(f"{v.status}: {v.text}")
    out_dir = harness.output_dir("cpu", False, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = {dist: r["series"] for dist, r in results.items()}
    harness.write_json(out_dir / "kv_memory.json", {**header, "series": series}, records)
    (out_dir / "kv_memory.md").write_text(markdown(header, records, results, verdict_list))
    written = ["kv_memory.json", "kv_memory.md"]
    if not args.no_plot:
        if plot(results, out_dir / "kv_memory.png"):
            written.append("kv_memory.png")
        else:
            harness.log("matplotlib is not installed: no plot (pip install 'rawformer[bench]')")
    harness.log(f"wrote {', '.join(str(out_dir / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
