"""Weight-only INT8: the GEMV kernel against the copy ceiling and cuBLAS fp16, then end-to-end decode.

    python bench/quant.py                      -> bench/results/<gpu>/quant.{json,md}
    python bench/quant.py --quick              -> $OUT (or bench/out): fewer reps, no token sweep
    python bench/quant.py --no-e2e --tokens 1,2,4,8,16,64

Kernel level, per (K, N) of CONFIGS (a linear layer x (M, K) @ W (K, N), fp16 activations), batch M = 1:
- rawformer: rf.int8_linear, per-output-channel scales, the default GEMV version; v1 / v2 / v3: each
  version; g128: group-wise scales (group 128), default version;
- cublas_fp16: cupy.matmul(x, W) with the fp16 W (what cuBLAS does for a GEMV of this shape);
- rf_fp16: rawformer's own fp16 GEMV (rf.linear, rawformer/ops/linear.py) when it exists, on the models'
  layout (nn.Linear's (N, K) contiguous, passed transposed: its gemv_nk kernel);
- chain / rf_fp16_chain (batch 1, not judged): rawformer / rf_fp16 called once on each rotation set, all
  captured in one CUDA graph (PDL between the launches, as in a decode step's graph): what a projection
  costs inside a decode step rather than alone between two events (launch and ramp overlapped).
GB/s count what must move: int8 values (row padding included) + fp16 scales + x + y for INT8; 2 bytes per
weight + x + y for fp16. Every implementation is checked against a float64 reference (on a sample of
output channels) before it is timed; inputs rotate over copies larger than 4x L2 (cold weights).
`--tokens` adds batches M > 1 (gemv and gemm paths of rf.int8_linear, cuBLAS fp16) for placing
GEMV_PATH_MAX_ROWS (rawformer/ops/quant.py); only M = 1 is judged.

End to end (bench/e2e.py's llama-1b config and helpers, random fp16 weights, prompt 128, 128 new tokens,
batch 1, Generator with CUDA graphs): fp16, then the same model quantized in place ("int8", "int8-g128");
decode-only tokens/s (decode steps / their time) and each one's weight-streaming roofline; then each step is
split into its projections (the step's qkv / o / gate-up SwiGLU / down / lm-head launches alone in one CUDA
graph, PDL as in the decode graph) and the rest (step - projections: attention, norms, RoPE, KV writes,
sampling, host time), and the report says what the INT8 projections would have to take for 1.5x with that
rest (`gap_lines`).

Acceptance (issue 9): INT8 GEMV at batch 1 >= 80% of the copy ceiling on every shape, and >= 1.6x the
cuBLAS fp16 time on every shape; end-to-end batch-1 decode INT8 >= 1.5x FP16 tokens/s. The e2e ratio also
depends on how close the fp16 decode is to its own roofline (host overheads outside the graph): both the
kernel-level and the e2e ratios are printed.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np

CONFIGS: dict[str, tuple[int, int, str]] = {  # name -> (K, N, what)
    "4096x4096": (4096, 4096, "Llama-2-7B q/k/v/o projection"),
    "4096x11008": (4096, 11008, "Llama-2-7B gate/up projection"),
    "11008x4096": (11008, 4096, "Llama-2-7B down projection"),
    "8192x28672": (8192, 28672, "Llama-3-70B gate/up projection"),
    "28672x8192": (28672, 8192, "Llama-3-70B down projection"),
}
QUICK_CONFIGS = ("4096x4096", "11008x4096")
IMPLS = (
    "rawformer", "v1", "v2", "v3", "g128", "gemv_path", "gemm_path", "cublas_fp16", "rf_fp16", "chain",
    "rf_fp16_chain", "copy_same_bytes",
)  # fmt: skip
ACCEPT_CEILING = 0.80
ACCEPT_VS_CUBLAS = 1.6
ACCEPT_E2E = 1.5
E2E_CONFIG = "llama-1b"
OP = "int8_gemv"
ACCEPTANCE = [
    harness.Criterion(OP, "b1", "ceiling_each", ACCEPT_CEILING),
    harness.Criterion(OP, "b1", "faster", ACCEPT_VS_CUBLAS, baseline="cublas_fp16"),
]
TOLERANCE = 4e-3  # fp16 output of an fp32 sum: max |out - ref| / max |ref|


# ---- kernel level ----------------------------------------------------------------------------------------


class Case:
    """One (K, N): rotation sets of fp16 weights, their INT8 forms, x, and the checked reference."""

    def __init__(self, cp: Any, rf: Any, k: int, n: int, m: int, l2_bytes: int, seed: int) -> None:
        from rawformer.ops.quant import QuantizedWeight, dequantize_int8

        self.cp, self.k, self.n, self.m, self.l2_bytes = cp, k, n, m, l2_bytes
        rs = cp.random.RandomState(seed)
        w = (rs.standard_normal((k, n), dtype=cp.float32) * 0.02).astype(cp.float16)
        self.x = rs.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        self.q = {g: rf.quantize_int8(w, group_size=g) for g in (None, 128)}
        sets = harness.rotation_sets(2 * k * n, l2_bytes)  # the fp16 matrix is the larger one
        self.w16 = [w] + [w.copy() for _ in range(sets - 1)]
        self.q_sets = {
            g: [qw] + [QuantizedWeight(qw.q.copy(), qw.scales.copy(), k, g) for _ in range(sets - 1)]
            for g, qw in self.q.items()
        }
        self.sets = sets
        # the reference on a sample of output channels (float64, host)
        self.cols = harness.sample_rows(n, k, budget=1 << 22)
        self.x64 = cp.asnumpy(self.x).astype(np.float64)
        self.ref = {}
        for g, qw in self.q.items():
            sub = QuantizedWeight(qw.q[cp.asarray(self.cols)], qw.scales[cp.asarray(self.cols)], k, g)
            self.ref[g] = self.x64 @ cp.asnumpy(dequantize_int8(sub, np.float64))
        self.ref16 = self.x64 @ cp.asnumpy(w[:, cp.asarray(self.cols)]).astype(np.float64)

    def error(self, y: Any, ref: np.ndarray) -> float:
        return harness.rel_error(self.cp.asnumpy(y)[:, self.cols].astype(np.float64), ref)

    def int8_bytes(self, g: int | None) -> int:
        return self.q[g].nbytes + 2 * self.m * (self.k + self.n)

    def fp16_bytes(self) -> int:
        return 2 * self.k * self.n + 2 * self.m * (self.k + self.n)


def measure(
    name: str, impl: str, direction: str, case: Case, calls: list[Callable[[], Any]], ref: np.ndarray,
    nbytes: int, clock: Any, reps: int, ceiling: float,
) -> dict:  # fmt: skip
    args = dict(
        op=OP, direction=direction, impl=impl, config=name, shape=(case.k, case.n), dtype="float16",
        nbytes=nbytes, flops=2 * case.m * case.k * case.n, ceiling_gbps=ceiling, tolerance=TOLERANCE,
        input_sets=len(calls),
    )  # fmt: skip
    try:
        err = case.error(calls[0](), ref)
    except Exception as exc:
        rec = harness.make_record(**args, status="error", message=harness.describe(exc))
        harness.log(harness.format_line(rec))
        return rec
    if not err <= TOLERANCE:
        rec = harness.make_record(**args, status="wrong", max_error=err, message=f"max error {err:.2e}")
    else:
        try:
            timing = harness.time_calls(calls, clock, reps=reps)
            rec = harness.make_record(**args, timing=timing, max_error=err)
        except Exception as exc:
            rec = harness.make_record(**args, status="error", max_error=err, message=harness.describe(exc))
    harness.log(harness.format_line(rec))
    return rec


def bench_shape(
    name: str, k: int, n: int, tokens: Sequence[int], cp: Any, rf: Any, clock: Any, reps: int,
    ceiling: float, l2_bytes: int, rf_linear: Any,
) -> list[dict]:  # fmt: skip
    """Every implementation on one (K, N), for each batch size M in `tokens`."""
    records = []
    for m in tokens:
        case = Case(cp, rf, k, n, m, l2_bytes, seed=17 + m)
        records += bench_case(name, case, cp, rf, clock, reps, ceiling, rf_linear)
        del case
        cp.get_default_memory_pool().free_all_blocks()
    return records


def bench_case(
    name: str, case: Case, cp: Any, rf: Any, clock: Any, reps: int, ceiling: float, rf_linear: Any
) -> list[dict]:
    from rawformer.ops import quant

    direction = f"b{case.m}"
    qs, ws, x = case.q_sets, case.w16, case.x
    records = []

    def run(impl: str, calls: list, ref: np.ndarray, nbytes: int) -> None:
        records.append(measure(name, impl, direction, case, calls, ref, nbytes, clock, reps, ceiling))

    def int8_calls(group: int | None, **kw: Any) -> list[Callable[[], Any]]:
        return [functools.partial(rf.int8_linear, x, q, **kw) for q in qs[group]]

    run("rawformer", int8_calls(None), case.ref[None], case.int8_bytes(None))
    if case.m <= quant.GEMV_MAX_TOKENS:
        for v in quant.GEMV_VERSIONS:
            run(f"v{v}", int8_calls(None, path="gemv", version=v), case.ref[None], case.int8_bytes(None))
    else:  # the default picks one of the two: time both to place GEMV_PATH_MAX_ROWS
        run("gemv_path", int8_calls(None, path="gemv"), case.ref[None], case.int8_bytes(None))
    run("gemm_path", int8_calls(None, path="gemm"), case.ref[None], case.int8_bytes(None))
    run("g128", int8_calls(128), case.ref[128], case.int8_bytes(128))
    run("cublas_fp16", [functools.partial(cp.matmul, x, w) for w in ws], case.ref16, case.fp16_bytes())
    if rf_linear is not None:  # the models' layout: W^T (N, K) contiguous, passed as its (K, N) view
        ws = [cp.ascontiguousarray(w.T).T for w in ws]
        run("rf_fp16", [functools.partial(rf_linear, x, w) for w in ws], case.ref16, case.fp16_bytes())
    if case.m == 1:
        records.append(same_size_copy(name, case, cp, clock, reps, ceiling))
    if case.m == 1:  # inside a graph, back to back (nbytes: the whole chain's)
        chain = [functools.partial(rf.int8_linear, x, q) for q in qs[None]]
        run("chain", graph_call(cp, chain), case.ref[None], case.int8_bytes(None) * len(chain))
        if rf_linear is not None:
            chain16 = [functools.partial(rf_linear, x, w) for w in ws]
            run("rf_fp16_chain", graph_call(cp, chain16), case.ref16, case.fp16_bytes() * len(chain16))
    return records


def same_size_copy(name: str, case: Case, cp: Any, clock: Any, reps: int, ceiling: float) -> dict:
    """cudaMemcpyAsync moving the INT8 GEMV's bytes (half read, half written), timed like the kernels: what
    the copy that defines the ceiling reaches at this size, fixed per-launch costs included (the ceiling
    itself is measured on 1 GiB, where they vanish). Not an acceptance baseline: context for small shapes."""
    half = case.int8_bytes(None) // 32 * 16
    sets = harness.rotation_sets(2 * half, case.l2_bytes)
    rs = cp.random.RandomState(5)
    bufs = [(rs.randint(0, 256, half, dtype=cp.uint8), cp.zeros(half, dtype=cp.uint8)) for _ in range(sets)]
    calls = [functools.partial(d.data.copy_from_device_async, s.data, half) for s, d in bufs]
    calls[0]()
    src, dst = bufs[0]
    ok = bool((src == dst).all())  # the copy is checked like the kernels (bytes equal: error 0)
    rec = harness.make_record(
        op=OP, direction=f"b{case.m}", impl="copy_same_bytes", config=name, shape=(case.k, case.n),
        dtype="float16", nbytes=2 * half, flops=0, ceiling_gbps=ceiling, input_sets=sets,  # the case's row
        max_error=0.0 if ok else 1.0, status="ok" if ok else "wrong",
        timing=harness.time_calls(calls, clock, reps=reps) if ok else None,
    )  # fmt: skip
    harness.log(harness.format_line(rec))
    return rec


def graph_call(cp: Any, calls: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
    """[one callable that replays `calls` captured in one CUDA graph on the current stream, returning the
    first call's output]; calls that cannot be captured raise here (measure() records the error)."""
    from rawformer.kernels import gemm

    try:
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            gemm.prepare()
            for c in calls:  # compile outside the capture
                c()
            stream.synchronize()
            stream.begin_capture()
            try:
                outs = [c() for c in calls]
            finally:
                graph = stream.end_capture()
    except Exception as exc:  # recorded as this implementation's error by measure()
        message = harness.describe(exc)

        def failed() -> Any:
            raise RuntimeError(f"CUDA graph capture failed: {message}")

        return [failed]

    def replay() -> Any:
        graph.launch(cp.cuda.get_current_stream())
        return outs[0]

    return [replay]


# ---- end to end ------------------------------------------------------------------------------------------


def e2e_decode(cp: Any, args: argparse.Namespace, ceiling: float) -> dict:
    """Batch-1 decode of bench/e2e.py's llama-1b: fp16, then the model quantized ("int8", "int8-g128")."""
    import e2e
    from rawformer.models import build_model, module_for
    from rawformer.models.common import random_weights
    from rawformer.models.quantize import quantize_model, quantized_bytes

    cfg = e2e.CONFIGS[E2E_CONFIG]
    fp16_bytes = e2e.weight_bytes_per_token(cfg, 2)
    prompt = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (1, args.prompt))
    out: dict[str, Any] = {"config": E2E_CONFIG, "prompt": args.prompt, "new": args.new, "runs": {}}
    first_tokens = None
    for mode in ("fp16", "int8", "int8-g128"):
        weights = random_weights(module_for(cfg).weight_shapes(cfg), args.seed, np.float16, cp, e2e.STD)
        model = build_model(cfg, weights, cp)
        del weights
        wbytes = fp16_bytes
        if mode != "fp16":
            quantize_model(model, mode)
            q_bytes, q_fp16 = quantized_bytes(model)
            wbytes = fp16_bytes - q_fp16 + q_bytes
        cp.get_default_memory_pool().free_all_blocks()
        try:
            rec = e2e_one(cp, model, mode, wbytes, prompt, args, ceiling)
            first_tokens = rec["first_tokens"] if first_tokens is None else first_tokens
            agree = np.ravel(rec["first_tokens"]) != np.ravel(first_tokens)
            rec["greedy_agree_steps"] = int(np.argmax(np.r_[agree, True]))
            rec.update(step_split(cp, model, rec, wbytes, ceiling))
        except Exception as exc:
            rec = {"mode": mode, "status": "error", "message": harness.describe(exc)}
            harness.log(f"  e2e {mode}: ERROR {rec['message']}")
        out["runs"][mode] = rec
        del model
        cp.get_default_memory_pool().free_all_blocks()
    return out


