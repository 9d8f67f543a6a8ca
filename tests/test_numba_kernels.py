"""The Numba CUDA kernels (rawformer/kernels/numba): layout selection and the import site (CPU), every kernel
variant in the Numba CUDA simulator and compiled to sm_90 PTX (CPU, in subprocesses), and every kernel on
the GPU against the float64 references of rawformer.ops on odd shapes with poisoned outputs (marked gpu).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import assert_close, poison

pytest.importorskip("numba")

from rawformer.kernels.numba import _numba  # noqa: E402
from rawformer.kernels.numba import activations as nb_act  # noqa: E402
from rawformer.kernels.numba import norms as nb_norms  # noqa: E402
from rawformer.kernels.numba import softmax as nb_softmax  # noqa: E402
from rawformer.kernels.numba._numba import RowPlan, plan_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTEST_XDIST", "PYTEST_CURRENT"))
}


# ---- CPU: the import site and the layout rules ----------------------------------------------------------
def test_missing_numba_says_which_extra():
    code = "import sys; sys.modules['numba'] = None\nimport rawformer.kernels.numba._numba"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=CLEAN_ENV, timeout=120
    )
    assert run.returncode != 0
    assert "RuntimeError" in run.stderr and "pip install 'rawformer[numba]'" in run.stderr


def test_row_stack_workaround_applied_when_missing():
    code = (
        "import numpy as np\n"
        "if 'row_stack' in vars(np): del np.row_stack\n"  # as NumPy 2.5 ships
        "import rawformer.kernels.numba._numba\n"
        "assert np.row_stack is np.vstack\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=CLEAN_ENV, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(
    "cols,vec,want",
    [
        (1, 1, RowPlan("regs", 1, 128, 1, 1)),
        (8, 8, RowPlan("regs", 1, 128, 8, 1)),  # one thread holds the row
        (19, 1, RowPlan("regs", 32, 128, 1, 1)),
        (64, 8, RowPlan("regs", 8, 128, 8, 1)),  # 8 lanes per row, 16 rows per block
        (97, 1, RowPlan("regs", 32, 128, 1, 4)),
        (1024, 8, RowPlan("regs", 32, 128, 8, 4)),
        (1024, 4, RowPlan("regs", 32, 128, 4, 8)),
        (1025, 1, RowPlan("regs", 128, 128, 1, 9)),
        (4096, 8, RowPlan("regs", 256, 256, 8, 2)),
        (4097, 1, RowPlan("regs", 512, 512, 1, 9)),
        (16384, 8, RowPlan("regs", 1024, 1024, 8, 2)),
        (16392, 8, RowPlan("loop", 512, 512, 8)),
        (32000, 8, RowPlan("loop", 512, 512, 8)),
    ],
)
def test_softmax_forward_layout_rule(cols, vec, want):
    plan = plan_rows(cols, vec, nb_softmax.FORWARD_WARP_ITEMS, nb_softmax.FORWARD_BLOCK_TIERS)
    assert plan == want
    if plan.mode == "regs":  # the row fits the registers, and no more than the item budget is used
        assert plan.group * plan.items >= cols
        assert plan.items <= (32 if plan.group <= 32 else 16)


def _fake(shape, dtype):
    """A 16-byte aligned host array standing in for a device array in the layout rules."""
    buf = np.zeros(int(np.prod(shape)) + 16, dtype)
    start = (-buf.ctypes.data % 16) // buf.itemsize
    return buf[start : start + int(np.prod(shape))].reshape(shape)


@pytest.mark.parametrize(
    "cols,dtype,want",
    [
        (1024, F16, RowPlan("regs", 32, 128, 8, 4)),  # 16 words per lane
        (2048, F16, RowPlan("regs", 32, 128, 8, 8)),  # packed: 64 float16 (32 words) per lane
        (2048, F32, RowPlan("regs", 128, 128, 4, 4)),
        (4096, F16, RowPlan("regs", 128, 128, 8, 4)),
        (8192, F32, RowPlan("regs", 512, 512, 4, 4)),
        (16384, F32, RowPlan("regs", 512, 512, 4, 8)),  # 512 threads of 32 words
        (32000, F16, RowPlan("regs", 512, 512, 8, 8)),  # the vocabulary row in registers, two per SM
        (32768, F16, RowPlan("regs", 512, 512, 8, 8)),
        (32776, F16, RowPlan("loop", 512, 512, 8)),
        (16388, F32, RowPlan("loop", 512, 512, 4)),
        (131072, F16, RowPlan("loop", 512, 512, 8)),
        (4097, F16, RowPlan("regs", 512, 512, 1, 9)),  # scalar float16: one element per word
    ],
)
def test_norm_forward_layout_rule(cols, dtype, want):
    x = _fake((2, cols), dtype)
    w = _fake((cols,), dtype)
    plan = nb_norms.forward_plan(x, None, w, w, x, None)
    assert plan == want
    if plan.mode == "regs":
        per = _numba.per_word(dtype, plan.vec)
        words = plan.items // per
        assert plan.group * plan.items >= cols
        assert words <= (nb_norms.FORWARD_WARP_WORDS if plan.group <= 32 else 32)
        assert _numba.min_blocks(plan) == (1 if plan.group <= 32 else 1024 // plan.block)


@pytest.mark.parametrize(
    "cols,dtype,want",
    [
        (1024, F16, RowPlan("regs", 32, 128, 8, 4)),  # 16 words each of x and residual per lane
        (2048, F16, RowPlan("regs", 128, 128, 8, 2)),
        (16384, F16, RowPlan("regs", 512, 512, 8, 4)),
        (32000, F16, RowPlan("regs", 1024, 1024, 8, 4)),  # 1024 threads of 16 + 16 words
        (16384, F32, RowPlan("regs", 1024, 1024, 4, 4)),
        (32776, F16, RowPlan("loop", 512, 512, 8)),
    ],
)
def test_norm_forward_residual_layout_rule(cols, dtype, want):
    x = _fake((2, cols), dtype)
    w = _fake((cols,), dtype)
    assert nb_norms.forward_plan(x, x, w, w, x, x) == want


@pytest.mark.parametrize(
    "cols,dtype,want",
    [
        (1024, F16, RowPlan("regs", 32, 128, 8, 4)),  # 16 words each of dy and y per lane
        (1024, F32, RowPlan("regs", 128, 128, 4, 2)),
        (8192, F32, RowPlan("regs", 1024, 1024, 4, 2)),
        (16384, F16, RowPlan("regs", 1024, 1024, 8, 2)),
        (32000, F16, RowPlan("regs", 1024, 1024, 8, 4)),  # the vocabulary row read once
        (16384, F32, RowPlan("regs", 1024, 1024, 4, 4)),
        (32776, F16, RowPlan("loop", 512, 512, 8)),
    ],
)
def test_softmax_backward_layout_rule(cols, dtype, want):
    dy = _fake((2, cols), dtype)
    assert nb_softmax.backward_plan(dy, dy, dy) == want


@pytest.mark.parametrize(
    "cols,dtype,want",
    [
        (8, F16, RowPlan("regs", 1, 512, 8, 1)),  # 512 rows per block, sums combined in shared memory
        (19, F32, RowPlan("regs", 4, 512, 1, 5)),
        (512, F16, RowPlan("regs", 64, 512, 8, 1)),
        (1024, F16, RowPlan("regs", 128, 512, 8, 1)),  # 4 rows of 128 threads per block
        (1024, F32, RowPlan("regs", 128, 512, 4, 2)),
        (4096, F16, RowPlan("regs", 512, 512, 8, 1)),
        (8192, F16, RowPlan("regs", 1024, 1024, 8, 1)),
        (8192, F32, RowPlan("regs", 1024, 1024, 4, 2)),
        (8200, F16, RowPlan("cols", 512, 256, 8)),
        (32000, F16, RowPlan("cols", 512, 256, 8)),
        (131072, F16, RowPlan("cols", 512, 256, 8)),
    ],
)
def test_norm_backward_layout_rule(cols, dtype, want):
    x = _fake((2, cols), dtype)
    plan = nb_norms.backward_plan(x, x, _fake((cols,), dtype), x)
    assert plan == want
    if plan.mode == "regs":
        assert plan.group * plan.items >= cols and plan.items <= nb_norms.BACKWARD_ITEMS


def test_vector_width_rule():
    buf = np.zeros(64, np.float16)
    aligned = buf[(-buf.ctypes.data % 16) // 2 :][:32]  # a 16-byte aligned start
    assert _numba.vec_width((32,), aligned) == 8
    assert _numba.vec_width((12,), aligned) == 4  # the row length limits it
    assert _numba.vec_width((32,), aligned[1:]) == 1  # a 2-byte offset pointer
    assert _numba.vec_width((32,), aligned[2:]) == 2
    assert _numba.vec_width((32,), aligned, aligned.astype(np.float32)) <= 4  # 16 bytes of the widest
    assert _numba.vec_width((), aligned, None) == 8


def test_group_reducer_shapes_are_checked():
    for group, block in ((48, 128), (64, 96), (256, 128), (8, 48)):  # not a power of two / not dividing
        with pytest.raises(ValueError):
            _numba.make_group_reducers(group, block)
        with pytest.raises(ValueError):
            _numba.make_pair_reducer(group, block)
    _numba.make_group_reducers(64, 128)  # two warps per group, two groups per block
    _numba.make_pair_reducer(8, 8)  # a block smaller than a warp holding one group


# ---- CPU: the simulator and the PTX, each in a process of its own -------------------------------------
@pytest.mark.parametrize("family", ["softmax", "norms", "activations"])
def test_kernels_in_cuda_simulator(family):
    """tests/numba_sim_cases.py under NUMBA_ENABLE_CUDASIM=1 (it must be set before numba.cuda loads)."""
    env = dict(CLEAN_ENV, NUMBA_ENABLE_CUDASIM="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        family,
        str(HERE / "numba_sim_cases.py"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
    assert run.returncode == 0, f"simulator cases failed:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1]


def _nvvm_env() -> dict[str, str]:
    env = dict(CLEAN_ENV, NUMBA_FORCE_CUDA_CC="9.0")  # no NVRTC needed to pick the architecture
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/nvvm").is_dir():
        env["CUDA_HOME"] = "/usr/local/cuda"  # a toolkit's NVVM when the cuda-toolkit[nvvm] wheel is absent
    return env


def test_kernels_compile_to_sm90_ptx():
    """Every kernel variant, float16 and float32, through NVVM to PTX: no local memory, no float64 maths,
    16-byte loads where expected, and (with ptxas) no spills. Skipped where NVVM cannot be found."""
    run = subprocess.run(
        [sys.executable, str(HERE / "numba_ptx_check.py")],
        capture_output=True,
        text=True,
        env=_nvvm_env(),
        cwd=HERE.parent,
        timeout=900,
    )
    if run.returncode == 77:
        pytest.skip(f"no NVVM here: {run.stdout.strip()[-300:]}")
    assert run.returncode == 0, f"PTX checks failed:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"


# ---- GPU: every kernel against the float64 references ---------------------------------------------------
ROWS = (0, 1, 3, 1000)
COLS = (1, 19, 64, 97, 1024, 1025, 4096, 4097, 12288, 32000)
SHAPES = [(r, c) for r in ROWS for c in COLS if r * c <= 4_200_000]
SHAPES += [(3, 12288), (3, 32000), (64, 32000), (5, 32768), (3, 32776), (5, 131072)]  # register tier edges
SHAPES = sorted(set(SHAPES))
DTYPES = (F16, F32)


def _data(rng, shape, dtype, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_gpu_softmax(cp, rows, cols, dtype):
    from rawformer.ops.softmax import (
        log_softmax_backward_ref,
        log_softmax_ref,
        softmax_backward_ref,
        softmax_ref,
    )

    rng = np.random.default_rng(rows * 100003 + cols)
    x = _data(rng, (rows, cols), dtype, 3.0)
    dy = _data(rng, (rows, cols), dtype)
    xd, dyd = cp.asarray(x), cp.asarray(dy)
    for log, ref, bref in (
        (False, softmax_ref, softmax_backward_ref),
        (True, log_softmax_ref, log_softmax_backward_ref),
    ):
        y = poison(cp, (rows, cols), dtype)
        nb_softmax.softmax_forward(xd, y, 0.5, log, None, 0, 0)
        assert_close(y, ref(x, scale=0.5), dtype, name=f"softmax log={log}")
        y_host = ref(x, scale=0.5).astype(dtype)
        dx = poison(cp, (rows, cols), dtype)
        nb_softmax.softmax_backward(dyd, cp.asarray(y_host), dx, 1.5, log)
        assert_close(dx, bref(dy, y_host, scale=1.5), dtype, name=f"softmax_backward log={log}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "s_q,s_k", [(1, 19), (7, 64), (33, 97), (5, 1025), (16, 4096), (3, 4097), (2, 32000)]
)
@pytest.mark.parametrize("log", [False, True])
def test_gpu_softmax_mask_and_causal(cp, s_q, s_k, dtype, log):
    """causal_rows = S_q and causal_offset = S_k - S_q is the reference's bottom-right causal rule over
    (B, S_q, S_k); the additive mask has -inf entries and one fully masked row (zeros)."""
    from rawformer.ops.softmax import log_softmax_ref, softmax_ref

    ref = log_softmax_ref if log else softmax_ref
    batch = 3
    rng = np.random.default_rng(s_q * 7 + s_k)
    x = _data(rng, (batch * s_q, s_k), dtype, 2.0)
    mask = np.where(rng.random(x.shape) < 0.2, -np.inf, rng.standard_normal(x.shape)).astype(dtype)
    mask[1 % (batch * s_q)] = -np.inf
    y = poison(cp, x.shape, dtype)
    nb_softmax.softmax_forward(cp.asarray(x), y, 0.8, log, cp.asarray(mask), s_q, s_k - s_q)
    want = ref(x.reshape(batch, s_q, s_k), scale=0.8, mask=mask.reshape(batch, s_q, s_k), causal=True)
    assert_close(y, want.reshape(x.shape), dtype, name="masked causal softmax")
    assert (cp.asnumpy(y)[1 % (batch * s_q)] == 0).all()


@pytest.mark.gpu
def test_gpu_softmax_special_values(cp):
    from rawformer.ops.softmax import softmax_ref

    for cols in (19, 4097, 32000):  # warp group, block group, loop
        x = np.zeros((4, cols), np.float32)
        x[0, 3], x[1, :], x[2, 5], x[3, 7] = np.nan, -np.inf, np.inf, -np.inf
        y = poison(cp, x.shape, np.float32)
        nb_softmax.softmax_forward(cp.asarray(x), y, 1.0, False, None, 0, 0)
        assert_close(y, softmax_ref(x), np.float32, name=f"special values cols={cols}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gpu_norms(cp, rows, cols, dtype, rms):
    from rawformer.ops import norms as ops_norms

    rng = np.random.default_rng(rows * 10007 + cols + rms)
    x = _data(rng, (rows, cols), dtype, 1.0, 0.5)
    res = _data(rng, (rows, cols), dtype)
    w, b = _data(rng, (cols,), dtype), _data(rng, (cols,), dtype)
    dy = _data(rng, (rows, cols), dtype)
    xd, rd, wd, bd = cp.asarray(x), cp.asarray(res), cp.asarray(w), cp.asarray(b)
    for residual in (None, rd):
        y = poison(cp, (rows, cols), dtype)
        h = None if residual is None else poison(cp, (rows, cols), dtype)
        mean = None if rms else poison(cp, (rows,), F32)
        rstd = poison(cp, (rows,), F32)
        # the kernels normalise h as stored: x + residual rounded to the storage dtype (as unfused)
        h64 = (x.astype(np.float64) + (0.0 if residual is None else res)).astype(dtype).astype(np.float64)
        if rms:
            nb_norms.rms_norm_forward(xd, residual, wd, y, h, rstd, 1e-6)
            want_y, want_rstd = ops_norms.rms_norm_ref(h64, w, 1e-6)
        else:
            nb_norms.layer_norm_forward(xd, residual, wd, bd, y, h, mean, rstd, 1e-5)
            want_y, want_mean, want_rstd = ops_norms.layer_norm_ref(h64, w, b, 1e-5)
            assert_close(mean, want_mean, F32, name="mean", rtol=1e-5)
        assert_close(y, want_y, dtype, name="y")
        assert_close(rstd, want_rstd, F32, name="rstd")
        if residual is not None:
            assert_close(h, h64, dtype, name="h")
    # backward from the kernel's own statistics of x
    mean = None if rms else cp.empty((rows,), F32)
    rstd = cp.empty((rows,), F32)
    y = cp.empty((rows, cols), dtype)
    if rms:
        nb_norms.rms_norm_forward(xd, None, wd, y, None, rstd, 1e-6)
    else:
        nb_norms.layer_norm_forward(xd, None, wd, bd, y, None, mean, rstd, 1e-5)
    dx = poison(cp, (rows, cols), dtype)
    dw = poison(cp, (cols,), F32)
    db = None if rms else poison(cp, (cols,), F32)
    if rms:
        nb_norms.rms_norm_backward(cp.asarray(dy), xd, wd, rstd, dx, dw)
        want_dx, want_dw = ops_norms.rms_norm_backward_ref(dy, x, w, cp.asnumpy(rstd))
    else:
        nb_norms.layer_norm_backward(cp.asarray(dy), xd, wd, mean, rstd, dx, dw, db)
        want_dx, want_dw, want_db = ops_norms.layer_norm_backward_ref(
            dy, x, w, cp.asnumpy(mean), cp.asnumpy(rstd)
        )
        assert_close(db, want_db, F32, name="dbias", rtol=1e-4)
    # dx cancels (to ~0 for one column): its rounding error is relative to the terms rstd * dy * w
    terms = np.abs(cp.asnumpy(rstd).astype(np.float64)[:, None] * dy * w.astype(np.float64))
    assert_close(dx, want_dx, dtype, name="dx", scale=float(np.max(terms, initial=0.0)))
    assert_close(dw, want_dw, F32, name="dweight", rtol=1e-4)  # sums of up to 1000 fp32 products


@pytest.mark.gpu
def test_gpu_norm_backward_is_deterministic(cp):
    rng = np.random.default_rng(0)
    rows, cols = 3000, 1024
    x, dy = cp.asarray(_data(rng, (rows, cols), F16)), cp.asarray(_data(rng, (rows, cols), F16))
    w = cp.asarray(_data(rng, (cols,), F16))
    mean, rstd = cp.zeros(rows, F32), cp.ones(rows, F32)
    outs = []
    for _ in range(2):
        dx, dw, db = cp.empty_like(x), cp.empty(cols, F32), cp.empty(cols, F32)
        nb_norms.layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db)
        outs.append((dw.get(), db.get()))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_gpu_activations(cp, rows, cols, dtype):
    from rawformer.ops import activations as ops_act

    rng = np.random.default_rng(rows * 1009 + cols)
    x, dy = _data(rng, (rows, cols), dtype, 3.0), _data(rng, (rows, cols), dtype)
    up, b = _data(rng, (rows, cols), dtype), _data(rng, (cols,), dtype)
    xd, dyd, ud = cp.asarray(x), cp.asarray(dy), cp.asarray(up)
    for approximate in ("tanh", "none"):
        for bias in (None, b):
            bd = None if bias is None else cp.asarray(bias)
            y = poison(cp, (rows, cols), dtype)
            nb_act.gelu_forward(xd, bd, y, approximate)
            assert_close(y, ops_act.gelu_ref(x, bias, approximate), dtype, name=f"gelu {approximate}")
            dx = poison(cp, (rows, cols), dtype)
            nb_act.gelu_backward(dyd, xd, bd, dx, approximate)
            want_dx, _ = ops_act.gelu_backward_ref(dy, x, bias, approximate)
            assert_close(dx, want_dx, dtype, name=f"gelu_backward {approximate}")
    y = poison(cp, (rows, cols), dtype)
    nb_act.swiglu_forward(xd, ud, y)
    assert_close(y, ops_act.swiglu_ref(x, up), dtype, name="swiglu")
    dg, du = poison(cp, (rows, cols), dtype), poison(cp, (rows, cols), dtype)
    nb_act.swiglu_backward(dyd, xd, ud, dg, du)
    want_dg, want_du = ops_act.swiglu_backward_ref(dy, x, up)
    assert_close(dg, want_dg, dtype, name="dgate")
    assert_close(du, want_du, dtype, name="dup")


@pytest.mark.gpu
def test_gpu_misaligned_and_narrow_vectors(cp):
    """Views starting 2 bytes past an aligned address take the scalar path; the results are the same."""
    from rawformer.ops.softmax import softmax_ref

    rng = np.random.default_rng(1)
    rows, cols = 5, 1024
    base = cp.asarray(_data(rng, (rows * cols + 8,), F16))
    x = base[1 : 1 + rows * cols].reshape(rows, cols)
    assert nb_softmax.forward_plan(x, x, None).vec == 1
    y = poison(cp, (rows, cols), F16)
    nb_softmax.softmax_forward(x, y, 1.0, False, None, 0, 0)
    assert_close(y, softmax_ref(cp.asnumpy(x)), F16)
    out = poison(cp, (rows * cols + 8,), F16)[1 : 1 + rows * cols].reshape(rows, cols)
    nb_act.gelu_forward(x, None, out, "tanh")
    from rawformer.ops.activations import gelu_ref

    assert_close(out, gelu_ref(cp.asnumpy(x), None, "tanh"), F16)


@pytest.mark.gpu
def test_gpu_runs_on_cupys_current_stream(cp):
    """Launches go to CuPy's current stream: work queued behind a long kernel on a side stream still sees
    the side stream's earlier writes, without any host synchronisation in between."""
    from rawformer.ops.norms import rms_norm_ref

    rng = np.random.default_rng(2)
    rows, cols = 4096, 4096
    x_host = _data(rng, (rows, cols), F16)
    w = cp.ones(cols, F16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.empty((rows, cols), F16)
        x.set(x_host, stream=stream)
        x *= 2  # queued on `stream` before the Numba kernel
        y, rstd = cp.empty_like(x), cp.empty(rows, F32)
        nb_norms.rms_norm_forward(x, None, w, y, None, rstd, 1e-6)
    stream.synchronize()
    want, _ = rms_norm_ref(x_host.astype(np.float64) * 2, None, 1e-6)
    assert_close(y, want, F16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_norm_layouts(cp, dtype):
    """Each norm layout run explicitly (odd row counts, groups that loop over rows, slabs of unequal
    length), forward with and without a residual and backward, against the float64 references."""
    from rawformer.ops import norms as ops_norms

    rng = np.random.default_rng(6)
    v16 = 16 // np.dtype(dtype).itemsize
    per = 2 if dtype == F16 else 1  # elements per register of a packed row
    forward = [
        (RowPlan("regs", 4, 128, 2, 3), 301, 24),
        (RowPlan("regs", 32, 128, v16, 32 * per // v16), 301, 32 * 32 * per - v16),  # warp tier, 1 short
        (RowPlan("regs", 128, 128, v16, 16 * per // v16), 7, 128 * 16 * per - 2 * v16),
        (RowPlan("regs", 512, 512, v16, 32 * per // v16), 7, 512 * 32 * per - 8 * v16),  # 512 x 32 words
        (RowPlan("loop", 512, 512, 2), 5, 40002),
        (RowPlan("loop", 512, 512, v16), 3, 70000),
    ]
    for plan, rows, cols in forward:
        x = _data(rng, (rows, cols), dtype, 2.0, 3.0)  # a mean far from 0: the variance must not cancel
        res = _data(rng, (rows, cols), dtype)
        w, b = _data(rng, (cols,), dtype), _data(rng, (cols,), dtype)
        xd, wd, bd = cp.asarray(x), cp.asarray(w), cp.asarray(b)
        for residual in (None, res):
            rd = None if residual is None else cp.asarray(residual)
            h64 = x.astype(np.float64) if residual is None else (x.astype(np.float64) + res).astype(dtype)
            for rms in (False, True):
                y, rstd = poison(cp, (rows, cols), dtype), poison(cp, (rows,), F32)
                mean = None if rms else poison(cp, (rows,), F32)
                h = None if residual is None else poison(cp, (rows, cols), dtype)
                nb_norms.run_forward(plan, xd, rd, wd, None if rms else bd, y, h, mean, rstd, 1e-5)
                if rms:
                    want_y, want_rstd = ops_norms.rms_norm_ref(h64, w, 1e-5)
                else:
                    want_y, want_mean, want_rstd = ops_norms.layer_norm_ref(h64, w, b, 1e-5)
                    assert_close(mean, want_mean, F32, name=f"mean {plan}", rtol=1e-5)
                assert_close(y, want_y, dtype, name=f"y {plan} rms={rms}")
                assert_close(rstd, want_rstd, F32, name=f"rstd {plan} rms={rms}", rtol=1e-5)
                if residual is not None:
                    assert_close(h, h64, dtype, name=f"h {plan}")
    v = 8 if dtype == F16 else 4
    backward = [
        (RowPlan("regs", 1, 512, v, 1), 3001, v, None),  # 512 rows per block
        (RowPlan("regs", 4, 512, 1, 5), 2999, 19, 3),  # 3 blocks of 128 groups, 8 rows each
        (RowPlan("regs", 128, 512, v16, 8 // v16), 1001, 1024, None),
        (RowPlan("regs", 1024, 1024, 1, 8), 77, 8191, 5),
        (RowPlan("cols", 512, 256, v16), 301, 12288, None),
        (RowPlan("cols", 512, 256, v16), 67, 32000, 7),  # 7 slabs: 6 of 10 rows and one of 7
        (RowPlan("cols", 128, 64, 1), 45, 1001, 4),
    ]
    for plan, rows, cols, grid in backward:
        x = _data(rng, (rows, cols), dtype, 1.0, 0.5)
        dy, w = _data(rng, (rows, cols), dtype), _data(rng, (cols,), dtype)
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=1).astype(F32)
        rstd = (1 / np.sqrt(x64.var(axis=1) + 1e-5)).astype(F32)
        for rms in (False, True):
            dx = poison(cp, (rows, cols), dtype)
            dw, db = poison(cp, (cols,), F32), (None if rms else poison(cp, (cols,), F32))
            args = (cp.asarray(dy), cp.asarray(x), cp.asarray(w), None if rms else cp.asarray(mean))
            nb_norms.run_backward(plan, *args, cp.asarray(rstd), dx, dw, db, grid=grid)
            if rms:
                want_dx, want_dw = ops_norms.rms_norm_backward_ref(dy, x, w, rstd)
            else:
                want_dx, want_dw, want_db = ops_norms.layer_norm_backward_ref(dy, x, w, mean, rstd)
                assert_close(db, want_db, F32, name=f"dbias {plan}", rtol=1e-4)
            assert_close(dx, want_dx, dtype, name=f"dx {plan} rms={rms}")
            assert_close(dw, want_dw, F32, name=f"dweight {plan} rms={rms}", rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_softmax_backward_layouts(cp, dtype):
    """The packed register tiers of the softmax backward (and the loop past them) run explicitly."""
    from rawformer.ops.softmax import log_softmax_backward_ref, softmax_backward_ref

    rng = np.random.default_rng(8)
    v16 = 16 // np.dtype(dtype).itemsize
    per = 2 if dtype == F16 else 1
    for plan, rows, cols in [
        (RowPlan("regs", 8, 128, 1, 3), 301, 23),
        (RowPlan("regs", 32, 128, v16, 16 * per // v16), 301, 32 * 16 * per - v16),
        (RowPlan("regs", 512, 512, v16, 8 * per // v16), 7, 512 * 8 * per - 3 * v16),
        (RowPlan("regs", 1024, 1024, v16, 16 * per // v16), 5, 1024 * 16 * per - v16),
        (RowPlan("loop", 512, 512, v16), 3, 70000),
    ]:
        y = rng.random((rows, cols))
        y = (y / y.sum(axis=1, keepdims=True)).astype(dtype)
        dy = _data(rng, (rows, cols), dtype)
        for log, ref in ((False, softmax_backward_ref), (True, log_softmax_backward_ref)):
            yy = np.log(y.astype(np.float64)).astype(dtype) if log else y
            dx = poison(cp, (rows, cols), dtype)
            nb_softmax.run_backward(plan, cp.asarray(dy), cp.asarray(yy), dx, 0.7, log)
            assert_close(dx, ref(dy, yy, scale=0.7), dtype, name=f"{plan} log={log}")


@pytest.mark.gpu
def test_gpu_every_layout(cp):
    """Each production layout of the softmax forward run explicitly at one size that needs it."""
    from rawformer.ops.softmax import softmax_ref

    rng = np.random.default_rng(4)
    for plan, rows, cols in [
        (RowPlan("regs", 1, 128, 8, 1), 300, 8),
        (RowPlan("regs", 4, 128, 2, 3), 300, 24),
        (RowPlan("regs", 32, 128, 8, 4), 300, 1000),
        (RowPlan("regs", 256, 256, 4, 4), 7, 4000),
        (RowPlan("regs", 1024, 1024, 8, 2), 7, 16384),
        (RowPlan("loop", 512, 512, 2), 7, 40002),
    ]:
        x = _data(rng, (rows, cols), F16, 2.0)
        y = poison(cp, (rows, cols), F16)
        nb_softmax.run_forward(plan, cp.asarray(x), y, 1.0, False, None, 0, 0)
        assert_close(y, softmax_ref(x), F16, name=str(plan))
