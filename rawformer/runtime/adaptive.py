"""Online control of the scheduler's per-step token budget and batch size from measured step latency.

Each scheduler step reports how long it took, how many tokens and sequences it ran, and whether it was
`saturated` (work was left waiting because of the budget or the batch-size cap). The controller moves two
knobs the scheduler reads before every step:

    token_budget  tokens one step may process (decode tokens + prefill chunks)
    max_seqs      sequences one step may run

Modes
-----
fixed       the knobs stay at their initial values.
latency     additive increase, multiplicative decrease against `target_ms` (the step latency, which is the
            inter-token latency every running request sees): a step slower than target * (1 + tolerance)
            shrinks both knobs by `decrease` (0.75); a saturated step faster than target * (1 - tolerance)
            grows them by an additive step (budget / 8, at least 16 tokens; one sequence).
throughput  grow while it pays: a saturated step below the latency ceiling `target_ms` grows the knobs
            multiplicatively (x1.25), but only while the measured tokens/s (an average over the last
            `window` steps at a level) rose by at least `min_gain` (3%) since the previous level; a level
            that did not pay is undone and growth pauses until conditions change (a step over the ceiling,
            which shrinks the knobs like latency mode, or `window * 8` steps later, to re-probe).

Everything is a pure function of the observations fed in (no clock of its own), so tests drive it with
synthetic latencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AdaptiveBatcher", "MODES"]

MODES = ("fixed", "latency", "throughput")


@dataclass
class _Level:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class AdaptiveBatcher:
    """The step token budget and batch size, tuned online (see the module docstring).

    Parameters
    ----------
    mode : "fixed" | "latency" | "throughput"
    target_ms : latency mode: the step latency to hold; throughput mode: the ceiling a step must stay under
    token_budget, max_seqs : initial values
    min_tokens, max_tokens : bounds of token_budget
    min_seqs, max_seqs_limit : bounds of max_seqs
    tolerance : dead band around the target (a fraction)
    window : steps averaged per level in throughput mode
    """

    def __init__(
        self,
        mode: str = "fixed",
        *,
        target_ms: float = 100.0,
        token_budget: int = 512,
        max_seqs: int = 32,
        min_tokens: int = 16,
        max_tokens: int = 8192,
        min_seqs: int = 1,
        max_seqs_limit: int = 256,
        tolerance: float = 0.15,
        decrease: float = 0.75,
        window: int = 8,
        min_gain: float = 0.03,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"AdaptiveBatcher: mode must be one of {MODES}, got {mode!r}")
        if not (isinstance(target_ms, (int, float)) and math.isfinite(target_ms) and target_ms > 0):
            raise ValueError(f"AdaptiveBatcher: target_ms must be a positive number, got {target_ms!r}")
        for name, v in (("min_tokens", min_tokens), ("min_seqs", min_seqs), ("window", window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AdaptiveBatcher: {name} must be a positive int, got {v!r}")
        if max_tokens < min_tokens or max_seqs_limit < min_seqs:
            raise ValueError("AdaptiveBatcher: a maximum below its minimum")
        if not 0 < decrease < 1:
            raise ValueError(f"AdaptiveBatcher: decrease must be in (0, 1), got {decrease!r}")
        self.mode = mode
        self.target_ms = float(target_ms)
        self.min_tokens, self.max_tokens = int(min_tokens), int(max_tokens)
        self.min_seqs, self.max_seqs_limit = int(min_seqs), int(max_seqs_limit)
        self.token_budget = self._clip_tokens(token_budget)
        self.max_seqs = self._clip_seqs(max_seqs)
        self.tolerance = float(tolerance)
        self.decrease = float(decrease)
        self.window = int(window)
        self.min_gain = float(min_gain)
        self.steps = 0
        self.increases = 0
        self.decreases = 0
        self.last_step_ms = 0.0
        self.ema_step_ms = 0.0
        self._level = _Level()
        self._prev_rate = 0.0  # throughput of the level before the current one
        self._prev_knobs: tuple[int, int] | None = None
        self._paused = 0  # throughput mode: steps left before growth may be probed again

    def _clip_tokens(self, v: float) -> int:
        return int(min(self.max_tokens, max(self.min_tokens, int(v))))

    def _clip_seqs(self, v: float) -> int:
        return int(min(self.max_seqs_limit, max(self.min_seqs, int(v))))

    def _set(self, tokens: float, seqs: float) -> None:
        t, s = self._clip_tokens(tokens), self._clip_seqs(seqs)
        if (t, s) > (self.token_budget, self.max_seqs):
            self.increases += 1
        elif (t, s) < (self.token_budget, self.max_seqs):
            self.decreases += 1
        self.token_budget, self.max_seqs = t, s

    def observe(self, step_s: float, tokens: int, seqs: int, saturated: bool) -> None:
        """Feed one step's measurement: wall seconds, tokens processed, sequences run, and whether work
        waited because of the budget / batch cap."""
        ms = 1e3 * float(step_s)
        self.steps += 1
        self.last_step_ms = ms
        self.ema_step_ms = ms if self.steps == 1 else 0.9 * self.ema_step_ms + 0.1 * ms
        if self.mode == "fixed" or tokens <= 0:
            return
        hi = self.target_ms * (1 + self.tolerance)
        if ms > hi:  # too slow in either mode: multiplicative decrease
            self._set(self.token_budget * self.decrease, self.max_seqs * self.decrease)
            self._level, self._prev_rate, self._prev_knobs, self._paused = _Level(), 0.0, None, 0
            return
        if not saturated:
            return
        if self.mode == "latency":
            if ms < self.target_ms * (1 - self.tolerance):
                self._set(self.token_budget + max(16, self.token_budget // 8), self.max_seqs + 1)
            return
        # throughput: average a window at this level, then decide whether growing paid off
        lvl = self._level
        lvl.tokens += tokens
        lvl.seconds += step_s
        lvl.steps += 1
        if self._paused:
            self._paused -= 1
            return
        if lvl.steps < self.window:
            return
        rate = lvl.rate
        if self._prev_knobs is not None and rate < self._prev_rate * (1 + self.min_gain):
            # the last growth did not pay: go back and hold there for a while
            self._set(*self._prev_knobs)
            self._prev_knobs, self._prev_rate = None, 0.0
            self._paused = 8 * self.window
        else:
            self._prev_knobs = (self.token_budget, self.max_seqs)
            self._prev_rate = rate
            self._set(self.token_budget * 1.25 + 1, self.max_seqs * 1.25 + 1)
        self._level = _Level()

    def state(self) -> dict[str, Any]:
        """The knobs and the measurements behind them (what the metrics show)."""
        return dict(
            mode=self.mode, target_ms=self.target_ms, token_budget=self.token_budget, max_seqs=self.max_seqs,
            last_step_ms=self.last_step_ms, ema_step_ms=self.ema_step_ms, steps=self.steps,
            increases=self.increases, decreases=self.decreases,
        )  # fmt: skip
