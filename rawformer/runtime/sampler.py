"""Next-token sampling: repetition penalty, temperature, top-k, top-p, seeded per request.

One code path over the array module of the logits: CuPy logits are processed on the device (only one
uniform number per sampled row comes from the host, and the chosen token ids go back), NumPy logits on the
host. Per row s of the (S, V) logits, in the order of Hugging Face's logits processors:

    repetition penalty r_s (tokens already in the sequence, prompt included):
        l[v] = l[v] / r_s  if l[v] > 0  else  l[v] * r_s                  for every seen v
    greedy (temperature 0):  token = argmax_v l[v]   (the first one on ties)
    otherwise:
        l = l / t_s
        top-k (k_s > 0):   keep v with l[v] >= the k-th largest l      (ties at the boundary are kept)
        top-p (p_s < 1):   sort the kept tokens by probability, descending; keep the shortest prefix whose
                           probability mass reaches p_s: token i (in that order) stays iff the mass of the
                           tokens before it is < p_s (the most likely token always stays; ties at the
                           boundary are kept)
        P = softmax over the kept tokens;  token = the first v with cumsum(P)[v] > u_s * sum(P)
                                                 (inverse CDF, u_s ~ U[0, 1) from the request's generator)

The uniform u_s comes from the request's own `numpy.random.Generator` (seeded from the request's seed), one
draw per sampled step: a request's tokens depend on its seed and its logits only, not on the other requests
of the batch. `sampling_probs` returns P itself (what the tests compare with the documented distribution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer import backend

__all__ = ["Sampler", "SamplingParams", "apply_repetition_penalty", "sample_tokens", "sampling_probs"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature : 0 = greedy (argmax); > 0 divides the logits
    top_k : keep the k most likely tokens (0 = all)
    top_p : nucleus sampling, keep the smallest set of most likely tokens with mass >= top_p (1 = all)
    repetition_penalty : > 0; 1 = none; > 1 discourages tokens already in the sequence (prompt included)
    seed : the request's generator seed, an int or a tuple of ints (numpy.random.default_rng's entropy);
        None: fresh entropy, not reproducible
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)):
            raise TypeError(f"temperature must be a number, got {t!r}")
        if not math.isfinite(float(t)) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 < float(p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)):
            raise TypeError(f"repetition_penalty must be a number, got {r!r}")
        if not math.isfinite(float(r)) or r <= 0:
            raise ValueError(f"repetition_penalty must be finite and > 0 (1 = off), got {r!r}")
        s = self.seed
        parts = s if isinstance(s, tuple) else (s,)
        if s is not None and not all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0 for x in parts
        ):
            raise ValueError(f"seed must be an int >= 0, a tuple of them, or None, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _acc(logits: Any) -> Any:
    """The logits in the sampling precision: float64 for float64 input, float32 otherwise (no copy when
    they already are: nothing here writes into them, every step makes a new array)."""
    dt = np.float64 if logits.dtype == np.float64 else np.float32
    return logits.astype(dt, copy=False)


def apply_repetition_penalty(logits: Any, seen: Any, penalty: Any) -> Any:
    """l[s, v] / r_s where seen and l > 0, l[s, v] * r_s where seen and l <= 0; returns a new array.

    logits (S, V) float; seen (S, V) bool; penalty (S,) float (rows with 1 are unchanged)."""
    xp = backend.array_module(logits)
    r = penalty[:, None]
    scaled = xp.where(logits > 0, logits / r, logits * r)
    return xp.where(seen, scaled, logits)


def _masked_scaled(logits: Any, temperature: Any, top_k: Any, top_p: Any, need_sort: bool) -> Any:
    """l / t with the tokens outside top-k / top-p set to -inf (rows with t == 0 use t = 1)."""
    xp = backend.array_module(logits)
    s, v = logits.shape
    t = xp.where(temperature > 0, temperature, 1.0).astype(logits.dtype)
    lg = logits / t[:, None]
    if not need_sort or v == 0:
        return lg
    rows = xp.arange(s)
    srt = -xp.sort(-lg, axis=1)  # (S, V) descending
    k = top_k.astype(np.int64)
    kth = srt[rows, xp.clip(k - 1, 0, v - 1)]  # the k-th largest value
    thr_k = xp.where(k > 0, kth, -np.inf)
    # top-p over what top-k left: descending probabilities, mass before each token
    srt = xp.where(srt >= thr_k[:, None], srt, -np.inf)
    e = xp.exp(srt - srt[:, :1])
    p = e / e.sum(axis=1, keepdims=True)
    before = xp.cumsum(p, axis=1) - p
    n_keep = xp.maximum((before < top_p[:, None]).sum(axis=1), 1)  # a prefix: `before` only grows
    thr_p = xp.where(top_p < 1, srt[rows, n_keep - 1], -np.inf)
    thr = xp.maximum(thr_k, thr_p)
    return xp.where(lg >= thr[:, None], lg, -np.inf)


def _softmax_rows(lg: Any) -> Any:
    xp = backend.array_module(lg)
    e = xp.exp(lg - lg.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _rows(value: Any, shape: tuple[int]) -> np.ndarray:
    """A scalar or per-row host value as a contiguous (S,) array (CuPy uploads it as one block)."""
    return np.array(np.broadcast_to(value, shape))


def _as_rows(xp: Any, value: Any, s: int, dtype: Any) -> Any:
    return xp.asarray(_rows(np.asarray(value, dtype=dtype), (s,)))


def sampling_probs(
    logits: Any,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    seen: Any = None,
) -> Any:
    """The distribution sampling draws from (see the module docstring), (S, V) in the sampling precision.

    logits (S, V); the parameters are scalars or (S,) per row (temperature > 0 here); seen (S, V) bool: the
    tokens the repetition penalty applies to."""
    xp = backend.array_module(logits)
    lg = _acc(logits)
    s = lg.shape[0]
    if seen is not None:
        lg = apply_repetition_penalty(lg, xp.asarray(seen), _as_rows(xp, repetition_penalty, s, lg.dtype))
    t = _as_rows(xp, temperature, s, lg.dtype)
    k = _as_rows(xp, top_k, s, np.int64)
    p = _as_rows(xp, top_p, s, lg.dtype)
    return _softmax_rows(_masked_scaled(lg, t, k, p, True))


def sample_tokens(
    logits: Any,
    uniforms: Any,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    seen: Any = None,
) -> np.ndarray:
    """Token ids (host int64 (S,)) for (S, V) logits and one uniform in [0, 1) per row (module docstring).

    Rows with temperature 0 take the argmax (their uniform is not used). The parameters are scalars or
    per-row (S,) values; seen (S, V) bool selects the tokens the repetition penalty applies to."""
    xp = backend.array_module(logits)
    lg = _acc(logits)
    s, v = lg.shape
    if s == 0:
        return np.zeros(0, dtype=np.int64)
    r = _rows(np.asarray(repetition_penalty, dtype=np.float64), (s,))
    if seen is not None and bool(np.any(r != 1)):
        lg = apply_repetition_penalty(lg, xp.asarray(seen), xp.asarray(r.astype(lg.dtype)))
    t_host = _rows(np.asarray(temperature, dtype=np.float64), (s,))
    if bool(np.all(t_host == 0)):
        return np.asarray(backend.to_numpy(xp.argmax(lg, axis=1)), dtype=np.int64)
    k_host = _rows(np.asarray(top_k, dtype=np.int64), (s,))
    p_host = _rows(np.asarray(top_p, dtype=np.float64), (s,))
    sampled = t_host > 0
    need_sort = bool(np.any(sampled & ((k_host > 0) | (p_host < 1))))
    t = xp.asarray(t_host.astype(lg.dtype))
    masked = _masked_scaled(lg, t, xp.asarray(k_host), xp.asarray(p_host.astype(lg.dtype)), need_sort)
    probs = _softmax_rows(masked)
    cum = xp.cumsum(probs, axis=1)
    u = xp.asarray(_rows(np.asarray(uniforms, dtype=np.float64), (s,)).astype(lg.dtype))
    # the first index whose cumulative mass passes u * total: `cum <= target` is a prefix of each row
    idx = xp.minimum((cum <= (u * cum[:, -1])[:, None]).sum(axis=1), v - 1)
    if bool(np.all(sampled)):
        chosen = idx
    else:
        chosen = xp.where(t > 0, idx, xp.argmax(lg, axis=1))
    return np.asarray(backend.to_numpy(chosen), dtype=np.int64)


class Sampler:
    """The sampling state of a batch of requests: parameters, generators and the seen-token masks.

    Parameters
    ----------
    params : one SamplingParams per request
    vocab_size : V
    xp : where the logits live (numpy or cupy): the seen-token mask is kept there

    `observe(rows, tokens)` records tokens into the requests' seen masks (the prompt, then each sampled
    token); `__call__(logits, rows)` picks one token per row of `logits` ((len(rows), V), row i belongs to
    request rows[i]) and returns them as a host int64 array. A greedy batch without repetition penalty is
    one argmax and one small device-to-host copy.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, xp: Any = np):
        self.params = list(params)
        self.vocab_size = int(vocab_size)
        self.xp = xp
        n = len(self.params)
        self.temperature = np.array([p.temperature for p in self.params], dtype=np.float64)
        self.top_k = np.array([p.top_k for p in self.params], dtype=np.int64)
        self.top_p = np.array([p.top_p for p in self.params], dtype=np.float64)
        self.penalty = np.array([p.repetition_penalty for p in self.params], dtype=np.float64)
        self.generators = [np.random.default_rng(p.seed) for p in self.params]
        self.all_greedy = bool(np.all(self.temperature == 0))
        self.penalized = bool(np.any(self.penalty != 1))
        # (N, V) bool: tokens seen by each request (only when some request has a repetition penalty)
        self.seen = xp.zeros((n, self.vocab_size), dtype=bool) if self.penalized else None

    def observe(self, rows: Sequence[int], tokens: Sequence[Sequence[int]] | Sequence[int]) -> None:
        """Mark tokens as seen: tokens[i] (an id or a list of ids) for request rows[i]."""
        if self.seen is None or not len(rows):
            return
        r: list[int] = []
        t: list[int] = []
        for row, toks in zip(rows, tokens, strict=True):
            toks = [toks] if isinstance(toks, (int, np.integer)) else list(toks)
            r.extend([int(row)] * len(toks))
            t.extend(int(x) for x in toks)
        if r:
            self.seen[self.xp.asarray(np.array(r)), self.xp.asarray(np.array(t))] = True

    def __call__(self, logits: Any, rows: Sequence[int]) -> np.ndarray:
        rows_np = np.asarray(rows, dtype=np.int64)
        s = rows_np.shape[0]
        if logits.shape[0] != s or logits.ndim != 2:
            raise ValueError(f"Sampler: logits of shape {tuple(logits.shape)} for {s} rows")
        if self.all_greedy and not self.penalized:
            return np.asarray(backend.to_numpy(self.xp.argmax(logits, axis=1)), dtype=np.int64)
        t = self.temperature[rows_np]
        u = np.array([self.generators[r].random() if t[i] > 0 else 0.0 for i, r in enumerate(rows_np)])
        seen = self.seen[self.xp.asarray(rows_np)] if self.penalized else None
        return sample_tokens(
            logits, u, t, self.top_k[rows_np], self.top_p[rows_np], self.penalty[rows_np], seen
        )
