"""AdamW over autograd parameters through the fused multi-tensor kernel, gradient clipping, the LR schedule.

    opt = AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, master_weights=True)
    norm = global_grad_norm(opt.params.values())         # one fused pass (rf.grad_norm), a host float
    opt.step(lr=cosine_lr(step, ...), grad_scale=clip_coefficient(norm, 1.0) / loss_scale)

Weight decay goes to matrices and embeddings (ndim >= 2) only, not to biases and norm scales (GPT-2 / nanoGPT
practice). With master_weights (mixed precision) the optimizer keeps a float32 copy of every parameter; the
kernel updates the copy and writes its rounded value into the float16 parameter. Moments are float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.autograd import Tensor
from rawformer.ops import optim as optim_ops

__all__ = ["AdamW", "clip_coefficient", "cosine_lr", "global_grad_norm"]


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `lr` over warmup_steps (step 0 gets lr / warmup),
    then a cosine from lr down to min_lr at total_steps (min_lr after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    span = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def global_grad_norm(params: Iterable[Tensor]) -> float:
    """sqrt(sum of squares) over the `.grad` of every parameter that has one, as a Python float (one fused
    kernel pass per dtype and one host sync); inf or NaN when any gradient element is non-finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(backend.to_numpy(optim_ops.grad_norm(grads)))


def clip_coefficient(norm: float, max_norm: float | None) -> float:
    """min(1, max_norm / norm): the factor that brings the gradient's global norm down to max_norm
    (1 when clipping is off, max_norm None or <= 0, or the norm is already small enough)."""
    if max_norm is None or max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


class AdamW:
    """Decoupled-weight-decay Adam over a dict of parameter Tensors, one fused launch a step (rf.adamw_step).

    Parameters
    ----------
    params : name -> Tensor (leaves with requires_grad); all on one device
    lr, beta1, beta2, eps, weight_decay : hyper-parameters (torch.optim.AdamW's meaning); lr can be
        overridden per step
    master_weights : keep float32 master copies (for float16 parameters); default: when a parameter is not
        float32 / float64
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        *,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        master_weights: bool | None = None,
    ) -> None:
        if not params:
            raise ValueError("AdamW: no parameters")
        self.params = dict(params)
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.weight_decay = float(weight_decay)
        first = next(iter(self.params.values()))
        xp = first.xp
        if master_weights is None:
            master_weights = any(p.dtype == np.float16 for p in self.params.values())
        state_dtype = np.float64 if first.dtype == np.float64 else np.float32
        self.exp_avg = {n: xp.zeros(p.shape, dtype=state_dtype) for n, p in self.params.items()}
        self.exp_avg_sq = {n: xp.zeros(p.shape, dtype=state_dtype) for n, p in self.params.items()}
        self.masters: dict[str, Any] | None = None
        if master_weights:
            self.masters = {n: p.data.astype(np.float32) for n, p in self.params.items()}
        self.decay = {n: self.weight_decay if p.ndim >= 2 else 0.0 for n, p in self.params.items()}
        self.step_count = 0

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """One update of every parameter that has a gradient: g = grad_scale * grad (unscale and clip).

        Parameters without a gradient are left alone (their moments too), as torch.optim does."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        self.step_count += 1
        optim_ops.adamw_step(
            [self.params[n].data for n in names],
            [self.params[n].grad for n in names],
            [self.exp_avg[n] for n in names],
            [self.exp_avg_sq[n] for n in names],
            step=self.step_count,
            lr=self.lr if lr is None else float(lr),
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=[self.decay[n] for n in names],
            grad_scale=float(grad_scale),
            master_params=None if self.masters is None else [self.masters[n] for n in names],
        )

    def zero_grad(self) -> None:
        """Drop every gradient (set to None: the next backward allocates fresh ones)."""
        for p in self.params.values():
            p.grad = None

    def weights(self) -> dict[str, Any]:
        """The full-precision weights: the float32 masters, or the parameters themselves without masters."""
        if self.masters is not None:
            return dict(self.masters)
        return {n: p.data for n, p in self.params.items()}

    def state_arrays(self) -> dict[str, Any]:
        """Moments as name -> array ("exp_avg.<param>", "exp_avg_sq.<param>"), for checkpoints."""
        out = {f"exp_avg.{n}": a for n, a in self.exp_avg.items()}
        out |= {f"exp_avg_sq.{n}": a for n, a in self.exp_avg_sq.items()}
        return out

    def load(self, weights: dict[str, Any], state: dict[str, Any], step_count: int) -> None:
        """Restore from a checkpoint: full-precision weights (name -> host array), moments (state_arrays
        names) and the step count. Parameters get the weights rounded to their dtype, as after a step."""
        xp = next(iter(self.params.values())).xp
        for n, p in self.params.items():
            if n not in weights:
                raise KeyError(f"AdamW.load: checkpoint has no weight {n!r}")
            w = np.asarray(weights[n])
            if tuple(w.shape) != p.shape:
                raise ValueError(f"AdamW.load: weight {n!r} has shape {w.shape}, the model {p.shape}")
            if self.masters is not None:
                self.masters[n][...] = xp.asarray(w.astype(np.float32))
                p.data[...] = self.masters[n].astype(p.dtype)
            else:
                p.data[...] = xp.asarray(w.astype(p.dtype))
            for key, table in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                a = state.get(f"{key}.{n}")
                if a is None:
                    raise KeyError(f"AdamW.load: checkpoint has no {key}.{n}")
                table[n][...] = xp.asarray(np.asarray(a).astype(table[n].dtype))
        self.step_count = int(step_count)
