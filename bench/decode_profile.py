"""Where a batch-1 decode step's time goes: the CUDA graph on the GPU, and the host around it.

    python bench/decode_profile.py                      -> prints a table; --out DIR also writes JSON
    python bench/decode_profile.py --config gpt2-small --batch 8

For one config (bench/e2e.py's CONFIGS, random fp16 weights) and batch size:
1. the decode loop as the Generator runs it: ms per step (decode-only rate);
2. the captured decode graph replayed back to back (no host work between launches): the GPU's own step
   time, so loop - graph = the host's share when nothing overlaps;
3. the host parts of one step, each timed on its own with the device idle: pool.prepare, Graph.launch
   (enqueue only), the sampler (argmax + device-to-host copy), observe / stop checks;
4. every op of the step captured 50 times in a graph of its own and replayed: in-graph time per call, and
   for the GEMMs GB/s against the copy ceiling measured in the same run. The sum of the op times next to
   the graph time shows what the graph adds (launch gaps between its nodes). `count` is how often the
   model's step runs the op: for Llama at one row per step the qkv, gate/up and lm-head GEMVs run fused with
   the RMSNorm (and residual add) before them (rf.add_rms_norm_linear), so those rows count, and the plain
   GEMVs / add_rms_norm / rms_norm they replace are listed with count 0 for comparison.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import e2e
import harness
import numpy as np
from rawformer.models import build_model
from rawformer.models.common import random_weights

import rawformer as rf
from rawformer.kernels import gemm
from rawformer.runtime import Generator, make_pool

lin = importlib.import_module("rawformer.ops.linear")  # the module (rf.ops.linear is the function)


def graph_ms(cp: Any, fn: Any, inner: int = 50, reps: int = 20) -> float:
    """Median ms of one `fn()` captured `inner` times in one graph (in-graph cost, launch gaps included)."""
    return harness.captured_ms(cp, [fn] * inner, reps) / inner


def build(cp: Any, name: str, seed: int = 0) -> Any:
    cfg = e2e.CONFIGS[name]
    from rawformer.models import module_for

    weights = random_weights(module_for(cfg).weight_shapes(cfg), seed, np.float16, cp, e2e.STD)
    return cfg, build_model(cfg, weights, cp)


def profile(cp: Any, name: str, batch: int, prompt: int, new: int) -> dict[str, Any]:
    cfg, model = build(cp, name)
    blocks = batch * ((prompt + new + 64) // 16 + 2)
    pool = make_pool(model, blocks * 16, max_seq_len=prompt + new + 32, prefix_caching=False)
    arena = pool.arena
    gen = Generator(model, pool, max_batch=batch)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.vocab_size, (batch, prompt)).tolist()
    gen.generate(prompts, new, ignore_eos=True)  # warm-up: compiles, captures
    loops = []
    for _ in range(3):
        gen.generate(prompts, new, ignore_eos=True)
        s = gen.last_stats
        loops.append(1e3 * s["decode_s"] / max(1, s["decode_steps"]))
    res: dict[str, Any] = dict(config=name, batch=batch, loop_ms=statistics.median(loops))

    # a live decode state to replay: one wave's sequences after prefill
    ids = [("p", i) for i in range(batch)]
    for i, sid in enumerate(ids):
        pool.add_sequence(sid, prompts[i])
    stream = gen.stream
    with stream:
        b0 = pool.prepare(ids)
        model.forward(b0, arena, last_only=True)
        width = gen._width([type("R", (), dict(prompt=prompts[0], max_new=new))()])
        bucket = batch
        host = {"prepare": [], "launch": [], "sample": [], "observe": []}
        from rawformer.runtime.sampler import Sampler, SamplingParams

        sampler = Sampler([SamplingParams()] * batch, model.vocab_size, cp)
        toks = [[1]] * batch
        for step in range(40):
            stream.synchronize()
            t0 = time.perf_counter()
            bt = pool.prepare(ids, toks, pad_to=bucket, block_table_width=width)
            t1 = time.perf_counter()
            logits = gen.graphs.run(bt)[:batch]
            t2 = time.perf_counter()
            stream.synchronize()
            t3 = time.perf_counter()
            out = sampler(logits, list(range(batch)))
            t4 = time.perf_counter()
            sampler.observe(list(range(batch)), [[int(t)] for t in out])
            toks = [[int(t)] for t in out]
            t5 = time.perf_counter()
            if step >= 5:
                host["prepare"].append(1e3 * (t1 - t0))
                host["launch"].append(1e3 * (t2 - t1))
                host["sample"].append(1e3 * (t4 - t3))
                host["observe"].append(1e3 * (t5 - t4))
        res["host_ms"] = {k: statistics.median(v) for k, v in host.items()}
        # how many launches of one eager decode step are the fused norm + GEMV (the graph replays the same
        # calls): 2 per layer + the head for Llama at batch 1; the step rewrites its own K/V unchanged
        res["fused_norm_linear_per_step"] = count_fused(model, bt, arena)
        # the graph alone, back to back
        key = (bucket, width, False)
        graph = gen.graphs._graphs[key].graph
        stream.synchronize()
        res["graph_ms"] = harness.replay_ms(cp, graph, stream, reps=10, launches=20)
        greedy = gen.graphs._graphs.get((bucket, width, True))  # the graph with the argmax (greedy loops)
        if greedy is not None:
            res["greedy_graph_ms"] = harness.replay_ms(cp, greedy.graph, stream, reps=10, launches=20)
        for sid in ids:
            pool.free_sequence(sid)
    res["ops"] = op_times(cp, cfg, model, arena, batch, prompt + new // 2)
    return res


def count_fused(model: Any, batch: Any, arena: Any) -> int:
    """gemv_nk_norm launches (rf.add_rms_norm_linear's fused kernel) in one eager forward of `batch`."""
    calls = []
    real = lin._gemv_nk

    def spy(*args: Any, norm: Any = None) -> None:
        calls.append(norm is not None)
        real(*args, norm=norm)

    lin._gemv_nk = spy
    try:
        model.forward(batch, arena, last_only=True)
    finally:
        lin._gemv_nk = real
    return sum(calls)


def op_times(cp: Any, cfg: Any, model: Any, arena: Any, batch: int, ctx: int) -> list[dict[str, Any]]:
    """In-graph time per op of one layer (and the head) at this batch. Each GEMM cycles over enough copies
    of its weight to exceed L2 (so the weights stream from HBM, as in a real step), and runs both through
    rf.linear (the GEMV kernels) and cuBLAS (gemm.matmul)."""
    rows = []
    dt = cp.float16
    hidden = model.embed.shape[1] if hasattr(model, "embed") else model.wte.shape[1]
    h = cp.asarray(np.random.default_rng(1).standard_normal((batch, hidden), np.float32), dt)

    def add(label: str, fn: Any, nbytes: int, count: int, inner: int = 48) -> None:
        ms = graph_ms(cp, fn, inner=inner)
        rows.append(dict(op=label, ms=ms, count=count, gbps=nbytes / ms / 1e6 if nbytes else None))

    blk = model.blocks[0]
    # Llama at one row per step: qkv, gate/up and the head run as rf.add_rms_norm_linear (models/common.py)
    fused = type(model).__name__ == "LlamaModel" and batch <= lin.GEMV_MAX_ROWS
    replaced = {"w_qkv", "w_gate", "w_up", "lm_head"} if fused else set()
    copies_of: dict[str, list[Any]] = {}
    mats = []
    for n, w in vars(blk).items():
        w = w[0] if isinstance(w, tuple) else w
        if getattr(w, "ndim", 0) == 2:
            mats.append((n, w))
    head = model.lm_head.T if hasattr(model, "lm_head") else model.wte.T
    mats.append(("lm_head", head))
    for n, w in mats:
        copies = max(2, -(-(160 << 20) // w.nbytes))
        ws = [w] + [w.copy() if w.flags.c_contiguous else w.T.copy().T for _ in range(copies - 1)]
        x = cp.ones((batch, w.shape[0]), dt)
        it = {"i": 0}

        def step(kind: str, ws: Any = ws, x: Any = x, it: Any = it) -> Any:
            it["i"] = (it["i"] + 1) % len(ws)
            wi = ws[it["i"]]
            return rf.linear(x, wi) if kind == "gemv" else gemm.matmul(x, wi)

        copies_of[n] = ws
        count = 0 if n in replaced else 1 if n == "lm_head" else model.num_layers
        if n in ("w_gate", "w_up") and hasattr(blk, "w_gate"):
            count = 0  # the model runs them as one DUAL launch (the gate+up row below)
        add(f"gemv {n} {tuple(w.shape)}", lambda step=step: step("gemv"), w.nbytes, count)
        add(f"cublas {n} {tuple(w.shape)}", lambda step=step: step("cublas"), w.nbytes, 0)
    if hasattr(blk, "w_gate"):
        wg = [blk.w_gate.copy() for _ in range(4)]
        wu = [blk.w_up.copy() for _ in range(4)]
        it2 = {"i": 0}

        def dual() -> Any:
            it2["i"] = (it2["i"] + 1) % 4
            return rf.linear_swiglu(h, wg[it2["i"]], wu[it2["i"]])

        add("gemv gate+up+swiglu (fused)", dual, 2 * blk.w_gate.nbytes, 0 if fused else model.num_layers)
        inter = blk.w_gate.shape[1]
        a, b = cp.ones((batch, inter), dt), cp.ones((batch, inter), dt)
        add("swiglu", lambda: rf.swiglu(a, b), 0, 0)
    g = cp.ones((batch, h.shape[1]), dt)
    norms = 0 if fused else 2 * model.num_layers
    add("add_rms_norm", lambda: rf.add_rms_norm(h, g, cp.ones(h.shape[1], dt), 1e-5), 0, norms)
    add("rms_norm", lambda: rf.rms_norm(h, cp.ones(h.shape[1], dt), 1e-5), 0, 0 if fused else 1)
    if hasattr(blk, "w_gate"):
        fused_times(cp, add, model, copies_of, h, g, fused)
    # attention of one layer over a context of `ctx` tokens per sequence, and the rope + cache write
    cfg_ = model.config
    nh = cfg_.num_attention_heads if hasattr(cfg_, "num_attention_heads") else cfg_.n_head
    nkv, d, bs = model.num_kv_heads, model.head_dim, arena.block_size
    nblk = -(-ctx // bs)
    tables = cp.asarray(np.arange(batch * nblk, dtype=np.int32).reshape(batch, nblk) % arena.num_blocks)
    lens = cp.full(batch, ctx, dtype=cp.int32)
    q = cp.ones((batch, 1, nh, d), dt)
    kc, vc = arena.k(0), arena.v(0)
    attend = lambda: rf.paged_attention(q, kc, vc, tables, lens)  # noqa: E731
    add(f"paged_attention ctx {ctx}", attend, 0, model.num_layers)
    if hasattr(model, "inv_freq"):
        q3, k3, v3 = cp.ones((batch, nh, d), dt), cp.ones((batch, nkv, d), dt), cp.ones((batch, nkv, d), dt)
        pos = cp.full(batch, ctx - 1, dtype=cp.int32)
        slots = cp.arange(batch, dtype=cp.int32)
        add(
            "rope_kv_write",
            lambda: rf.rope_kv_write(q3, k3, v3, pos, kc, vc, slots, inv_freq=model.inv_freq),
            0,
            model.num_layers,
        )
    total = sum(r["ms"] * r["count"] for r in rows)
    rows.append(dict(op="sum of counted ops", ms=total, count=1, gbps=None))
    return rows


def fused_times(
    cp: Any, add: Any, model: Any, copies_of: dict[str, list[Any]], x: Any, a: Any, on: bool
) -> None:
    """rf.add_rms_norm_linear (residual add + RMSNorm + GEMV in one launch) for the qkv (with and without
    the add: layer 0 has none), the gate/up DUAL and the lm head, weights cycled from HBM as above; counted
    when the model's step runs them (`on`)."""
    n_layers = model.num_layers
    ln = cp.ones(x.shape[1], x.dtype)
    it = {"i": 0}

    def call(name: str, addend: Any, dual: bool = False) -> Any:
        ws = copies_of[name]
        it["i"] = (it["i"] + 1) % len(ws)
        w2 = copies_of["w_up"][it["i"] % len(copies_of["w_up"])] if dual else None
        return rf.add_rms_norm_linear(addend, x, ln, 1e-5, ws[it["i"]], w2=w2)

    qkv, gate, head = copies_of["w_qkv"][0], copies_of["w_gate"][0], copies_of["lm_head"][0]
    shape = f"{tuple(qkv.shape)}"
    add(
        f"fused add_rms_norm+gemv w_qkv {shape}",
        lambda: call("w_qkv", a),
        qkv.nbytes,
        n_layers - 1 if on else 0,
    )
    add(f"fused rms_norm+gemv w_qkv {shape} (layer 0)", lambda: call("w_qkv", None), qkv.nbytes, int(on))
    add(
        f"fused add_rms_norm+gemv gate+up+swiglu {tuple(gate.shape)}",
        lambda: call("w_gate", a, dual=True), 2 * gate.nbytes, n_layers if on else 0,
    )  # fmt: skip
    add(
        f"fused add_rms_norm+gemv lm_head {tuple(head.shape)}",
        lambda: call("lm_head", a),
        head.nbytes,
        int(on),
    )


def nk_sweep(cp: Any, batches: list[int]) -> list[dict[str, Any]]:
    """gemv_nk (each compiled configuration) against cuBLAS on the decoders' shapes, HBM-resident weights, at
    each batch size: where the GEMV pays (rf.linear's GEMV_MAX_ROWS) and which configuration (_nk_config)."""
    shapes = [(2560, 2048), (2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048), (2304, 768), (768, 3072)]
    out = []
    rng = np.random.default_rng(0)
    keep = lin.GEMV_MAX_ROWS
    for n, k in shapes:
        copies = max(2, -(-(160 << 20) // (n * k * 2)))
        ws = [cp.asarray(rng.standard_normal((n, k), np.float32), cp.float16) for _ in range(copies)]
        for batch in batches:
            x = cp.ones((batch, k), cp.float16)
            cases = [("cublas", None)] + [(f"gemv {c}", c) for c in (None, *lin.NK_SHAPES)]
            for label, cfg in cases:
                lin.NK_CONFIG = cfg
                it = {"i": 0}

                def step(ws: Any = ws, x: Any = x, it: Any = it, label: str = label) -> Any:
                    it["i"] = (it["i"] + 1) % len(ws)
                    if label == "cublas":
                        return gemm.matmul(x, ws[it["i"]].T)
                    return rf.linear(x, ws[it["i"]].T)

                lin.GEMV_MAX_ROWS = 8
                ms = graph_ms(cp, step)
                out.append(dict(n=n, k=k, batch=batch, impl=label, us=1e3 * ms, gbps=n * k * 2 / ms / 1e6))
        lin.NK_CONFIG, lin.GEMV_MAX_ROWS = None, keep
        del ws
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-1b", choices=sorted(e2e.CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--nk-sweep", action="store_true", help="only time gemv_nk's configurations")
    a = p.parse_args(argv)
    cp = harness.require_gpu("decode_profile.py")
    if a.nk_sweep:
        rows = nk_sweep(cp, [1, 2, 4, 8])
        for r in rows:
            shape = f"N={r['n']:6d} K={r['k']:5d} b={r['batch']}"
            print(f"{shape} {r['impl']:>14}  {r['us']:7.2f} us  {r['gbps']:6.0f} GB/s")
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "gemv_sweep.json").write_text(json.dumps(rows, indent=1))
        return 0
    res = profile(cp, a.config, a.batch, a.prompt, a.new)
    roof = e2e.weight_bytes_per_token(e2e.CONFIGS[a.config], 2)
    ceil = harness.measure_copy_ceiling(cp, harness.CudaClock(cp))["ceiling_gbps"]
    res["copy_gbps"] = ceil
    res["roofline_ms"] = roof / ceil / 1e6
    for r in res["ops"]:
        if r["gbps"]:
            r["pct_copy"] = 100 * r["gbps"] / ceil
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"decode_profile_{a.config}_b{a.batch}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
