"""What every benchmark family (bench/<family>.py) shares: timing, the copy ceiling, checks, results.

A family script describes its ops (inputs, bytes, implementations, float64 reference) and its CONFIGS of
real model shapes; this module does the rest the same way for all of them:

- `require_gpu` / `device_header`: CuPy and the device, or a clear exit; name, L2 size, versions, commit.
- `CudaClock` + `time_calls`: CUDA events around every call, after a warm-up, median of `reps` (>= 20).
  A spin kernel is queued first so the host runs ahead of the GPU: the events then bracket GPU work only,
  not Python launch overhead. Calls rotate over several input sets (`rotation_sets`) whose total size is
  over 4x L2, so every call reads its inputs from device memory (cold L2).
- `measure_copy_ceiling`: the roofline measured in the same run (>= 1 GiB device-to-device copy, bytes read
  plus written; the best of cudaMemcpy and a 16-byte-vector copy kernel). Never hard-coded.
- `rel_error` / `sample_rows`: correctness against the float64 reference before anything is timed.
- `write_json`, `markdown_report`, `evaluate` (acceptance criteria), `write_plot`: the results files.

Everything here except `require_gpu`, `CudaClock`, `measure_copy_ceiling` and `device_header` runs without a
GPU (the tests in tests/test_bench_harness.py use `HostClock` and NumPy).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "bench" / "results"
MIN_REPS = 20
CEILING_BYTES = 1 << 30  # the copy that measures the ceiling moves at least this much each way
L2_FACTOR = 4  # rotation sets together are larger than this many L2 caches

# the distributions whose versions go into every results file
VERSIONED = ("numpy", "cupy", "numba", "numba-cuda", "torch", "rawformer", "matplotlib")


def log(*parts: Any) -> None:
    """Print one progress line now (the GPU machine's output is piped through tee)."""
    print(*parts, flush=True)


def describe(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters (for a record's message)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def import_torch(cp: Any) -> Any:
    """torch on CuPy's current device, or None (logged) when it does not import or has no CUDA."""
    try:
        import torch
    except Exception as exc:
        log(f"torch did not import ({exc}): its columns are skipped")
        return None
    if not torch.cuda.is_available():
        log("torch has no CUDA here: its columns are skipped")
        return None
    torch.cuda.set_device(cp.cuda.Device().id)
    return torch


# ---- device, versions, where results go ------------------------------------------------------------------


def list_arg(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of names, each one of `choices`."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def require_gpu(script: str) -> Any:
    """CuPy with a CUDA device, or exit with a message that says what is missing."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise SystemExit(
            f"{script}: needs an NVIDIA GPU and CuPy, but CuPy did not import ({exc}). Install the GPU extra "
            "(pip install -e '.[cuda13]' or '.[cuda12]') on a machine with a CUDA device."
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise SystemExit(f"{script}: needs a CUDA GPU, but CUDA found none ({exc}).") from None
    if count < 1:
        raise SystemExit(f"{script}: needs a CUDA GPU, but CUDA found none.")
    return cupy


def gpu_slug(name: str) -> str:
    """A short directory name for a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' ->
    'rtx4090', 'NVIDIA A100-SXM4-80GB' -> 'a100'. Falls back to the whole name, lower-case, dashed."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "quadro")]
    for i, w in enumerate(words):
        if w in ("rtx", "gtx") and i + 1 < len(words) and words[i + 1].isdigit():
            return w + words[i + 1]
        if re.fullmatch(r"[a-z]+\d+[a-z]*", w):
            return w
    return "-".join(words) or "unknown-gpu"


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """(HEAD commit, whether the work tree has uncommitted changes); ('unknown', False) outside a repo.

    A copy of the work tree without .git (the GPU machine gets one) names its commit in RAWFORMER_COMMIT.
    """
    if os.environ.get("RAWFORMER_COMMIT"):
        return os.environ["RAWFORMER_COMMIT"], False
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown", False
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    """Installed versions by distribution name (without importing anything); 'not installed' if absent."""
    found = {"python": platform.python_version()}
    for name in names:
        candidates = (name, f"{name}-cuda13x", f"{name}-cuda12x") if name == "cupy" else (name,)
        for dist in candidates:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            found[name] = "not installed"
    return found


def device_header(cp: Any) -> dict[str, Any]:
    """Name, slug, compute capability, SM count, L2 and memory of the current device, CUDA versions."""
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "gpu_slug": gpu_slug(name),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "multiprocessors": int(props["multiProcessorCount"]),
        "l2_bytes": int(props["l2CacheSize"]),
        "memory_bytes": int(props["totalGlobalMem"]),
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
    }


def run_header(device: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The header of a results file: device, date (UTC), commit, versions, command line, and `extra`."""
    commit, dirty = git_commit()
    return {
        **device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "versions": versions(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **extra,
    }


def output_dir(slug: str, quick: bool, out: str | None) -> Path:
    """Where results go: --out if given; a quick run into $OUT (or bench/out), never into bench/results;
    a full run into bench/results/<gpu slug>/."""
    if out:
        return Path(out)
    if quick:
        return Path(os.environ.get("OUT") or REPO_ROOT / "bench" / "out")
    return RESULTS_ROOT / slug


def copy_to_out(out_dir: Path, names: Iterable[str], quick: bool, out: str | None) -> None:
    """A full run on the GPU machine (no --quick, no --out): also bring the results back through $OUT."""
    ret = os.environ.get("OUT")
    if quick or out or not ret or Path(ret).resolve() == out_dir.resolve():
        return
    Path(ret).mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out_dir / name).exists():
            shutil.copy2(out_dir / name, ret)


# ---- timing ------------------------------------------------------------------------------------------------

# Two helper kernels, compiled by NVRTC on first use: a spin that holds the GPU for a given number of
# nanoseconds (so the host can queue every timed call before the first one starts), and a grid-stride copy
# in 16-byte vectors (one of the two copies the ceiling is the best of).
_HELPER_SOURCE = r"""
extern "C" __global__ void bench_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}

extern "C" __global__ void bench_copy16(const int4* __restrict__ src, int4* __restrict__ dst, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}
"""


class CudaClock:
    """CUDA events on CuPy's current stream, plus the spin kernel that lets the host run ahead."""

    def __init__(self, cp: Any):
        self.cp = cp
        self._module = None
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        # the copy kernel's grid: one full wave of 512-thread blocks
        self._copy_blocks = props["multiProcessorCount"] * max(1, props["maxThreadsPerMultiProcessor"] // 512)

    def _kernel(self, name: str) -> Any:
        if self._module is None:
            self._module = self.cp.RawModule(code=_HELPER_SOURCE, options=("-std=c++17",))
        return self._module.get_function(name)

    def event(self) -> Any:
        return self.cp.cuda.Event()

    def record(self, event: Any) -> None:
        event.record()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self.cp.cuda.get_elapsed_time(start, end))

    def synchronize(self) -> None:
        self.cp.cuda.Device().synchronize()

    def hold(self, ns: int) -> None:
        """Queue a kernel that keeps the GPU busy for `ns` nanoseconds."""
        if ns > 0:
            self._kernel("bench_spin")((1,), (1,), (np.uint64(ns),))

    def copy16(self, src: Any, dst: Any) -> None:
        """dst[...] = src with 16-byte loads and stores (both contiguous, nbytes a multiple of 16)."""
        n = src.nbytes // 16
        self._kernel("bench_copy16")((self._copy_blocks,), (512,), (src, dst, np.int64(n)))


class HostClock:
    """The same interface on the host clock, for CPU-only runs and the harness's own tests."""

    def event(self) -> list[float]:
        return [0.0]

    def record(self, event: list[float]) -> None:
        event[0] = time.perf_counter()

    def elapsed_ms(self, start: list[float], end: list[float]) -> float:
        return (end[0] - start[0]) * 1e3

    def synchronize(self) -> None:
        pass

    def hold(self, ns: int) -> None:
        pass


@dataclass(frozen=True)
class Timing:
    """Per-call times in ms (one per timed call) and their summary."""

    times_ms: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.times_ms, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times_ms, 90))


MAX_HOLD_NS = 100_000_000  # never spin more than 0.1 s (a call that synchronises itself gains nothing)


def time_calls(calls: Sequence[Callable[[], Any]], clock: Any, reps: int = 30, warmup: int = 3) -> Timing:
    """Time `reps` calls rotating over `calls` (one per input set); each call between its own two events.

    The first call (which may compile) and `warmup` more run untimed; the warm-up also measures how long
    the host takes to enqueue one call, and the GPU is then held by a spin kernel long enough for the host
    to enqueue all `reps` calls, so that each event pair measures GPU time only.
    """
    if reps < 1 or not calls:
        raise ValueError("time_calls needs at least one call and reps >= 1")
    n = len(calls)
    calls[0]()
    clock.synchronize()
    host_s = []
    k = 1
    for _ in range(warmup):
        t0 = time.perf_counter()
        calls[k % n]()
        host_s.append(time.perf_counter() - t0)
        k += 1
    clock.synchronize()
    per_call = float(np.median(host_s)) if host_s else 1e-4
    starts = [clock.event() for _ in range(reps)]
    ends = [clock.event() for _ in range(reps)]
    clock.hold(int(min(MAX_HOLD_NS, 1.5 * reps * per_call * 1e9 + 100_000)))
    for i in range(reps):
        clock.record(starts[i])
        calls[k % n]()
        clock.record(ends[i])
        k += 1
    clock.synchronize()
    return Timing(tuple(clock.elapsed_ms(s, e) for s, e in zip(starts, ends, strict=True)))


def rotation_sets(set_bytes: int, l2_bytes: int, factor: int = L2_FACTOR, minimum: int = 2) -> int:
    """How many input sets to rotate over so that together they are larger than `factor` x L2."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    return max(minimum, factor * l2_bytes // set_bytes + 1)


def replay_ms(cp: Any, graph: Any, stream: Any, reps: int = 20, launches: int = 1) -> float:
    """Median ms of one replay of a captured CUDA graph: `reps` timings of `launches` back-to-back launches
    between two events on `stream`."""
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(launches):
            graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / launches)
    return float(np.median(times))


def captured_ms(cp: Any, calls: Sequence[Callable[[], Any]], reps: int = 20) -> float:
    """Median ms of `calls` (in order) captured once into one CUDA graph and replayed: their in-graph cost,
    launch gaps included, as a decode step's graph pays it. Each call runs once eagerly first (compiles,
    warms up; the GEMM handle is bound before the capture, as rawformer.runtime.cuda_graphs does)."""
    from rawformer.kernels import gemm

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gemm.prepare()
        for c in calls:
            c()
        stream.synchronize()
        stream.begin_capture()
        for c in calls:
            c()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        return replay_ms(cp, graph, stream, reps)


def measure_copy_ceiling(cp: Any, clock: CudaClock, nbytes: int = CEILING_BYTES, reps: int = 30) -> dict:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), measured now on this GPU.

    Copies `nbytes` of random data twice per timing: with cudaMemcpyAsync and with a 16-byte-vector
    grid-stride kernel; the ceiling is the better of the two medians.
    """
    nbytes = max(16, nbytes // 16 * 16)
    src = cp.random.RandomState(7).standard_normal(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    memcpy = time_calls([lambda: dst.data.copy_from_device_async(src.data, nbytes)], clock, reps)
    kernel = time_calls([lambda: clock.copy16(src, dst)], clock, reps)
    if not bool((dst == src).all()):
        raise RuntimeError("the copy kernel that measures the ceiling produced a wrong copy")
    rates = {"memcpy": gbps(2 * nbytes, memcpy.median), "copy_kernel": gbps(2 * nbytes, kernel.median)}
    return {
        "ceiling_gbps": max(rates.values()),
        "copy_bytes": nbytes,
        **{f"{k}_gbps": v for k, v in rates.items()},
    }


def measure_matmul_ceiling(
    cp: Any, clock: CudaClock, n: int = 8192, dtype: str = "float16", reps: int = 20
) -> dict:
    """cuBLAS (through cupy.matmul) TFLOP/s for an n x n x n product in `dtype`, measured now: the compute
    roofline that compute-bound kernels (prefill attention) are compared with."""
    rs = cp.random.RandomState(11)
    a = rs.standard_normal((n, n), dtype=cp.float32).astype(dtype)
    b = rs.standard_normal((n, n), dtype=cp.float32).astype(dtype)
    c = cp.empty((n, n), dtype=dtype)
    timing = time_calls([lambda: cp.matmul(a, b, out=c)], clock, reps)
    return {
        "matmul_tflops": tflops(2.0 * n**3, timing.median),
        "matmul_shape": [n, n, n],
        "matmul_dtype": dtype,
    }


# ---- numbers -----------------------------------------------------------------------------------------------


def gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) for `nbytes` moved in `ms` milliseconds."""
    return nbytes / ms / 1e6 if ms > 0 else float("nan")


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9 if ms > 0 else float("nan")


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values]
    if not vals or any(v <= 0 or not math.isfinite(v) for v in vals):
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def sample_rows(rows: int, cols: int, budget: int = 1 << 22, most: int = 256, least: int = 8) -> np.ndarray:
    """Row indices to check against the host reference: first, last and evenly spread rows, about
    `budget` elements in all (between `least` and `most` rows, never more than there are)."""
    if rows <= 0:
        return np.zeros(0, dtype=np.int64)
    want = min(rows, most, max(least, budget // max(cols, 1)))
    return np.unique(np.linspace(0, rows - 1, num=want).round().astype(np.int64))


def rel_error(out: Any, ref: Any) -> float:
    """max|out - ref| / max|ref| (inf when `out` is non-finite where `ref` is finite, or shapes differ).

    Both arrays of one kind (NumPy or CuPy); the result is a Python float."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    if out.size == 0:
        return 0.0
    out = out.astype(np.float64)
    ref = ref.astype(np.float64)
    finite = ref == ref  # not NaN in the reference
    bad = ~(out == out) & finite
    if bool(bad.any()):
        return float("inf")
    diff = abs(out - ref)
    diff[~finite] = 0
    scale = float(abs(ref[finite]).max()) if bool(finite.any()) else 1.0
    worst = float(diff.max())
    return worst / max(scale, 1e-30) if math.isfinite(worst) else float("inf")


# ---- records and the results files -------------------------------------------------------------------------

RECORD_KEYS = (
    "op",
    "direction",
    "impl",
    "config",
    "shape",
    "dtype",
    "status",
    "ms",
    "ms_p10",
    "ms_p90",
    "gbps",
    "tflops",
    "pct_ceiling",
    "bytes",
    "flops",
    "max_error",
    "tolerance",
    "reps",
    "input_sets",
    "message",
)


def make_record(
    *,
    op: str,
    direction: str,
    impl: str,
    config: str,
    shape: Sequence[int],
    dtype: str,
    nbytes: int,
    flops: int,
    ceiling_gbps: float,
    timing: Timing | None = None,
    status: str = "ok",
    max_error: float | None = None,
    tolerance: float | None = None,
    input_sets: int | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """One measurement. status: 'ok' (checked, then timed), 'wrong' (failed the check: not timed),
    'error' (raised: not timed)."""
    ms = timing.median if timing is not None else None
    rate = gbps(nbytes, ms) if ms else None
    return {
        "op": op,
        "direction": direction,
        "impl": impl,
        "config": config,
        "shape": [int(s) for s in shape],
        "dtype": str(dtype),
        "status": status,
        "ms": ms,
        "ms_p10": timing.p10 if timing is not None else None,
        "ms_p90": timing.p90 if timing is not None else None,
        "gbps": rate,
        "tflops": tflops(flops, ms) if ms else None,
        "pct_ceiling": 100.0 * rate / ceiling_gbps if rate and ceiling_gbps else None,
        "bytes": int(nbytes),
        "flops": int(flops),
        "max_error": max_error,
        "tolerance": tolerance,
        "reps": len(timing.times_ms) if timing is not None else None,
        "input_sets": input_sets,
        "message": message,
    }


def shape_label(rec: dict[str, Any]) -> str:
    return "x".join(str(s) for s in rec["shape"]) + " " + _short_dtype(rec["dtype"])


def _short_dtype(dtype: str) -> str:
    return {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}.get(dtype, dtype)


def format_line(rec: dict[str, Any]) -> str:
    """The progress line for one record: `ms | GB/s | TFLOP/s | % of ceiling`, or why it was not timed."""
    head = (
        f"{rec['op']:<11} {rec['direction']:<8} {rec['impl']:<9} {rec['config']:<20} {shape_label(rec):<17}"
    )
    if rec["status"] != "ok":
        err = f" (max error {rec['max_error']:.2e})" if rec.get("max_error") is not None else ""
        return f"{head} | {rec['status'].upper()}{err}: {rec.get('message') or ''}"
    return (
        f"{head} | {rec['ms']:9.4f} ms | {rec['gbps']:7.1f} GB/s | {rec['tflops']:6.3f} TFLOP/s | "
        f"{rec['pct_ceiling']:5.1f}% of ceiling | err {rec['max_error']:.1e}"
    )


def _clean(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean({"header": header, "records": records}), indent=1) + "\n")


def read_json(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads(Path(path).read_text())
    return data["header"], data["records"]


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple, dict[str, dict]]]:
    """{(op, direction): {(config, shape, dtype): {impl: record}}}, in first-seen order."""
    out: dict[tuple[str, str], dict[tuple, dict[str, dict]]] = {}
    for rec in records:
        row = (rec["config"], tuple(rec["shape"]), rec["dtype"])
        out.setdefault((rec["op"], rec["direction"]), {}).setdefault(row, {})[rec["impl"]] = rec
    return out


