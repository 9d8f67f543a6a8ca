"""The training GPT (rawformer.training.model, tied embedding = a parameter used twice) under DataParallel on
CPU ranks: the averaged gradient of the ranks' halves equals one process's gradient over the whole batch;
then bench/distributed.py's DP-overhead function runs on NumPy (its code path, not its numbers).
Run: mpiexec -n R python tests/distributed/gpt_dp_check.py"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import common
import numpy as np
from rawformer.models.config import GPT2Config

import rawformer.distributed as dist
from rawformer.training.model import GPT

BENCH = Path(__file__).resolve().parents[2] / "bench"
CFG = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
BATCH, SEQ = 4, 9

groups = dist.init()
rank, size = groups.rank, groups.size
rng = np.random.default_rng(7)
ids = rng.integers(0, CFG.vocab_size, (BATCH, SEQ))
tgt = rng.integers(0, CFG.vocab_size, (BATCH, SEQ))
model = GPT.create(CFG, seed=1)
dp = dist.DataParallel(model.parameters(), bucket_mb=0.01, first_bucket_mb=0.002)
dp.broadcast_parameters()
per = BATCH // size
dp.begin_step(True)
model.loss(ids[rank * per : (rank + 1) * per], tgt[rank * per : (rank + 1) * per]).backward()
dp.finish()
grads = {k: p.grad.copy() for k, p in model.parameters().items()}

for name in ("harness", "distributed"):  # the bench scripts import harness by that name
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
bench = sys.modules["distributed"]
rec = bench.dp_overhead(np, groups, "gpt2-tiny", "float32", reps=2)
bal = bench.balance_run(np, groups, "gpt2-tiny", "float32", steps=4, every=2)

# the bus-bandwidth verdict (issue 11's bar) on synthetic sweep records: N/A on one rank, else judged
sweep = [
    {"path": path, "size": size, "placement": where, "time_us": t}
    for path, t in (("nccl", 100.0), ("rawformer", 105.0))
    for size in (1 << 20, 64 << 20)
    for where in ("in", "out")
]
slow = [dict(r, time_us=200.0) if r["path"] == "rawformer" and r["size"] == 64 << 20 else r for r in sweep]
verdicts = {
    "one_rank": bench.busbw_verdict(slow, 1).status,
    "fast": bench.busbw_verdict(sweep, 2).status,
    "slow": bench.busbw_verdict(slow, 2).status,
    "small_only": bench.busbw_verdict([r for r in sweep if r["size"] < 64 << 20], 2),
}
Verdict = sys.modules["harness"].Verdict
exits = [
    bench.exit_code([Verdict(bench.NOT_APPLICABLE, "x"), Verdict("PASS", "y"), Verdict("SKIP", "z")]),
    bench.exit_code([Verdict(bench.NOT_APPLICABLE, "x"), Verdict("FAIL", "y")]),
]

if rank == 0:
    ref = GPT.create(CFG, seed=1)
    ref.loss(ids, tgt).backward()
    common.result(
        check="gpt_dp",
        size=size,
        buckets=len(dp.buckets),
        max_diff=common.max_diff(grads, {k: p.grad for k, p in ref.parameters().items()}),
        bench_keys=sorted(rec),
        bench_tokens=rec["tokens_per_s"] > 0 and rec["plain_ms"] > 0,
        balance_shares=bal["shares"],
        busbw_verdicts=verdicts,
        exit_codes=exits,
    )