def e2e_one(
    cp: Any, model: Any, mode: str, wbytes: int, prompt: np.ndarray, args: argparse.Namespace, ceiling: float
) -> dict:
    """Decode-only and end-to-end tokens/s of one model (Generator, CUDA graphs unless --no-graphs)."""
    import e2e

    from rawformer.memory import KVArena, KVPool
    from rawformer.runtime import Generator

    max_len = args.prompt + args.new
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, args.block_size,
        num_blocks=math.ceil(max_len / args.block_size) + 8, xp=cp,
    )  # fmt: skip
    pool = KVPool(arena, max_seq_len=max_len, prefix_caching=False)
    gen = Generator(model, pool, max_batch=1, use_graphs=not args.no_graphs)
    try:
        tokens = np.array(gen.generate(prompt, 8, ignore_eos=True).token_ids)
        times = e2e.wall(cp, lambda: gen.generate(prompt, args.new, ignore_eos=True), args.e2e_reps)
        st = gen.last_stats
    finally:
        if gen.graphs is not None:
            gen.graphs.clear()
    decode_only = (args.new - 1) / st["decode_s"] if st["decode_s"] > 0 else None
    rec = {
        "mode": mode, "weight_bytes": wbytes, "roofline_tok_s": ceiling * 1e9 / wbytes,
        "tok_s": args.new / float(np.median(times)), "decode_only_tok_s": decode_only,
        "graphs": st.get("graphs"), "first_tokens": tokens.tolist(),
    }  # fmt: skip
    pct = 100 * decode_only / rec["roofline_tok_s"] if decode_only else float("nan")
    harness.log(
        f"  e2e {mode:<9}: {rec['tok_s']:8,.0f} tok/s end to end, decode-only {decode_only or 0:8,.0f} tok/s "
        f"({pct:.1f}% of its roofline {rec['roofline_tok_s']:,.0f}; {wbytes / 1e6:,.0f} MB/token)"
    )
    return rec


