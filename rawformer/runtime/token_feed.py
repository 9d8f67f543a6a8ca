"""What the two overlapped greedy decode loops share (Generator._decode_fed, runtime/overlap.py).

Both launch step n+1 before step n's sampled ids reach the host: the requests whose last token is still on
the device take the first rows of step n+1, and `feed_tokens` copies their ids there from step n's argmax;
`TokenReadback` starts each step's copy to the host without blocking, to be read while the next step runs;
`decodes_again` says from counts alone whether a request takes another step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InFlight", "TokenReadback", "decodes_again", "feed_tokens"]


def decodes_again(prompt_len: int, generated: int, max_new: int, max_len: int) -> bool:
    """Whether a request with `generated` tokens (its in-flight one counted) decodes another step: it stays
    below max_new and feeding its last token keeps it within the longest sequence, max_len."""
    return generated < max_new and prompt_len + generated <= max_len


def feed_tokens(tokens: Any, prev_ids: Any, src_rows: Sequence[int], xp: Any) -> None:
    """tokens[:k] <- prev_ids[src_rows] (k = len(src_rows)), queued on the current stream: the previous step's
    argmax as this step's input ids for its first k rows. A plain copy when the rows are unchanged."""
    k = len(src_rows)
    if list(src_rows) == list(range(k)):
        tokens[:k] = prev_ids[:k]
    else:
        tokens[:k] = prev_ids[xp.asarray(np.asarray(src_rows))]


@dataclass
class InFlight:
    """A launched step whose token ids have not been read: the requests in row order, the device ids (bucket
    rows), their host copy and the event after that copy (None on the CPU)."""

    reqs: list[Any]
    ids: Any
    host: np.ndarray
    event: Any
    rows: dict[int, int] = field(init=False)  # id(request) -> its row

    def __post_init__(self) -> None:
        self.rows = {id(r): i for i, r in enumerate(self.reqs)}

    def tokens(self) -> list[int]:
        """The requests' token ids, once the copy has landed (blocks until then)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[: len(self.reqs)].tolist()


class TokenReadback:
    """Copies of launched steps' token ids to the host that do not block: two pinned buffers alternate, one
    read for the step in flight while the next step's copy fills the other (grown when a step is larger).

    `start(reqs, ids)` -> InFlight: the copy of the first len(reqs) ids started, with an event recorded after
    it (on the CPU the ids are copied at once and there is no event)."""

    def __init__(self, xp: Any, capacity: int = 1) -> None:
        self.xp = xp
        self.is_gpu = xp is not np
        self.capacity = max(1, capacity)
        self._bufs: dict[int, np.ndarray] = {}
        self._count = 0

    def start(self, reqs: list[Any], ids: Any) -> InFlight:
        n = len(reqs)
        if not self.is_gpu:
            return InFlight(reqs, ids, np.array(ids[:n]), None)
        slot = self._count % 2
        self._count += 1
        buf = self._bufs.get(slot)
        if buf is None or buf.shape[0] < n or buf.dtype != ids.dtype:
            size = max(n, self.capacity)
            mem = self.xp.cuda.alloc_pinned_memory(size * np.dtype(ids.dtype).itemsize)
            buf = self._bufs[slot] = np.ndarray((size,), dtype=ids.dtype, buffer=mem)
        host = buf[:n]
        ids[:n].get(out=host, blocking=False)  # pinned: asynchronous, in stream order
        event = self.xp.cuda.Event(block=False, disable_timing=True)
        event.record()
        return InFlight(reqs, ids, host, event)
