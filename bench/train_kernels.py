"""Benchmark of rawformer's training kernels against torch, with the ceilings measured in the same run.

    attention backward   rf.attention_backward (default: tensor-core v4 = 8 warps, 128 keys per block,
                         vector dQ reductions; "rf-v2" = 4 warps, 64 keys per block; "rf-v3" = v2 with
                         half the query rows per tile; "rf-v1" = SIMT) against
                         torch SDPA's flash backend backward ("torch-flash", FlashAttention-2), timed as
                         torch.autograd.grad of a recorded forward (the backward only). TFLOP/s with the
                         FlashAttention convention: backward FLOPs = 2.5 x forward FLOPs = 2.5 * 4 * batch *
                         heads * seq_q * seq_k * head_dim, halved when causal; % of cuBLAS's fp16 matmul rate.
    cross_entropy        rf.cross_entropy with the gradient written in the same kernel (reads the logits
                         twice, writes dlogits once: 3 x N x V x 2 bytes) against torch's eager
                         F.cross_entropy forward + backward; GB/s (our byte count for both) vs the copy
                         ceiling.
    adamw                rf.adamw_step over GPT-2 small's parameter shapes (one launch) against
                         torch.optim.AdamW(fused=True); fp32 params and grads (28 bytes / parameter: p, m, v
                         read + written, g read), and fp16 params + grads with fp32 masters (2 + 2 + 2 + 8 +
                         8 + 8 = 30 bytes / parameter; torch: the mixed-precision recipe, fp16 grads copied
                         into the fp32 masters' .grad, fused AdamW on the masters, masters copied into the
                         fp16 params, all with foreach kernels).
    grad_norm            rf.grad_norm over the same grads against torch.nn.utils.get_total_norm (or the
                         _foreach_norm composition); 4 bytes / parameter (fp32).
    embedding backward   rf.embedding_backward (sort + segmented sum) against aten's
                         embedding_dense_backward; bytes: dout read + dW written (fp32).

Every implementation is checked first (float64 references on the device for attention on one sequence,
cross-entropy on sampled rows; torch's result for the optimizer); a wrong one is not timed. Timing: CUDA
events, median of --reps after a warm-up, inputs rotated over sets larger than 4x L2 (bench/harness.py).

    python bench/train_kernels.py                 full run -> bench/results/<gpu>/train_kernels.{json,md}
    python bench/train_kernels.py --quick         GPT-2 small shapes only -> $OUT (or bench/out)
    python bench/train_kernels.py --parts attention --impls rawformer,torch-flash
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

# name -> (batch, seq, q_heads, kv_heads, head_dim, causal)
ATTN_CONFIGS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "gpt2-small-b8-s1024": (8, 1024, 12, 12, 64, False),
    "gpt2-small-b8-s1024-causal": (8, 1024, 12, 12, 64, True),
    "llama-b2-s4096-d128-gqa-causal": (2, 4096, 32, 8, 128, True),
}
# name -> (rows, vocab)
CE_CONFIGS: dict[str, tuple[int, int]] = {"gpt2-b8-s1024": (8192, 50257), "llama3-b4-s1024": (4096, 128256)}
# name -> (layers, hidden, vocab, positions): GPT-2 style parameter lists (weights, biases, norms)
OPTIM_CONFIGS: dict[str, tuple[int, int, int, int]] = {"gpt2-small": (12, 768, 50257, 1024)}
# name -> (tokens, vocab, hidden)
EMB_CONFIGS: dict[str, tuple[int, int, int]] = {"gpt2-b8-s1024": (8192, 50257, 768)}
QUICK = {
    "attention": ["gpt2-small-b8-s1024", "gpt2-small-b8-s1024-causal"],
    "cross_entropy": ["gpt2-b8-s1024"],
    "optim": ["gpt2-small"],
    "embedding": ["gpt2-b8-s1024"],
}
PARTS = ("attention", "cross_entropy", "optim", "embedding")
IMPLS = ("rawformer", "rf-v1", "rf-v2", "rf-v3", "torch-flash", "torch")
ACCEPTANCE = [
    Criterion("attention_backward", "backward", "faster", 0.5, baseline="torch-flash"),
    Criterion("cross_entropy", "forward+backward", "faster", 1.0, baseline="torch"),
    Criterion("cross_entropy", "forward+backward", "ceiling_each", 0.6),
    Criterion("adamw", "step", "faster", 1.0, baseline="torch"),
    Criterion("adamw", "step", "ceiling_each", 0.6),
    Criterion("grad_norm", "reduce", "ceiling_each", 0.6),
]


def on_device(cp: Any, x: Any) -> Any:
    if isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor (a loss that requires grad cannot be exported as is)
        x = x.detach().contiguous()
    return cp.from_dlpack(x)


def _measure(calls: list[Callable], check: Callable[[], float], clock: Any, reps: int, warmup: int,
             common: dict) -> dict:  # fmt: skip
    """Check (relative error vs the reference), then time the calls rotating over input sets."""
    tol = common["tolerance"]
    try:
        err = check()
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


# ---- attention backward -----------------------------------------------------------------------------------


def attention_grads_ref(cp: Any, q: Any, k: Any, v: Any, o: Any, do: Any, lse: Any, causal: bool,
                        scale: float) -> tuple[Any, Any, Any]:  # fmt: skip
    """float64 dq, dk, dv of one sequence on the device: q / o / do (S, Hq, D), k / v (S, Hk, D), lse
    (Hq, S)."""
    s_q, h_q, _ = q.shape
    s_k, h_k, _ = k.shape
    grp = h_q // h_k
    f = lambda a: a.astype(cp.float64)  # noqa: E731
    qh, oh, doh = (f(a).transpose(1, 0, 2) for a in (q, o, do))  # (Hq, S, D)
    kh = cp.repeat(f(k).transpose(1, 0, 2), grp, axis=0)
    vh = cp.repeat(f(v).transpose(1, 0, 2), grp, axis=0)
    s = cp.matmul(qh, kh.transpose(0, 2, 1)) * scale
    if causal:
        keep = cp.arange(s_k)[None, :] <= cp.arange(s_q)[:, None] + (s_k - s_q)
        s = cp.where(keep[None], s, -cp.inf)
    p = cp.exp(s - f(lse)[:, :, None])
    dd = cp.sum(doh * oh, axis=-1, keepdims=True)
    ds = p * (cp.matmul(doh, vh.transpose(0, 2, 1)) - dd)
    dq = scale * cp.matmul(ds, kh)
    dk = scale * cp.matmul(ds.transpose(0, 2, 1), qh).reshape(h_k, grp, s_k, -1).sum(1)
    dv = cp.matmul(p.transpose(0, 2, 1), doh).reshape(h_k, grp, s_k, -1).sum(1)
    return dq.transpose(1, 0, 2), dk.transpose(1, 0, 2), dv.transpose(1, 0, 2)


def bench_attention(cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling, matmul_tflops):
    batch, seq, h_q, h_k, dim, causal = cfg
    scale = 1.0 / math.sqrt(dim)
    set_bytes = 2 * batch * seq * dim * 2 * (3 * h_q + 2 * h_k)
    n_sets = harness.rotation_sets(set_bytes, l2)
    sets = []
    for i in range(n_sets):
        rs = cp.random.RandomState(500 + i)
        q = rs.standard_normal((batch, seq, h_q, dim), dtype=cp.float32).astype(cp.float16)
        k = rs.standard_normal((batch, seq, h_k, dim), dtype=cp.float32).astype(cp.float16)
        v = rs.standard_normal((batch, seq, h_k, dim), dtype=cp.float32).astype(cp.float16)
        do = rs.standard_normal((batch, seq, h_q, dim), dtype=cp.float32).astype(cp.float16)
        o, lse = rf.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        sets.append(dict(q=q, k=k, v=v, do=do, o=o, lse=lse))
    a0 = sets[0]
    ref = attention_grads_ref(cp, a0["q"][0], a0["k"][0], a0["v"][0], a0["o"][0], a0["do"][0], a0["lse"][0],
                              causal, scale)  # fmt: skip
    fwd = 4 * batch * h_q * seq * seq * dim // (2 if causal else 1)
    flops = int(2.5 * fwd)
    nbytes = set_bytes
    records = []
    for impl in impls:
        common = dict(op="attention_backward", direction="backward", impl=impl, config=name,
                      shape=(batch, seq, h_q, h_k, dim), dtype="float16", nbytes=nbytes, flops=flops,
                      ceiling_gbps=ceiling, tolerance=5e-3, input_sets=n_sets)  # fmt: skip
        try:
            if impl in ("rawformer", "rf-v1", "rf-v2", "rf-v3"):
                ver = {"rf-v1": 1, "rf-v2": 2, "rf-v3": 3}.get(impl)

                def make(a: dict, ver: int | None = ver) -> Callable:
                    return lambda: rf.attention_backward(a["q"], a["k"], a["v"], a["o"], a["do"], a["lse"],
                                                         causal=causal, scale=scale, version=ver)  # fmt: skip
            elif impl == "torch-flash":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def make(a: dict) -> Callable:
                    tq, tk, tv = (torch.from_dlpack(a[n]).transpose(1, 2).detach().requires_grad_(True)
                                  for n in ("q", "k", "v"))  # fmt: skip
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        to = torch.nn.functional.scaled_dot_product_attention(
                            tq, tk, tv, is_causal=causal, scale=scale, enable_gqa=h_q != h_k
                        )
                    tdo = torch.from_dlpack(a["do"]).transpose(1, 2)

                    def call() -> Any:
                        g = torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True)
                        return tuple(x.transpose(1, 2) for x in g)

                    return call
            else:
                continue
            calls = [make(a) for a in sets]
        except Exception as exc:
            records.append(harness.make_record(**common, status="error", message=harness.describe(exc)))
            harness.log(harness.format_line(records[-1]))
            continue

        def check(call: Callable = calls[0]) -> float:
            got = call()
            return max(harness.rel_error(on_device(cp, g)[0], r) for g, r in zip(got, ref, strict=True))

        rec = _measure(calls, check, clock, reps, warmup, common)
        if rec.get("tflops"):
            rec["pct_ceiling"] = 100.0 * rec["tflops"] / matmul_tflops
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


# ---- cross-entropy ----------------------------------------------------------------------------------------


def _ce_maker(impl: str, rf: Any, torch: Any, rows: int) -> Callable[[dict], Callable] | None:
    """input set -> zero-argument call returning (per-row loss, dlogits), the gradient of the mean loss."""
    if impl in ("rawformer", "rf-v3"):
        version = 3 if impl == "rf-v3" else None

        def make_rf(a: dict) -> Callable:
            def call() -> Any:
                loss, _ = rf.cross_entropy(
                    a["x"], a["t"], dlogits=a["dl"], grad_scale=1.0 / rows, version=version
                )
                return loss, a["dl"]

            return call

        return make_rf
    if impl != "torch":
        return None
    functional = torch.nn.functional

    def make_torch(a: dict) -> Callable:
        tx, tt = torch.from_dlpack(a["x"]), torch.from_dlpack(a["t"])

        def call() -> Any:
            xx = tx.detach().requires_grad_(True)
            loss = functional.cross_entropy(xx, tt, reduction="none")
            loss.backward(torch.full_like(loss, 1.0 / rows))
            return loss.detach(), xx.grad

        return call

    return make_torch


def bench_cross_entropy(cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling):
    rows, vocab = cfg
    nbytes = 3 * rows * vocab * 2 + 16 * rows
    n_sets = harness.rotation_sets(rows * vocab * 4, l2)
    sets = []
    for i in range(n_sets):
        rs = cp.random.RandomState(600 + i)
        x = (rs.standard_normal((rows, vocab), dtype=cp.float32) * 3).astype(cp.float16)
        t = rs.randint(0, vocab, rows).astype(cp.int64)
        sets.append(dict(x=x, t=t, dl=cp.empty_like(x)))
    a0 = sets[0]
    sample = cp.asarray(harness.sample_rows(rows, vocab, most=64))
    xs = a0["x"][sample].astype(cp.float64)
    m = xs.max(1, keepdims=True)
    lse = (m + cp.log(cp.exp(xs - m).sum(1, keepdims=True)))[:, 0]
    ts = a0["t"][sample]
    ref_loss = lse - xs[cp.arange(len(sample)), ts]
    ref_grad = cp.exp(xs - lse[:, None]) / rows
    ref_grad[cp.arange(len(sample)), ts] -= 1.0 / rows
    records = []
    for impl in impls:
        make = _ce_maker(impl, rf, torch, rows)
        if make is None or (impl == "rf-v3" and vocab > 65536):
            continue
        common = dict(op="cross_entropy", direction="forward+backward", impl=impl, config=name,
                      shape=(rows, vocab), dtype="float16", nbytes=nbytes, flops=4 * rows * vocab,
                      ceiling_gbps=ceiling, tolerance=5e-3, input_sets=n_sets)  # fmt: skip
        calls = [make(a) for a in sets]

        def check(call: Callable = calls[0]) -> float:
            loss, grad = call()
            loss, grad = on_device(cp, loss), on_device(cp, grad)
            return max(harness.rel_error(loss[sample], ref_loss), harness.rel_error(grad[sample], ref_grad))

        rec = _measure(calls, check, clock, reps, warmup, common)
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


# ---- optimizer ---------------------------------------------------------------------------------------------


def gpt2_shapes(layers: int, hidden: int, vocab: int, positions: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (positions, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,), (hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    return shapes + [(hidden,), (hidden,)]


def _adamw_call(impl: str, master: bool, cp: Any, rf: Any, torch: Any, params: list, grads: list,
                hp: dict) -> Callable:  # fmt: skip
    """An AdamW step over fresh copies of `params` (zero moments), returning the (master) params[0].

    master: fp16 params and grads with fp32 master params (the mixed-precision step), else all fp32."""
    p = [x.copy() for x in params]
    m = [cp.zeros_like(x) for x in params]
    v = [cp.zeros_like(x) for x in params]
    p16 = [x.astype(cp.float16) for x in params] if master else None
    g16 = [x.astype(cp.float16) for x in grads] if master else None
    step = [0]
    if impl == "rawformer":

        def call_rf() -> Any:
            step[0] += 1
            if master:
                rf.adamw_step(p16, g16, m, v, step=step[0], master_params=p, **hp)
            else:
                rf.adamw_step(p, grads, m, v, step=step[0], **hp)
            return p[0]

        return call_rf
    tparams = [torch.nn.Parameter(torch.from_dlpack(x)) for x in p]
    for tpar, gg in zip(tparams, grads, strict=True):
        tpar.grad = torch.from_dlpack(gg) if not master else torch.empty_like(tpar)
    opt = torch.optim.AdamW(tparams, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], fused=True)  # fmt: skip
    if not master:

        def call_torch() -> Any:
            opt.step()
            return p[0]

        return call_torch
    t_g16 = [torch.from_dlpack(x) for x in g16]
    t_p16 = [torch.from_dlpack(x) for x in p16]
    master_grads = [tpar.grad for tpar in tparams]
    master_data = [tpar.detach() for tpar in tparams]

    def call_torch_master() -> Any:
        with torch.no_grad():
            torch._foreach_copy_(master_grads, t_g16)  # fp16 grads -> fp32 .grad of the masters
            opt.step()
            torch._foreach_copy_(t_p16, master_data)  # updated masters -> fp16 params
        return p[0]

    return call_torch_master


def _norm_call(impl: str, rf: Any, torch: Any, grads: list) -> Callable:
    if impl == "rawformer":
        return lambda: rf.grad_norm(grads)
    tg = [torch.from_dlpack(x) for x in grads]
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return lambda: total(tg)
    return lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))


def bench_optim(cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling):
    shapes = gpt2_shapes(*cfg)
    count = sum(math.prod(s) for s in shapes)
    rs = cp.random.RandomState(700)
    params = [rs.standard_normal(s, dtype=cp.float32) * 0.02 for s in shapes]
    grads = [rs.standard_normal(s, dtype=cp.float32) * 0.01 for s in shapes]
    hp = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    host_p0, host_g0 = params[0][:4].get(), grads[0][:4].get()
    zeros = np.zeros_like(host_p0)
    want = rf.ops.optim.adamw_ref(host_p0, host_g0, zeros, zeros, step=1, **hp)[0]
    records = []
    runs = [(impl, master) for master in (False, True) for impl in impls if impl in ("rawformer", "torch")]
    for impl, master in runs:
        per = 30 if master else 28
        dtype = "float16" if master else "float32"
        # the fp16 step reads the grads rounded to fp16: compare with the reference on those
        tol = 1e-3 if master else 1e-5
        common = dict(op="adamw", direction="step", impl=impl, config=name, shape=(count,), dtype=dtype,
                      nbytes=per * count, flops=12 * count, ceiling_gbps=ceiling, tolerance=tol,
                      input_sets=1)  # fmt: skip
        try:
            call = _adamw_call(impl, master, cp, rf, torch, params, grads, hp)

            def check(call: Callable = call) -> float:
                return harness.rel_error(on_device(cp, call())[:4].get(), want)

            rec = _measure([call], check, clock, reps, warmup, common)
        except Exception as exc:
            rec = harness.make_record(**common, status="error", message=harness.describe(exc))
        records.append(rec)
        harness.log(harness.format_line(rec))
        cp.get_default_memory_pool().free_all_blocks()

    want_norm = math.sqrt(sum(float(cp.sum(gg.astype(cp.float64) ** 2)) for gg in grads))
    for impl in ("rawformer", "torch"):
        if impl not in impls:
            continue
        common = dict(op="grad_norm", direction="reduce", impl=impl, config=name, shape=(count,),
                      dtype="float32", nbytes=4 * count, flops=2 * count, ceiling_gbps=ceiling,
                      tolerance=1e-5, input_sets=1)  # fmt: skip
        call = _norm_call(impl, rf, torch, grads)

        def check(call: Callable = call) -> float:
            return abs(float(on_device(cp, call())) - want_norm) / want_norm

        rec = _measure([call], check, clock, reps, warmup, common)
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


# ---- embedding backward ------------------------------------------------------------------------------------


def _emb_call(impl: str, rf: Any, torch: Any, ids: Any, dout: Any, vocab: int) -> Callable:
    if impl == "rawformer":
        return lambda: rf.embedding_backward(ids, dout, vocab)
    ti, tg = torch.from_dlpack(ids), torch.from_dlpack(dout)
    return lambda: torch.ops.aten.embedding_dense_backward(tg, ti, vocab, -1, False)


def bench_embedding(cp, rf, torch, name, cfg, impls, clock, reps, warmup, l2, ceiling):
    tokens, vocab, hidden = cfg
    rs = cp.random.RandomState(800)
    ids = rs.randint(0, vocab, tokens).astype(cp.int64)
    dout = rs.standard_normal((tokens, hidden), dtype=cp.float32).astype(cp.float16)
    ref = cp.zeros((vocab, hidden), dtype=cp.float64)
    cp.add.at(ref, ids, dout.astype(cp.float64))
    nbytes = tokens * hidden * 2 + vocab * hidden * 4
    records = []
    for impl in ("rawformer", "torch"):
        if impl not in impls:
            continue
        common = dict(op="embedding", direction="backward", impl=impl, config=name,
                      shape=(tokens, vocab, hidden), dtype="float16", nbytes=nbytes, flops=tokens * hidden,
                      ceiling_gbps=ceiling, tolerance=5e-3, input_sets=1)  # fmt: skip
        call = _emb_call(impl, rf, torch, ids, dout, vocab)

        def check(call: Callable = call) -> float:
            return harness.rel_error(on_device(cp, call()).astype(cp.float64), ref)

        rec = _measure([call], check, clock, reps, warmup, common)
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


# ---- the command -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/train_kernels.py",
        description="Benchmark rawformer's training kernels (attention backward, cross-entropy, AdamW, grad "
        "norm, embedding backward) against torch and the ceilings measured in the same run. Needs a GPU.",
    )
    p.add_argument("--quick", action="store_true", help="GPT-2 small shapes only, 20 reps, results to $OUT")
    p.add_argument("--parts", type=harness.list_arg(PARTS, "part"), default=list(PARTS))
    p.add_argument("--impls", type=harness.list_arg(IMPLS, "impl"), default=list(IMPLS))
    p.add_argument("--out", metavar="DIR", help="write the results here instead")
    p.add_argument("--reps", type=int, help="timed calls per measurement (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="do not import torch; skip its columns")
    p.add_argument("--from-json", metavar="FILE", help="no GPU: rebuild the markdown from a json")
    return p


def write_results(header: dict, records: list[dict], out_dir: Path, json_too: bool = True) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    ops = {r["op"] for r in records}
    verdicts = harness.evaluate([c for c in ACCEPTANCE if c.op in ops], records)
    if json_too:
        harness.write_json(out_dir / "train_kernels.json", header, records)
    extra = [
        "- attention backward FLOPs: 2.5 x the forward's 4 * batch * heads * seq^2 * head_dim (halved when "
        "causal), the FlashAttention convention; '% compute ceiling' is against cuBLAS's fp16 matmul "
        f"({header.get('matmul_tflops', 0):.0f} TFLOP/s, measured in this run)"
    ]
    md = harness.markdown_report(
        f"rawformer training kernels on {header.get('gpu', '?')}", header, records, impls=IMPLS,
        main="rawformer", main_label="rf", ratios=("torch-flash", "torch"), verdicts=verdicts,
        metrics={"attention_backward": "tflops"}, extra_header=extra,
    )  # fmt: skip
    (out_dir / "train_kernels.md").write_text(md)
    harness.log("\nACCEPTANCE")
    for v in verdicts:
        harness.log(f"  {v.status}  {v.text}")
    harness.log(f"\nwrote train_kernels.md into {out_dir}")
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        header, records = harness.read_json(Path(args.from_json))
        write_results(header, records, Path(args.out or Path(args.from_json).parent), json_too=bool(args.out))
        return 0
    if args.reps is not None and args.reps < harness.MIN_REPS:
        raise SystemExit(f"--reps must be >= {harness.MIN_REPS}")
    cp = harness.require_gpu("bench/train_kernels.py")
    reps = args.reps or (harness.MIN_REPS if args.quick else 30)
    import rawformer as rf
    import rawformer.ops.optim  # noqa: F401  (adamw_ref for the check)

    torch = None if args.no_torch else harness.import_torch(cp)
    impls = [i for i in args.impls if not (i.startswith("torch") and torch is None)]
    clock = harness.CudaClock(cp)
    device = harness.device_header(cp)
    l2 = device["l2_bytes"]

    def free() -> None:
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()

    ceiling = harness.measure_copy_ceiling(cp, clock)
    free()
    matmul = harness.measure_matmul_ceiling(cp, clock)
    free()
    harness.log(
        f"copy ceiling {ceiling['ceiling_gbps']:.0f} GB/s; cuBLAS fp16 {matmul['matmul_tflops']:.0f} TFLOP/s"
    )
    cgb = ceiling["ceiling_gbps"]

    def pick(part: str, table: dict) -> dict:
        if part not in args.parts:
            return {}
        return {n: c for n, c in table.items() if not args.quick or n in QUICK[part]}

    records: list[dict] = []
    for name, cfg in pick("attention", ATTN_CONFIGS).items():
        records += bench_attention(cp, rf, torch, name, cfg, impls, clock, reps, args.warmup, l2, cgb,
                                   matmul["matmul_tflops"])  # fmt: skip
        free()
    for name, cfg in pick("cross_entropy", CE_CONFIGS).items():
        records += bench_cross_entropy(cp, rf, torch, name, cfg, impls, clock, reps, args.warmup, l2, cgb)
        free()
    for name, cfg in pick("optim", OPTIM_CONFIGS).items():
        records += bench_optim(cp, rf, torch, name, cfg, impls, clock, reps, args.warmup, l2, cgb)
        free()
    for name, cfg in pick("embedding", EMB_CONFIGS).items():
        records += bench_embedding(cp, rf, torch, name, cfg, impls, clock, reps, args.warmup, l2, cgb)
        free()
    header = harness.run_header(device, **ceiling, **matmul, reps=reps, warmup=args.warmup, quick=args.quick)
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    write_results(header, records, out_dir)
    harness.copy_to_out(out_dir, ("train_kernels.json", "train_kernels.md"), args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
