"""ONNX: the graph executor's overhead per node, and native-path decode speed of an ONNX file vs the runtime.

    python bench/onnx_bench.py                         -> bench/results/<gpu>/onnx.{json,md}
    python bench/onnx_bench.py --quick                 -> $OUT (or bench/out): gpt2-small only, fewer tokens
    python bench/onnx_bench.py --device cpu --quick    a CPU smoke run (tiny config)

1. Executor overhead per node. A chain of N Add nodes on a 1-element tensor does no work, so its time per
   node is what the executor itself costs (dispatch, value bookkeeping, host <-> device decisions); then
   the fixture-like exported models are run node by node with profiling on, giving the per-op-type time
   table and the node count.
2. Native-path decode. A random model of each config is exported with rawformer.export.onnx_export
   (float16 on the GPU; the 1.1B Llama goes through external data), loaded back with rawformer.load (the
   structure is recognised, the weights imported: path "native") and run by rawformer.runtime.Generator;
   the same weights built directly as the runtime's model (init_random, the e2e benchmark's path) are the
   baseline. Greedy tokens must be identical; decode-only tokens/s (decode steps / their time) compared.
   The executor path's tokens/s on the small config (whole-sequence re-runs, no KV cache) is shown for scale.

Acceptance (the issue): native-path decode equals the runtime's numbers (>= 0.95x at every batch); the
executor overhead per node is reported (no threshold).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import e2e
import harness
import numpy as np
from rawformer.export.onnx_executor import OnnxExecutor
from rawformer.export.onnx_export import export_onnx
from rawformer.models import LlamaConfig, init_random

from rawformer.loading import load
from rawformer.runtime import Generator, make_pool

CONFIGS: dict[str, Any] = {
    **e2e.CONFIGS,  # gpt2-small, llama-1b: the end-to-end bench's configs
    "tiny": LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}
ACCEPT_RATIO = 0.95
CHAIN_NODES = 2000


def sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def chain_overhead(device: str, reps: int) -> dict[str, float]:
    """Seconds per node of a chain of Add nodes on one float (no work: pure executor cost)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Add", [f"v{i}", "one"], [f"v{i + 1}"], name=f"add{i}") for i in range(CHAIN_NODES)
    ]
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"v{CHAIN_NODES}", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chain.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        ex = OnnxExecutor(path, device=device)
    x = ex.xp.ones(1, np.float32)
    ex.run(v0=x)
    times = []
    for _ in range(reps):
        sync(ex.xp)
        t0 = time.perf_counter()
        out = ex.run(v0=x)[f"v{CHAIN_NODES}"]
        sync(ex.xp)
        times.append(time.perf_counter() - t0)
    assert float(np.asarray(out.get() if hasattr(out, "get") else out)[0]) == CHAIN_NODES + 1
    return {"nodes": CHAIN_NODES, "us_per_node": statistics.median(times) / CHAIN_NODES * 1e6}


def profile_model(path: Path, device: str, dtype: Any, tokens: int) -> dict[str, Any]:
    """Per-op-type time of one executor forward over `tokens` tokens (profiled: a sync per node)."""
    ex = OnnxExecutor(path, device=device, dtype=dtype, profile=True)
    ids = np.arange(tokens, dtype=np.int64)[None] % 50
    ex.run(input_ids=ids)
    ex.run(input_ids=ids)
    total = sum(t for _, _, t in ex.timings)
    ex.profile = False
    sync(ex.xp)
    t0 = time.perf_counter()
    ex.run(input_ids=ids)
    sync(ex.xp)
    wall = time.perf_counter() - t0
    return {
        "nodes": len(ex.nodes),
        "profiled_s": total,
        "wall_s": wall,
        "ops": {k: {"nodes": n, "ms": s * 1e3} for k, (n, s) in ex.profile_table().items()},
    }


