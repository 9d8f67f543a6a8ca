"""The per-step batch description the models consume, and the persistent buffers it lives in."""

from __future__ import annotations

import types
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(eq=False)
class AttentionBatch:
    """Everything a model forward needs about the cache for one step over S sequences and T new tokens.

    Arrays are on the pool's device (CuPy on GPU, NumPy on CPU); `host` holds the same arrays in NumPy (so
    a model can read lengths without a device-to-host copy). All of them are VIEWS of the pool's persistent
    step buffers (allocated once, reused every step: no device allocation on the hot path, fixed addresses
    for CUDA graphs): they stay valid until the pool's next `prepare`. Copy what must outlive the step.

    Attributes
    ----------
    tokens : int32 (T,)
        The new token ids, packed sequence after sequence.
    positions : int32 (T,)
        Position of each new token in its sequence.
    slot_mapping : int32 (T,)
        Cache slot (block * block_size + offset) of each new token; -1 for padding (not written).
    cu_seqlens_q : int32 (S+1,)
        Offsets of each sequence's new tokens in the packed batch (cu_seqlens_q[0] = 0).
    context_lens : int32 (S,)
        Tokens in the cache per sequence INCLUDING this step's new ones.
    block_tables : int32 (S, max_blocks)
        Each sequence's block ids, -1 padded.
    max_seqlen_q, max_context : int
        max(q lengths), max(context_lens).
    is_prefill : bool
        True when every sequence's new tokens start at position 0 (no cached prefix): attention over the
        new tokens only (rf.attention varlen). False: decode (rf.paged_attention, q_len <= 16) or a
        prefix-hit / chunked prefill (attention over cached + new K/V).
    seq_ids : tuple
        The pool's sequence ids, in batch order (padding entries are None).
    num_seqs, num_tokens : int
        S and T (padding included).
    """

    tokens: Any
    positions: Any
    slot_mapping: Any
    cu_seqlens_q: Any
    context_lens: Any
    block_tables: Any
    max_seqlen_q: int
    max_context: int
    is_prefill: bool
    seq_ids: tuple = ()
    host: AttentionBatch | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def q_lens(self) -> np.ndarray:
        """Host int32 (S,): new tokens per sequence."""
        cu = (self.host or self).cu_seqlens_q
        return np.diff(np.asarray(cu))

    @property
    def last_token_index(self) -> np.ndarray:
        """Host int32 (S,): index in the packed batch of each sequence's last new token (cu_seqlens_q[1:]
        - 1; -1 for a sequence with no new token)."""
        cu = np.asarray((self.host or self).cu_seqlens_q)
        q = np.diff(cu)
        return np.where(q > 0, cu[1:] - 1, -1).astype(np.int32)

    def detached(self) -> AttentionBatch:
        """A copy that owns its arrays (device and host), still valid after the pool's next `prepare`: for a
        forward launched over several steps (the Scheduler's interleaved prefill). On the GPU the device
        copies are queued on the current stream, after the upload that filled the step buffers."""
        own = {name: getattr(self, name).copy() for name in FIELDS}
        if self.host is self:  # the CPU: the arrays are their own host copy
            batch = replace(self, **own, host=None)
            batch.host = batch
            return batch
        return replace(self, **own, host=None if self.host is None else self.host.detached())


FIELDS = ("tokens", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "block_tables")


class StepBuffers:
    """One int32 host staging buffer and one device buffer holding every array of a step back to back:
    [tokens T | positions T | slot_mapping T | cu_seqlens_q S+1 | context_lens S | block_tables S*W].

    The pool fills the host buffer, then ONE host-to-device copy of the used prefix moves the whole step.
    On the GPU the staging buffer is pinned and the copy asynchronous on the current stream; an event after
    it makes the next step wait before overwriting the staging buffer. On the CPU the "device" buffer is the
    staging buffer itself (no copy). Both grow (to twice the need) only when a step does not fit: the one
    allocation outside start-up, counted in `grown`.
    """

    def __init__(self, xp: types.ModuleType, capacity: int):
        self.xp = xp
        self.is_gpu = xp is not np
        self.grown = 0
        # one event, re-recorded after every upload; _pending: an upload may still read the staging buffer
        self._event = xp.cuda.Event(block=False, disable_timing=True) if self.is_gpu else None
        self._pending = False
        self._alloc(max(64, int(capacity)))
        self.grown = 0

    def _alloc(self, n: int) -> None:
        if self._pending:
            self._event.synchronize()
            self._pending = False
        if self.is_gpu:
            mem = self.xp.cuda.alloc_pinned_memory(n * 4)
            self.host = np.ndarray((n,), dtype=np.int32, buffer=mem)
            self.device = self.xp.empty(n, dtype=np.int32)
        else:
            self.host = np.empty(n, dtype=np.int32)
            self.device = self.host
        self.capacity = n
        self.grown += 1

    @staticmethod
    def size(tokens: int, seqs: int, width: int) -> int:
        return 3 * tokens + 2 * seqs + 1 + seqs * width

    def _views(self, buf: Any, tokens: int, seqs: int, width: int) -> dict[str, Any]:
        t, s = tokens, seqs
        o = [0, t, 2 * t, 3 * t, 3 * t + s + 1, 3 * t + 2 * s + 1, 3 * t + 2 * s + 1 + s * width]
        views = {name: buf[o[i] : o[i + 1]] for i, name in enumerate(FIELDS)}
        views["block_tables"] = views["block_tables"].reshape(s, width)
        return views

    def host_views(self, tokens: int, seqs: int, width: int) -> dict[str, np.ndarray]:
        """Host arrays to fill for a step of this shape (waits until the previous upload has read them)."""
        need = self.size(tokens, seqs, width)
        if need > self.capacity:
            self._alloc(2 * need)
        elif self._pending:
            self._event.synchronize()
            self._pending = False
        return self._views(self.host, tokens, seqs, width)

    def upload(self, tokens: int, seqs: int, width: int) -> dict[str, Any]:
        """Copy the step's prefix of the staging buffer to the device in one transfer; the device views."""
        need = self.size(tokens, seqs, width)
        if self.is_gpu and need:
            cuda = self.xp.cuda
            stream = cuda.get_current_stream().ptr
            cuda.runtime.memcpyAsync(
                self.device.data.ptr, self.host.ctypes.data, need * 4, cuda.runtime.memcpyHostToDevice, stream
            )
            self._event.record()
            self._pending = True
        return self._views(self.device, tokens, seqs, width)

    @property
    def nbytes(self) -> int:
        return self.capacity * 4
