"""Benchmark of rawformer's attention kernels: prefill (flash attention on tensor cores), decode over a paged
KV cache (flash-decoding), and the fused RoPE + KV-cache write.

    attention prefill      rf.attention (default kernel; "rf-v1" = the general SIMT kernel) against
                           torch's scaled_dot_product_attention with its flash backend ("torch-flash",
                           FlashAttention-2) and with torch's own backend choice ("torch"). Compute-bound:
                           TFLOP/s, and the fraction of cuBLAS's fp16 matmul rate measured in the same run.
    paged_attention decode rf.paged_attention over a paged cache with shuffled block tables (default: auto
                           split-KV; "rf-nosplit" = one pass; "rf-v1" = the SIMT kernel; "numba" = the Numba
                           kernel) against torch SDPA over a contiguous cache of the same contents.
                           Memory-bound: GB/s against the copy ceiling measured in the same run.
    rope_kv_write forward  rf.rope_kv_write against the obvious CuPy composition ("naive").

FLOPs of attention: 4 * batch * heads * seq_q * seq_k * head_dim (two matmuls), halved when causal (the
FlashAttention convention). Bytes of decode: K and V of every context token read once, q read and out
written once. Each implementation is checked against a float64 reference on a sample of query rows first;
a wrong one is not timed. Timing: CUDA events, median of --reps after a warm-up, inputs rotated over sets
larger than 4x L2 (bench/harness.py).

    python bench/attention.py                  full run -> bench/results/<gpu>/attention.{json,md} + plots
    python bench/attention.py --quick          one shape per part -> $OUT (or bench/out)
    python bench/attention.py --parts decode --impls rawformer,torch
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import Criterion

# name -> (batch, seq, heads, head_dim, causal): the prefill shapes, hidden size 2048
PREFILL_CONFIGS: dict[str, tuple[int, int, int, int, bool]] = {
    f"b{b}-s{s}-d{d}{'-causal' if c else ''}": (b, s, 2048 // d, d, c)
    for b, s in ((2, 8192), (16, 1024))
    for d in (64, 128)
    for c in (False, True)
}
# name -> (batch, context, q_heads, kv_heads, head_dim, block_size)
DECODE_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "b64-c4096-gqa8": (64, 4096, 32, 4, 128, 16),
    "b64-c4096-mha": (64, 4096, 32, 32, 128, 16),
    "b8-c32768-gqa8": (8, 32768, 32, 4, 128, 16),
    "b8-c32768-mha": (8, 32768, 32, 32, 128, 16),
}
# name -> (tokens, q_heads, kv_heads, head_dim, block_size)
ROPE_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "prefill-8k-llama8b": (8192, 32, 8, 128, 16),
    "decode-256-llama8b": (256, 32, 8, 128, 16),
}
QUICK = {"prefill": ["b16-s1024-d128-causal"], "decode": ["b64-c4096-gqa8"], "rope": ["prefill-8k-llama8b"]}
PARTS = ("prefill", "decode", "rope")
IMPLS = {
    "prefill": ("rawformer", "rf-v1", "torch-flash", "torch"),
    "decode": ("rawformer", "rf-nosplit", "rf-v1", "numba", "torch", "torch-flash"),
    "rope": ("rawformer", "naive"),
}
ALL_IMPLS = tuple(dict.fromkeys(i for part in PARTS for i in IMPLS[part]))
TOLERANCE = {"float16": 2e-3, "float32": 1e-5}  # the relative error bound vs float64
SAMPLE_ROWS = 48  # query positions per prefill check (first, last, spread)

ACCEPTANCE = [
    Criterion("attention", "prefill", "faster", 0.6, baseline="torch-flash"),
    Criterion("paged_attention", "decode", "ceiling_each", 0.70),
    Criterion("paged_attention", "decode", "faster", 1.0, baseline="torch"),
    Criterion("paged_attention", "decode", "faster", 1.0, baseline="torch-flash"),
]


# ---- float64 references on the device (a sample of query rows) ---------------------------------------------


def attention_rows_ref(cp: Any, q: Any, k: Any, v: Any, rows: np.ndarray, causal: bool, scale: float) -> Any:
    """out[:, rows] of softmax(scale q k^T) v in float64; q (B, Sq, H, D), k/v (B, Sk, Hkv, D) (BSHD).
    Causal is bottom-right aligned: query i sees keys j <= i + Sk - Sq."""
    batch, seq_q, heads, _ = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qs = q[:, rows].astype(cp.float64)  # (B, n, H, D)
    kk = cp.repeat(k.astype(cp.float64), group, axis=2)  # (B, Sk, H, D)
    vv = cp.repeat(v.astype(cp.float64), group, axis=2)
    s = cp.einsum("bnhd,bkhd->bhnk", qs, kk) * scale
    if causal:
        allowed = cp.arange(seq_k)[None, :] <= cp.asarray(rows)[:, None] + (seq_k - seq_q)
        s = cp.where(allowed[None, None], s, -cp.inf)
    s -= s.max(-1, keepdims=True)
    p = cp.exp(s)
    p /= p.sum(-1, keepdims=True)
    return cp.einsum("bhnk,bkhd->bnhd", p, vv)


def gather_cache(cp: Any, cache: Any, table: Any, context: int) -> Any:
    """The first `context` tokens of one sequence's paged cache as (context, kv_heads, head_dim)."""
    blocks = cache[table]  # (blocks, block_size, kv_heads, head_dim)
    return blocks.reshape(-1, *cache.shape[2:])[:context]


