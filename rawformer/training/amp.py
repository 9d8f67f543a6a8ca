"""Mixed precision: float16 compute with float32 masters, and dynamic loss scaling that skips bad steps.

The loss's gradient is seeded with S (the loss scale) so that small float16 gradients stay above the
float16 subnormal range; the optimizer step unscales by 1 / S inside the AdamW kernel (no extra pass). When
the scaled gradient overflows (its global norm is inf or NaN) the step is skipped, every gradient dropped,
and S halved; after `growth_interval` good steps in a row S doubles (the schedule of NVIDIA's apex and
torch.cuda.amp). The global norm doubles as the overflow check and the clipping norm: one fused pass.

`optimizer_step` is the whole update a training step ends with:
    norm = |scaled grad| / S;  skip if not finite;  clip = min(1, max_norm / norm);
    AdamW with grad_scale = clip / S;  update S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rawformer.training.optim import AdamW, clip_coefficient, global_grad_norm

__all__ = ["LossScaler", "StepResult", "optimizer_step"]


class LossScaler:
    """Dynamic loss scale.

    Parameters
    ----------
    init_scale : starting S (2**16 as in torch.cuda.amp); ignored when disabled (S = 1)
    growth_factor, backoff_factor : S *= growth after growth_interval good steps; S *= backoff on overflow
    growth_interval : good steps between growths
    enabled : False for float32 training: S stays 1 (non-finite steps are still skipped)
    min_scale : S never drops below this
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        min_scale: float = 1.0,
    ) -> None:
        if init_scale <= 0 or growth_factor < 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                "LossScaler: need init_scale > 0, growth_factor >= 1, 0 < backoff_factor < 1, "
                f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, "
                f"{growth_interval}"
            )
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.good_steps = 0
        self.skipped = 0

    def update(self, overflow: bool) -> None:
        """After a step: back off on overflow, grow after growth_interval good steps."""
        if overflow:
            self.skipped += 1
            self.good_steps = 0
            if self.enabled:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))


@dataclass
class StepResult:
    """What one optimizer step did: the unscaled gradient norm (inf / NaN on overflow), whether it was
    skipped, and the clip coefficient applied."""

    grad_norm: float
    skipped: bool
    clip: float


def optimizer_step(
    optimizer: AdamW, scaler: LossScaler, *, lr: float, max_grad_norm: float | None = None
) -> StepResult:
    """Unscale, check for overflow, clip and apply AdamW; then update the loss scale and drop the grads.

    Gradients must hold d(S * loss) (the backward was seeded with scaler.scale, averaged over ranks)."""
    scaled = global_grad_norm(optimizer.params.values())
    norm = scaled / scaler.scale
    if not math.isfinite(norm):
        scaler.update(overflow=True)
        optimizer.zero_grad()
        return StepResult(norm, True, 0.0)
    clip = clip_coefficient(norm, max_grad_norm)
    optimizer.step(lr=lr, grad_scale=clip / scaler.scale)
    scaler.update(overflow=False)
    optimizer.zero_grad()
    return StepResult(norm, False, clip)
