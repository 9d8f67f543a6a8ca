"""Sweep the knobs of the attention kernels on the GPU, to set defaults from measurements.

    python bench/attention_sweep.py                  everything below
    python bench/attention_sweep.py --parts decode   one part (prefill | decode | read)
    python bench/attention_sweep.py --once decode    one call of the default decode kernel (for ncu)

- read:    the read-only bandwidth of this GPU (a kernel summing a 2 GiB buffer in 16-byte loads), the
           ceiling of a kernel that only reads, next to the copy ceiling (read + write).
- decode:  rf.paged_attention per version, split count and block size, and torch SDPA per backend, on the
           benchmark's decode shapes (bench/attention.py DECODE_CONFIGS).
- prefill: rf.attention per version and torch SDPA per backend on the prefill shapes.
Timing as everywhere (bench/harness.py). Output: one line per measurement.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as bench  # noqa: E402
import harness  # noqa: E402

_READ_SOURCE = r"""
extern "C" __global__ void read_all(const int4* __restrict__ src, long long n, int* __restrict__ sink) {
    int acc = 0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        int4 v = __ldcs(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678) sink[0] = acc;  // keeps the loads; practically never taken
}
"""


def read_ceiling(cp, clock, reps: int) -> float:
    props = cp.cuda.runtime.getDeviceProperties(0)
    src = cp.random.RandomState(3).standard_normal(1 << 29, dtype=cp.float32)  # 2 GiB
    sink = cp.zeros(1, dtype=cp.int32)
    kernel = cp.RawKernel(_READ_SOURCE, "read_all")
    blocks = props["multiProcessorCount"] * 4
    n = src.nbytes // 16
    timing = harness.time_calls([lambda: kernel((blocks,), (512,), (src, cp.int64(n), sink))], clock, reps)
    rate = harness.gbps(src.nbytes, timing.median)
    harness.log(
        f"read-only ceiling: {rate:.0f} GB/s ({src.nbytes / 2**30:.0f} GiB read, {blocks} x 512 threads)"
    )
    return rate


def _line(what: str, nbytes: float, flops: float, timing) -> None:
    ms = timing.median
    harness.log(
        f"{what:<58} {ms:8.4f} ms  {harness.gbps(nbytes, ms):7.0f} GB/s  "
        f"{harness.tflops(flops, ms):7.1f} TFLOP/s"
    )


def sweep_torch(what: str, call, torch, sets, clock, reps: int, nbytes: float, flops: float) -> None:
    """torch SDPA per backend (None: torch's own choice) over `sets`; call(sdpa, a) makes one timed call."""
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", None):
        sdpa = bench._torch_sdpa(torch, backend)
        calls = [call(sdpa, a) for a in sets]
        try:
            t = harness.time_calls(calls, clock, reps)
        except Exception as exc:
            harness.log(f"{what} torch {backend}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        _line(f"{what} torch {backend or 'default'}", nbytes, flops, t)


def sweep_decode(cp, rf, torch, clock, reps: int, l2: int, split_counts=(None, 1, 2, 4, 8, 16)) -> None:
    paged = importlib.import_module("rawformer.ops.paged_attention")
    default_stages = paged._V3_STAGES
    for name, (batch, ctx, heads, kv_heads, dim, _bs) in bench.DECODE_CONFIGS.items():
        kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
        nbytes = kv_bytes + 2 * batch * heads * dim * 2
        flops = 4 * batch * heads * ctx * dim
        for bs, shuffle in ((16, True), (16, False), (64, True)):
            n_sets = harness.rotation_sets(kv_bytes, l2)
            sets = [
                bench.decode_inputs(cp, 200 + i, batch, ctx, heads, kv_heads, dim, bs, shuffle)
                for i in range(n_sets)
            ]
            tag = f"bs{bs}" + ("" if shuffle else " in order")
            # (version, v3 pipeline stages): every variant the launcher can run for fp16
            variants = [(v, None) for v in paged.VERSIONS if v != 3] + [(3, 2), (3, 3)]
            for version, stages in variants:
                if stages is not None:
                    paged._V3_STAGES = stages
                label = f"v{version}" + (f"/{stages} stages" if stages else "")
                for splits in split_counts:
                    calls = [
                        (lambda a=a, v=version, s=splits: rf.paged_attention(
                            a["q"], a["k_cache"], a["v_cache"], a["tables"], a["context_lens"],
                            num_splits=s, version=v))
                        for a in sets
                    ]  # fmt: skip
                    try:
                        t = harness.time_calls(calls, clock, reps)
                    except Exception as exc:
                        harness.log(f"{name} {tag} {label} splits {splits}: {type(exc).__name__}: {exc}")
                        continue
                    _line(f"decode {name} {tag} {label} splits {splits or 'auto'}", nbytes, flops, t)
            paged._V3_STAGES = default_stages
            if bs == 16 and shuffle:
                for a in sets:
                    a["contiguous"] = bench.contiguous_kv(cp, a)
                sweep_torch(
                    f"decode {name}", lambda sdpa, a: sdpa(a["q"], *a["contiguous"], False, a["scale"]),
                    torch, sets, clock, reps, nbytes, flops,
                )  # fmt: skip
            del sets
            cp.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()


def sweep_prefill(cp, rf, torch, clock, reps: int, l2: int) -> None:
    for name, (batch, seq, heads, dim, causal) in bench.PREFILL_CONFIGS.items():
        flops = 4 * batch * heads * seq * seq * dim // (2 if causal else 1)
        nbytes = 4 * batch * seq * heads * dim * 2
        n_sets = harness.rotation_sets(3 * batch * seq * heads * dim * 2, l2)
        sets = [bench.prefill_inputs(cp, 100 + i, batch, seq, heads, dim) for i in range(n_sets)]
        scale = dim**-0.5
        for version in [v for v in importlib.import_module("rawformer.ops.attention").VERSIONS if v != 1]:
            calls = [
                (
                    lambda a=a, v=version, c=causal, s=scale: rf.attention(
                        a["q"], a["k"], a["v"], causal=c, scale=s, version=v
                    )
                )
                for a in sets
            ]
            _line(f"prefill {name} v{version}", nbytes, flops, harness.time_calls(calls, clock, reps))
        sweep_torch(
            f"prefill {name}", lambda sdpa, a, c=causal, s=scale: sdpa(a["q"], a["k"], a["v"], c, s),
            torch, sets, clock, reps, nbytes, flops,
        )  # fmt: skip
        del sets
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


def once(cp, rf, part: str) -> None:
    """One call of the default kernel on the first shape of `part` (for profilers)."""
    if part == "decode":
        batch, ctx, heads, kv_heads, dim, bs = bench.DECODE_CONFIGS["b64-c4096-gqa8"]
        a = bench.decode_inputs(cp, 200, batch, ctx, heads, kv_heads, dim, bs)
        for _ in range(3):
            rf.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["tables"], a["context_lens"])
        for version in (2,):  # the previous kernel too, for comparison under the same profiler
            rf.paged_attention(
                a["q"], a["k_cache"], a["v_cache"], a["tables"], a["context_lens"], version=version
            )
    else:
        batch, seq, heads, dim, causal = bench.PREFILL_CONFIGS["b2-s8192-d128"]
        a = bench.prefill_inputs(cp, 100, batch, seq, heads, dim)
        for _ in range(3):
            rf.attention(a["q"], a["k"], a["v"], causal=causal)
    cp.cuda.Device().synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/attention_sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="read,decode,prefill")
    p.add_argument("--configs", help="comma list of decode/prefill config names (default: all)")
    p.add_argument("--once", choices=("decode", "prefill"))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--splits", default="auto,1,2,4,8,16", help="decode split counts to sweep")
    args = p.parse_args(argv)
    cp = harness.require_gpu("bench/attention_sweep.py")
    import rawformer as rf

    if args.once:
        once(cp, rf, args.once)
        return 0
    import torch

    if args.configs:  # narrow the shapes the sweeps walk over
        chosen = set(args.configs.split(","))
        bench.DECODE_CONFIGS = {k: v for k, v in bench.DECODE_CONFIGS.items() if k in chosen}
        bench.PREFILL_CONFIGS = {k: v for k, v in bench.PREFILL_CONFIGS.items() if k in chosen}
    clock = harness.CudaClock(cp)
    l2 = harness.device_header(cp)["l2_bytes"]
    parts = args.parts.split(",")
    if "read" in parts:
        harness.log(f"copy ceiling: {harness.measure_copy_ceiling(cp, clock)['ceiling_gbps']:.0f} GB/s")
        read_ceiling(cp, clock, args.reps)
        cp.get_default_memory_pool().free_all_blocks()
    if "decode" in parts:
        counts = [None if s == "auto" else int(s) for s in args.splits.split(",")]
        sweep_decode(cp, rf, torch, clock, args.reps, l2, counts)
    if "prefill" in parts:
        sweep_prefill(cp, rf, torch, clock, args.reps, l2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
