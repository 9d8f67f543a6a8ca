"""bench/distributed.py's pipeline mode on CPU ranks (NumPy, the tiny GPT): both schedules run, and the
micro-batch losses equal the whole model's in one process. Run: mpiexec -n R python gpt_pp_check.py"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import common
import numpy as np

import rawformer.distributed as dist

BENCH = Path(__file__).resolve().parents[2] / "bench"
for name in ("harness", "distributed"):  # the bench scripts import harness by that name
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
bench = sys.modules["distributed"]

size = dist.mpi().COMM_WORLD.Get_size()
groups = dist.init(pp=size)
recs = [bench.pp_run(np, groups, "gpt2-tiny", "float32", kind, micro=3, reps=1) for kind in ("gpipe", "1f1b")]
if groups.rank == 0:
    from rawformer.models.config import GPT2Config

    from rawformer.training.model import GPT

    overrides, mb, seq = bench.CONFIGS["gpt2-tiny"]
    cfg = GPT2Config(**overrides)
    model = GPT.create(cfg, seed=0)
    rs = np.random.default_rng(0)
    ids = [rs.integers(0, cfg.vocab_size, (mb, seq)) for _ in range(3)]
    tgt = [rs.integers(0, cfg.vocab_size, (mb, seq)) for _ in range(3)]
    ref = [float(model.loss(i, t).data) for i, t in zip(ids, tgt, strict=True)]
    common.result(
        check="gpt_pp",
        stages=size,
        ranges=recs[0]["ranges"],
        loss_diff=max(abs(a - b) for r in recs for a, b in zip(r["losses"], ref, strict=True)),
        tokens=[r["tokens_per_s"] > 0 for r in recs],
        theory=[r["bubble_theoretical"] for r in recs],
    )