def projection_calls(cp: Any, model: Any) -> list[Callable[[], Any]]:
    """One decode step's projections of a Llama model at batch 1, as models/llama.py calls them (per block:
    the norm + fused qkv, o, the norm + gate/up SwiGLU pair, down; the final norm + lm head; the norms in
    the GEMVs' prologues, models/common.norm_linear), on random fp16 inputs of the right widths."""
    from rawformer.models.common import linear, norm_linear

    inputs: dict[int, Any] = {}

    def x_for(k: int, seed: int = 0) -> Any:
        if (k, seed) not in inputs:
            rs = cp.random.RandomState(k + seed)
            inputs[k, seed] = rs.standard_normal((1, k), dtype=cp.float32).astype(cp.float16)
        return inputs[k, seed]

    eps = model.config.rms_norm_eps
    calls = []
    for blk in model.blocks:
        h = blk.ln_1.shape[0]
        a, x = x_for(h, 1), x_for(h)
        calls.append(functools.partial(norm_linear, a, x, blk.ln_1, eps, blk.w_qkv, blk.b_qkv))
        calls.append(functools.partial(linear, x_for(blk.w_o.shape[0]), blk.w_o, blk.b_o))
        calls.append(
            functools.partial(norm_linear, a, x, blk.ln_2, eps, blk.w_gate, blk.b_gate, blk.w_up, blk.b_up)
        )
        calls.append(functools.partial(linear, x_for(blk.w_down.shape[0]), blk.w_down, blk.b_down))
    h = model.norm.shape[0]
    calls.append(functools.partial(norm_linear, x_for(h, 1), x_for(h), model.norm, eps, model.lm_head.T))
    return calls