def decode_ref(cp: Any, a: dict, seqs: Sequence[int]) -> Any:
    """Float64 decode output (len(seqs), 1, heads, head_dim) for the chosen sequences."""
    outs = []
    for s in seqs:
        ctx = int(a["context"])
        k = gather_cache(cp, a["k_cache"], a["tables"][s], ctx)[None]
        v = gather_cache(cp, a["v_cache"], a["tables"][s], ctx)[None]
        outs.append(attention_rows_ref(cp, a["q"][s : s + 1], k, v, np.array([0]), False, a["scale"])[0])
    return cp.stack(outs)


def on_device(cp: Any, out: Any) -> Any:
    """A CuPy view of an output (torch's tensors arrive through DLPack; made contiguous first)."""
    if isinstance(out, cp.ndarray):
        return out
    return cp.from_dlpack(out.contiguous() if hasattr(out, "contiguous") else out)


def rel_err(cp: Any, out: Any, ref: Any) -> float:
    return harness.rel_error(out, ref)


# ---- input sets --------------------------------------------------------------------------------------------


def prefill_inputs(cp: Any, seed: int, batch: int, seq: int, heads: int, dim: int) -> dict:
    """q, k, v (B, S, H, D) float16 with unit-variance entries, carved out of one packed qkv buffer as a
    model's fused QKV projection produces them (views, last dim contiguous)."""
    rs = cp.random.RandomState(seed)
    qkv = rs.standard_normal((batch, seq, 3, heads, dim), dtype=cp.float32).astype(cp.float16)
    return {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2], "qkv": qkv}


def decode_inputs(
    cp: Any,
    seed: int,
    batch: int,
    ctx: int,
    heads: int,
    kv_heads: int,
    dim: int,
    bs: int,
    shuffle: bool = True,
) -> dict:
    """A paged cache holding `batch` sequences of `ctx` tokens in shuffled blocks, their block tables and
    context lengths, one new query token per sequence, and the same K/V laid out contiguously for torch.
    shuffle=False gives every sequence consecutive blocks (the cache is then one contiguous tensor)."""
    rs = cp.random.RandomState(seed)
    per_seq = -(-ctx // bs)
    num_blocks = batch * per_seq
    k_cache = rs.standard_normal((num_blocks, bs, kv_heads, dim), dtype=cp.float32).astype(cp.float16)
    v_cache = rs.standard_normal((num_blocks, bs, kv_heads, dim), dtype=cp.float32).astype(cp.float16)
    order = np.random.default_rng(seed).permutation(num_blocks) if shuffle else np.arange(num_blocks)
    tables = cp.asarray(order.astype(np.int32)).reshape(batch, per_seq)
    q = rs.standard_normal((batch, 1, heads, dim), dtype=cp.float32).astype(cp.float16)
    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "tables": tables,
        "context_lens": cp.full((batch,), ctx, dtype=cp.int32),
        "context": ctx,
        "scale": 1.0 / math.sqrt(dim),
    }


def contiguous_kv(cp: Any, a: dict) -> tuple[Any, Any]:
    """(B, ctx, kv_heads, D) copies of the paged K and V, in table order: torch's contiguous cache."""
    ctx = a["context"]
    k = a["k_cache"][a["tables"]].reshape(a["tables"].shape[0], -1, *a["k_cache"].shape[2:])[:, :ctx]
    v = a["v_cache"][a["tables"]].reshape(a["tables"].shape[0], -1, *a["v_cache"].shape[2:])[:, :ctx]
    return cp.ascontiguousarray(k), cp.ascontiguousarray(v)