def decode_rates(
    models: list[Any], prompts: np.ndarray, new: int, reps: int
) -> list[tuple[float, list[list[int]]]]:
    """Per model: median decode-only tokens/s of Generator.generate (prefill excluded) and the greedy tokens.
    The models' timed calls alternate, so a slow spell of a shared machine hits both alike."""
    b, p = prompts.shape
    gens, tokens = [], []
    for model in models:
        pool = make_pool(model, b * (p + new) + 64, max_seq_len=p + new, prefix_caching=False)
        gens.append(Generator(model, pool, max_batch=b))
        tokens.append(gens[-1].generate(prompts, new, ignore_eos=True).token_ids)  # warm-up, graph capture
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(reps):
        for gen, r in zip(gens, rates, strict=True):
            gen.generate(prompts, new, ignore_eos=True)
            r.append(b * (new - 1) / gen.last_stats["decode_s"])
    for gen in gens:
        if gen.graphs is not None:
            gen.graphs.clear()
    return [(statistics.median(r), t) for r, t in zip(rates, tokens, strict=True)]


def run_config(name: str, args: argparse.Namespace, xp: Any, workdir: Path) -> dict[str, Any]:
    cfg = CONFIGS[name]
    gpu = xp is not np
    dtype = np.float16 if gpu else np.float32
    harness.log(f"{name}: random weights, export, load back ...")
    host_model = init_random(cfg, args.seed, np.float32, np)
    t0 = time.perf_counter()
    path = export_onnx(host_model, workdir / f"{name}.onnx", dtype=dtype, check=not args.no_check)
    export_s = time.perf_counter() - t0
    del host_model
    t0 = time.perf_counter()
    loaded = load(path, dtype=dtype, device="gpu" if gpu else "cpu", verify=not args.no_verify)
    load_s = time.perf_counter() - t0
    res: dict[str, Any] = {
        "config": name,
        "export_s": export_s,
        "load_s": load_s,
        "path_taken": loaded.path_taken,
        "file_bytes": sum(f.stat().st_size for f in workdir.glob(f"{name}.onnx*")),
        "records": [],
    }
    harness.log(
        f"  exported in {export_s:.1f} s ({res['file_bytes'] / 2**20:,.0f} MiB), loaded in {load_s:.1f} s: "
        f"path {loaded.path_taken}"
    )
    if loaded.path_taken != "native":
        res["error"] = f"not recognised: {loaded.reason}"
        return res
    direct = init_random(cfg, args.seed, dtype, xp)
    rng = np.random.default_rng(args.seed)
    for b in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt))
        (native, toks_n), (base, toks_d) = decode_rates([loaded.model, direct], prompts, args.new, args.reps)
        same = toks_n == toks_d
        res["records"].append(
            {
                "batch": b,
                "native_tok_s": native,
                "runtime_tok_s": base,
                "ratio": native / base,
                "tokens_identical": same,
            }
        )
        harness.log(
            f"  batch {b:>3}: onnx->native {native:>10,.0f} tok/s, runtime {base:>10,.0f} tok/s "
            f"({native / base:.3f}x), greedy tokens {'identical' if same else 'DIFFER'}"
        )
    del direct
    if name != "llama-1b":  # the executor for scale: whole-sequence re-runs, one prompt
        ex_model = load(path, native=False, dtype=dtype, device="gpu" if gpu else "cpu")
        prompt = rng.integers(0, cfg.vocab_size, (1, args.prompt))
        ex_model.generate(prompt, 2)
        sync(xp)
        t0 = time.perf_counter()
        ex_model.generate(prompt, args.exec_new)
        sync(xp)
        res["executor_tok_s"] = args.exec_new / (time.perf_counter() - t0)
        harness.log(f"  executor path (no KV cache): {res['executor_tok_s']:,.1f} tok/s at batch 1")
        res["profile"] = profile_model(path, "gpu" if gpu else "cpu", dtype, args.prompt)
    return res


def verdicts(results: list[dict[str, Any]], chain: dict[str, float]) -> list[harness.Verdict]:
    out = []
    for r in results:
        what = (
            f"{r['config']}: ONNX-loaded native decode >= {ACCEPT_RATIO:g}x the runtime's own, "
            "greedy identical"
        )
        if "error" in r:
            out.append(harness.Verdict("FAIL", f"{what}: {r['error']}"))
            continue
        recs = r["records"]
        ok = bool(recs) and all(x["ratio"] >= ACCEPT_RATIO and x["tokens_identical"] for x in recs)
        each = ", ".join(
            f"batch {x['batch']} {x['ratio']:.3f}x ({x['native_tok_s']:,.0f} vs {x['runtime_tok_s']:,.0f} "
            f"tok/s{'' if x['tokens_identical'] else ', tokens differ'})"
            for x in recs
        )
        out.append(harness.Verdict("PASS" if ok else "FAIL", f"{what}: {each}"))
    out.append(
        harness.Verdict(
            "PASS",
            f"executor overhead reported: {chain['us_per_node']:.1f} us per node "
            f"(chain of {chain['nodes']} no-op Adds)",
        )
    )
    return out


