"""Benchmark of rawformer's fused row ops: softmax, layer_norm, rms_norm (forward and backward), GELU, SwiGLU.

Each op runs on real model shapes (CONFIGS) in four implementations:

    rawformer  rf.<op>(..., impl="cuda")      our CUDA C++ kernel (NVRTC through CuPy)
    numba      rf.<op>(..., impl="numba")     our Numba CUDA kernel
    naive      the obvious CuPy composition    one CuPy call per step, in the input dtype
    torch      torch's own op (baseline only; skipped when torch does not import, or with --no-torch)

Before timing, every implementation's output is compared with the float64 NumPy reference on the same input
(a sample of rows; the row-summed outputs dw, db over all rows, in float64 on the device); a wrong one is
recorded with its error and not timed. Timing (bench/harness.py): CUDA events, warm-up, median of --reps
(>= 20) calls rotated over input sets larger than 4x L2 together. The ceiling is a >= 1 GiB device copy
measured in the same run. Bytes counted are the minimum: every input read once, every output written once.

    python bench/kernels.py                 full run -> bench/results/<gpu>/kernels.{json,md,png}
    python bench/kernels.py --quick         two shapes, 20 reps -> $OUT (or bench/out), for `make gpu-check`
    python bench/kernels.py --ops softmax --configs llama-vocab --no-torch
    python bench/kernels.py --from-json bench/results/h100/kernels.json   # re-render md/png, no GPU
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import Criterion

LN_EPS = 1e-5
RMS_EPS = 1e-6
GELU_C = math.sqrt(2.0 / math.pi)

# name -> (rows, cols, dtype, where the shape comes from)
CONFIGS: dict[str, tuple[int, int, str, str]] = {
    "gpt2m-hidden": (32768, 1024, "float16", "GPT-2 medium / BERT-large hidden (1024), 32 x 1024 tokens"),
    "llama7b-hidden": (8192, 4096, "float16", "Llama-2-7B hidden (4096), 8192 tokens"),
    "llama-vocab": (4096, 32000, "float16", "Llama-2 vocabulary (32000) logits, 4096 tokens"),
    "nemo-vocab": (1024, 131072, "float16", "Mistral-NeMo vocabulary (131072) logits, 1024 tokens"),
    "llama70b-hidden-fp32": (16384, 8192, "float32", "Llama-2-70B hidden (8192) in fp32, 16384 tokens"),
}
QUICK_CONFIGS = ("gpt2m-hidden", "llama70b-hidden-fp32")
IMPLS = ("rawformer", "numba", "naive", "torch")
# a result further than this from the float64 reference (max|out - ref| / max|ref|) is wrong, not slow
TOLERANCE = {"float16": 1e-2, "float32": 1e-4}


# ---- float64 references (xp = numpy on a row sample, or cupy for the row-summed outputs) ------------------


def softmax_ref(xp: Any, a: dict) -> tuple:
    """y = exp(x - max x) / sum exp(x - max x) over each row."""
    e = xp.exp(a["x"] - a["x"].max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True),)


def softmax_backward_ref(xp: Any, a: dict) -> tuple:
    """dx = y * (dy - sum(dy * y)) over each row."""
    dy, y = a["dy"], a["y"]
    return (y * (dy - (dy * y).sum(-1, keepdims=True)),)


def layer_norm_ref(xp: Any, a: dict) -> tuple:
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over each row."""
    x = a["x"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / xp.sqrt(var + LN_EPS) * a["w"] + a["b"],)


def layer_norm_backward_ref(xp: Any, a: dict) -> tuple:
    """With xhat = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = sum_rows(dy * xhat), db = sum_rows(dy)."""
    dy, x, w = a["dy"], a["x"], a["w"]
    rstd = a["rstd"][:, None]
    xhat = (x - a["mean"][:, None]) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


def rms_norm_ref(xp: Any, a: dict) -> tuple:
    """y = x / sqrt(mean(x^2) + eps) * w over each row."""
    x = a["x"]
    return (x / xp.sqrt((x * x).mean(-1, keepdims=True) + RMS_EPS) * a["w"],)


def rms_norm_backward_ref(xp: Any, a: dict) -> tuple:
    """With xhat = x * rstd and g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat)), dw = sum_rows(dy * xhat)."""
    dy, x, w = a["dy"], a["x"], a["w"]
    rstd = a["rstd"][:, None]
    xhat = x * rstd
    g = dy * w
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(0)