def gemv_step_ms(cp: Any, model: Any, reps: int = 20) -> float:
    """Milliseconds of one decode step's projections alone: projection_calls captured in one CUDA graph
    (the launches the decode graph holds, PDL included, nothing else), median of `reps` replays."""
    return harness.captured_ms(cp, projection_calls(cp, model), reps)


def step_split(cp: Any, model: Any, rec: dict, wbytes: int, ceiling: float) -> dict:
    """The decode step split into its projections (gemv_step_ms, their RMSNorms in the GEMVs' prologues
    included) and the rest (step - projections: attention, RoPE, KV writes, embedding, sampling, graph
    launch and host time per token)."""
    step = 1e3 / rec["decode_only_tok_s"] if rec.get("decode_only_tok_s") else None
    gemv = gemv_step_ms(cp, model)
    out = {
        "step_ms": step,
        "gemv_ms": gemv,
        "gemv_gbps": wbytes / gemv / 1e6,
        "roofline_ms": wbytes / ceiling / 1e6,
    }
    out["rest_ms"] = step - gemv if step is not None else None
    harness.log(
        f"  e2e {rec['mode']:<9}: step {step or 0:.3f} ms = projections {gemv:.3f} ms "
        f"({out['gemv_gbps']:,.0f} GB/s; {out['roofline_ms']:.3f} ms at the copy ceiling) + rest "
        f"{out['rest_ms'] or 0:.3f} ms"
    )
    return out