def _ok(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") == "ok" and bool(rec.get("ms"))


def _cell(rec: dict[str, Any] | None, metric: str = "gbps") -> str:
    if rec is None:
        return "-"
    if not _ok(rec):
        err = f" (err {rec['max_error']:.1e})" if rec.get("max_error") is not None else ""
        return f"{rec['status']}{err}"
    if metric == "tflops":
        return f"{rec['tflops']:.0f} TFLOP/s ({rec['ms']:.3f} ms)"
    return f"{rec['gbps']:.0f} GB/s ({rec['ms']:.3f} ms)"


def _ratio(num: dict | None, den: dict | None) -> float | None:
    """How many times faster `den` is than `num` (num.ms / den.ms), or None."""
    if not (_ok(num) and _ok(den)):
        return None
    return num["ms"] / den["ms"]


def markdown_report(
    title: str,
    header: dict[str, Any],
    records: list[dict[str, Any]],
    impls: Sequence[str],
    main: str,
    ratios: Sequence[str] = (),
    main_label: str | None = None,
    verdicts: Sequence[Verdict] = (),
    configs: dict[str, str] | None = None,
    metrics: dict[str, str] | None = None,
    extra_header: Sequence[str] = (),
) -> str:
    """The results as markdown: run header, one table per (op, direction), then the acceptance verdicts.

    Columns: shape | each impl (GB/s and ms) | main/baseline speed-up for each of `ratios` | % of ceiling
    (of `main`); `main_label` names `main` in the speed-up column headers. `metrics` maps an op to
    "tflops" for compute-bound ops: their cells show TFLOP/s, and their records' pct_ceiling (which the
    caller sets) is against a compute ceiling. `extra_header` lines are added to the run header."""
    v = header.get("versions", {})
    short = main_label or main
    lines = [
        f"# {title}",
        "",
        f"- GPU: {header.get('gpu', '?')} ({header.get('multiprocessors', '?')} SMs, "
        f"L2 {header.get('l2_bytes', 0) / 2**20:.0f} MiB)",
        f"- date: {header.get('date', '?')}, commit: {header.get('commit', '?')}"
        + (" (uncommitted changes)" if header.get("dirty") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- copy ceiling (measured in this run, bytes read + written): "
        f"{header.get('ceiling_gbps', 0):.0f} GB/s"
        + (
            f" (memcpy {header['memcpy_gbps']:.0f}, copy kernel {header['copy_kernel_gbps']:.0f})"
            if "memcpy_gbps" in header and "copy_kernel_gbps" in header
            else ""
        ),
        f"- timing: median of {header.get('reps', '?')} calls between CUDA events after a warm-up; inputs "
        f"rotated over sets larger than {L2_FACTOR}x L2 together; each implementation checked against the "
        "float64 reference first (a wrong one is not timed)",
        "- speed-up columns: how many times faster "
        + main
        + " is than the baseline (baseline ms / "
        + main
        + " ms)",
    ]
    lines += list(extra_header)
    if configs:
        lines += ["", "Shapes:", ""] + [f"- `{name}`: {text}" for name, text in configs.items()]
    for (op, direction), rows in _groups(records).items():
        lines += ["", f"## {op} {direction}", ""]
        metric = (metrics or {}).get(op, "gbps")
        ceiling_col = "% compute ceiling" if metric == "tflops" else "% ceiling"
        # only the implementations (and speed-ups) this table has measurements of
        present = [i for i in impls if any(i in by_impl for by_impl in rows.values())]
        base = [b for b in ratios if b in present]
        cols = ["shape", *present, *(f"{short}/{b}" for b in base), ceiling_col]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for (config, _shape, _dtype), by_impl in rows.items():
            any_rec = next(iter(by_impl.values()))
            cells = [f"{shape_label(any_rec)} ({config})"]
            cells += [_cell(by_impl.get(i), metric) for i in present]
            for b in base:
                r = _ratio(by_impl.get(b), by_impl.get(main))
                cells.append(f"{r:.2f}x" if r is not None else "-")
            m = by_impl.get(main)
            cells.append(f"{m['pct_ceiling']:.1f}%" if _ok(m) else "-")
            lines.append("| " + " | ".join(cells) + " |")
        notes = [
            f"- {r['impl']} {shape_label(r)}: {r['status']}: {r.get('message') or ''}"
            for by_impl in rows.values()
            for r in by_impl.values()
            if r["status"] != "ok"
        ]
        if notes:
            lines += ["", "Not timed:", "", *notes]
    if verdicts:
        lines += ["", *acceptance_lines(verdicts)]
    return "\n".join(lines) + "\n"


def acceptance_lines(verdicts: Sequence[Verdict]) -> list[str]:
    """The markdown acceptance section: a heading, the count per status, one bullet per verdict."""
    counts = {s: sum(v.status == s for v in verdicts) for s in ("PASS", "FAIL", "SKIP", "N/A")}
    return [
        "## ACCEPTANCE",
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        *(f"- **{v.status}** {v.text}" for v in verdicts),
    ]


# ---- acceptance --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """One acceptance rule over the records of (op, direction).

    kind 'faster':   `baseline` ms / `impl` ms >= threshold on every shape measured
    kind 'ceiling':  geometric mean over shapes of `impl`'s % of ceiling >= threshold (a fraction)
    kind 'within':   `impl` ms / `baseline` ms <= threshold on every shape (impl at most that much slower)
    kind 'ceiling_each': `impl`'s % of ceiling >= threshold (a fraction) on every shape
    """

    op: str
    direction: str
    kind: str
    threshold: float
    impl: str = "rawformer"
    baseline: str | None = None

    def describe(self) -> str:
        what = f"{self.op} {self.direction}: {self.impl}"
        if self.kind == "faster":
            return f"{what} >= {self.threshold:g}x {self.baseline} on every shape"
        if self.kind == "ceiling":
            return f"{what} geomean >= {100 * self.threshold:g}% of the copy ceiling"
        if self.kind == "ceiling_each":
            return f"{what} >= {100 * self.threshold:g}% of the copy ceiling on every shape"
        if self.kind == "within":
            return f"{what} within {self.threshold:g}x of {self.baseline} on every shape"
        raise ValueError(f"unknown criterion kind {self.kind!r}")


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS | FAIL | SKIP
    text: str


def evaluate(criteria: Sequence[Criterion], records: list[dict[str, Any]]) -> list[Verdict]:
    """Judge each criterion on the records. A shape where `impl` (or a baseline that ran elsewhere) has no
    timing fails the rule; a baseline with no record at all (torch not installed) or an (op, direction)
    not measured in this run gives SKIP."""
    groups = _groups(records)
    verdicts = []
    for c in criteria:
        desc = c.describe()
        rows = groups.get((c.op, c.direction))
        if not rows:
            verdicts.append(Verdict("SKIP", f"{desc}: not measured in this run"))
            continue
        if c.baseline is not None and not any(c.baseline in by_impl for by_impl in rows.values()):
            verdicts.append(Verdict("SKIP", f"{desc}: no {c.baseline} measurements in this run"))
            continue
        values: list[tuple[str, float]] = []
        missing: list[str] = []
        for (config, _s, _d), by_impl in rows.items():
            label = f"{shape_label(next(iter(by_impl.values())))} ({config})"
            mine = by_impl.get(c.impl)
            if c.kind in ("ceiling", "ceiling_each"):
                if _ok(mine) and mine.get("pct_ceiling"):
                    values.append((label, mine["pct_ceiling"] / 100.0))
                else:
                    missing.append(f"{label}: {c.impl} {mine['status'] if mine else 'absent'}")
                continue
            base = by_impl.get(c.baseline)
            if not _ok(mine) or not _ok(base):
                who = c.impl if not _ok(mine) else c.baseline
                rec = mine if who == c.impl else base
                missing.append(f"{label}: {who} {rec['status'] if rec else 'absent'}")
                continue
            values.append((label, base["ms"] / mine["ms"] if c.kind == "faster" else mine["ms"] / base["ms"]))
        if c.kind == "ceiling_each":
            worst = min(values, key=lambda t: t[1]) if values else None
            ok = bool(values) and not missing and all(v >= c.threshold for _, v in values)
            detail = f"worst {100 * worst[1]:.1f}% at {worst[0]}" if worst else "no measurements"
            each = ", ".join(f"{lbl} {100 * v:.1f}%" for lbl, v in values)
        elif c.kind == "ceiling":
            g = geomean(v for _, v in values)
            ok = bool(values) and not missing and g >= c.threshold
            detail = f"geomean {100 * g:.1f}%" if values else "no measurements"
            each = ", ".join(f"{lbl} {100 * v:.1f}%" for lbl, v in values)
        else:
            if c.kind == "faster":
                ok = bool(values) and not missing and all(v >= c.threshold for _, v in values)
                worst = min(values, key=lambda t: t[1]) if values else None
            else:
                ok = bool(values) and not missing and all(v <= c.threshold for _, v in values)
                worst = max(values, key=lambda t: t[1]) if values else None
            detail = f"worst {worst[1]:.2f}x at {worst[0]}" if worst else "no measurements"
            each = ", ".join(f"{lbl} {v:.2f}x" for lbl, v in values)
        text = f"{desc}: {detail}" + (f" [{each}]" if each else "")
        if missing:
            text += "; not measured: " + "; ".join(missing)
        verdicts.append(Verdict("PASS" if ok else "FAIL", text))
    return verdicts


# ---- the plot ----------------------------------------------------------------------------------------------


def write_plot(
    path: Path,
    title: str,
    records: list[dict[str, Any]],
    impls: Sequence[str],
    ceiling_gbps: float | None,
    metric: str = "gbps",
    ylabel: str = "achieved GB/s",
) -> bool:
    """Grouped bars of `metric` per shape and impl, one panel per (op, direction), the copy ceiling as a
    horizontal line. Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = _groups(records)
    if not groups:
        return False
    ncols = 2 if len(groups) > 1 else 1
    nrows = math.ceil(len(groups) / ncols)
    height = 3.6 * nrows + 0.8  # inches: the panels, then room for the title and legend on top
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, height), squeeze=False)
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(len(impls), 1)
    for ax, ((op, direction), rows) in zip(axes.flat, groups.items(), strict=False):
        labels = []
        for (config, _s, _d), by_impl in rows.items():
            labels.append(shape_label(next(iter(by_impl.values()))).replace(" ", "\n") + f"\n{config}")
        for j, impl in enumerate(impls):
            for i, by_impl in enumerate(rows.values()):
                r = by_impl.get(impl)
                x = i + (j - (len(impls) - 1) / 2) * width
                if _ok(r) and r.get(metric):
                    ax.bar(x, r[metric], width, color=colors(j), label=impl)
                elif r is not None:  # measured but not timed: say why where the bar would be
                    ax.text(x, 0, f" {r['status']}", rotation=90, ha="center", va="bottom", fontsize=6)
        if ceiling_gbps and metric == "gbps":
            ax.axhline(ceiling_gbps, color="black", linestyle="--", linewidth=1, label="copy ceiling")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{op} {direction}", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    order = [name for name in (*impls, "copy ceiling") if name in legend]
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    fig.legend(
        [legend[n] for n in order], order, loc="upper center", ncol=len(order), fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.4 / height), frameon=False,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