def gelu_ref(xp: Any, a: dict) -> tuple:
    """u = x + bias; y = u/2 * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3)))."""
    u = a["x"] + a["b"]
    return (0.5 * u * (1.0 + xp.tanh(GELU_C * (u + 0.044715 * u**3))),)


def swiglu_ref(xp: Any, a: dict) -> tuple:
    """y = silu(gate) * up = gate / (1 + exp(-gate)) * up."""
    g = a["gate"]
    return (g / (1.0 + xp.exp(-g)) * a["up"],)


# ---- naive compositions: one array-library call per step, in the input dtype ------------------------------


def _xp(a: Any) -> Any:
    """cupy for a CuPy array, else numpy (the naive code also runs on NumPy, which the CPU tests use)."""
    return sys.modules["cupy"] if type(a).__module__.startswith("cupy") else np


def naive_softmax(a: dict) -> tuple:
    x = a["x"]
    m = x.max(-1, keepdims=True)
    e = _xp(x).exp(x - m)
    return (e / e.sum(-1, keepdims=True),)


def naive_softmax_backward(a: dict) -> tuple:
    dy, y = a["dy"], a["y"]
    return (y * (dy - (dy * y).sum(-1, keepdims=True)),)


def naive_layer_norm(a: dict) -> tuple:
    x = a["x"]
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    xhat = xc / _xp(x).sqrt(var + LN_EPS)
    return (xhat * a["w"] + a["b"],)


def naive_layer_norm_backward(a: dict) -> tuple:
    dy, x, w = a["dy"], a["x"], a["w"]
    mean = a["mean"].astype(x.dtype)[:, None]
    rstd = a["rstd"].astype(x.dtype)[:, None]
    xhat = (x - mean) * rstd
    g = dy * w
    dx = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) * rstd
    return dx, (dy * xhat).sum(0), dy.sum(0)


def naive_rms_norm(a: dict) -> tuple:
    x = a["x"]
    ms = (x * x).mean(-1, keepdims=True)
    return (x / _xp(x).sqrt(ms + RMS_EPS) * a["w"],)


def naive_rms_norm_backward(a: dict) -> tuple:
    dy, x, w = a["dy"], a["x"], a["w"]
    rstd = a["rstd"].astype(x.dtype)[:, None]
    xhat = x * rstd
    g = dy * w
    return (g - xhat * (g * xhat).mean(-1, keepdims=True)) * rstd, (dy * xhat).sum(0)


def naive_gelu(a: dict) -> tuple:
    u = a["x"] + a["b"]
    return (0.5 * u * (1.0 + _xp(u).tanh(GELU_C * (u + 0.044715 * u * u * u))),)


def naive_swiglu(a: dict) -> tuple:
    g = a["gate"]
    return (g / (1.0 + _xp(g).exp(-g)) * a["up"],)


# ---- torch: its own op on the same data (DLPack, no copy); backward = autograd.grad of a graph built once --


def _torch_inputs(torch: Any, a: dict, grad: Sequence[str] = ()) -> dict:
    t = {k: torch.from_dlpack(v) for k, v in a.items()}
    for k in grad:
        t[k] = t[k].detach().requires_grad_(True)
    return t


def _torch_grad(torch: Any, y: Any, wrt: tuple, dy: Any) -> Callable[[], Any]:
    # retain_graph: every timed call runs only the backward kernels of the one graph built for this input set
    return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)


def torch_softmax(torch: Any, a: dict) -> Callable[[], Any]:
    x = _torch_inputs(torch, a)["x"]
    return lambda: torch.softmax(x, -1)


def torch_softmax_backward(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a, grad=("x",))
    return _torch_grad(torch, torch.softmax(t["x"], -1), (t["x"],), t["dy"])


def torch_layer_norm(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a)
    f, cols = torch.nn.functional, t["x"].shape[-1]
    return lambda: f.layer_norm(t["x"], (cols,), t["w"], t["b"], LN_EPS)


def torch_layer_norm_backward(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a, grad=("x", "w", "b"))
    y = torch.nn.functional.layer_norm(t["x"], (t["x"].shape[-1],), t["w"], t["b"], LN_EPS)
    return _torch_grad(torch, y, (t["x"], t["w"], t["b"]), t["dy"])


def torch_rms_norm(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a)
    f, cols = torch.nn.functional, t["x"].shape[-1]
    return lambda: f.rms_norm(t["x"], (cols,), t["w"], RMS_EPS)