def gap_lines(e2e_result: dict) -> list[str]:
    """The 1.5x target in numbers: what the INT8 projections would have to take with the rest unchanged."""
    runs = e2e_result["runs"]
    base = runs.get("fp16", {})
    if base.get("step_ms") is None or base.get("gemv_ms") is None:
        return []
    lines = [
        f"- fp16 step {base['step_ms']:.3f} ms = projections {base['gemv_ms']:.3f} ms + rest "
        f"{base['rest_ms']:.3f} ms ({100 * base['rest_ms'] / base['step_ms']:.0f}% of the step)"
    ]
    target = base["step_ms"] / ACCEPT_E2E
    for mode in ("int8", "int8-g128"):
        r = runs.get(mode, {})
        if r.get("step_ms") is None or r.get("gemv_ms") is None:
            continue
        need = target - r["rest_ms"]
        lines.append(
            f"- {mode} step {r['step_ms']:.3f} ms = projections {r['gemv_ms']:.3f} ms + rest "
            f"{r['rest_ms']:.3f} ms; "
            f"{ACCEPT_E2E:g}x fp16 needs a {target:.3f} ms step: with this rest, projections of "
            + (
                f"{need:.3f} ms ({r['weight_bytes'] / need / 1e6:,.0f} GB/s; at the copy ceiling they take "
                f"{r['roofline_ms']:.3f} ms)"
                if need > 0
                else f"{need:.3f} ms: impossible, the rest alone exceeds the target"
            )
        )
    return lines


