"""rawformer.distributed on the GPU (marked gpu: skipped without one): the NCCL path with one rank (mpirun
-n 1, one GPU), DataParallel on CuPy parameters, and the bucketed all-reduce's overhead on a GPT-2 step
(< 5%, measured by bench/distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rawformer.distributed.launch import find_mpiexec

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "distributed"


def _run(
    args: list[str], cwd: Path, timeout: float = 600, ranks: int = 1, check: bool = True, **extra: str
) -> subprocess.CompletedProcess:
    exe = find_mpiexec()
    if exe is None:
        pytest.skip("no mpiexec / mpirun on this machine")
    # Open MPI refuses root without these; NVLink multicast stays off on the GPU machines
    env = dict(
        os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", NCCL_NVLS_ENABLE="0",
        **extra,
    )  # fmt: skip
    proc = subprocess.run([exe, "-n", str(ranks), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)  # fmt: skip
    tail = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in tail if "Error" in ln or "error" in ln][
        -20:
    ]  # the traceback, not mpiexec's footer
    if check:
        assert proc.returncode == 0, (
            f"{args} failed:\n" + "\n".join(errors) + "\n" + proc.stdout[-1500:] + proc.stderr[-2000:]
        )
    return proc


def test_nccl_path_and_data_parallel_on_one_gpu():
    proc = _run([str(DIST / "gpu_check.py")], DIST)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["nccl_wrong"] == 0 and r["host-staged_wrong"] == 0, r
    assert r.get("mpi-cuda_wrong", 0) == 0, r
    for name in ("nccl", "host-staged"):
        assert r[f"dp_{name}_rel"] <= 1e-6, r  # fp32: the same as one process
        assert r[f"dp_{name}_early"] == [r[f"dp_{name}_buckets"]] * 3, r  # every bucket left during backward
    assert r["dp_nccl_fp16_rel"] <= 2e-3, r  # float16 on the wire: half-precision rounding of the gradient
    # gradients are bucket views; finish() returned while a 0.5 s kernel queued before it still ran (it
    # does not block the host), and the gradients read after it on the stream are the averaged ones
    assert r["finish_views"] and r["finish_returned_before_spin"] and r["finish_ms"] < 250, r
    assert r["finish_grad_rel"] <= 1e-6 and r["finish_unused_zero"], r
    assert 0.0 <= r["finish_exposed_ms"] < 60_000, r


def _result(proc: subprocess.CompletedProcess) -> dict:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_two_ranks_sharing_the_gpu_host_staged():
    """DP and PP (both schedules) on CuPy arrays with 2 ranks on the one GPU, through host-staged MPI."""
    r = _result(_run([str(DIST / "gpu_check.py")], DIST, ranks=2, GPU_KINDS="host-staged"))
    assert r["size"] == 2 and r["host-staged_wrong"] == 0 and r["dp_host-staged_rel"] <= 1e-6, r
    p = _result(
        _run([str(DIST / "pp_check.py")], DIST, ranks=2, PP_GPU="1", RAWFORMER_COLLECTIVES="host-staged")
    )
    for kind in ("gpipe", "1f1b"):
        assert (
            p[kind]["grads_seen"] == 16 and p[kind]["grad_diff"] <= 1e-6 and p[kind]["loss_diff"] <= 1e-6
        ), p


def test_bucketed_allreduce_overhead_under_5_percent(tmp_path):
    """The bench's DP step runs and is timed; the < 5% bar is asserted when this test has the GPU to itself
    (pytest without xdist). Among parallel GPU tests (make gpu-check's -n 8) other workers' kernels share
    the GPU and the step timings with it: there the bench run alone judges the bar (gpu-check runs
    bench/distributed.py, which exits 1 when it fails)."""
    proc = _run([str(ROOT / "bench" / "distributed.py"), "--no-sweep", "--dp-reps", "10", "--out",
                 str(tmp_path)], ROOT, check=False)  # fmt: skip
    records = json.loads((tmp_path / "distributed.json").read_text())["records"]
    dp = next(r["dp"] for r in records if "dp" in r)
    assert dp["collectives"] == "nccl" and dp["plain_ms"] > 0 and dp["dp_ms"] > 0, dp
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip(
            f"DP overhead {dp['overhead']:+.2%} measured beside other GPU tests: judged by the bench alone"
        )
    assert dp["overhead"] < 0.05, (dp, proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_allreduce_sweep_quick(tmp_path):
    _run([str(ROOT / "bench" / "distributed.py"), "--quick", "--no-dp", "--out", str(tmp_path)], ROOT)
    records = json.loads((tmp_path / "distributed.json").read_text())["records"]
    assert {r["path"] for r in records} == {"nccl", "rawformer"}
    assert all(r["wrong"] == 0 for r in records)
    assert min(r["size"] for r in records) == 8 and max(r["size"] for r in records) == 64 << 20
