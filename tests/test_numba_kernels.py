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
def test_forward_layout_rule(cols, vec, want):
    plan = plan_rows(cols, vec, *nb_softmax.FORWARD_ITEMS)
    assert plan == want
    if plan.mode == "regs":  # the row fits the registers, and no more than the item budget is used
        assert plan.group * plan.items >= cols
        assert plan.items <= (32 if plan.group <= 32 else 16)


def test_backward_layout_rule():
    assert plan_rows(512, 8, *nb_norms.BACKWARD_ITEMS) == RowPlan("regs", 32, 128, 8, 2)
    assert plan_rows(513, 1, *nb_norms.BACKWARD_ITEMS) == RowPlan("regs", 128, 128, 1, 5)
    assert plan_rows(8192, 8, *nb_norms.BACKWARD_ITEMS) == RowPlan("regs", 1024, 1024, 8, 1)
    assert plan_rows(8200, 8, *nb_norms.BACKWARD_ITEMS).mode == "loop"


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
    with pytest.raises(ValueError):
        _numba.make_group_reducers(48, 128)
    with pytest.raises(ValueError):
        _numba.make_group_reducers(64, 128)  # more than a warp but not the block


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
SHAPES = [(r, c) for r in ROWS for c in COLS if r * c <= 4_200_000] + [(3, 12288), (3, 32000), (64, 32000)]
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
    assert_close(dx, want_dx, dtype, name="dx")
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