def torch_rms_norm_backward(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a, grad=("x", "w"))
    y = torch.nn.functional.rms_norm(t["x"], (t["x"].shape[-1],), t["w"], RMS_EPS)
    return _torch_grad(torch, y, (t["x"], t["w"]), t["dy"])


def torch_gelu(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a)
    f = torch.nn.functional
    return lambda: f.gelu(t["x"] + t["b"], approximate="tanh")


def torch_swiglu(torch: Any, a: dict) -> Callable[[], Any]:
    t = _torch_inputs(torch, a)
    f = torch.nn.functional
    return lambda: f.silu(t["gate"]) * t["up"]


# ---- inputs: random data, generated on the device ----------------------------------------------------------


def _randn(xp: Any, seed: int, shape: tuple[int, ...], dtype: str, scale: float = 1.0, shift: float = 0.0):
    rs = xp.random.RandomState(seed)
    if xp is np:
        v = rs.standard_normal(shape)
    else:
        v = rs.standard_normal(shape, dtype=np.float32)
    if scale != 1.0 or shift != 0.0:
        v = v * scale + shift
    return v.astype(dtype, copy=False)


def _params(xp: Any, seed: int, cols: int, dtype: str) -> dict:
    return {
        "w": _randn(xp, seed + 101, (cols,), dtype, 0.1, 1.0),
        "b": _randn(xp, seed + 102, (cols,), dtype, 0.1),
    }