def markdown(
    header: dict[str, Any],
    chain: dict[str, float],
    results: list[dict[str, Any]],
    verdict_list: list[harness.Verdict],
) -> str:
    lines = [
        f"# ONNX: executor overhead and native-path decode ({header.get('gpu', 'cpu')})",
        "",
        f"Executor overhead: **{chain['us_per_node']:.1f} us per node** (chain of {chain['nodes']} no-op Add "
        "nodes on one float).",
        "",
    ]
    lines += [
        "| config | batch | ONNX -> native tok/s | runtime tok/s | ratio | greedy identical |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for x in r["records"]:
            lines.append(
                f"| {r['config']} | {x['batch']} | {x['native_tok_s']:,.0f} | {x['runtime_tok_s']:,.0f} | "
                f"{x['ratio']:.3f} | {x['tokens_identical']} |"
            )
    for r in results:
        if "profile" in r:
            p = r["profile"]
            lines += [
                "",
                f"## {r['config']}: executor forward, {p['nodes']} nodes, {p['wall_s'] * 1e3:.1f} ms "
                f"({p['wall_s'] / p['nodes'] * 1e6:.1f} us per node; executor decode "
                f"{r['executor_tok_s']:,.1f} tok/s without KV cache)",
                "",
                "| op | nodes | ms (profiled) |",
                "|---|---:|---:|",
            ]
            lines += [f"| {k} | {v['nodes']} | {v['ms']:.3f} |" for k, v in list(p["ops"].items())[:15]]
        lines.append(
            f"\n{r['config']}: export {r['export_s']:.1f} s, load {r['load_s']:.1f} s, file "
            f"{r['file_bytes'] / 2**20:,.0f} MiB, path {r['path_taken']}"
        )
    lines += ["", *harness.acceptance_lines(verdict_list)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--configs", type=harness.list_arg(list(CONFIGS), "config"), default=["gpt2-small", "llama-1b"]
    )
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (64)")
    p.add_argument("--new", type=int, default=64, help="new tokens (64)")
    p.add_argument("--exec-new", type=int, default=8, help="tokens generated on the executor path (8)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker on the exported files")
    p.add_argument("--no-verify", action="store_true", help="skip rawformer.load's probe verification")
    p.add_argument("--quick", action="store_true", help="gpt2-small (tiny on the CPU), batch 1 and 8, 3 reps")
    p.add_argument("--out", metavar="DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.configs = ["tiny"] if args.device == "cpu" else ["gpt2-small"]
        args.batches, args.reps, args.new, args.prompt = [1, 8], min(args.reps, 3), 16, 16
    if args.device == "gpu":
        xp = harness.require_gpu("onnx.py")
        device = harness.device_header(xp)
    else:
        xp, device = np, {"gpu": "cpu", "gpu_slug": "cpu"}
    chain = chain_overhead(args.device, reps=5)
    harness.log(f"executor overhead: {chain['us_per_node']:.1f} us per node ({args.device})")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.configs:
            results.append(run_config(name, args, xp, Path(d)))
    verdict_list = verdicts(results, chain)
    header = harness.run_header(
        device,
        chain=chain,
        workload={k: getattr(args, k) for k in ("prompt", "new", "batches", "reps", "seed", "device")},
    )
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / "onnx.json", header, results)
    (out_dir / "onnx.md").write_text(markdown(header, chain, results, verdict_list))
    harness.copy_to_out(out_dir, ["onnx.json", "onnx.md"], args.quick, args.out)
    print()
    for v in verdict_list:
        print(f"{v.status}: {v.text}")
    harness.log(f"wrote {out_dir / 'onnx.json'}, {out_dir / 'onnx.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