def e2e_verdicts(e2e_result: dict | None) -> list[harness.Verdict]:
    what = f"{E2E_CONFIG} batch-1 decode: INT8 >= {ACCEPT_E2E:g}x FP16 tokens/s (decode-only)"
    if e2e_result is None:
        return [harness.Verdict("SKIP", f"{what}: not run (--no-e2e)")]
    runs = e2e_result["runs"]
    base = runs.get("fp16", {}).get("decode_only_tok_s")
    out = []
    for mode in ("int8", "int8-g128"):
        mine = runs.get(mode, {}).get("decode_only_tok_s")
        if not base or not mine:
            out.append(harness.Verdict("FAIL", f"{what} [{mode}]: no measurement"))
            continue
        r = mine / base
        out.append(
            harness.Verdict(
                "PASS" if r >= ACCEPT_E2E else "FAIL",
                f"{what} [{mode}]: {r:.2f}x ({mine:,.0f} vs {base:,.0f} tok/s; end to end "
                f"{runs[mode]['tok_s']:,.0f} vs {runs['fp16']['tok_s']:,.0f})",
            )
        )
    return out


def kernel_ratio_lines(records: list[dict]) -> list[str]:
    """Per shape at batch 1: INT8 / cuBLAS fp16 time ratio, INT8 / rf fp16 (if measured)."""
    by = {}
    for r in records:
        if r["direction"] == "b1" and r["status"] == "ok":
            by.setdefault(r["config"], {})[r["impl"]] = r["ms"]
    lines = []
    for cfg, t in by.items():
        parts = [
            f"{b} / INT8 = {t[b] / t['rawformer']:.2f}x"
            for b in ("cublas_fp16", "rf_fp16")
            if b in t and "rawformer" in t
        ]
        lines.append(f"- {cfg}: " + ", ".join(parts))
    return lines


# ---- the command -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/quant.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK_CONFIGS)}, 20 reps")
    p.add_argument("--configs", type=harness.list_arg(tuple(CONFIGS), "config"))
    p.add_argument(
        "--tokens", default="1", help="comma list of batch sizes M (default 1; e.g. 1,2,4,8,16,64)"
    )
    p.add_argument("--reps", type=int, default=None, help="timed calls (>= 20; default 30, 20 with --quick)")
    p.add_argument("--no-e2e", action="store_true", help="kernel level only")
    p.add_argument("--no-graphs", action="store_true", help="e2e without CUDA graphs")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--e2e-reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write the results here instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
    if not tokens or min(tokens) < 1:
        raise SystemExit("--tokens: positive integers")
    reps = max(harness.MIN_REPS, args.reps or (harness.MIN_REPS if args.quick else 30))
    if args.quick:
        args.new, args.e2e_reps = min(args.new, 64), min(args.e2e_reps, 3)
    cp = harness.require_gpu("bench/quant.py")
    import rawformer as rf

    try:
        from rawformer.ops.linear import linear as rf_linear
    except ImportError:
        rf_linear = None
    names = args.configs or (list(QUICK_CONFIGS) if args.quick else list(CONFIGS))
    clock = harness.CudaClock(cp)
    device = harness.device_header(cp)
    harness.log(f"{device['gpu']}: {device['multiprocessors']} SMs, L2 {device['l2_bytes'] / 2**20:.0f} MiB")
    ceiling = harness.measure_copy_ceiling(cp, clock)
    cp.get_default_memory_pool().free_all_blocks()
    harness.log(f"copy ceiling {ceiling['ceiling_gbps']:.0f} GB/s (bytes read + written)")
    records: list[dict] = []
    for name in names:
        k, n, _ = CONFIGS[name]
        try:
            records += bench_shape(
                name,
                k,
                n,
                tokens,
                cp,
                rf,
                clock,
                reps,
                ceiling["ceiling_gbps"],
                device["l2_bytes"],
                rf_linear,
            )
        except Exception as exc:  # setting up (out of memory, ...): recorded, the rest goes on
            harness.log(f"{name}: setup failed: {harness.describe(exc)}")
            records.append(
                harness.make_record(
                    op=OP,
                    direction="b1",
                    impl="rawformer",
                    config=name,
                    shape=(k, n),
                    dtype="float16",
                    nbytes=k * n,
                    flops=2 * k * n,
                    ceiling_gbps=ceiling["ceiling_gbps"],
                    status="error",
                    message=f"setup failed: {harness.describe(exc)}",
                )  # fmt: skip
            )
        cp.get_default_memory_pool().free_all_blocks()
    e2e_result = None if args.no_e2e else e2e_decode(cp, args, ceiling["ceiling_gbps"])
    verdicts = harness.evaluate(ACCEPTANCE, records) + e2e_verdicts(e2e_result)
    header = harness.run_header(device, **ceiling, reps=reps, quick=args.quick, tokens=tokens)
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    write_results(header, records, e2e_result, verdicts, out_dir)
    harness.copy_to_out(out_dir, ("quant.json", "quant.md"), args.quick, args.out)
    return 0


