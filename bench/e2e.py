"""End-to-end generation: rawformer vs Hugging Face transformers (PyTorch eager), the same random weights.

    python bench/e2e.py                       -> bench/results/<gpu>/e2e.{json,md}
    python bench/e2e.py --quick               -> $OUT (or bench/out): 1 rep, 32 new tokens
    python bench/e2e.py --configs llama-1b --batches 1,64 --no-hf

For each config (fp16, random N(0, 0.02) weights drawn once, on the GPU) both sides hold identical weights:
rawformer's model is built from an HF-layout weights dict, and a transformers GPT2LMHeadModel /
LlamaForCausalLM is built from the same config (field names are the config.json keys) and loaded from the
same dict (load_state_dict through DLPack). Before anything is timed the two must agree: the last-position
logits of two prompts (relative error) and the greedy tokens of a few steps (how many agree is printed;
fp16 near-ties can flip a token late, the logits check is the gate).

Timed, per batch size B (1, 8, 64), prompts of `--prompt` random tokens (128) and `--new` new tokens (128),
greedy, no stop token (HF's eos is switched off so both sides generate every token):
- decode: B x new / wall time of one generate call (prefill included, the same definition on both sides);
  rawformer's decode-only rate (decode steps / their time) is printed beside it;
- prefill: B x prompt / wall time of a generate call with one new token.
rawformer: Generator over a KVPool (CUDA graphs for decode steps, captured in the warm-up call). HF:
model.generate with its default cache (DynamicCache), torch eager (no compile), `--hf-attn` attention
(default "sdpa", transformers' default). Wall time with the device synchronised around each call; median of
`--reps` after one warm-up call.

Roofline beside batch 1: a decode step must stream every weight it reads once (all matrices and norms, the
lm head; the input embedding and position tables only by rows), so batch-1 tokens/s <= copy bandwidth /
weight bytes, with the device-to-device copy bandwidth measured in the same run
(harness.measure_copy_ceiling).

Acceptance (the issue): batch-1 decode >= 2x HF on both configs, >= 50% of the roofline for the 1B config
(decode-only rate), batch-64 decode >= 2x HF.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from typing import Any

import harness
import numpy as np
from rawformer.models import GPT2Config, LlamaConfig, build_model, module_for
from rawformer.models.common import random_weights

from rawformer.memory import KVArena, KVPool
from rawformer.runtime import Generator

CONFIGS: dict[str, Any] = {
    "gpt2-small": GPT2Config(),  # 124M: 12 layers, 768 hidden, 12 heads, vocab 50257, 1024 positions
    "llama-1b": LlamaConfig(  # ~1.1B (TinyLlama shape): 22 layers, 2048 hidden, GQA 32:4, SwiGLU 5632
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
BATCHES = (1, 8, 64)
STD = 0.02
ACCEPT_SPEEDUP = 2.0  # batch 1 and batch 64 decode vs HF
ACCEPT_ROOFLINE = 0.5  # batch-1 decode of the 1B config vs the weight-streaming roofline
LOGITS_TOL = 2e-2  # fp16, 12-22 layers, two implementations: max |ours - HF| / max |HF| of the logits


# ---- the two models ----------------------------------------------------------------------------------------


def weight_bytes_per_token(cfg: Any, itemsize: int) -> int:
    """Bytes a decode step streams: every tensor but the tables read by rows only (token / position
    embeddings), the lm head included (GPT-2's is the tied token embedding)."""
    shapes = module_for(cfg).weight_shapes(cfg)
    skip = {"wpe.weight"} if isinstance(cfg, GPT2Config) else set()
    if isinstance(cfg, LlamaConfig) and not cfg.tie_word_embeddings:
        skip.add("embed_tokens.weight")  # lm_head.weight is the one read fully
    return itemsize * sum(math.prod(s) for n, s in shapes.items() if n not in skip)


def hf_name(cfg: Any, name: str) -> str:
    """Our weight name -> the transformers LM-head model's state-dict key."""
    if isinstance(cfg, GPT2Config):
        return "transformer." + name
    return name if name == "lm_head.weight" else "model." + name


def import_hf() -> tuple[Any, Any] | None:
    """(torch, transformers), or None when either is missing (the HF side is then skipped)."""
    try:
        import torch
        import transformers
    except Exception as exc:  # ImportError, or a broken CUDA torch
        harness.log(f"transformers / torch not usable ({exc}): the HF baseline is skipped")
        return None
    return torch, transformers


def build_hf(torch: Any, transformers: Any, cfg: Any, weights: dict[str, Any], attn: str) -> Any:
    """A transformers LM built from `cfg` on the GPU in fp16, holding a copy of `weights` (CuPy, HF names)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model_type"}
    if isinstance(cfg, GPT2Config):
        hf_cfg, cls = (
            transformers.GPT2Config(**fields, attn_implementation=attn),
            transformers.GPT2LMHeadModel,
        )
    else:
        hf_cfg = transformers.LlamaConfig(**fields, attn_implementation=attn)
        cls = transformers.LlamaForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = cls(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    state = {hf_name(cfg, n): torch.from_dlpack(w) for n, w in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if isinstance(cfg, GPT2Config) else set()  # tied to wte
    bad_missing = [
        k for k in missing if k not in allowed and not k.endswith((".attn.bias", ".attn.masked_bias"))
    ]
    if bad_missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    if isinstance(cfg, GPT2Config):
        model.tie_weights()
    model.eval()
    # no stop token: both sides generate every requested token
    for c in (model.config, model.generation_config):
        c.eos_token_id = None
        c.pad_token_id = 0
    return model


def hf_generate(torch: Any, model: Any, prompts: np.ndarray, new: int) -> np.ndarray:
    """HF greedy generate of `new` tokens for (B, L) prompts (no padding: all of one length)."""
    ids = torch.from_numpy(prompts.astype(np.int64)).cuda()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
            eos_token_id=None, pad_token_id=0, use_cache=True,
        )  # fmt: skip
    return out[:, prompts.shape[1] :].cpu().numpy()


def our_last_logits(cp: Any, model: Any, pool: KVPool, prompts: np.ndarray) -> np.ndarray:
    """float64 last-position logits of each prompt through rawformer's prefill."""
    ids = [("check", i) for i in range(len(prompts))]
    try:
        for sid, p in zip(ids, prompts, strict=True):
            pool.add_sequence(sid, p.tolist())
        logits = model.forward(pool.prepare(ids), pool.arena, last_only=True)
        return cp.asnumpy(logits).astype(np.float64)
    finally:
        for sid in ids:
            if sid in pool:
                pool.free_sequence(sid)


def hf_last_logits(torch: Any, model: Any, prompts: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(prompts.astype(np.int64)).cuda()
    with torch.inference_mode():
        return model(input_ids=ids).logits[:, -1].float().cpu().numpy().astype(np.float64)


# ---- timing ------------------------------------------------------------------------------------------------


def wall(cp: Any, fn: Any, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` with the device synchronised before and after, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t0)
    return times


def record(
    config: str, impl: str, phase: str, batch: int, tokens: int, times: list[float], **extra: Any
) -> dict:
    ms = 1e3 * statistics.median(times)
    q = np.percentile(np.array(times) * 1e3, [10, 90]).tolist() if times else [None, None]
    return {
        "config": config, "impl": impl, "phase": phase, "batch": batch, "tokens": tokens,
        "status": "ok", "ms": ms, "ms_p10": q[0], "ms_p90": q[1], "reps": len(times),
        "tok_s": tokens / (ms / 1e3), **extra,
    }  # fmt: skip


def failed(config: str, impl: str, phase: str, batch: int, exc: BaseException) -> dict:
    harness.log(f"  {impl} {phase} batch {batch}: ERROR {type(exc).__name__}: {exc}")
    return {
        "config": config, "impl": impl, "phase": phase, "batch": batch, "status": "error",
        "message": f"{type(exc).__name__}: {exc}",
    }  # fmt: skip


# ---- one config --------------------------------------------------------------------------------------------


def run_config(
    name: str, args: argparse.Namespace, cp: Any, hf: tuple[Any, Any] | None, ceiling: float
) -> dict:
    cfg = CONFIGS[name]
    rng = np.random.default_rng(args.seed)
    vocab = cfg.vocab_size
    batches = sorted(args.batches)
    prompts = rng.integers(0, vocab, (max(batches), args.prompt))
    harness.log(f"{name}: drawing random fp16 weights ...")
    weights = random_weights(module_for(cfg).weight_shapes(cfg), args.seed, np.float16, cp, STD)
    model = build_model(cfg, weights, cp)
    wbytes = weight_bytes_per_token(cfg, 2)
    roofline = ceiling * 1e9 / wbytes
    result: dict[str, Any] = {
        "config": name, "weight_bytes": wbytes, "params": sum(int(w.size) for w in weights.values()),
        "roofline_tok_s": roofline, "records": [], "checks": {},
    }  # fmt: skip
    # the pool: every batch's sequences at full length, one arena allocated once
    max_len = args.prompt + args.new
    blocks = max(batches) * math.ceil(max_len / args.block_size) + 8
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, args.block_size,
        num_blocks=blocks, xp=cp,
    )  # fmt: skip
    # prefix caching off: the timed calls repeat the same prompts, which would otherwise skip the prefill
    pool = KVPool(arena, max_seq_len=max_len, prefix_caching=False)
    gen = Generator(model, pool, max_batch=max(batches), use_graphs=not args.no_graphs)
    result["kv_arena_bytes"] = arena.nbytes

    hf_model = None
    if hf is not None:
        torch, transformers = hf
        try:
            hf_model = build_hf(torch, transformers, cfg, weights, args.hf_attn)
        except Exception as exc:
            harness.log(f"  HF model could not be built: {type(exc).__name__}: {exc}")
            result["checks"]["hf_build_error"] = f"{type(exc).__name__}: {exc}"
    del weights  # the HF model holds its own copy; ours keeps what it references

    # ---- correctness before timing
    check = prompts[:2]
    ours_tok = np.array(gen.generate(check, args.check_tokens, ignore_eos=True).token_ids)
    if hf_model is not None:
        torch = hf[0]  # type: ignore[index]
        a, b = our_last_logits(cp, model, pool, check), hf_last_logits(torch, hf_model, check)
        err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        theirs = hf_generate(torch, hf_model, check, args.check_tokens)
        agree = [int(np.argmax(np.r_[ours_tok[i] != theirs[i], True])) for i in range(len(check))]
        result["checks"].update(
            logits_rel_error=err, logits_ok=err <= LOGITS_TOL, greedy_agree_steps=agree,
            greedy_steps=args.check_tokens, argmax_equal=bool(np.all(a.argmax(1) == b.argmax(1))),
        )  # fmt: skip
        harness.log(
            f"  check vs HF: last-position logits rel error {err:.2e} (tolerance {LOGITS_TOL:g}), greedy "
            f"tokens agree for {agree} of {args.check_tokens} steps"
        )
        if err > LOGITS_TOL:
            harness.log("  the models disagree: the HF timings are recorded but the comparison is suspect")

    # ---- timed
    for b in batches:
        p = prompts[:b]
        tokens = b * args.new
        try:
            times = wall(cp, lambda p=p: gen.generate(p, args.new, ignore_eos=True), args.reps)
            st = gen.last_stats
            decode_only = b * (args.new - 1) / st["decode_s"] if st["decode_s"] > 0 else None
            rec = record(
                name, "rawformer", "decode", b, tokens, times, decode_only_tok_s=decode_only,
                decode_steps=st["decode_steps"], graphs=st.get("graphs"),
            )  # fmt: skip
            result["records"].append(rec)
            extra = f" (decode-only {decode_only:,.0f} tok/s)" if decode_only else ""
            harness.log(f"  rawformer decode  batch {b:>3}: {rec['tok_s']:>10,.0f} tok/s{extra}")
        except Exception as exc:
            result["records"].append(failed(name, "rawformer", "decode", b, exc))
        try:
            times = wall(cp, lambda p=p: gen.generate(p, 1, ignore_eos=True), args.reps)
            rec = record(name, "rawformer", "prefill", b, b * args.prompt, times)
            result["records"].append(rec)
            harness.log(f"  rawformer prefill batch {b:>3}: {rec['tok_s']:>10,.0f} tok/s")
        except Exception as exc:
            result["records"].append(failed(name, "rawformer", "prefill", b, exc))
        if hf_model is None:
            continue
        for phase, new, n_tok in (("decode", args.new, b * args.new), ("prefill", 1, b * args.prompt)):
            try:
                made: list[int] = []
                times = wall(cp, lambda p=p, new=new, made=made: made.append(
                    hf_generate(hf[0], hf_model, p, new).shape[1]), args.hf_reps)  # fmt: skip
                rec = record(name, "hf", phase, b, n_tok * made[-1] // new, times, new_tokens=made[-1])
                if made[-1] != new:
                    rec["message"] = f"HF generated {made[-1]} tokens, not {new}"
                result["records"].append(rec)
                harness.log(f"  HF        {phase:<7} batch {b:>3}: {rec['tok_s']:>10,.0f} tok/s")
            except Exception as exc:
                result["records"].append(failed(name, "hf", phase, b, exc))
    if hf_model is not None:
        del hf_model
        hf[0].cuda.empty_cache()  # type: ignore[index]
    if gen.graphs is not None:
        gen.graphs.clear()
    return result


# ---- verdicts and the report -------------------------------------------------------------------------------


def find(records: list[dict], impl: str, phase: str, batch: int) -> dict | None:
    for r in records:
        if r["impl"] == impl and r["phase"] == phase and r["batch"] == batch and r["status"] == "ok":
            return r
    return None


def verdicts(results: list[dict]) -> list[harness.Verdict]:
    out = []
    for res in results:
        recs, name = res["records"], res["config"]
        for b in (1, 64):
            ours, hf = find(recs, "rawformer", "decode", b), find(recs, "hf", "decode", b)
            what = f"{name} batch-{b} decode >= {ACCEPT_SPEEDUP:g}x HF transformers"
            if not any(r["impl"] == "rawformer" and r["batch"] == b for r in recs):
                out.append(harness.Verdict("SKIP", f"{what}: batch {b} not run"))
                continue
            if ours is None or hf is None:
                missing = "rawformer" if ours is None else "HF"
                status = "SKIP" if ours is not None and not any(r["impl"] == "hf" for r in recs) else "FAIL"
                out.append(harness.Verdict(status, f"{what}: no {missing} measurement"))
                continue
            x = ours["tok_s"] / hf["tok_s"]
            out.append(
                harness.Verdict(
                    "PASS" if x >= ACCEPT_SPEEDUP else "FAIL",
                    f"{what}: {x:.2f}x ({ours['tok_s']:,.0f} vs {hf['tok_s']:,.0f} tok/s)",
                )
            )
        if name == "llama-1b":
            ours = find(recs, "rawformer", "decode", 1)
            what = f"{name} batch-1 decode >= {100 * ACCEPT_ROOFLINE:g}% of the weight-streaming roofline"
            if ours is None or not ours.get("decode_only_tok_s"):
                out.append(harness.Verdict("FAIL", f"{what}: no measurement"))
            else:
                f = ours["decode_only_tok_s"] / res["roofline_tok_s"]
                out.append(
                    harness.Verdict(
                        "PASS" if f >= ACCEPT_ROOFLINE else "FAIL",
                        f"{what}: {100 * f:.1f}% (decode-only {ours['decode_only_tok_s']:,.0f} of "
                        f"{res['roofline_tok_s']:,.0f} tok/s; end to end {ours['tok_s']:,.0f} tok/s)",
                    )
                )
    return out


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(header: dict, results: list[dict], verdict_list: list[harness.Verdict]) -> str:
    w = header["workload"]
    lines = [
        "# End-to-end generation: rawformer vs HF transformers",
        "",
        f"- {header['gpu']}, {header['date']}, commit {header['commit']}"
        + (" (uncommitted changes)" if header["dirty"] else ""),
        f"- fp16, random weights (std {STD}), identical on both sides; prompt {w['prompt']} tokens, "
        f"{w['new']} new tokens, greedy; median of {w['reps']} (HF {w['hf_reps']}) after one warm-up",
        f"- HF: transformers {header.get('transformers', '?')}, torch eager, attention {w['hf_attn']}, "
        "default cache; rawformer: Generator, paged KV pool, CUDA graphs "
        + ("off" if w["no_graphs"] else "on"),
        "- decode tok/s = batch x new tokens / wall time of one generate call (prefill included); "
        "decode-only = rawformer's decode steps alone; prefill tok/s = batch x prompt / a 1-token generate",
        f"- copy ceiling measured now: {header['copy_ceiling_gbps']:,.0f} GB/s (read + written); "
        "roofline = ceiling / weight bytes per token",
        "",
    ]
    for res in results:
        recs = res["records"]
        ch = res["checks"]
        lines += [
            f"## {res['config']} ({res['params'] / 1e6:,.0f}M params, {res['weight_bytes'] / 1e6:,.0f} MB "
            f"streamed per step, roofline {res['roofline_tok_s']:,.0f} tok/s at batch 1)",
            "",
        ]
        if "logits_rel_error" in ch:
            lines += [
                f"check vs HF: logits rel error {ch['logits_rel_error']:.2e} "
                f"({'ok' if ch['logits_ok'] else 'TOO LARGE'}), greedy tokens agree for "
                f"{ch['greedy_agree_steps']} of {ch['greedy_steps']} steps",
                "",
            ]
        lines += [
            "| batch | rawformer decode tok/s | decode-only | HF decode tok/s | speedup | % roofline "
            "(decode-only) | rawformer prefill tok/s | HF prefill tok/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in sorted({r["batch"] for r in recs}):
            od, hd = find(recs, "rawformer", "decode", b), find(recs, "hf", "decode", b)
            op, hp = find(recs, "rawformer", "prefill", b), find(recs, "hf", "prefill", b)
            sp = od["tok_s"] / hd["tok_s"] if od and hd else None
            roof = (
                100 * od["decode_only_tok_s"] / res["roofline_tok_s"]
                if b == 1 and od and od.get("decode_only_tok_s")
                else None
            )
            lines.append(
                f"| {b} | {fmt(od and od['tok_s'])} | {fmt(od and od.get('decode_only_tok_s'))} | "
                f"{fmt(hd and hd['tok_s'])} | {fmt(sp, '.2f')}{'x' if sp else ''} | "
                f"{fmt(roof, '.1f')}{'%' if roof else ''} | {fmt(op and op['tok_s'])} | "
                f"{fmt(hp and hp['tok_s'])} |"
            )
        errs = [r for r in recs if r["status"] != "ok" or r.get("message")]
        lines += [""] + [f"- {r['impl']} {r['phase']} batch {r['batch']}: {r.get('message')}" for r in errs]
        lines.append("")
    lines += harness.acceptance_lines(verdict_list)
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--configs", type=harness.list_arg(list(CONFIGS), "config"), default=list(CONFIGS))
    p.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=list(BATCHES)
    )
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (128)")
    p.add_argument("--new", type=int, default=128, help="new tokens per request (128)")
    p.add_argument("--reps", type=int, default=5, help="timed rawformer calls (median)")
    p.add_argument("--hf-reps", type=int, default=3, help="timed HF calls (median)")
    p.add_argument("--check-tokens", type=int, default=8, help="greedy steps compared with HF")
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    p.add_argument("--no-hf", action="store_true", help="rawformer only")
    p.add_argument("--no-graphs", action="store_true", help="rawformer decode steps without CUDA graphs")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 rep, 32 new tokens, results into $OUT")
    p.add_argument("--out", metavar="DIR", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.reps, args.hf_reps, args.new = 1, 1, min(args.new, 32)
    if min(args.batches) < 1 or args.prompt < 1 or args.new < 2 or args.reps < 1 or args.hf_reps < 1:
        raise SystemExit("e2e.py: batches, --prompt, --reps, --hf-reps >= 1 and --new >= 2")
    cp = harness.require_gpu("e2e.py")
    device = harness.device_header(cp)
    clock = harness.CudaClock(cp)
    harness.log(f"{device['gpu']}: measuring the copy ceiling ...")
    ceiling = harness.measure_copy_ceiling(cp, clock)
    harness.log(f"  copy ceiling {ceiling['ceiling_gbps']:,.0f} GB/s")
    hf = None if args.no_hf else import_hf()
    results = []
    for name in args.configs:
        results.append(run_config(name, args, cp, hf, ceiling["ceiling_gbps"]))
        r = results[-1]
        harness.log(
            f"  {name}: roofline {r['roofline_tok_s']:,.0f} tok/s at batch 1 ({r['weight_bytes'] / 1e6:,.0f} "
            f"MB per step at {ceiling['ceiling_gbps']:,.0f} GB/s)"
        )
    verdict_list = verdicts(results)
    header = harness.run_header(
        device,
        copy_ceiling_gbps=ceiling["ceiling_gbps"],
        ceiling=ceiling,
        transformers=hf[1].__version__ if hf else None,
        workload={
            "prompt": args.prompt, "new": args.new, "batches": sorted(args.batches), "reps": args.reps,
            "hf_reps": args.hf_reps, "hf_attn": args.hf_attn, "no_graphs": args.no_graphs,
            "block_size": args.block_size, "seed": args.seed, "std": STD,
        },
        configs={k: dataclasses.asdict(CONFIGS[k]) for k in args.configs},
    )  # fmt: skip
    records = [dict(r, roofline_tok_s=res["roofline_tok_s"]) for res in results for r in res["records"]]
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = {res["config"]: {**res["checks"], "weight_bytes": res["weight_bytes"]} for res in results}
    harness.write_json(out_dir / "e2e.json", {**header, "checks": checks}, records)
    (out_dir / "e2e.md").write_text(markdown(header, results, verdict_list))
    print()
    for v in verdict_list:
        print(f"{v.status}: {v.text}")
    harness.log(f"wrote {out_dir / 'e2e.json'}, {out_dir / 'e2e.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
