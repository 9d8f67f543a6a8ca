"""What the multi-rank scripts under tests/distributed share: a small MLP on rawformer.autograd (NumPy,
float32), its float32 SGD, a result line for the pytest driver (tests/test_distributed.py), and the same
model run in one process as the reference."""

from __future__ import annotations

import json
import sys

import numpy as np

from rawformer import autograd as ag

D_IN, HIDDEN, D_OUT = 7, 19, 5


def make_params(seed: int) -> dict[str, ag.Tensor]:
    """An MLP x -> gelu(x W1 + b1) W2 + b2 (odd sizes), float32 leaves."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (D_IN, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, D_OUT), "b2": (D_OUT,)}
    return {
        k: ag.Tensor((rng.standard_normal(s) * 0.5).astype(np.float32), requires_grad=True)
        for k, s in shapes.items()
    }


def data(steps: int, batch: int, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (steps, batch, D_IN) and per-sample loss weights (steps, batch, D_OUT), float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, batch, D_IN)).astype(np.float32)
    c = rng.standard_normal((steps, batch, D_OUT)).astype(np.float32)
    return x, c


def loss_fn(params: dict[str, ag.Tensor], x: np.ndarray, c: np.ndarray, scale: float = 1.0) -> ag.Tensor:
    """scale * mean over samples of sum_j y_ij c_ij, with y = mlp(x): linear in y, non-linear in the weights.
    sum_j y_ij c_ij is the diagonal of y c^T; it is written as linear(y * ..., ) through a fixed (O, 1)
    projection per sample, so every op is an autograd op: here y (n, O) is reshaped to (1, n*O) and
    projected on c flattened."""
    h = ag.gelu(ag.linear(ag.Tensor(x), params["w1"], params["b1"]))
    y = ag.linear(h, params["w2"], params["b2"])  # (n, O)
    flat = ag.reshape(y, (1, y.size))  # (1, n*O)
    proj = ag.linear(flat, ag.Tensor(c.reshape(-1, 1)))  # (1, 1) = sum_ij y_ij c_ij
    return ag.mul(ag.sum(proj), scale / x.shape[0])


def sgd(params: dict[str, ag.Tensor], lr: float) -> None:
    for p in params.values():
        p.data -= np.float32(lr) * p.grad
        p.grad = None


def reference_run(steps: int, batch: int, lr: float, seed: int = 0) -> dict[str, np.ndarray]:
    """One process, one backward per step over the whole global batch."""
    params = make_params(seed)
    x, c = data(steps, batch)
    for s in range(steps):
        loss_fn(params, x[s], c[s]).backward()
        sgd(params, lr)
    return {k: p.data.copy() for k, p in params.items()}


def reference_grads(x: np.ndarray, c: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    params = make_params(seed)
    loss_fn(params, x, c).backward()
    return {k: p.grad.copy() for k, p in params.items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def result(**fields: object) -> None:
    """The line the pytest driver reads."""
    print("RESULT " + json.dumps(fields), flush=True)
    sys.stdout.flush()
