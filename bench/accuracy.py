"""Accuracy of reduced precision: logits and perplexity of fp32 vs fp16 vs INT8 weights.

    python bench/accuracy.py                       -> bench/results/<gpu or cpu>/accuracy.{json,md}
    python bench/accuracy.py --quick               -> $OUT (or bench/out): one small config, short sequences
    python bench/accuracy.py --checkpoint DIR --text FILE   a trained model on held-out text
    python bench/accuracy.py --bundled [OPTIONS]   the bundled model on its held-out split: hands over to
                                                   bench/accuracy_bundled.py (its options, its results files)

Variants, all holding the same weights: on a GPU the reference is fp32, then fp16, then the fp16 model with
weight-only INT8 (models/quantize.py: "int8" per channel, "int8-g128" group-wise); on a CPU (no GPU) the
reference is the float64 NumPy path, then float32, then INT8 on the float32 model (the NumPy reference
of the dequantized math).

Data. Random-weight configs: sequences sampled from the reference model itself (temperature 1, a random
first token), so the text is what that model finds likely and its perplexity means something; every variant
scores the same sequences. A trained checkpoint (--checkpoint, any HF directory load_hf reads) is scored on
--text: the file's bytes are the token ids (a byte-level model, vocab >= 256: the training engineer's
bundled model and its held-out split), cut into --seq-len windows.

Per variant against the reference, over every position of every sequence: max |logits - ref| / max |ref|,
mean KL(p_ref || p_variant), top-1 agreement, and the perplexity exp(mean NLL of the actual next token)
with its relative change vs the reference and vs fp16. Issue 9's bar for the bundled model: INT8 weights
raise perplexity by <= 1% relative (to the fp16 model); printed as acceptance lines.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import e2e
import harness
import numpy as np
from rawformer.models import GPT2Config, LlamaConfig, build_model, module_for
from rawformer.models.common import random_weights
from rawformer.models.quantize import quantize_model

from rawformer import backend
from rawformer.runtime import make_pool

CONFIGS: dict[str, tuple[Any, float]] = {  # name -> (config, weight std)
    "llama-small": (
        LlamaConfig(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),  # fmt: skip
        0.05,
    ),
    "gpt2-small-random": (
        GPT2Config(vocab_size=4096, n_positions=1024, n_embd=512, n_layer=4, n_head=8),
        0.05,
    ),
    "llama-1b": (e2e.CONFIGS["llama-1b"], e2e.STD),  # the end-to-end bench's 1B config
}
QUICK_CONFIGS = ("llama-small",)
CPU_CONFIGS = ("llama-small", "gpt2-small-random")  # the 1B config needs a GPU
QUANT_MODES = ("int8", "int8-g128")
ACCEPT_PPL = 0.01  # INT8 weights: perplexity at most 1% above fp16's (issue 9, the bundled model)


# ---- scoring ---------------------------------------------------------------------------------------------


def pool_for(model: Any, seqs: int, length: int, block_size: int = 16, kv8: bool = False) -> Any:
    """A pool (the model's dtype and device, no prefix caching) holding `seqs` sequences of `length`; kv8:
    over an Int8KVArena (int8 K / V + an fp16 scale per token and head) instead of the float cache."""
    blocks = seqs * math.ceil(length / block_size)  # each sequence's last block may be partly filled
    return make_pool(
        model, blocks * block_size, block_size=block_size, prefix_caching=False, max_seq_len=length,
        kv_int8=kv8,
    )  # fmt: skip


def all_logits(model: Any, seqs: np.ndarray, block_size: int = 16) -> np.ndarray:
    """float64 (S, L, V) logits of every position of S sequences of length L (one prefill step)."""
    s, length = seqs.shape
    pool = pool_for(model, s, length, block_size)
    arena = pool.arena
    for i, row in enumerate(seqs):
        pool.add_sequence(i, [int(t) for t in row])
    logits = model.forward(pool.prepare(list(range(s))), arena)  # (S * L, V)
    return backend.to_numpy(logits).astype(np.float64).reshape(s, length, -1)


def decode_logits(model: Any, seqs: np.ndarray, kv8: bool, block_size: int = 16) -> np.ndarray:
    """float64 (S, L, V) logits scored one token per step (teacher forcing), so that every position reads
    its context from the paged cache (rf.paged_attention); kv8: the cache is an Int8KVArena, read by
    rf.paged_attention_int8 (models/int8_kv.py), i.e. attention over an INT8 KV cache."""
    s, length = seqs.shape
    pool = pool_for(model, s, length, block_size, kv8)
    arena = pool.arena
    ids = list(range(s))
    for i in ids:
        pool.add_sequence(i, [int(seqs[i, 0])])
    out = np.empty((s, length, model.vocab_size))
    for t in range(length):
        batch = pool.prepare(ids) if t == 0 else pool.prepare(ids, [[int(v)] for v in seqs[:, t]])
        logits = model.forward(batch, arena)  # (S, V): one token per sequence
        out[:, t] = backend.to_numpy(logits).astype(np.float64)
    return out


def log_softmax64(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, out: np.ndarray, seqs: np.ndarray) -> dict[str, float]:
    """Metrics of `out` logits against `ref` (both (S, L, V) float64) on sequences (S, L)."""
    lr, lo = log_softmax64(ref), log_softmax64(out)
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lo), axis=-1)))
    nxt = seqs[:, 1:]
    nll = -np.take_along_axis(lo[:, :-1], nxt[..., None], axis=-1).mean()
    return {
        "logits_rel_error": float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30)),
        "mean_kl": kl,
        "top1_agreement": float(np.mean(out.argmax(-1) == ref.argmax(-1))),
        "nll": float(nll),
        "ppl": float(np.exp(nll)),
    }


def sample_from(model: Any, n_seqs: int, length: int, seed: int) -> np.ndarray:
    """(n_seqs, length) token ids sampled at temperature 1 from `model` (first token uniform)."""
    rng = np.random.default_rng(seed)
    vocab = model.vocab_size
    pool = pool_for(model, n_seqs, length)
    arena = pool.arena
    seqs = np.zeros((n_seqs, length), dtype=np.int64)
    seqs[:, 0] = rng.integers(0, vocab, n_seqs)
    ids = list(range(n_seqs))
    for i in ids:
        pool.add_sequence(i, [int(seqs[i, 0])])
    logits = model.forward(pool.prepare(ids), arena, last_only=True)
    for t in range(1, length):
        p = np.exp(log_softmax64(backend.to_numpy(logits).astype(np.float64)))
        u = rng.random((n_seqs, 1))
        seqs[:, t] = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), vocab - 1)
        if t + 1 < length:
            logits = model.forward(pool.prepare(ids, [[int(v)] for v in seqs[:, t]]), arena)
    return seqs


# ---- variants --------------------------------------------------------------------------------------------


def variants(make: Any, gpu: bool) -> list[tuple[str, Any, str]]:
    """(name, builder, scoring) of every variant; the first is the reference. `make(dtype)` builds the model
    in a dtype (one at a time in memory for the big config). scoring: "prefill" (all positions in one
    step), "decode" (one token per step, fp16 cache) or "kv8" (one token per step, INT8 cache)."""
    hi, lo = (np.float32, np.float16) if gpu else (np.float64, np.float32)
    names = ("fp32", "fp16") if gpu else ("fp64", "fp32")

    def quantized(mode: str) -> Any:
        return lambda: quantize_model(make(lo), mode)

    return [
        (names[0], lambda: make(hi), "prefill"),
        (names[1], lambda: make(lo), "prefill"),
        *[(m, quantized(m), "prefill") for m in QUANT_MODES],
        (f"{names[1]} decode", lambda: make(lo), "decode"),
        (f"{names[1]} kv8", lambda: make(lo), "kv8"),
        ("int8 kv8", quantized("int8"), "kv8"),
    ]


def base_of(name: str, scoring: str, gpu: bool) -> str:
    """The variant a variant's perplexity change is measured against: the low-precision float model scored
    the same way (prefill, or step by step for the KV-cache variants)."""
    lo = "fp16" if gpu else "fp32"
    return lo if scoring == "prefill" else f"{lo} decode"


def run_config(
    name: str,
    builders: list[tuple[str, Any, str]],
    seqs: np.ndarray | None,
    args: argparse.Namespace,
    xp: Any,
    gpu: bool,
) -> dict:
    ref_name, ref_build, _ = builders[0]
    model = ref_build()
    if seqs is None:
        seqs = sample_from(model, args.seqs, args.seq_len, args.seed + 1)
    ref = all_logits(model, seqs)
    del model
    result: dict[str, Any] = {"config": name, "reference": ref_name, "seqs": list(seqs.shape), "variants": {}}
    result["variants"][ref_name] = {**compare(ref, ref, seqs), "scoring": "prefill"}
    for vname, build, scoring in builders[1:]:
        model = build()
        logits = (
            all_logits(model, seqs) if scoring == "prefill" else decode_logits(model, seqs, scoring == "kv8")
        )
        result["variants"][vname] = {**compare(ref, logits, seqs), "scoring": scoring}
        del model, logits
        if gpu:
            xp.get_default_memory_pool().free_all_blocks()
    for vname, m in result["variants"].items():
        m["ppl_vs_reference"] = m["ppl"] / result["variants"][ref_name]["ppl"] - 1
        m["base"] = base_of(vname, m["scoring"], gpu)
        base = result["variants"].get(m["base"])
        m["ppl_vs_base"] = m["ppl"] / base["ppl"] - 1 if base else None
        harness.log(
            f"  {name:<18} {vname:<12} logits err {m['logits_rel_error']:.2e}  KL {m['mean_kl']:.2e}  top-1 "
            f"{100 * m['top1_agreement']:.2f}%  ppl {m['ppl']:.4f} ({100 * m['ppl_vs_reference']:+.3f}% vs "
            f"{ref_name})"
        )
    return result


def random_config(name: str, args: argparse.Namespace, xp: Any, gpu: bool) -> dict:
    cfg, std = CONFIGS[name]
    shapes = module_for(cfg).weight_shapes(cfg)

    def make(dtype: Any) -> Any:
        return build_model(cfg, random_weights(shapes, args.seed, dtype, xp, std), xp)

    return run_config(name, variants(make, gpu), None, args, xp, gpu)


def checkpoint_config(args: argparse.Namespace, xp: Any, gpu: bool) -> dict:
    """A trained checkpoint on held-out bytes (--checkpoint, --text)."""
    from rawformer.export.hf import load_hf

    data = np.frombuffer(Path(args.text).read_bytes(), dtype=np.uint8).astype(np.int64)
    n = min(args.seqs * 4, len(data) // args.seq_len)
    if n < 1:
        raise SystemExit(f"--text {args.text}: shorter than one --seq-len window")
    seqs = data[: n * args.seq_len].reshape(n, args.seq_len)
    device = "gpu" if gpu else "cpu"

    def make(dtype: Any) -> Any:
        return load_hf(args.checkpoint, dtype=dtype, device=device)

    return run_config(f"checkpoint:{Path(args.checkpoint).name}", variants(make, gpu), seqs, args, xp, gpu)


def verdicts(results: list[dict], trained: bool) -> list[harness.Verdict]:
    """Issue 9's perplexity bars: INT8 weights <= +1% of the float model; an INT8 KV cache <= +1% of the
    fp16 cache (both scored step by step). On random weights the lines are informative."""
    out = []
    for res in results:
        random = not res["config"].startswith("checkpoint:")
        for vname, m in res["variants"].items():
            is_weights = vname in QUANT_MODES
            is_kv = vname.endswith(" kv8") and not vname.startswith("int8")
            if not (is_weights or is_kv) or m.get("ppl_vs_base") is None:
                continue
            rise = m["ppl_vs_base"]
            what = f"{res['config']}: {vname} perplexity <= +{100 * ACCEPT_PPL:g}% of {m['base']}"
            if random:
                what += " (random weights: informative; the bar is for the bundled model)"
            status = "PASS" if rise <= ACCEPT_PPL else "FAIL"
            out.append(harness.Verdict(status, f"{what}: {100 * rise:+.3f}% (ppl {m['ppl']:.4f})"))
    if not trained:
        out.append(
            harness.Verdict(
                "SKIP", "bundled model on its held-out split: run with --bundled (accuracy_bundled.py)"
            )
        )
    return out


def markdown(header: dict, results: list[dict], verdict_list: list[harness.Verdict]) -> str:
    lines = [
        f"# Accuracy of fp16 and INT8 weights ({header.get('gpu', 'CPU')})",
        "",
        f"- date {header['date']}, commit {header['commit']}"
        + (" (uncommitted changes)" if header["dirty"] else ""),
        "- reference: fp32 on the GPU (float64 on a CPU); every variant holds the same weights; INT8 = "
        "weight-only, fp16 activations (models/quantize.py)",
        f"- random configs: {header['seqs']} sequences of {header['seq_len']} tokens sampled from the "
        "reference model (temperature 1)",
        "",
        "| config | variant | scoring | max logits error (rel.) | mean KL | top-1 agreement | perplexity "
        "| vs reference | vs base (base) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for v, m in res["variants"].items():
            vs = "-" if m.get("ppl_vs_base") is None else f"{100 * m['ppl_vs_base']:+.3f}% ({m['base']})"
            lines.append(
                f"| {res['config']} | {v} | {m['scoring']} | {m['logits_rel_error']:.2e} | "
                f"{m['mean_kl']:.2e} | "
                f"{100 * m['top1_agreement']:.2f}% | {m['ppl']:.4f} | "
                f"{100 * m['ppl_vs_reference']:+.3f}% | {vs} |"
            )
    lines += ["", *harness.acceptance_lines(verdict_list)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/accuracy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_CONFIGS)} only, 4 x 64 tokens")
    p.add_argument("--configs", type=harness.list_arg(tuple(CONFIGS), "config"))
    p.add_argument("--seqs", type=int, default=8, help="sequences per config (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="the NumPy path even when a GPU is present")
    p.add_argument("--checkpoint", metavar="DIR", help="a trained HF-layout checkpoint to score on --text")
    p.add_argument("--text", metavar="FILE", help="held-out text; its bytes are the token ids")
    p.add_argument("--out", metavar="DIR", help="write the results here instead")
    p.add_argument("--bundled", action="store_true", help="the bundled model on its held-out split: "
                   "bench/accuracy_bundled.py with the other arguments (see its --help)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--bundled" in argv:  # another script's options: hand over before parsing ours
        import accuracy_bundled

        argv.remove("--bundled")
        return accuracy_bundled.main(argv)
    args = build_parser().parse_args(argv)
    if bool(args.checkpoint) != bool(args.text):
        raise SystemExit("--checkpoint and --text go together")
    cp = None if args.cpu else backend.cupy_module()
    gpu = cp is not None
    xp = cp if gpu else np
    if args.quick:
        args.seqs, args.seq_len = min(args.seqs, 4), min(args.seq_len, 64)
    names = args.configs or list(QUICK_CONFIGS if args.quick else (CONFIGS if gpu else CPU_CONFIGS))
    device = harness.device_header(cp) if gpu else {"gpu": "CPU (NumPy)", "gpu_slug": "cpu"}
    harness.log(f"{device['gpu']}: configs {', '.join(names)}; {args.seqs} x {args.seq_len} tokens")
    results = []
    for name in names:
        results.append(random_config(name, args, xp, gpu))
    if args.checkpoint:
        results.append(checkpoint_config(args, xp, gpu))
    verdict_list = verdicts(results, trained=bool(args.checkpoint))
    header = harness.run_header(
        device, seqs=args.seqs, seq_len=args.seq_len, quick=args.quick, seed=args.seed
    )
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / "accuracy.json", header, results)
    (out_dir / "accuracy.md").write_text(markdown(header, results, verdict_list))
    harness.copy_to_out(out_dir, ("accuracy.json", "accuracy.md"), args.quick, args.out)
    harness.log("\nACCEPTANCE")
    for v in verdict_list:
        harness.log(f"  {v.status}  {v.text}")
    harness.log(f"\nwrote accuracy.json, accuracy.md into {out_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