def write_results(
    header: dict, records: list[dict], e2e_result: dict | None, verdicts: list, out_dir: Path
) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / "quant.json", {**header, "e2e": e2e_result}, records)
    extra = [
        "- INT8 bytes: int8 values (rows padded to 16) + fp16 scales + x + y; fp16: 2 bytes per weight + x "
        "+ y",
        "- impls: rawformer = rf.int8_linear per-channel, default path and version; v1-v3 = GEMV versions; "
        "g128 = group-wise; gemv_path / gemm_path = forced paths; cublas_fp16 = cupy.matmul; rf_fp16 = "
        "rf.linear; chain / rf_fp16_chain = every rotation set's GEMV back to back in one CUDA graph (as "
        "in a decode step; GB/s over the whole chain); copy_same_bytes = cudaMemcpyAsync moving the INT8 "
        "GEMV's bytes (half read, half written): the copy at this size, per-launch costs included",
    ]
    md = harness.markdown_report(
        f"Weight-only INT8 GEMV on {header.get('gpu', '?')}", header, records, impls=IMPLS, main="rawformer",
        main_label="int8", ratios=("cublas_fp16", "rf_fp16"), verdicts=(), extra_header=extra,
        configs={k: f"K={v[0]}, N={v[1]}: {v[2]}" for k, v in CONFIGS.items()},
    )  # fmt: skip
    lines = [md.rstrip("\n"), "", "## Kernel-level ratios at batch 1", "", *kernel_ratio_lines(records), ""]
    if e2e_result is not None:
        lines += [
            f"## End to end: {E2E_CONFIG} batch-1 decode",
            "",
            "| mode | MB streamed / token | roofline tok/s | decode-only tok/s | % of roofline | "
            "end-to-end tok/s | greedy tokens equal to fp16 | step ms | projections ms (GB/s) | rest ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, r in e2e_result["runs"].items():
            if "decode_only_tok_s" not in r:
                lines.append(f"| {mode} | error: {r.get('message')} | | | | | | | | |")
                continue
            d = r["decode_only_tok_s"] or 0
            split = "| | | |"
            if r.get("gemv_ms") is not None:
                split = (
                    f"| {r['step_ms'] or 0:.3f} | {r['gemv_ms']:.3f} ({r['gemv_gbps']:,.0f}) | "
                    f"{r['rest_ms'] or 0:.3f} |"
                )
            lines.append(
                f"| {mode} | {r['weight_bytes'] / 1e6:,.0f} | {r['roofline_tok_s']:,.0f} | {d:,.0f} | "
                f"{100 * d / r['roofline_tok_s']:.1f}% | {r['tok_s']:,.0f} | {r['greedy_agree_steps']} of "
                f"{len(r['first_tokens'][0])} {split}"
            )
        lines += [
            "",
            "step = 1 / decode-only tok/s; projections = the step's qkv, o, gate/up (SwiGLU), down and "
            "lm-head launches alone, captured in one CUDA graph (PDL as in the decode graph); rest = step - "
            "projections (attention, norms, RoPE, KV writes, embedding, sampling, launch and host time).",
            "",
            *gap_lines(e2e_result),
            "",
        ]
    lines += harness.acceptance_lines(verdicts)
    (out_dir / "quant.md").write_text("\n".join(lines) + "\n")
    harness.log("\nACCEPTANCE")
    for v in verdicts:
        harness.log(f"  {v.status}  {v.text}")
    harness.log(f"\nwrote quant.json, quant.md into {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