def rope_inputs(cp: Any, seed: int, tokens: int, heads: int, kv_heads: int, dim: int, bs: int) -> dict:
    rs = cp.random.RandomState(seed)
    qkv = rs.standard_normal((tokens, heads + 2 * kv_heads, dim), dtype=cp.float32).astype(cp.float16)
    num_blocks = -(-tokens // bs) + 8
    slots = cp.asarray(np.random.default_rng(seed).permutation(num_blocks * bs)[:tokens].astype(np.int32))
    return {
        "q": qkv[:, :heads],
        "k": qkv[:, heads : heads + kv_heads],
        "v": qkv[:, heads + kv_heads :],
        "positions": cp.arange(tokens, dtype=cp.int32) + 37,
        "k_cache": cp.zeros((num_blocks, bs, kv_heads, dim), dtype=cp.float16),
        "v_cache": cp.zeros((num_blocks, bs, kv_heads, dim), dtype=cp.float16),
        "slots": slots,
    }


# ---- implementations: each returns a zero-argument call producing the output to check ----------------------


def _torch_sdpa(torch: Any, backend: str | None) -> Callable:
    """torch's SDPA on BSHD CuPy arrays shared through DLPack, as (B, H, S, D) views (what FA2 wants)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional

    def bind(q: Any, k: Any, v: Any, causal: bool, scale: float) -> Callable[[], Any]:
        tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
        gqa = tq.shape[1] != tk.shape[1]

        def call() -> Any:
            if backend is None:
                o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale, enable_gqa=gqa)
            else:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    o = F.scaled_dot_product_attention(
                        tq, tk, tv, is_causal=causal, scale=scale, enable_gqa=gqa
                    )
            return o.transpose(1, 2)  # back to BSHD for the check

        return call

    return bind


def prefill_call(impl: str, rf: Any, torch: Any, a: dict, causal: bool, scale: float) -> Callable[[], Any]:
    q, k, v = a["q"], a["k"], a["v"]
    if impl == "rawformer":
        return lambda: rf.attention(q, k, v, causal=causal, scale=scale)
    if impl == "rf-v1":
        return lambda: rf.attention(q, k, v, causal=causal, scale=scale, version=1)
    if impl in ("torch-flash", "torch"):
        if torch is None:
            raise RuntimeError("torch is not available")
        return _torch_sdpa(torch, "FLASH_ATTENTION" if impl == "torch-flash" else None)(
            q, k, v, causal, scale
        )
    raise ValueError(f"no prefill implementation {impl!r}")


def decode_call(impl: str, rf: Any, torch: Any, a: dict) -> Callable[[], Any]:
    args = (a["q"], a["k_cache"], a["v_cache"], a["tables"], a["context_lens"])
    scale = a["scale"]
    if impl == "rawformer":
        return lambda: rf.paged_attention(*args, scale=scale)
    if impl == "rf-nosplit":
        return lambda: rf.paged_attention(*args, scale=scale, num_splits=1)
    if impl == "rf-v1":
        return lambda: rf.paged_attention(*args, scale=scale, version=1)
    if impl == "numba":
        return lambda: rf.paged_attention(*args, scale=scale, impl="numba")
    if impl in ("torch", "torch-flash"):
        if torch is None:
            raise RuntimeError("torch is not available")
        k, v = a["contiguous"]
        return _torch_sdpa(torch, "FLASH_ATTENTION" if impl == "torch-flash" else None)(
            a["q"], k, v, False, scale
        )
    raise ValueError(f"no decode implementation {impl!r}")


def _neox_rotation(cp: Any, positions: Any, dim: int, base: float, dtype: Any) -> Callable[[Any], Any]:
    """x -> x rotated NeoX-style (halves) at `positions`, computed and returned in `dtype`."""
    inv_freq = base ** (-cp.arange(0, dim, 2, dtype=dtype) / dim)
    ang = positions.astype(dtype)[:, None] * inv_freq[None]
    cos, sin = cp.cos(ang)[:, None], cp.sin(ang)[:, None]

    def rot(x: Any) -> Any:
        x = x.astype(dtype)
        x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
        return cp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    return rot


def naive_rope_kv_write(cp: Any, a: dict, base: float = 10000.0) -> tuple[Any, Any]:
    """NeoX RoPE and the cache scatter as separate CuPy steps in float32."""
    q, k, v = a["q"], a["k"], a["v"]
    rot = _neox_rotation(cp, a["positions"], q.shape[-1], base, cp.float32)
    qr, kr = rot(q).astype(cp.float16), rot(k).astype(cp.float16)
    bs = a["k_cache"].shape[1]
    blocks, offs = a["slots"] // bs, a["slots"] % bs
    a["k_cache"][blocks, offs] = kr
    a["v_cache"][blocks, offs] = v
    return qr, kr


def rope_call(impl: str, rf: Any, cp: Any, a: dict) -> Callable[[], Any]:
    if impl == "rawformer":
        return lambda: rf.rope_kv_write(
            a["q"], a["k"], a["v"], a["positions"], a["k_cache"], a["v_cache"], a["slots"]
        )
    if impl == "naive":
        return lambda: naive_rope_kv_write(cp, a)
    raise ValueError(f"no rope implementation {impl!r}")


def rope_ref(cp: Any, a: dict, base: float = 10000.0) -> tuple[Any, Any]:
    """Float64 NeoX rotation of q and k."""
    rot = _neox_rotation(cp, a["positions"], a["q"].shape[-1], base, cp.float64)
    return rot(a["q"]), rot(a["k"])


# ---- measuring ---------------------------------------------------------------------------------------------


def _timed_record(calls: list[Callable], check: Callable[[Any], float], clock: Any, reps: int, warmup: int,
                  common: dict) -> dict:  # fmt: skip
    """Check the first call's output (relative error vs float64), then time all calls rotating."""
    tol = common["tolerance"]
    try:
        err = check(calls[0]())
    except Exception as exc:
        return harness.make_record(**common, status="error", message=harness.describe(exc))
    if not err <= tol:
        return harness.make_record(
            **common, status="wrong", max_error=err, message=f"max error {err:.2e} > {tol:g}: not timed"
        )
    try:
        timing = harness.time_calls(calls, clock, reps=reps, warmup=warmup)
    except Exception as exc:
        return harness.make_record(**common, status="error", max_error=err, message=harness.describe(exc))
    return harness.make_record(**common, timing=timing, max_error=err)


def bench_prefill(
    cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling, matmul_tflops
) -> list[dict]:
    batch, seq, heads, dim, causal = cfg
    scale = 1.0 / math.sqrt(dim)
    set_bytes = 3 * batch * seq * heads * dim * 2
    n_sets = harness.rotation_sets(set_bytes, l2)
    sets = [prefill_inputs(cp, 100 + i, batch, seq, heads, dim) for i in range(n_sets)]
    rows = np.unique(np.linspace(0, seq - 1, SAMPLE_ROWS).round().astype(np.int64))
    ref = attention_rows_ref(cp, sets[0]["q"], sets[0]["k"], sets[0]["v"], rows, causal, scale)
    flops = 4 * batch * heads * seq * seq * dim // (2 if causal else 1)
    nbytes = 4 * batch * seq * heads * dim * 2  # q, k, v read, out written
    records = []
    for impl in impls:
        common = dict(op="attention", direction="prefill", impl=impl, config=name,
                      shape=(batch, seq, heads, dim), dtype="float16", nbytes=nbytes, flops=flops,
                      ceiling_gbps=ceiling, tolerance=TOLERANCE["float16"], input_sets=n_sets)  # fmt: skip
        try:
            calls = [prefill_call(impl, rf, torch, a, causal, scale) for a in sets]
        except Exception as exc:
            rec = harness.make_record(**common, status="error", message=harness.describe(exc))
        else:
            rec = _timed_record(
                calls, lambda out: rel_err(cp, on_device(cp, out)[:, rows], ref), clock, reps, warmup, common
            )
        if rec.get("tflops"):
            rec["pct_ceiling"] = 100.0 * rec["tflops"] / matmul_tflops
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


def bench_decode(cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling) -> list[dict]:
    batch, ctx, heads, kv_heads, dim, bs = cfg
    kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
    nbytes = kv_bytes + 2 * batch * heads * dim * 2
    n_sets = harness.rotation_sets(kv_bytes, l2)
    sets = [decode_inputs(cp, 200 + i, batch, ctx, heads, kv_heads, dim, bs) for i in range(n_sets)]
    if any(i.startswith("torch") for i in impls) and torch is not None:
        for a in sets:
            a["contiguous"] = contiguous_kv(cp, a)
    check_seqs = sorted({0, batch // 2, batch - 1})
    ref = decode_ref(cp, sets[0], check_seqs)
    flops = 4 * batch * heads * ctx * dim
    records = []
    for impl in impls:
        common = dict(op="paged_attention", direction="decode", impl=impl, config=name,
                      shape=(batch, ctx, heads, kv_heads, dim), dtype="float16", nbytes=nbytes, flops=flops,
                      ceiling_gbps=ceiling, tolerance=TOLERANCE["float16"], input_sets=n_sets)  # fmt: skip
        try:
            calls = [decode_call(impl, rf, torch, a) for a in sets]
        except Exception as exc:
            rec = harness.make_record(**common, status="error", message=harness.describe(exc))
        else:
            rec = _timed_record(
                calls,
                lambda out: rel_err(cp, on_device(cp, out)[check_seqs], ref),
                clock,
                reps,
                warmup,
                common,
            )
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


def bench_rope(cp, rf, name, cfg, impls, clock, reps, warmup, l2, ceiling) -> list[dict]:
    tokens, heads, kv_heads, dim, bs = cfg
    # read q, k, v; write q_rot, k_rot and the k, v cache slots; positions and slots (4 bytes each)
    nbytes = (tokens * (heads + 2 * kv_heads) * dim + tokens * (heads + kv_heads) * dim) * 2
    nbytes += tokens * 2 * kv_heads * dim * 2 + 8 * tokens
    n_sets = harness.rotation_sets(nbytes, l2)
    sets = [rope_inputs(cp, 300 + i, tokens, heads, kv_heads, dim, bs) for i in range(n_sets)]
    ref_q, ref_k = rope_ref(cp, sets[0])
    a0 = sets[0]

    def check(out: Any) -> float:
        q_rot, k_rot = out
        bs_ = a0["k_cache"].shape[1]
        cached = a0["k_cache"][a0["slots"] // bs_, a0["slots"] % bs_]
        return max(rel_err(cp, q_rot, ref_q), rel_err(cp, k_rot, ref_k), rel_err(cp, cached, ref_k))

    records = []
    for impl in impls:
        common = dict(op="rope_kv_write", direction="forward", impl=impl, config=name,
                      shape=(tokens, heads, kv_heads, dim), dtype="float16", nbytes=nbytes,
                      flops=6 * tokens * (heads + kv_heads) * dim, ceiling_gbps=ceiling,
                      tolerance=1e-2, input_sets=n_sets)  # fmt: skip
        try:
            calls = [rope_call(impl, rf, cp, a) for a in sets]
        except Exception as exc:
            rec = harness.make_record(**common, status="error", message=harness.describe(exc))
        else:
            rec = _timed_record(calls, check, clock, reps, warmup, common)
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


# ---- the command -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/attention.py",
        description="Benchmark rawformer's attention kernels (prefill, paged decode, RoPE + KV write) "
        "against torch SDPA, cuBLAS's matmul rate and the copy ceiling measured in the same run. "
        "Needs a GPU and CuPy.",
    )
    p.add_argument("--quick", action="store_true", help="one shape per part, 20 reps, results to $OUT")
    p.add_argument(
        "--parts", type=harness.list_arg(PARTS, "part"), default=list(PARTS), help="prefill,decode,rope"
    )
    p.add_argument("--impls", type=harness.list_arg(ALL_IMPLS, "impl"), default=list(ALL_IMPLS))
    p.add_argument("--configs", help="comma list of config names (any part)")
    p.add_argument("--out", metavar="DIR", help="write the results here instead")
    p.add_argument(
        "--reps", type=int, help="timed calls per measurement (>= 20; default 30, 20 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="do not import torch; skip its columns")
    p.add_argument(
        "--from-json", metavar="FILE", help="no GPU: rebuild attention.md and the plots from a json"
    )
    return p


def write_results(header: dict, records: list[dict], out_dir: Path, json_too: bool = True) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    ops = {r["op"] for r in records}
    verdicts = harness.evaluate([c for c in ACCEPTANCE if c.op in ops], records)
    if json_too:
        harness.write_json(out_dir / "attention.json", header, records)
    title = f"rawformer attention kernels on {header.get('gpu', '?')}"
    extra = []
    if header.get("matmul_tflops"):
        extra.append(
            f"- compute ceiling (measured in this run): cuBLAS fp16 matmul {header['matmul_shape']} "
            f"{header['matmul_tflops']:.0f} TFLOP/s; prefill's '% compute ceiling' is against it"
        )
    md = harness.markdown_report(
        title, header, records, impls=ALL_IMPLS, main="rawformer", main_label="rf",
        ratios=("torch-flash", "torch", "naive"), verdicts=verdicts, metrics={"attention": "tflops"},
        extra_header=extra,
    )  # fmt: skip
    (out_dir / "attention.md").write_text(md)
    prefill = [r for r in records if r["op"] == "attention"]
    memory = [r for r in records if r["op"] != "attention"]
    plots = []
    if prefill and harness.write_plot(
        out_dir / "attention_prefill.png", title + ": prefill", prefill, IMPLS["prefill"], None,
        metric="tflops", ylabel="TFLOP/s",
    ):  # fmt: skip
        plots.append("attention_prefill.png")
    impls = tuple(dict.fromkeys((*IMPLS["decode"], *IMPLS["rope"])))
    if memory and harness.write_plot(
        out_dir / "attention_decode.png", title + ": decode and KV write", memory, impls,
        header.get("ceiling_gbps"),
    ):  # fmt: skip
        plots.append("attention_decode.png")
    harness.log("\nACCEPTANCE")
    for v in verdicts:
        harness.log(f"  {v.status}  {v.text}")
    harness.log(
        f"\nwrote {', '.join(['attention.json'] * json_too + ['attention.md', *plots])} into {out_dir}"
    )
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        header, records = harness.read_json(Path(args.from_json))
        write_results(header, records, Path(args.out or Path(args.from_json).parent), json_too=bool(args.out))
        return 0
    if args.reps is not None and args.reps < harness.MIN_REPS:
        raise SystemExit(f"--reps must be >= {harness.MIN_REPS}")
    cp = harness.require_gpu("bench/attention.py")
    reps = args.reps or (harness.MIN_REPS if args.quick else 30)
    chosen = set(args.configs.split(",")) if args.configs else None
    every = {**PREFILL_CONFIGS, **DECODE_CONFIGS, **ROPE_CONFIGS}
    if chosen and chosen - set(every):
        raise SystemExit(f"unknown configs {sorted(chosen - set(every))}; choose from {', '.join(every)}")

    def pick(part: str, table: dict) -> dict:
        if part not in args.parts:
            return {}
        names = [n for n in table if (chosen is None or n in chosen) and (not args.quick or n in QUICK[part])]
        return {n: table[n] for n in names}

    import rawformer as rf

    torch = None if args.no_torch else harness.import_torch(cp)
    impls = {p: [i for i in IMPLS[p] if i in args.impls and not (i.startswith("torch") and torch is None)]
             for p in PARTS}  # fmt: skip
    clock = harness.CudaClock(cp)
    device = harness.device_header(cp)
    l2 = device["l2_bytes"]

    def free() -> None:
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()

    harness.log(
        f"{device['gpu']}: {device['multiprocessors']} SMs, L2 {l2 / 2**20:.0f} MiB; median of {reps}"
    )
    ceiling = harness.measure_copy_ceiling(cp, clock)
    free()
    matmul = harness.measure_matmul_ceiling(cp, clock)
    free()
    harness.log(
        f"copy ceiling {ceiling['ceiling_gbps']:.0f} GB/s; "
        f"cuBLAS fp16 matmul {matmul['matmul_tflops']:.0f} TFLOP/s"
    )
    records: list[dict] = []
    for name, cfg in pick("prefill", PREFILL_CONFIGS).items():
        records += bench_prefill(cp, rf, torch, name, cfg, impls["prefill"], clock, reps, args.warmup, l2,
                                 ceiling["ceiling_gbps"], matmul["matmul_tflops"])  # fmt: skip
        free()
    for name, cfg in pick("decode", DECODE_CONFIGS).items():
        records += bench_decode(cp, rf, torch, name, cfg, impls["decode"], clock, reps, args.warmup, l2,
                                ceiling["ceiling_gbps"])  # fmt: skip
        free()
    for name, cfg in pick("rope", ROPE_CONFIGS).items():
        records += bench_rope(
            cp, rf, name, cfg, impls["rope"], clock, reps, args.warmup, l2, ceiling["ceiling_gbps"]
        )
        free()
    header = harness.run_header(device, **ceiling, **matmul, reps=reps, warmup=args.warmup, quick=args.quick)
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    write_results(header, records, out_dir)
    names = ("attention.json", "attention.md", "attention_prefill.png", "attention_decode.png")
    harness.copy_to_out(out_dir, names, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
