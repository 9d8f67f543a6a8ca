"""Dynamic load balancing for data parallel on unequal devices: per-rank micro-batch sizes proportional to
measured throughput, re-balanced every K steps, global batch and gradient unchanged.

Rank r trains on b_r samples of the global batch B (sum_r b_r = B) and computes the mean gradient g_r over
them; DataParallel weighs it by w_r = b_r / B, so the all-reduced sum_r w_r g_r = (1/B) sum of every
per-sample gradient: exactly the gradient of the equal split, whatever the shares (up to float rounding).

    lb = LoadBalancer(global_batch=B, group=groups.data, every=K)
    for step ...:
        lo, hi = lb.slice                        # this rank's samples of the step's global batch
        dp.begin_step(sync=True, weight=lb.weight)
        t = time.perf_counter(); loss(batch[lo:hi]).backward(); lb.record(time.perf_counter() - t)
        dp.finish(); optimizer.step()
        lb.end_step()                            # every K steps: all-gather throughputs, new shares

Only the compute time goes into `record` (not the wait for the all-reduce, which the slow rank sets).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rawformer.distributed import groups
from rawformer.distributed.groups import Group


def proportional_shares(total: int, rates: Sequence[float], minimum: int = 1) -> list[int]:
    """Integers summing to `total`, proportional to `rates` (largest remainder), each at least `minimum`.

    >>> proportional_shares(24, [2.0, 1.0])
    [16, 8]
    """
    n = len(rates)
    rates = np.asarray(rates, dtype=np.float64)
    if n == 0 or total < minimum * n:
        raise ValueError(f"cannot give {n} ranks at least {minimum} of {total} samples each")
    if not np.all(np.isfinite(rates)) or np.any(rates < 0):
        raise ValueError(f"rates must be finite and >= 0, got {rates.tolist()}")
    if rates.sum() <= 0:
        rates = np.ones(n)
    spare = total - minimum * n  # handed out in proportion, on top of the minimum
    exact = rates / rates.sum() * spare
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")
    base[order[: spare - int(base.sum())]] += 1
    return [int(b) + minimum for b in base]


class LoadBalancer:
    """Per-rank shares of a global batch, re-balanced every `every` steps from measured throughput.

    Parameters
    ----------
    global_batch : B, samples per step over the whole group (kept fixed)
    group : the data-parallel group (default: groups.current().data)
    every : K, steps between re-balances (the throughput is averaged over them)
    minimum : fewest samples a rank gets
    """

    def __init__(self, global_batch: int, group: Group | None = None, every: int = 10, minimum: int = 1):
        self.group = group if group is not None else groups.current().data
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        self.B, self.every, self.minimum = int(global_batch), int(every), int(minimum)
        self.shares = proportional_shares(self.B, [1.0] * self.group.size, minimum)
        self.step = 0
        self._seconds = 0.0
        self._samples = 0
        self.history: list[list[int]] = [list(self.shares)]

    @property
    def share(self) -> int:
        """b_r: this rank's samples per step."""
        return self.shares[self.group.rank]

    @property
    def slice(self) -> tuple[int, int]:
        """[lo, hi): this rank's samples within the step's global batch."""
        lo = sum(self.shares[: self.group.rank])
        return lo, lo + self.share

    @property
    def weight(self) -> float:
        """w_r = b_r / B, this rank's weight in the averaged gradient (DataParallel.begin_step(weight=))."""
        return self.share / self.B

    def record(self, seconds: float, samples: int | None = None) -> None:
        """Add one step's compute time (forward + backward of this rank's `share` samples)."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self._seconds += seconds
        self._samples += self.share if samples is None else int(samples)

    def end_step(self) -> bool:
        """Count a step; every `every` steps re-balance. Returns True when the shares changed."""
        self.step += 1
        return self.rebalance() if self.step % self.every == 0 else False

    def rebalance(self) -> bool:
        """All-gather every rank's throughput (samples/s) and set the shares proportional to it."""
        rate = self._samples / self._seconds if self._seconds > 0 else 0.0
        rates = self.group.comm.allgather(rate)
        self._seconds, self._samples = 0.0, 0
        if any(r <= 0 for r in rates):  # a rank measured nothing yet: keep the shares
            return False
        new = proportional_shares(self.B, rates, self.minimum)
        changed = new != self.shares
        self.shares = new
        self.history.append(list(new))
        return changed