def _softmax_f32(xp: Any, x: Any) -> Any:
    x32 = x.astype(np.float32)
    e = xp.exp(x32 - x32.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ln_stats(xp: Any, x: Any, w: Any, b: Any, rf: Any) -> tuple[Any, Any]:
    """mean, rstd as rf.layer_norm(..., return_stats=True) gives them (float32 (rows,) on the GPU); computed
    here in float32 when rawformer is not there or its forward fails (that shows in the forward's record)."""
    if rf is not None:
        try:
            _, mean, rstd = rf.layer_norm(x, w, b, eps=LN_EPS, return_stats=True)
            return mean, rstd
        except Exception as exc:
            harness.log(f"  (layer_norm stats computed in the bench: rf.layer_norm failed: {exc})")
    x32 = x.astype(np.float32)
    mean = x32.mean(-1)
    var = ((x32 - mean[:, None]) ** 2).mean(-1)
    return mean, (1.0 / xp.sqrt(var + np.float32(LN_EPS))).astype(np.float32)


def _rms_stats(xp: Any, x: Any, w: Any, rf: Any) -> Any:
    if rf is not None:
        try:
            return rf.rms_norm(x, w, eps=RMS_EPS, return_stats=True)[1]
        except Exception as exc:
            harness.log(f"  (rms_norm stats computed in the bench: rf.rms_norm failed: {exc})")
    x32 = x.astype(np.float32)
    return (1.0 / xp.sqrt((x32 * x32).mean(-1) + np.float32(RMS_EPS))).astype(np.float32)


def inputs_x(xp, seed, rows, cols, dtype, rf=None) -> dict:
    return {"x": _randn(xp, seed, (rows, cols), dtype)}


def inputs_softmax_backward(xp, seed, rows, cols, dtype, rf=None) -> dict:
    x = _randn(xp, seed, (rows, cols), dtype)
    # y is a real softmax output (torch builds its graph from x, so it sees the same y)
    return {"dy": _randn(xp, seed + 1, (rows, cols), dtype), "y": _softmax_f32(xp, x).astype(dtype), "x": x}


def inputs_x_w_b(xp, seed, rows, cols, dtype, rf=None) -> dict:
    return {"x": _randn(xp, seed, (rows, cols), dtype), **_params(xp, seed, cols, dtype)}


def inputs_x_w(xp, seed, rows, cols, dtype, rf=None) -> dict:
    return {"x": _randn(xp, seed, (rows, cols), dtype), "w": _params(xp, seed, cols, dtype)["w"]}


def inputs_layer_norm_backward(xp, seed, rows, cols, dtype, rf=None) -> dict:
    a = inputs_x_w_b(xp, seed, rows, cols, dtype)
    a["mean"], a["rstd"] = _ln_stats(xp, a["x"], a["w"], a["b"], rf)
    a["dy"] = _randn(xp, seed + 1, (rows, cols), dtype)
    return a


def inputs_rms_norm_backward(xp, seed, rows, cols, dtype, rf=None) -> dict:
    a = inputs_x_w(xp, seed, rows, cols, dtype)
    a["rstd"] = _rms_stats(xp, a["x"], a["w"], rf)
    a["dy"] = _randn(xp, seed + 1, (rows, cols), dtype)
    return a


def inputs_x_bias(xp, seed, rows, cols, dtype, rf=None) -> dict:
    return {"x": _randn(xp, seed, (rows, cols), dtype), "b": _params(xp, seed, cols, dtype)["b"]}


def inputs_gate_up(xp, seed, rows, cols, dtype, rf=None) -> dict:
    return {"gate": _randn(xp, seed, (rows, cols), dtype), "up": _randn(xp, seed + 1, (rows, cols), dtype)}


# ---- the ops -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One op and direction: its inputs, outputs, byte count, reference and implementations.

    make_inputs(xp, seed, rows, cols, dtype, rf) -> dict of arrays; row_args are indexed by row (the rest
    are per-column parameters); reads are the inputs the op reads (others exist for torch's graph);
    outputs name what every implementation returns, in order; reduced are the outputs summed over rows.
    nbytes(rows, cols, itemsize): the minimum traffic, each input read once and each output written once
    (per-row statistics are float32). flops_per_element: a rough count (one per add, mul, exp, tanh); the
    ops are memory bound and TFLOP/s is printed for the convention only.
    """

    op: str
    direction: str
    make_inputs: Callable[..., dict]
    row_args: tuple[str, ...]
    reads: tuple[str, ...]
    outputs: tuple[str, ...]
    reduced: tuple[str, ...]
    nbytes: Callable[[int, int, int], int]
    flops_per_element: int
    reference: Callable[[Any, dict], tuple]
    rf_call: Callable[[Any, dict, str | None], Any]
    naive: Callable[[dict], tuple]
    torch: Callable[[Any, dict], Callable[[], Any]]


OPS: tuple[OpSpec, ...] = (
    OpSpec(
        op="softmax", direction="forward", make_inputs=inputs_x,
        row_args=("x",), reads=("x",), outputs=("y",), reduced=(),
        nbytes=lambda r, c, s: 2 * r * c * s, flops_per_element=5, reference=softmax_ref,
        rf_call=lambda rf, a, impl: rf.softmax(a["x"], impl=impl),
        naive=naive_softmax, torch=torch_softmax,
    ),
    OpSpec(
        op="softmax", direction="backward", make_inputs=inputs_softmax_backward,
        row_args=("dy", "y", "x"), reads=("dy", "y"), outputs=("dx",), reduced=(),
        nbytes=lambda r, c, s: 3 * r * c * s, flops_per_element=4, reference=softmax_backward_ref,
        rf_call=lambda rf, a, impl: rf.softmax_backward(a["dy"], a["y"], impl=impl),
        naive=naive_softmax_backward, torch=torch_softmax_backward,
    ),
    OpSpec(
        op="layer_norm", direction="forward", make_inputs=inputs_x_w_b,
        row_args=("x",), reads=("x", "w", "b"), outputs=("y",), reduced=(),
        nbytes=lambda r, c, s: 2 * r * c * s + 2 * c * s, flops_per_element=7, reference=layer_norm_ref,
        rf_call=lambda rf, a, impl: rf.layer_norm(a["x"], a["w"], a["b"], eps=LN_EPS, impl=impl),
        naive=naive_layer_norm, torch=torch_layer_norm,
    ),
    OpSpec(
        op="layer_norm", direction="backward", make_inputs=inputs_layer_norm_backward,
        row_args=("dy", "x", "mean", "rstd"), reads=("dy", "x", "w", "mean", "rstd"),
        outputs=("dx", "dw", "db"), reduced=("dw", "db"),
        # dy, x read and dx written; w read; mean, rstd (float32) read; dw, db written
        nbytes=lambda r, c, s: 3 * r * c * s + c * s + 2 * r * 4 + 2 * c * s, flops_per_element=13,
        reference=layer_norm_backward_ref,
        rf_call=lambda rf, a, impl: rf.layer_norm_backward(
            a["dy"], a["x"], a["w"], a["mean"], a["rstd"], impl=impl
        ),
        naive=naive_layer_norm_backward, torch=torch_layer_norm_backward,
    ),
    OpSpec(
        op="rms_norm", direction="forward", make_inputs=inputs_x_w,
        row_args=("x",), reads=("x", "w"), outputs=("y",), reduced=(),
        nbytes=lambda r, c, s: 2 * r * c * s + c * s, flops_per_element=4, reference=rms_norm_ref,
        rf_call=lambda rf, a, impl: rf.rms_norm(a["x"], a["w"], eps=RMS_EPS, impl=impl),
        naive=naive_rms_norm, torch=torch_rms_norm,
    ),
    OpSpec(
        op="rms_norm", direction="backward", make_inputs=inputs_rms_norm_backward,
        row_args=("dy", "x", "rstd"), reads=("dy", "x", "w", "rstd"), outputs=("dx", "dw"), reduced=("dw",),
        # dy, x read and dx written; w read; rstd (float32) read; dw written
        nbytes=lambda r, c, s: 3 * r * c * s + c * s + r * 4 + c * s, flops_per_element=9,
        reference=rms_norm_backward_ref,
        rf_call=lambda rf, a, impl: rf.rms_norm_backward(a["dy"], a["x"], a["w"], a["rstd"], impl=impl),
        naive=naive_rms_norm_backward, torch=torch_rms_norm_backward,
    ),
    OpSpec(
        op="gelu", direction="forward", make_inputs=inputs_x_bias,
        row_args=("x",), reads=("x", "b"), outputs=("y",), reduced=(),
        nbytes=lambda r, c, s: 2 * r * c * s + c * s, flops_per_element=9, reference=gelu_ref,
        rf_call=lambda rf, a, impl: rf.gelu(a["x"], a["b"], approximate="tanh", impl=impl),
        naive=naive_gelu, torch=torch_gelu,
    ),
    OpSpec(
        op="swiglu", direction="forward", make_inputs=inputs_gate_up,
        row_args=("gate", "up"), reads=("gate", "up"), outputs=("y",), reduced=(),
        nbytes=lambda r, c, s: 3 * r * c * s, flops_per_element=5, reference=swiglu_ref,
        rf_call=lambda rf, a, impl: rf.swiglu(a["gate"], a["up"], impl=impl),
        naive=naive_swiglu, torch=torch_swiglu,
    ),
)  # fmt: skip
OP_NAMES = tuple(dict.fromkeys(s.op for s in OPS))

ACCEPTANCE: tuple[Criterion, ...] = (
    Criterion("softmax", "forward", "faster", 6.5, baseline="naive"),
    Criterion("softmax", "forward", "faster", 1.0, baseline="torch"),
    Criterion("softmax", "forward", "ceiling", 0.85),
    Criterion("layer_norm", "forward", "faster", 3.7, baseline="naive"),
    Criterion("layer_norm", "forward", "faster", 1.0, baseline="torch"),
    Criterion("rms_norm", "forward", "faster", 1.0, baseline="torch"),
    Criterion("softmax", "backward", "faster", 1.0, baseline="torch"),
    Criterion("layer_norm", "backward", "faster", 1.0, baseline="torch"),
    Criterion("rms_norm", "backward", "faster", 1.0, baseline="torch"),
    *(Criterion(s.op, s.direction, "within", 1.5, impl="numba", baseline="rawformer") for s in OPS),
)


# ---- checking and timing one op on one shape ---------------------------------------------------------------


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _to_xp(xp: Any, a: Any) -> Any:
    """An output (CuPy, NumPy or torch) as an array of `xp`, without a copy where DLPack allows."""
    return a if isinstance(a, xp.ndarray) else xp.from_dlpack(a)


def _to_host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


class Reference:
    """The float64 reference of one input set, computed on first use and shared by every implementation.

    Row outputs: NumPy on a sample of rows (first, last, evenly spread). Row-summed outputs (dw, db): over
    all rows in float64 with `xp` (CuPy on the GPU: NumPy would take seconds per shape)."""

    def __init__(self, spec: OpSpec, inputs: dict, xp: Any, rows: int, cols: int):
        self.spec, self.inputs, self.xp = spec, inputs, xp
        self.rows, self.cols = rows, cols
        self.idx = harness.sample_rows(rows, cols)
        self.idx_xp = xp.asarray(self.idx)
        self._rows: dict | None = None
        self._summed: dict | None = None

    def row_outputs(self) -> dict:
        if self._rows is None:
            spec = self.spec
            a = {
                k: _to_host(v[self.idx_xp] if k in spec.row_args else v).astype(np.float64)
                for k, v in self.inputs.items()
            }
            self._rows = dict(zip(spec.outputs, spec.reference(np, a), strict=True))
        return self._rows

    def summed_outputs(self) -> dict:
        if self._summed is None:
            a = {k: v.astype(np.float64) for k, v in self.inputs.items()}
            outs = dict(zip(self.spec.outputs, self.spec.reference(self.xp, a), strict=True))
            self._summed = {k: outs[k] for k in self.spec.reduced}
        return self._summed

    def error(self, outputs: Any) -> tuple[float, str | None]:
        """(max relative error over all outputs, what is wrong with their shapes or None)."""
        outs = _as_tuple(outputs)
        spec = self.spec
        if len(outs) != len(spec.outputs):
            return math.inf, f"returned {len(outs)} outputs, expected {len(spec.outputs)} {spec.outputs}"
        worst = 0.0
        for name, out in zip(spec.outputs, outs, strict=True):
            o = _to_xp(self.xp, out)
            want = (self.cols,) if name in spec.reduced else (self.rows, self.cols)
            if tuple(o.shape) != want:
                return math.inf, f"{name} has shape {tuple(o.shape)}, expected {want}"
            if name in spec.reduced:
                err = harness.rel_error(o, self.summed_outputs()[name])
            else:
                err = harness.rel_error(_to_host(o[self.idx_xp]), self.row_outputs()[name])
            worst = max(worst, err)
        return worst, None


def default_binders(rf: Any, torch: Any, rf_error: str | None = None) -> dict[str, Callable]:
    """impl name -> bind(spec, inputs) -> a no-argument call that runs the op on those inputs."""

    def rawformer(impl: str) -> Callable:
        def bind(spec: OpSpec, a: dict) -> Callable[[], Any]:
            if rf is None:
                raise RuntimeError(f"rawformer did not import: {rf_error}")
            return functools.partial(spec.rf_call, rf, a, impl)

        return bind

    def torch_bind(spec: OpSpec, a: dict) -> Callable[[], Any]:
        if torch is None:
            raise RuntimeError("torch is not available")
        return spec.torch(torch, a)

    return {
        "rawformer": rawformer("cuda"),
        "numba": rawformer("numba"),
        "naive": lambda spec, a: functools.partial(spec.naive, a),
        "torch": torch_bind,
    }


def bench_op(
    spec: OpSpec,
    config: str,
    rows: int,
    cols: int,
    dtype: str,
    *,
    impls: Sequence[str],
    binders: dict[str, Callable],
    xp: Any,
    clock: Any,
    reps: int,
    warmup: int,
    l2_bytes: int,
    ceiling_gbps: float,
    rf: Any = None,
    seed: int = 0,
) -> list[dict]:
    """Check, then time, every implementation of `spec` on one shape; one record each (printed as it goes)."""
    itemsize = np.dtype(dtype).itemsize
    common = {
        "op": spec.op,
        "direction": spec.direction,
        "config": config,
        "shape": (rows, cols),
        "dtype": dtype,
        "nbytes": spec.nbytes(rows, cols, itemsize),
        "flops": spec.flops_per_element * rows * cols,
        "ceiling_gbps": ceiling_gbps,
        "tolerance": TOLERANCE[dtype],
    }
    first = spec.make_inputs(xp, seed, rows, cols, dtype, rf)
    n_sets = harness.rotation_sets(sum(int(first[k].nbytes) for k in spec.reads), l2_bytes)
    sets = [first] + [spec.make_inputs(xp, seed + 1000 * i, rows, cols, dtype, rf) for i in range(1, n_sets)]
    ref = Reference(spec, first, xp, rows, cols)
    records = []
    for impl in impls:
        rec = _measure(binders[impl], spec, sets, ref, clock, reps, warmup, common, impl, n_sets)
        records.append(rec)
        harness.log(harness.format_line(rec))
    return records


def _measure(
    bind: Callable,
    spec: OpSpec,
    sets: list[dict],
    ref: Reference,
    clock: Any,
    reps: int,
    warmup: int,
    common: dict,
    impl: str,
    n_sets: int,
) -> dict:
    """One implementation on one shape: bind it to every input set, check it on the first, then time it.
    (A function of its own so that its calls, and torch's graphs in them, are freed when it returns.)"""
    args = {**common, "impl": impl, "input_sets": n_sets}
    tol = args["tolerance"]
    try:
        calls = [bind(spec, a) for a in sets]
        err, problem = ref.error(calls[0]())
    except Exception as exc:
        return harness.make_record(**args, status="error", message=harness.describe(exc))
    if problem is not None or not err <= tol:
        msg = problem or f"max error {err:.2e} > tolerance {tol:g}: not timed"
        return harness.make_record(**args, status="wrong", max_error=err, message=msg)
    try:
        timing = harness.time_calls(calls, clock, reps=reps, warmup=warmup)
    except Exception as exc:
        return harness.make_record(**args, status="error", max_error=err, message=harness.describe(exc))
    return harness.make_record(**args, timing=timing, max_error=err)


def run(
    specs: Sequence[OpSpec],
    configs: dict[str, tuple[int, int, str, str]],
    impls: Sequence[str],
    *,
    binders: dict[str, Callable],
    xp: Any,
    clock: Any,
    reps: int,
    warmup: int,
    l2_bytes: int,
    ceiling_gbps: float,
    rf: Any = None,
    free: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Every spec on every config (shape outer, so each shape's arrays are made once per op and freed)."""
    records: list[dict] = []
    for config, (rows, cols, dtype, _what) in configs.items():
        for spec in specs:
            try:
                records += bench_op(
                    spec,
                    config,
                    rows,
                    cols,
                    dtype,
                    impls=impls,
                    binders=binders,
                    xp=xp,
                    clock=clock,
                    reps=reps,
                    warmup=warmup,
                    l2_bytes=l2_bytes,
                    ceiling_gbps=ceiling_gbps,
                    rf=rf,
                )
            except Exception as exc:  # making the inputs or the reference failed (out of memory, ...)
                for impl in impls:
                    rec = harness.make_record(
                        op=spec.op,
                        direction=spec.direction,
                        impl=impl,
                        config=config,
                        shape=(rows, cols),
                        dtype=dtype,
                        nbytes=spec.nbytes(rows, cols, np.dtype(dtype).itemsize),
                        flops=spec.flops_per_element * rows * cols,
                        ceiling_gbps=ceiling_gbps,
                        status="error",
                        message=f"setting up the inputs failed: {harness.describe(exc)}",
                    )
                    records.append(rec)
                    harness.log(harness.format_line(rec))
            free()
    return records


# ---- the command -------------------------------------------------------------------------------------------


def _reps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reps must be an integer, got {text!r}") from None
    if n < harness.MIN_REPS:
        raise argparse.ArgumentTypeError(f"--reps must be >= {harness.MIN_REPS} (median of at least 20)")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/kernels.py",
        description="Benchmark rawformer's fused row ops (CUDA and Numba) against the naive CuPy "
        "composition, torch, and the copy ceiling measured in the same run. Needs an NVIDIA GPU with CuPy.",
        epilog="Shapes: "
        + "; ".join(f"{k} = {r}x{c} {d} ({w})" for k, (r, c, d, w) in CONFIGS.items())
        + ". Results: bench/results/<gpu>/kernels.json, kernels.md, kernels.png (a --quick run writes to "
        "$OUT or bench/out instead; a full run also copies them to $OUT when that is set).",
    )
    p.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK_CONFIGS)} only, 20 reps")
    p.add_argument(
        "--ops", type=harness.list_arg(OP_NAMES, "op"), default=list(OP_NAMES), help="comma list of ops"
    )
    p.add_argument(
        "--configs", type=harness.list_arg(tuple(CONFIGS), "config"), help="comma list of CONFIGS names"
    )
    p.add_argument(
        "--impls", type=harness.list_arg(IMPLS, "impl"), default=list(IMPLS), help="comma list of impls"
    )
    p.add_argument("--out", metavar="DIR", help="write the results here instead")
    p.add_argument(
        "--reps", type=_reps, help="timed calls per measurement (>= 20; default 30, 20 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (default 3)")
    p.add_argument("--no-torch", action="store_true", help="do not import torch; skip its columns")
    p.add_argument(
        "--from-json",
        metavar="FILE",
        help="no measuring (no GPU needed): rebuild kernels.md and kernels.png, acceptance included, from a "
        "kernels.json written earlier, next to it (or into --out)",
    )
    return p


def report_from_json(path: str | Path, out: str | None = None) -> Path:
    """Re-evaluate and re-render the results of an earlier run; returns the directory written."""
    header, records = harness.read_json(Path(path))
    ops = {r["op"] for r in records}
    verdicts = harness.evaluate([c for c in ACCEPTANCE if c.op in ops], records)
    out_dir = Path(out) if out else Path(path).parent
    write_results(header, records, verdicts, out_dir, json_too=Path(path).parent != out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        report_from_json(args.from_json, args.out)
        return 0
    cp = harness.require_gpu("bench/kernels.py")
    reps = args.reps or (harness.MIN_REPS if args.quick else 30)
    names = args.configs or (list(QUICK_CONFIGS) if args.quick else list(CONFIGS))
    configs = {k: CONFIGS[k] for k in names}
    specs = [s for s in OPS if s.op in args.ops]
    impls = [i for i in args.impls if not (i == "torch" and args.no_torch)]

    try:
        import rawformer as rf

        rf_error = None
    except Exception as exc:
        rf, rf_error = None, harness.describe(exc)
        harness.log(f"rawformer did not import ({rf_error}): its columns will say so")
    torch = harness.import_torch(cp) if "torch" in impls else None
    if torch is None:
        impls = [i for i in impls if i != "torch"]

    clock = harness.CudaClock(cp)
    device = harness.device_header(cp)

    def free() -> None:
        try:
            cp.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
        except Exception as exc:  # a broken CUDA context: the records say what failed
            harness.log(f"  (freeing device memory failed: {harness.describe(exc)})")

    harness.log(f"{device['gpu']}: {device['multiprocessors']} SMs, L2 {device['l2_bytes'] / 2**20:.0f} MiB")
    harness.log(f"shapes {', '.join(configs)}; impls {', '.join(impls)}; median of {reps} after a warm-up")
    ceiling = harness.measure_copy_ceiling(cp, clock)
    free()
    harness.log(
        f"copy ceiling {ceiling['ceiling_gbps']:.0f} GB/s (memcpy {ceiling['memcpy_gbps']:.0f}, "
        f"copy kernel {ceiling['copy_kernel_gbps']:.0f}; bytes read + written)"
    )
    records = run(
        specs,
        configs,
        impls,
        binders=default_binders(rf, torch, rf_error),
        xp=cp,
        clock=clock,
        reps=reps,
        warmup=args.warmup,
        l2_bytes=device["l2_bytes"],
        ceiling_gbps=ceiling["ceiling_gbps"],
        rf=rf,
        free=free,
    )
    # measured again at the end: a large difference means the GPU's clocks or load changed during the run
    try:
        end_gbps = harness.measure_copy_ceiling(cp, clock)["ceiling_gbps"]
        harness.log(f"copy ceiling at the end {end_gbps:.0f} GB/s")
    except Exception as exc:  # a kernel left the CUDA context broken: still write what was measured
        end_gbps = None
        harness.log(f"the copy ceiling could not be measured at the end: {harness.describe(exc)}")
    free()
    header = harness.run_header(
        device,
        **ceiling,
        ceiling_end_gbps=end_gbps,
        reps=reps,
        warmup=args.warmup,
        quick=args.quick,
        configs={k: list(v) for k, v in configs.items()},
    )
    verdicts = harness.evaluate([c for c in ACCEPTANCE if c.op in args.ops], records)
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    write_results(header, records, verdicts, out_dir)
    harness.copy_to_out(out_dir, ("kernels.json", "kernels.md", "kernels.png"), args.quick, args.out)
    return 0


def write_results(
    header: dict, records: list[dict], verdicts: list, out_dir: str | Path, json_too: bool = True
) -> None:
    """kernels.json (unless json_too is false), kernels.md and kernels.png into `out_dir`; print the
    acceptance verdicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = {k: CONFIGS[k] for k in header.get("configs", CONFIGS) if k in CONFIGS}
    if json_too:
        harness.write_json(out_dir / "kernels.json", header, records)
    title = f"rawformer fused-op kernels on {header.get('gpu', '?')}"
    md = harness.markdown_report(
        title,
        header,
        records,
        impls=IMPLS,
        main="rawformer",
        main_label="rf",
        ratios=("naive", "torch"),
        verdicts=verdicts,
        configs={k: f"{r}x{c} {d}: {w}" for k, (r, c, d, w) in ran.items()},
    )
    (out_dir / "kernels.md").write_text(md)
    plotted = harness.write_plot(out_dir / "kernels.png", title, records, IMPLS, header.get("ceiling_gbps"))
    harness.log("")
    harness.log("ACCEPTANCE")
    for v in verdicts:
        harness.log(f"  {v.status}  {v.text}")
    written = ["kernels.json"] * json_too + ["kernels.md"] + ["kernels.png"] * plotted
    harness.log(f"\nwrote {', '.join(written)} into {out_dir}")
    if not plotted:
        harness.log("(no plot: matplotlib is not installed; pip install -e '.[bench]')")


if __name__ == "__main__":
    sys.exit(main())
