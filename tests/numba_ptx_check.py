"""Compile every Numba kernel variant to PTX for sm_90 without a GPU, and check what it compiled to.

Run as a script in its own process (tests/test_numba_kernels.py does): `python tests/numba_ptx_check.py`.
Needs NVVM (the `cuda-toolkit[nvvm]==13.0.*` wheel, or a CUDA 13.0 toolkit found through CUDA_HOME) and
NUMBA_FORCE_CUDA_CC=9.0 in the environment (so Numba does not ask NVRTC which architectures exist). Exit
status 0: all good; 1: a check failed; 77: NVVM is not available (the caller skips).

Per kernel, in both float16 and float32:
- it compiles (typing and lowering of every branch, the vector intrinsics included);
- no local memory (`.local`): the register arrays were fully unrolled and promoted, nothing spilled by NVVM;
- no float64 arithmetic (`.f64`): a stray Python float literal would silently make the maths double;
- 16-byte global loads (`ld.global.v4`) where the variant reads 16-byte vectors;
- ptxas (when on PATH) assembles it for sm_90, under the kernel's own launch bounds (threads per block and,
  for the register-resident block kernels, the minimum resident blocks per SM that caps registers at 64),
  with no spill stores; its register count is printed.
Device functions are compiled for the current device's compute capability, which needs a GPU: the check
pretends the current device is sm_90 (this process only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

CC = (9, 0)


def _compile_without_gpu() -> None:
    """Two stand-ins, for this process only: the current device is an sm_90 (device functions are compiled
    for it), and NVRTC may be absent (Numba looks its path up beside libdevice's, but compile_ptx never calls
    it once NUMBA_FORCE_CUDA_CC names the architecture), so NVVM alone is enough."""
    import numba.cuda.cuda_paths as cuda_paths
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: _Device()
    find_nvrtc = cuda_paths._get_nvrtc_path

    def nvrtc_or_none():
        try:
            return find_nvrtc()
        except Exception:
            return cuda_paths._env_path_tuple("<not installed>", None)

    cuda_paths._get_nvrtc_path = nvrtc_or_none


def _cases():
    """(name, dispatcher, numba argument types, expects 16-byte loads), for the production layouts: every
    tier of each register plan at its largest size, the looped and column kernels, and scalar fallbacks."""
    from numba.cuda import types as t

    from rawformer.kernels.numba import activations as act
    from rawformer.kernels.numba import norms as nrm
    from rawformer.kernels.numba import softmax as smx
    from rawformer.kernels.numba._numba import per_word

    i64, f32 = t.int64, t.float32
    a32 = f32[::1]
    for dt in (t.float16, t.float32):
        a = dt[::1]
        v16 = 16 // (dt.bitwidth // 8)  # elements of a 16-byte vector
        per = per_word("float16" if dt == t.float16 else "float32", v16)  # packed elements per word
        fw = (a, a, a, i64, i64, f32, i64, i64)
        bw = (a, a, a, i64, i64, f32)
        fwd_block = smx.FORWARD_BLOCK_TIERS[-1][1]
        for log in (False, True):
            yield (
                f"softmax_fwd warp log={log}",
                smx._forward_regs(32, 128, v16, smx.FORWARD_WARP_ITEMS // v16, log, True, True),
                fw,
                True,
            )
            yield (
                f"softmax_fwd block1024 log={log}",
                smx._forward_regs(1024, 1024, v16, fwd_block // v16, log, True, False, 1),
                fw,
                True,
            )
            yield (
                f"softmax_fwd block512 log={log}",
                smx._forward_regs(512, 512, v16, fwd_block // v16, log, False, False, 2),
                fw,
                True,
            )
            yield f"softmax_fwd loop log={log}", smx._forward_loop(512, v16, log, True, True), fw, True
            warp_items = smx.BACKWARD_WARP_WORDS * per
            yield (
                f"softmax_bwd warp log={log}",
                smx._backward_regs(32, 128, v16, warp_items // v16, per, log),
                bw,
                True,
            )
            for threads, words in sorted(set(smx.BACKWARD_BLOCK_TIERS)):
                if threads < 512:
                    continue
                yield (
                    f"softmax_bwd block{threads}x{words}w log={log}",
                    smx._backward_regs(threads, threads, v16, words * per // v16, per, log, 1024 // threads),
                    bw,
                    True,
                )
            yield f"softmax_bwd loop log={log}", smx._backward_loop(512, v16, log), bw, True
        yield "softmax_fwd subwarp scalar", smx._forward_regs(8, 128, 1, 3, False, False, False), fw, False
        yield "softmax_fwd block scalar", smx._forward_regs(512, 512, 1, 9, False, False, True, 2), fw, False
        yield "softmax_bwd block scalar", smx._backward_regs(1024, 1024, 1, 16, 1, False, 1), bw, False
        nf = (a, a, a, a, a, a, a32, a32, i64, i64, f32)
        nb = (a, a, a, a32, a32, a, a32, a32, i64, i64, i64)
        ns = (a, a, a, a32, a32, a32, i64, i64)
        nc = (a, a, a, a32, a32, a32, a, a32, a32, i64, i64, i64)
        for rms in (False, True):
            for res in (False, True):
                tag = f"rms={rms} res={res}"
                warp_words = nrm.FORWARD_RES_WARP_WORDS if res else nrm.FORWARD_WARP_WORDS
                tiers = nrm.FORWARD_RES_BLOCK_TIERS if res else nrm.FORWARD_BLOCK_TIERS
                yield (
                    f"norm_fwd warp {tag}",
                    nrm._forward_regs(32, 128, v16, warp_words * per // v16, per, rms, res),
                    nf,
                    True,
                )
                for threads, words in tiers:  # the first tier and the widest per thread count
                    if (threads, words) != tiers[0] and words != max(w for _, w in tiers if _ == threads):
                        continue
                    yield (
                        f"norm_fwd block{threads}x{words}w {tag}",
                        nrm._forward_regs(
                            threads, threads, v16, words * per // v16, per, rms, res, 1024 // threads
                        ),
                        nf,
                        True,
                    )
                yield f"norm_fwd loop {tag}", nrm._forward_loop(512, v16, rms, res), nf, True
            yield (
                f"norm_fwd block scalar rms={rms}",
                nrm._forward_regs(512, 512, 1, 16, 1, rms, False, 2),
                nf,
                False,
            )
            packs = max(1, nrm.BACKWARD_ITEMS // v16)
            for group in (32, 128, 1024):
                block = max(group, nrm.BACKWARD_BLOCK)
                yield (
                    f"norm_bwd group{group} block{block} rms={rms}",
                    nrm._backward_regs(group, block, v16, packs, per, rms),
                    nb,
                    True,
                )
            yield (
                f"norm_bwd subwarp scalar rms={rms}",
                nrm._backward_regs(4, nrm.BACKWARD_BLOCK, 1, nrm.BACKWARD_ITEMS, 1, rms),
                nb,
                False,
            )
            yield f"norm_bwd stats rms={rms}", nrm._backward_stats(nrm.STATS_THREADS, v16, rms), ns, True
            yield f"norm_bwd cols rms={rms}", nrm._backward_cols(nrm.COL_THREADS, v16, per, rms), nc, True
            yield f"norm_bwd cols scalar rms={rms}", nrm._backward_cols(nrm.COL_THREADS, 1, 1, rms), nc, False
        for tanh_form in (True, False):
            for bias in (False, True):
                name = f"gelu tanh={tanh_form} bias={bias}"
                yield f"{name} fwd", act._gelu_forward(v16, bias, tanh_form), (a, a, a, i64, i64), True
                yield f"{name} bwd", act._gelu_backward(v16, bias, tanh_form), (a, a, a, a, i64, i64), True
        yield "gelu fwd scalar", act._gelu_forward(1, True, True), (a, a, a, i64, i64), False
        yield "swiglu fwd", act._swiglu_forward(v16), (a, a, a, i64), True
        yield "swiglu bwd", act._swiglu_backward(v16), (a, a, a, a, a, i64), True
        yield "swiglu fwd vec2", act._swiglu_forward(2), (a, a, a, i64), False
    for both in (False, True):
        yield (
            f"reduce_partials both={both}",
            nrm._reduce_partials(both),
            (a32, a32, a32, a32, i64, i64),
            False,
        )
    # paged decode attention: the production plans (one query row; GQA 8:1 at head dims 128/256, 4 rows at
    # 64/80, and the 8-byte float16 benchmark plan), a narrower access for a head_dim whose rows are not
    # 16-byte multiples, and the split-KV combine kernel
    from rawformer.kernels.numba import paged_attention as pa

    for dt in (t.float16, t.float32):
        a, ai = dt[::1], t.int32[::1]
        v16 = 16 // (dt.bitwidth // 8)
        args = (a, a, a, ai, ai, a, a32, a32, i64, i64, i64, i64, i64, i64, f32)
        layouts = [
            (128, 1, 16, v16),
            (128, 8, 16, v16),
            (64, 4, 8, v16),  # (8 rows of float16 head_dim 64 spill 4 bytes at 255 registers: documented)
            (80, 4, 128, v16),
            (256, 8, 16, v16),
        ]
        if dt == t.float16:
            layouts.append((128, 8, 16, 4))
        for dim, group_rows, bs, vec in layouts:
            p = per_word("float16" if dt == t.float16 else "float32", vec)
            plan = pa.make_plan(dim, vec, group_rows, per=p)
            yield (
                f"paged_attention d={dim} rows={group_rows} bs={bs} {plan}",
                pa._decode_kernel(
                    dim, bs, plan.vec, plan.lanes, plan.packs, plan.warps, plan.unroll, plan.rows, p
                ),
                args,
                vec == v16,
            )
        for dim in (128, 256):
            yield (
                f"paged_attention_combine d={dim}",
                pa._combine_kernel(dim, min(v16, 4)),
                (a32, a32, a, i64, i64),
                True,
            )
    plan = pa.make_plan(68, 4, 3, per=2)
    yield (
        "paged_attention d=68 vec=4",
        pa._decode_kernel(68, 32, plan.vec, plan.lanes, plan.packs, plan.warps, plan.unroll, plan.rows, 2),
        (t.float16[::1], t.float16[::1], t.float16[::1], t.int32[::1], t.int32[::1], t.float16[::1])
        + (a32, a32, i64, i64, i64, i64, i64, i64, f32),
        False,
    )


def _ptxas(ptx: str) -> tuple[str, str]:
    """(registers, spill-store bytes) from ptxas -v, or ('-', '-') without ptxas."""
    exe = shutil.which("ptxas")
    if exe is None:
        return "-", "-"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [exe, f"-arch=sm_{CC[0]}{CC[1]}", "-v", path, "-o", os.devnull], capture_output=True, text=True
        )
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    regs = re.findall(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
    return (regs[-1] if regs else "?"), (spills[-1] if spills else "0")


def main() -> int:
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()  # loads libnvvm
    except Exception as exc:  # no NVVM: nothing to check here
        print(f"NVVM unavailable: {exc}")
        return 77
    _compile_without_gpu()
    from numba import cuda
    from numba.cuda import types as t

    failures = []
    start = time.time()
    count = 0
    for name, kernel, argtypes, wide in _cases():
        dtype = argtypes[0].dtype
        label = f"{name} [{dtype}]"
        bounds = kernel.targetoptions["launch_bounds"]  # (threads, min blocks per SM) as production
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=CC, launch_bounds=bounds)
            regs, spills = _ptxas(ptx)
        except Exception as exc:
            failures.append(f"{label}: does not compile: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        count += 1
        problems = []
        if ".local" in ptx:
            problems.append("uses local memory")
        if re.search(r"\.f64\b", ptx):
            problems.append("has float64 arithmetic")
        if wide and dtype in (t.float16, t.float32) and "ld.global.v4" not in ptx:
            problems.append("no 16-byte loads")
        if spills not in ("0", "-"):
            problems.append(f"ptxas spills {spills} bytes")
        status = "; ".join(problems) or "ok"
        print(f"{label:<62} bounds={str(bounds):<9} regs={regs:>4} spill={spills:>3} {status}")
        if problems:
            failures.append(f"{label}: {status}")
    print(f"{count} kernels compiled in {time.time() - start:.1f} s")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
