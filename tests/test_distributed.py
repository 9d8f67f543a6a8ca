"""rawformer.distributed on CPU ranks: `mpiexec -n 2` / `-n 4` (the pip MPICH of the mpi extra) run the
scripts under tests/distributed/, each comparing with one process and printing a RESULT line read here;
plus the pure functions (buckets, partitions, schedules, shares, checkpoints) in this process.

The multi-rank tests skip, with the reason, only when mpiexec cannot start a job at all."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rawformer.distributed import balance, faults, pipeline
from rawformer.distributed.data_parallel import MIB, plan_buckets
from rawformer.distributed.launch import find_mpiexec

DIST = Path(__file__).parent / "distributed"
TOL = 1e-6  # fp32: DP / PP / balanced results against one process


@functools.cache
def _mpiexec() -> str:
    exe = find_mpiexec()
    if exe is None:
        pytest.skip("no mpiexec: install the mpi extra (pip install 'rawformer[mpi]')")
    probe = subprocess.run(
        [exe, "-n", "2", sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"mpiexec cannot start a 2-rank job here: {(probe.stderr or probe.stdout)[-300:]}")
    return exe


def _env() -> dict[str, str]:
    # one thread per rank: ranks share the 2 CI cores; no GPU for these CPU ranks
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", RAWFORMER_BACKEND="cpu")


def run_ranks(n: int, script: str, *args: str, timeout: float = 60, **env: str) -> dict:
    """Run tests/distributed/<script> on n ranks; the RESULT of rank 0 as a dict."""
    proc = subprocess.run(
        [_mpiexec(), "-n", str(n), sys.executable, str(DIST / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=DIST,
        env={**_env(), **env},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"{script} -n {n} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


# ---- multi-rank ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 4])
def test_data_parallel_equals_one_process(ranks):
    r = run_ranks(ranks, "dp_check.py")
    assert r["size"] == ranks
    assert r["max_diff"] <= TOL, r  # parameters after 4 steps (2 micro-steps each) vs one process
    assert r["replica_diff"] == 0.0, r  # every replica holds the same parameters
    # every bucket launched during the final micro-step's backward, none on the accumulation micro-step
    assert r["buckets"] > 1 and r["launches"] == [0, r["buckets"]] * 4, r
    assert 0 < r["fp16_rel"] <= 2e-3, r  # fp16 compression: half-precision rounding, no more


@pytest.mark.parametrize("ranks", [1, 2])
def test_gradients_are_bucket_views(ranks):
    r = run_ranks(ranks, "dp_views_check.py")
    for x in r["ranks"]:  # every rank: the same averaged gradients, each checked against one process
        assert x["size"] == ranks and x["buckets"] > 1 and x["all_views"], x
        assert x["attached_zero"] and x["views_after_finish"] and x["views_after_foreign"], x
        assert x["views_micro0"] and x["views_micro1"], x  # accumulation stays in the buckets
        assert x["step_diff"] <= TOL and x["accum_diff"] <= TOL and x["foreign_diff"] <= TOL, x
        assert not x["fp16_views"] and not x["fp16_shares"] and 0 < x["fp16_rel"] <= 2e-3, x
        assert x["staged_wrong"] == 0 and x["staged_local"] is (True if ranks == 1 else None), x


def test_training_gpt_under_data_parallel():
    r = run_ranks(2, "gpt_dp_check.py")  # the tied embedding is one parameter used twice
    assert r["buckets"] > 1 and r["max_diff"] <= TOL, r
    assert r["bench_tokens"] and "exposed_comm_ms" in r["bench_keys"], r  # bench/distributed.py's DP path
    # its --balance path (the numbers are the GPU run's business): every share list covers the global batch
    assert r["balance_shares"][0] == [2, 2] and all(sum(x) == 4 for x in r["balance_shares"]), r
    # the bench's bus-bandwidth bar: N/A on one rank (never FAIL), judged on more; exit 1 only on a FAIL
    assert r["busbw_verdicts"] == {"one_rank": "N/A", "fast": "PASS", "slow": "FAIL", "small_only": None}, r
    assert r["exit_codes"] == [0, 1], r


def test_gpt_pipeline_benchmark_path():
    r = run_ranks(2, "gpt_pp_check.py")  # bench/distributed.py --pp's stages: embedding, blocks, head
    assert r["ranges"] == [[0, 2], [2, 4]] and r["loss_diff"] <= TOL and all(r["tokens"]), r


def test_training_loop_with_data_parallel(tmp_path):
    r = run_ranks(
        2, "train_check.py", str(tmp_path)
    )  # rawformer.training.loop.train(dp_factory=DataParallel)
    assert len(r["losses"]) == 3 and r["max_diff"] <= 4e-6, r  # losses ~5.5 in fp32: a few ulps


@pytest.mark.parametrize("ranks,plan", [(2, None), (4, None), (4, "1,3,2,2")])
def test_pipeline_equals_one_process(tmp_path, ranks, plan):
    r = run_ranks(ranks, "pp_check.py", *([plan] if plan else []), PNG_DIR=str(tmp_path))
    assert r["stages"] == ranks
    if plan:
        assert [b - a for a, b in r["ranges"]] == [1, 3, 2, 2]
    for kind in ("gpipe", "1f1b"):
        assert r[kind]["grads_seen"] == 16, r  # every layer's weight and bias came back
        assert r[kind]["grad_diff"] <= TOL and r[kind]["loss_diff"] <= TOL, (kind, r)
        assert r[kind]["theory"] == pytest.approx((ranks - 1) / (5 + ranks - 1))
        assert 0.0 <= r[kind]["bubble"] < 1.0
        assert Path(r[kind]["png"]).read_bytes()[:4] == b"\x89PNG"  # the timeline with its bubble
    assert r["gpipe"]["peak_in_flight"] == 5  # GPipe keeps every micro-batch's activations
    assert r["1f1b"]["peak_in_flight"] == ranks  # 1F1B at most p on stage 0


def test_groups_layout_and_pipeline_times_data_parallel():
    r = run_ranks(4, "groups_check.py")  # pp=2, dp=2: rank = dp_index * pp + stage
    by_rank = {x["rank"]: x for x in r["layouts"]}
    for rank, x in by_rank.items():
        assert (x["stage"], x["dp_index"]) == (rank % 2, rank // 2)
        assert x["data"] == [rank % 2, rank % 2 + 2] and x["pipeline"] == [
            rank - rank % 2,
            rank - rank % 2 + 1,
        ]
        assert x["data_rank"] == rank // 2 and x["pipe_rank"] == rank % 2
        assert x["local"] == [rank, 4]  # one node: the local rank (-> GPU) is the rank
    assert len(r["grads_seen"]) == 16 and r["grad_diff"] <= TOL, r


def test_load_balancing_speeds_up_a_slow_rank_and_keeps_the_gradient():
    r = run_ranks(2, "balance_check.py")
    assert r["shares"][0] == [12, 12] and r["shares"][1][0] > r["shares"][1][1], r
    assert r["improvement"] >= 0.25, r
    assert r["grad_diff"] <= TOL, r


@pytest.mark.parametrize("mode,ranks,resume_ranks", [("hang", 4, 2), ("kill", 4, 3)])
def test_failed_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path, mode, ranks, resume_ranks):
    ckpt = tmp_path / "ckpt.npz"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rawformer.distributed.launch",
            "--mpiexec",
            _mpiexec(),
            "-n",
            str(ranks),
            "--",
            sys.executable,
            str(DIST / "fault_check.py"),
            "train",
            mode,
            str(ckpt),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DIST,
        env=_env(),
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 3.0 + 20, f"stopped after {elapsed:.1f} s (watchdog timeout 3 s)"
    if mode == "hang":  # the watchdog of a waiting rank names the missing one
        assert "rawformer.distributed: rank" in out and "rank(s) [1] did not reach step 3" in out, out
    else:  # the launcher killed the job at once; the wrapper names the dead rank from its PID
        assert "rawformer.distributed.launch: rank 1 (pid" in out and "died" in out, out
    # the last checkpoint is whole: that of step 3 (rank 1 failed before step 4), or an earlier one when the
    # launcher killed rank 0 while it wrote (the kill case: hydra stops every rank at once)
    arrays, meta = faults.load_checkpoint(ckpt)
    assert set(arrays) == {"w1", "b1", "w2", "b2"} and meta["ranks"] == ranks
    assert meta["step"] == 3 if mode == "hang" else 1 <= meta["step"] <= 3, meta
    r = run_ranks(resume_ranks, "fault_check.py", "resume", str(ckpt))
    assert r["first"] == meta["step"] and r["size"] == resume_ranks
    assert r["max_diff"] <= TOL, r


def test_hung_pipeline_stage_is_named():
    t0 = time.monotonic()
    proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(DIST / "pp_hang_check.py")],
                          capture_output=True, text=True, timeout=60, cwd=DIST, env=_env())  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - t0 < 2.0 + 20, out
    assert (
        "rawformer.distributed: rank 0 waited 2 s for the gradient of micro-batch 0 from stage 1 (rank 1)"
        in out
    )


# ---- single process: the pure parts ------------------------------------------------------------------------


def test_missing_mpi4py_names_the_extra(monkeypatch):
    from rawformer.distributed import groups

    monkeypatch.setattr(groups, "_MPI", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ImportError, match=r"rawformer\[mpi\]"):
        groups.mpi()


def test_buckets_reverse_order_first_small():
    nbytes = [400, 400, 400, 400, 4000, 400]
    b = plan_buckets(nbytes, ["f4"] * 6, bucket_mb=1000 / MIB, first_bucket_mb=500 / MIB)
    assert b == [[5], [4], [3, 2], [1, 0]]  # last parameter first; 4000 B alone (over the cap)
    assert sum(b, []) == list(range(5, -1, -1))
    mixed = plan_buckets([4, 4, 4], ["f4", "f2", "f2"], 1.0, 1.0)
    assert mixed == [[2, 1], [0]]  # one dtype per bucket


def test_partition_by_parameter_count_and_plan():
    assert pipeline.partition([1, 1, 1, 1, 4], 2) == [range(0, 4), range(4, 5)]
    counts = [5, 9, 2, 7, 7, 3, 1, 8]
    for p in (1, 2, 3, 4, 8):
        ranges = pipeline.partition(counts, p)
        assert len(ranges) == p and all(len(r) >= 1 for r in ranges)
        assert [i for r in ranges for i in r] == list(range(len(counts)))
        best = max(sum(counts[i] for i in r) for r in ranges)
        # brute force over every split into p contiguous parts: none has a smaller largest stage
        for cuts in itertools.combinations(range(1, len(counts)), p - 1):
            bounds = [0, *cuts, len(counts)]
            assert best <= max(sum(counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert pipeline.partition(counts, 3, plan=[2, 5, 1]) == [range(0, 2), range(2, 7), range(7, 8)]
    with pytest.raises(ValueError, match="plan"):
        pipeline.partition(counts, 3, plan=[2, 5, 2])
    with pytest.raises(ValueError, match="stages"):
        pipeline.partition(counts, 9)


@pytest.mark.parametrize("kind", pipeline.SCHEDULES)
@pytest.mark.parametrize("p,m", [(1, 1), (2, 5), (4, 3), (4, 8)])
def test_schedules_are_complete_and_causal(kind, p, m):
    for s in range(p):
        acts = pipeline.schedule(kind, p, s, m)
        assert sorted(acts) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(acts.index(("F", i)) < acts.index(("B", i)) for i in range(m))
        live, peak = 0, 0
        for op, _ in acts:
            live += 1 if op == "F" else -1
            peak = max(peak, live)
        assert peak == (m if kind == "gpipe" else min(p - s, m))
    assert pipeline.theoretical_bubble(p, m) == pytest.approx((p - 1) / (m + p - 1))


def test_proportional_shares():
    assert balance.proportional_shares(24, [2.0, 1.0]) == [16, 8]
    assert balance.proportional_shares(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(balance.proportional_shares(97, [3.3, 0.1, 7.9, 1.0])) == 97
    assert balance.proportional_shares(5, [1000.0, 0.0], minimum=1) == [4, 1]
    with pytest.raises(ValueError, match="at least"):
        balance.proportional_shares(3, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        balance.proportional_shares(8, [1, float("nan")])


def test_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.npz"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    faults.save_checkpoint(path, {"w": w}, {"step": 4})
    arrays, meta = faults.load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], w)
    assert meta == {"step": 4}

    class Boom:  # an array whose conversion fails mid-write: the old checkpoint must survive
        def __array__(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        faults.save_checkpoint(path, {"w": w, "x": Boom()}, {"step": 5})
    assert faults.load_checkpoint(path)[1] == {"step": 4}
    assert [f.name for f in tmp_path.iterdir()] == ["c.npz"]


def test_timeline_png_and_bubble(tmp_path):
    spans = [
        pipeline.Span(0, "F", 0, 0.0, 1.0),
        pipeline.Span(1, "F", 0, 1.0, 2.0),
        pipeline.Span(1, "B", 0, 2.0, 4.0),
        pipeline.Span(0, "B", 0, 4.0, 6.0),
    ]
    assert pipeline.bubble_fraction(spans, 2) == pytest.approx(1 - 6 / 12)
    info = pipeline.plot_timeline(spans, 2, 1, str(tmp_path / "t.png"), title="test")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert info["theoretical_bubble"] == pytest.approx(0.5)


def test_aligned_offsets():
    from rawformer.distributed.data_parallel import aligned_offsets

    assert aligned_offsets([3, 70, 1], 4) == [0, 64, 192]  # 256-byte slots: 64 float32
    assert aligned_offsets([128, 1, 0, 5], 2) == [0, 128, 256, 256]
    assert aligned_offsets([], 4) == []


def test_use_grad_buffer_accumulates_in_place():
    from rawformer import autograd as ag

    rng = np.random.default_rng(0)
    w = ag.Tensor(rng.standard_normal((3, 5)).astype(np.float32), requires_grad=True)
    x = ag.Tensor(rng.standard_normal((4, 3)).astype(np.float32))
    flat = np.full(40, np.nan, dtype=np.float32)  # the slot is 15 of 40 values; NaN must be overwritten
    view = flat[8:23].reshape(3, 5)
    w.use_grad_buffer(view)  # no .grad yet: zeros
    assert w.grad is view and not view.any()
    ag.sum(ag.matmul(x, w)).backward()
    ag.sum(ag.matmul(x, w)).backward()  # two backward calls add into the same buffer
    expected = 2 * x.data.sum(axis=0)[:, None] * np.ones((1, 5), dtype=np.float32)
    assert w.grad is view
    np.testing.assert_allclose(flat[8:23].reshape(3, 5), expected, rtol=1e-6)
    assert np.isnan(flat[:8]).all() and np.isnan(flat[23:]).all()  # nothing written outside the slot

    other = np.empty((3, 5), dtype=np.float32)
    w.use_grad_buffer(other)  # keep=True: the gradient so far moves with it
    np.testing.assert_array_equal(other, expected)
    w.grad = None  # zero_grad detaches: the next backward allocates afresh, the buffer stays as it was
    ag.sum(ag.matmul(x, w)).backward()
    assert w.grad is not other
    np.testing.assert_array_equal(other, expected)
    mine = np.full((3, 5), 7.0, dtype=np.float32)
    w.use_grad_buffer(mine, keep=False)  # taken as is (the caller zeroed a whole bucket)
    assert w.grad is mine and (mine == 7.0).all()

    with pytest.raises(ValueError, match="expected"):
        w.use_grad_buffer(np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected"):
        w.use_grad_buffer(np.zeros((3, 5), dtype=np.float64))
    with pytest.raises(TypeError, match="buffer"):
        w.use_grad_buffer([[0.0] * 5] * 3)
    with pytest.raises(ValueError, match="overlaps"):
        w.use_grad_buffer(w.data)
    with pytest.raises(ValueError, match="leaves"):
        x.use_grad_buffer(np.zeros((4, 3), dtype=np.float32))
    assert w.grad is mine  # a refused buffer changes nothing
