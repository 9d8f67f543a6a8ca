"""Perplexity of the bundled model (models/stdlib-gpt.onnx) on its held-out split: fp32 / fp16 / INT8 weights
and the INT8 KV cache, through the runtime's own forward over a KV pool (issue 9's accuracy bar).

    python bench/accuracy_bundled.py              GPU: the 512 evaluation windows, INT8-KV scored one
                                                  token per step -> bench/results/<gpu>/accuracy_bundled.*
    python bench/accuracy_bundled.py --cpu        CPU: 64 of them, float64 reference -> bench/results/cpu/
    python bench/accuracy.py --bundled ...        the same (accuracy.py hands its arguments over)

Data: exactly what `rawformer eval` scores and the model card reports. The training config beside the model
(models/stdlib-gpt.json, "train_config") gives the corpus (the running interpreter's stdlib *.py files), the
held-out split (by crc32 of the file path, held_out_fraction 0.05), seq_len 256 and the evaluation windows:
eval_batches x batch_size = 8 x 64 = 512 non-overlapping windows of 257 bytes from the start of the held-out
stream (rawformer.training.data.eval_batches): inputs are a window's first 256 bytes, targets its last 256.
--windows eval (GPU default) takes those 512, so the reference row reproduces the card's held-out loss where
the stdlib is the card's; --windows N takes N of them evenly spaced (round(linspace)); --windows all every
window of the held-out stream. The held-out set depends on the Python version: the header records the
version, file and token counts and a crc32 of the held-out tokens.

Perplexity = exp(mean over every scored position of -log p(actual next byte)), teacher forcing, logits from
`model.forward(pool.prepare(...), arena)` of the native model `rawformer.load` builds (quantize= for INT8
weights: models/quantize.py, the path `rawformer generate --quantize` takes; with more than 8 rows per step,
as here, rf.int8_linear dequantizes to fp16 and runs cuBLAS; the <= 8-row GEMV kernel computes the same
dequantized product and is checked against it in tests/test_quant.py). Two ways of scoring a window:

    prefill   one forward step over the whole window (flash attention over the step's own fresh K / V; the
              cache is written, not read): the weight variants.
    steps     the window's first byte as a one-token prefill, then the rest in chunks of --kv-step tokens
              (chunked prefill: pool.prepare(..., max_prompt_tokens=k); each chunk is a "decode" plan, so
              attention is rf.paged_attention / rf.paged_attention_int8 reading every key and value, the
              chunk's own included, back from the paged cache after they were written). With an
              Int8KVArena (kv8 variants) the cache holds int8 values + an fp16 scale per token and head
              (rf.kv_write_int8), and the kernel dequantizes what it reads: every position but the first
              attends over quantized K / V only (position 0 attends to its own fresh K / V, as any prompt's
              prefill does). --kv-step 1 is exactly generation's decode step (one new token per sequence,
              q_len 1); the quantized values do not depend on the chunking (a token's K / V depend only on
              the quantized cache before it), so larger steps measure the same quantity in 1/k of the steps
              (the CPU default, 16: the NumPy reference dequantizes the whole cache at every step).

Variants (GPU; on a CPU the reference is float64 and "fp16" is not scored, the others use float64 weights):

    fp32        reference                       fp16          float16 weights, prefill
    int8        W8A16 per output channel        int8-g128     W8A16, one scale per 128 inputs
    fp16 steps  float16, float cache, steps     fp16 kv8      float16, INT8 cache, steps
    int8 steps  int8 weights, float cache       int8 kv8      int8 weights, INT8 cache, steps

Bars (acceptance lines): int8 and int8-g128 perplexity <= +1% of fp16 (CPU: of the reference); fp16 kv8 <=
+1% of fp16 steps and int8 kv8 <= +1% of int8 steps (each INT8 cache against the same weights scored the
same way with a float cache). Every variant also gets max |logits - ref| / max |ref|, mean KL(ref || variant)
and top-1 agreement against the reference. Statistics: windows are the units (positions of one window are
correlated): the relative standard error of a perplexity is std(per-window mean NLL) / sqrt(windows); that
of a change vs its base is the same over the per-window differences (paired: both score the same bytes),
which is what decides a 1% bar.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import numpy as np
from accuracy import all_logits, log_softmax64, pool_for
from rawformer.models.common import MAX_DECODE_Q

import rawformer as rf
from rawformer import backend

MODEL = harness.REPO_ROOT / "models" / "stdlib-gpt.onnx"
ACCEPT_PPL = 0.01  # issue 9: INT8 weights <= +1% perplexity; an INT8 KV cache <= +1% more
MAX_STEP = MAX_DECODE_Q  # tokens per sequence a decode plan takes (longer chunks: the gather plan)
DEFAULTS = {  # (windows, windows per forward, tokens per step of the "steps" scoring)
    "gpu": ("eval", 128, 1),
    "cpu": ("64", 32, 16),
}


@dataclass(frozen=True)
class Variant:
    """One way of running the model: weights (dtype, quantize mode), scoring, cache, and what it is judged
    against (`base`; `bar`: an acceptance line at ACCEPT_PPL)."""

    name: str
    dtype: Any
    quantize: str | None
    scoring: str  # "prefill" | "steps"
    kv8: bool = False
    base: str | None = None
    bar: bool = False


def variants(gpu: bool) -> list[Variant]:
    """The variants in scoring order; the first is the reference (module docstring)."""
    if gpu:
        ref = [
            Variant("fp32", np.float32, None, "prefill"),
            Variant("fp16", np.float16, None, "prefill", base="fp32"),
        ]
        lo, lo_name = np.float16, "fp16"
    else:
        ref = [Variant("fp64", np.float64, None, "prefill")]
        lo, lo_name = np.float64, "fp64"
    return [
        *ref,
        Variant("int8", lo, "int8", "prefill", base=lo_name, bar=True),
        Variant("int8-g128", lo, "int8-g128", "prefill", base=lo_name, bar=True),
        Variant(f"{lo_name} steps", lo, None, "steps", base=lo_name),
        Variant(f"{lo_name} kv8", lo, None, "steps", kv8=True, base=f"{lo_name} steps", bar=True),
        Variant("int8 steps", lo, "int8", "steps", base="int8"),
        Variant("int8 kv8", lo, "int8", "steps", kv8=True, base="int8 steps", bar=True),
    ]


# ---- data --------------------------------------------------------------------------------------------------


def train_config(model_path: Path) -> Any:
    """The TrainConfig stored beside the model (FILE.json's "train_config"), as `rawformer eval` reads it."""
    from rawformer.training.config import TrainConfig

    sidecar = model_path.with_suffix(".json")
    if not sidecar.is_file():
        raise SystemExit(f"{model_path}: no {sidecar.name} beside it (the training config gives the split)")
    return TrainConfig.from_dict(json.loads(sidecar.read_text(encoding="utf-8"))["train_config"])


def held_out_windows(tcfg: Any, which: str) -> tuple[np.ndarray, dict[str, Any]]:
    """int64 (W, seq_len + 1) windows of the held-out stream (module docstring) and a description of them.

    which: "eval" (the training evaluation's windows), "all" (every window of the stream) or a count N
    (N of the evaluation windows, evenly spaced)."""
    from rawformer.training.data import eval_batches, load_corpus

    corpus = load_corpus(
        tcfg.data,
        held_out_fraction=tcfg.held_out_fraction,
        skip_dirs=tcfg.skip_dirs,
        max_files=tcfg.max_files,
    )
    batches = None if which == "all" else tcfg.eval_batches
    parts = [np.concatenate([x, y[:, -1:]], axis=1) for x, y in eval_batches(
        corpus.held_out, tcfg.seq_len, tcfg.batch_size, batches
    )]  # fmt: skip
    if not parts:
        raise SystemExit(f"the held-out stream ({corpus.held_out.size} tokens) is shorter than one window")
    rows = np.concatenate(parts)  # (E, seq_len + 1)
    picked = np.arange(len(rows))
    if which not in ("eval", "all"):
        n = int(which)
        if not 1 <= n <= len(rows):
            raise SystemExit(f"--windows {n}: between 1 and the {len(rows)} evaluation windows")
        picked = np.unique(np.round(np.linspace(0, len(rows) - 1, n)).astype(np.int64))
    info = {
        **corpus.fingerprint(),
        "corpus": corpus.root,
        "window_source": "every held-out window" if which == "all" else "the evaluation windows",
        "source_windows": len(rows),
        "windows": len(picked),
        "window_index": picked.tolist() if len(picked) < len(rows) else "all",
        "seq_len": tcfg.seq_len,
    }
    return rows[picked], info


# ---- scoring -----------------------------------------------------------------------------------------------


def window_logits(model: Any, inputs: np.ndarray, v: Variant, step: int) -> np.ndarray:
    """float64 (B, P, V) logits of every position of B input windows (B, P), scored as `v` says (module
    docstring: one prefill step, or a one-token prefill then chunks of `step` read from the cache)."""
    from rawformer.models.common import plan_step

    if v.scoring == "prefill":
        return all_logits(model, inputs)
    b, p = inputs.shape
    pool = pool_for(model, b, p, kv8=v.kv8)
    arena = pool.arena
    ids = list(range(b))
    for i in ids:
        pool.add_sequence(i, [int(t) for t in inputs[i]])
    out = np.empty((b, p, model.vocab_size))
    done = 0
    while done < p:
        n = 1 if done == 0 else min(step, p - done)
        batch = pool.prepare(ids, max_prompt_tokens=n)
        if done > 0:  # the cache must be what attention reads: a decode plan (paged attention), never prefill
            mode = plan_step(batch, arena.block_size, model.xp).mode
            if mode != "decode":
                raise RuntimeError(f"{v.name}: a chunk of {n} tokens took the {mode} plan, not decode")
        logits = model.forward(batch, arena)  # (B n, V)
        out[:, done : done + n] = backend.to_numpy(logits).astype(np.float64).reshape(b, n, -1)
        done += n
    return out


def window_stats(ref: np.ndarray, out: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-window metrics of `out` logits against `ref` logits (both (B, P, V) float64), targets (B, P):
    nll / kl / top1 (B,) means over positions, err = max |out - ref|."""
    lr, lo = log_softmax64(ref), log_softmax64(out)
    return {
        "nll": -np.take_along_axis(lo, targets[..., None], axis=-1)[..., 0].mean(axis=1),
        "kl": np.sum(np.exp(lr) * (lr - lo), axis=-1).mean(axis=1),
        "top1": (out.argmax(-1) == ref.argmax(-1)).mean(axis=1),
        "err": float(np.max(np.abs(out - ref))),
    }


def mean_se(x: np.ndarray) -> tuple[float, float | None]:
    """Mean of per-window values and its standard error (None for a single window)."""
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(np.mean(x)), se


def summarize(vs: list[Variant], per: dict[str, dict[str, list]], ref_max: float, secs: dict) -> list[dict]:
    """One record per variant from the per-window arrays (module docstring's statistics)."""
    nll = {name: np.concatenate(d["nll"]) for name, d in per.items()}
    ref = vs[0].name
    records = []
    for v in vs:
        mean, se = mean_se(nll[v.name])
        rec: dict[str, Any] = {
            "variant": v.name, "weights": np.dtype(v.dtype).name, "quantize": v.quantize,
            "scoring": v.scoring, "kv_cache": "int8" if v.kv8 else np.dtype(v.dtype).name,
            "nll": mean, "ppl": math.exp(mean), "ppl_rel_se": se,
            "logits_rel_error": max(per[v.name]["err"]) / max(ref_max, 1e-30),
            "mean_kl": float(np.mean(np.concatenate(per[v.name]["kl"]))),
            "top1_agreement": float(np.mean(np.concatenate(per[v.name]["top1"]))),
            "ppl_vs_reference": math.exp(mean - float(np.mean(nll[ref]))) - 1,
            "base": v.base, "bar": v.bar, "ppl_vs_base": None, "ppl_vs_base_se": None,
            "seconds": secs[v.name],
        }  # fmt: skip
        if v.base is not None:
            d_mean, d_se = mean_se(nll[v.name] - nll[v.base])  # paired: the same windows
            rec["ppl_vs_base"] = math.exp(d_mean) - 1
            rec["ppl_vs_base_se"] = None if d_se is None else math.exp(d_mean) * d_se
        records.append(rec)
    return records


def score(
    model_path: Path,
    windows: np.ndarray,
    vs: list[Variant],
    device: str,
    batch: int,
    step: int,
    positions: int,
) -> list[dict]:
    """Load every variant, score all windows batch by batch (the reference first in each batch) and return
    the records of summarize()."""
    loaded: dict[tuple, Any] = {}  # one model per (weights dtype, quantize): the forwards keep no state
    models = {}
    for v in vs:  # verify (native vs the ONNX executor on probe tokens) once: the others are the same file
        key = (np.dtype(v.dtype), v.quantize)
        if key not in loaded:
            loaded[key] = rf.load(
                model_path, native=True, dtype=v.dtype, device=device, verify=not loaded, quantize=v.quantize
            ).model
        models[v.name] = loaded[key]
    inputs, targets = windows[:, :positions], windows[:, 1 : positions + 1]
    per: dict[str, dict[str, list]] = {v.name: {"nll": [], "kl": [], "top1": [], "err": []} for v in vs}
    secs = dict.fromkeys(models, 0.0)
    ref_max = 0.0
    for b0 in range(0, len(windows), batch):
        x, y = inputs[b0 : b0 + batch], targets[b0 : b0 + batch]
        ref = None
        for v in vs:
            t0 = time.perf_counter()
            logits = window_logits(models[v.name], x, v, step)
            secs[v.name] += time.perf_counter() - t0
            if ref is None:
                ref, ref_max = logits, max(ref_max, float(np.max(np.abs(logits))))
            for key, val in window_stats(ref, logits, y).items():
                per[v.name][key].append(val)
        harness.log(f"  windows {b0 + len(x)}/{len(windows)}")
    return summarize(vs, per, ref_max, secs)


# ---- report ------------------------------------------------------------------------------------------------


def pct(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.3f}%" + ("" if se is None else f" ± {100 * se:.3f}%")


def verdicts(records: list[dict]) -> list[harness.Verdict]:
    """Issue 9's bars: every variant marked `bar` at most ACCEPT_PPL above its base."""
    out = []
    for r in records:
        if not r["bar"]:
            continue
        what = "INT8 KV cache" if r["kv_cache"] == "int8" else "INT8 weights"
        rise = r["ppl_vs_base"]
        status = "PASS" if rise <= ACCEPT_PPL else "FAIL"
        out.append(
            harness.Verdict(
                status,
                f"stdlib-gpt held-out: {what} ({r['variant']}) perplexity <= +{100 * ACCEPT_PPL:g}% of "
                f"{r['base']}: {pct(rise, r['ppl_vs_base_se'])} (ppl {r['ppl']:.4f})",
            )
        )
    return out


def markdown(header: dict, records: list[dict], verdict_list: list[harness.Verdict]) -> str:
    data = header["data"]
    ref = records[0]
    lines = [
        f"# stdlib-gpt held-out perplexity: float vs INT8 weights vs INT8 KV cache ({header['gpu']})",
        "",
        f"- date {header['date']}, commit {header['commit']}"
        + (" (uncommitted changes)" if header["dirty"] else ""),
        f"- model {header['model']}; command `{header['command']}`",
        f"- held-out split of the training config (Python {data['python']}'s stdlib: "
        f"{data['held_out_files']} held-out files, {data['held_out_tokens']:,} tokens, "
        f"crc32 {data['held_out_crc32']}); "
        f"{data['windows']} of {data['source_windows']} windows ({data['window_source']}), "
        f"{header['positions']} positions each = {header['tokens']:,} scored bytes",
        f"- reference {ref['variant']}: held-out loss {ref['nll']:.6f} nats/byte, perplexity "
        f"{ref['ppl']:.4f} (relative standard error over windows {pct(ref['ppl_rel_se']).lstrip('+')})",
        f"- steps scoring: a one-token prefill, then chunks of {header['kv_step']} token(s) read back from "
        "the paged cache (decode plan); kv8 = Int8KVArena (int8 + fp16 scale per token and head)",
        f"- {header['windows_per_forward']} windows per forward; total {header['seconds']:.1f} s",
    ]
    if header.get("card"):
        lines.append(f"- {header['card']}")
    lines += [
        "",
        "| variant | weights | scoring | KV cache | max logits error (rel.) | mean KL | top-1 agreement | "
        "perplexity | vs reference | vs base ± s.e. (base) | seconds |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        w = r["weights"] + (f" + {r['quantize']}" if r["quantize"] else "")
        vs = "-" if r["base"] is None else f"{pct(r['ppl_vs_base'], r['ppl_vs_base_se'])} ({r['base']})"
        lines.append(
            f"| {r['variant']} | {w} | {r['scoring']} | {r['kv_cache']} | {r['logits_rel_error']:.2e} | "
            f"{r['mean_kl']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['ppl']:.4f} | "
            f"{pct(r['ppl_vs_reference'])} | {vs} | {r['seconds']:.1f} |"
        )
    lines += ["", *harness.acceptance_lines(verdict_list)]
    return "\n".join(lines) + "\n"


def card_line(model_path: Path, data: dict, windows: str, ref_nll: float) -> str | None:
    """The reference loss next to the one the model's JSON records for training's held-out set, when this
    run scored the same windows of the same stdlib (same Python version)."""
    meta = json.loads(model_path.with_suffix(".json").read_text(encoding="utf-8"))
    trained = meta.get("trained_on", {})
    if windows != "eval" or trained.get("python") != data["python"] or "held_out_loss" not in trained:
        return None
    card = float(trained["held_out_loss"])
    return (
        f"training's held-out loss (Python {trained['python']}): {card:.6f}; here {ref_nll:.6f} "
        f"({ref_nll / card - 1:+.2e} relative)"
    )


def shown_path(path: Path) -> str:
    """`path` relative to the repository when inside it (results files name no local folders)."""
    try:
        return str(path.resolve().relative_to(harness.REPO_ROOT))
    except ValueError:
        return str(path)


# ---- command line ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/accuracy_bundled.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL), help="an .onnx file with its training config beside it")
    p.add_argument("--cpu", action="store_true", help="the NumPy path even when a GPU is present")
    p.add_argument("--windows", help="eval | all | N (default: eval on a GPU, 64 on a CPU)")
    p.add_argument("--batch", type=int, help="windows per forward (default 128 on a GPU, 32 on a CPU)")
    p.add_argument("--kv-step", type=int, help=f"tokens per step of the steps scoring, 1..{MAX_STEP} "
                   "(default 1 on a GPU: decode; 16 on a CPU)")  # fmt: skip
    p.add_argument("--positions", type=int, help="score only the first N positions of each window (tests)")
    p.add_argument("--out", metavar="DIR", help="write the results here instead of bench/results/<device>")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cp = None if args.cpu else backend.cupy_module()
    gpu = cp is not None
    d_windows, d_batch, d_step = DEFAULTS["gpu" if gpu else "cpu"]
    which = args.windows or d_windows
    batch, step = args.batch or d_batch, args.kv_step or d_step
    if which not in ("eval", "all") and not which.isdigit():
        raise SystemExit(f"--windows: eval, all or a count, got {which!r}")
    if not 1 <= step <= MAX_STEP or batch < 1:
        raise SystemExit(f"--kv-step must be 1..{MAX_STEP} and --batch >= 1")
    model_path = Path(args.model)
    tcfg = train_config(model_path)
    positions = tcfg.seq_len if args.positions is None else args.positions
    if not 1 <= positions <= tcfg.seq_len:
        raise SystemExit(f"--positions must be 1..{tcfg.seq_len}")
    device = harness.device_header(cp) if gpu else {"gpu": "CPU (NumPy)", "gpu_slug": "cpu"}
    windows, data = held_out_windows(tcfg, which)
    vs = variants(gpu)
    harness.log(
        f"{device['gpu']}: {model_path.name}, {data['windows']} held-out windows x {positions} positions "
        f"(Python {data['python']}, crc32 {data['held_out_crc32']}), {batch} per forward, steps of {step}"
    )
    t0 = time.perf_counter()
    records = score(model_path, windows, vs, "gpu" if gpu else "cpu", batch, step, positions)
    seconds = time.perf_counter() - t0
    header = harness.run_header(
        device, model=shown_path(model_path), data=data, positions=positions, tokens=len(windows) * positions,
        windows_per_forward=batch, kv_step=step, seconds=seconds,
    )  # fmt: skip
    card = card_line(model_path, data, which, records[0]["nll"]) if positions == tcfg.seq_len else None
    if card:
        header["card"] = card
    verdict_list = verdicts(records)
    for r in records:
        harness.log(
            f"  {r['variant']:<10} ppl {r['ppl']:.4f} (s.e. {pct(r['ppl_rel_se']).lstrip('+')})  vs base "
            f"{pct(r['ppl_vs_base'], r['ppl_vs_base_se'])} ({r['base']})  KL {r['mean_kl']:.2e}  top-1 "
            f"{100 * r['top1_agreement']:.2f}%  {r['seconds']:.1f} s"
        )
    if card:
        harness.log(f"  {card}")
    out_dir = harness.output_dir(device["gpu_slug"], False, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / "accuracy_bundled.json", header, records)
    (out_dir / "accuracy_bundled.md").write_text(markdown(header, records, verdict_list))
    harness.copy_to_out(out_dir, ("accuracy_bundled.json", "accuracy_bundled.md"), False, args.out)
    harness.log("\nACCEPTANCE")
    for v in verdict_list:
        harness.log(f"  {v.status}  {v.text}")
    harness.log(f"\n{seconds:.1f} s; wrote accuracy_bundled.json, accuracy_bundled.md into {out_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
