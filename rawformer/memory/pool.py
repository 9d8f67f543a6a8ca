"""KVPool: the front of the paged memory pool. Sequences by id, their block tables, prefix sharing,
copy-on-write, fork, swap, the per-step AttentionBatch, and the accounting.

Everything here is host-side Python on integer block ids; the only device work is the arena's block copies
(copy-on-write, swap) and one host-to-device copy of the step arrays per `prepare`. Nothing on the hot path
allocates device memory: the arena and the step buffers are allocated once.

Every operation first plans (how many blocks it needs, whether every argument is valid) and only then
changes state, so an error — OutOfBlocks above all — leaves the pool exactly as it was.

Life of a sequence::

    cached = pool.add_sequence(sid, prompt)     # blocks for the whole prompt; full blocks of a known prefix
                                                # are shared (the first `cached` tokens need no compute)
    batch = pool.prepare([sid, ...])            # the step computes the pending prompt tokens
    batch = pool.prepare([sid, ...], [[tok], ...])  # decode: append one sampled token per sequence
    pool.fork(sid, sid2)                        # parallel sampling: shares every block
    pool.swap_out(sid); pool.swap_in(sid)       # preemption to host memory and back
    pool.free_sequence(sid)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer.memory.allocator import BlockAllocator
from rawformer.memory.arena import KVArena
from rawformer.memory.batch import AttentionBatch, StepBuffers
from rawformer.memory.errors import OutOfBlocks, SequenceTooLong, UnknownSequence
from rawformer.memory.prefix import PrefixCache, block_key
from rawformer.memory.sequence import BlockTable, Sequence


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's accounting (KVPool.stats()).

    tokens_stored counts physical slots holding a token (a block shared by several sequences counts once);
    logical_tokens counts every resident sequence's tokens (shared ones once per sequence).
    waste = reserved_slots - tokens_stored: the unused tail slots of used blocks.
    """

    num_blocks: int
    block_size: int
    block_bytes: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int  # free blocks that still hold reusable prefix-cache content (counted in blocks_free)
    blocks_shared: int  # used blocks held by more than one sequence
    bytes_used: int
    bytes_reserved: int  # the whole arena (allocated once)
    tokens_stored: int
    logical_tokens: int
    reserved_slots: int
    waste_slots: int
    sequences: int
    sequences_swapped: int
    swap_host_bytes: int
    prefix_hit_blocks: int
    prefix_query_blocks: int
    cow_copies: int
    step_buffer_bytes: int

    @property
    def bytes_free(self) -> int:
        return self.blocks_free * self.block_bytes

    @property
    def waste_ratio(self) -> float:
        """Wasted slots / reserved slots of used blocks (0 when nothing is used)."""
        return self.waste_slots / self.reserved_slots if self.reserved_slots else 0.0

    @property
    def utilization(self) -> float:
        """Used blocks / all blocks."""
        return self.blocks_used / self.num_blocks if self.num_blocks else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(bytes_free=self.bytes_free, waste_ratio=self.waste_ratio, utilization=self.utilization)
        return d

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"blocks {self.blocks_used}/{self.num_blocks} used ({self.blocks_free} free, "
            f"{self.blocks_cached} cached, {self.blocks_shared} shared) | {self.bytes_used / mib:.1f} of "
            f"{self.bytes_reserved / mib:.1f} MiB | {self.tokens_stored} tokens stored "
            f"({self.logical_tokens} logical) | waste {self.waste_slots} slots "
            f"({100 * self.waste_ratio:.2f}%) | {self.sequences} seqs ({self.sequences_swapped} swapped, "
            f"{self.swap_host_bytes / mib:.1f} MiB on host)"
        )


@dataclass
class _Swapped:
    """A swapped-out sequence's blocks on the host: (layers, 2, n, block_size, kv_heads, head_dim)."""

    host: np.ndarray
    num_blocks: int


UNKNOWN_TOKEN = -1  # a new token whose id is still on the device (KVPool.prepare(..., unknown_tokens=True))


def _token_list(token_ids: Any, name: str, allow_unknown: bool = False) -> list[int]:
    """Token ids as a list of Python ints >= 0 (a list, tuple or 1-D integer array); with allow_unknown,
    UNKNOWN_TOKEN entries too."""
    if token_ids is None:
        return []
    low = UNKNOWN_TOKEN if allow_unknown else 0
    if isinstance(token_ids, (list, tuple)) and all(type(t) is int and t >= low for t in token_ids):
        return list(token_ids)  # the common case (a decode step's one token) without NumPy
    arr = np.asarray(token_ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
    if arr.size and int(arr.min()) < low:
        raise ValueError(f"{name} holds a negative token id ({int(arr.min())})")
    return arr.tolist()


class KVPool:
    """The paged KV memory pool over one KVArena.

    Parameters
    ----------
    arena : KVArena
        The cache (its block size and block count define the pool).
    max_seq_len : int, optional
        Longest sequence accepted (SequenceTooLong beyond); default: as many slots as the arena has.
    prefix_caching : bool
        Share identical full-block prefixes between sequences (default True).
    salt : bytes
        Mixed into the first block's key (e.g. a model or adapter id) so that pools do not share by mistake.
    max_seqs, max_tokens : int
        Initial capacity of the step buffers (a larger step grows them once; see StepBuffers).
    """

    def __init__(
        self,
        arena: KVArena,
        *,
        max_seq_len: int | None = None,
        prefix_caching: bool = True,
        salt: bytes = b"",
        max_seqs: int = 256,
        max_tokens: int = 8192,
    ):
        if not isinstance(arena, KVArena):
            raise TypeError(f"KVPool: arena must be a KVArena, got {type(arena).__name__}")
        self.arena = arena
        self.xp = arena.xp
        self.block_size = arena.block_size
        self.num_blocks = arena.num_blocks
        if max_seq_len is None:
            max_seq_len = arena.num_slots
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"KVPool: max_seq_len must be a positive int, got {max_seq_len!r}")
        self.max_seq_len = max_seq_len
        self.salt = bytes(salt)
        self.prefix = PrefixCache() if prefix_caching else None
        self.allocator = BlockAllocator(arena.num_blocks, on_evict=self._evict)
        self._seqs: dict[Hashable, Sequence] = {}
        self._fill = [0] * arena.num_blocks  # tokens held by each used block (shared blocks agree)
        self._stored = 0  # sum of _fill over used blocks
        self._swap_bytes = 0
        self._inflight: list[tuple[Any, np.ndarray]] = []  # (event, host buffer) of running swap-in copies
        self.cow_copies = 0
        width = math.ceil(min(max_seq_len, 1 << 20) / self.block_size)
        self._steps = StepBuffers(self.xp, StepBuffers.size(max_tokens, max_seqs, min(width, 256)))

    # ---- small helpers -----------------------------------------------------------------------------------

    def _evict(self, block: int) -> None:
        if self.prefix is not None:
            self.prefix.forget(block)

    def _keep(self, block: int) -> bool:
        """Whether a block that becomes free stays in the prefix cache (cached free)."""
        return self.prefix is not None and block in self.prefix

    def _release(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; blocks that become free stop counting as stored."""
        for b in self.allocator.free(blocks, keep=self._keep):
            self._stored -= self._fill[b]
            self._fill[b] = 0

    def _set_fill(self, block: int, fill: int) -> None:
        self._stored += fill - self._fill[block]
        self._fill[block] = fill

    def _get(self, seq_id: Hashable, resident: bool = True) -> Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequence(f"the pool holds no sequence {seq_id!r}")
        if resident and seq.swapped is not None:
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in first")
        return seq

    def _check_length(self, seq_id: Hashable, n: int) -> None:
        if n > self.max_seq_len:
            raise SequenceTooLong(
                f"sequence {seq_id!r} would hold {n} tokens, over max_seq_len={self.max_seq_len}"
            )
        if math.ceil(n / self.block_size) > self.num_blocks:
            raise SequenceTooLong(
                f"sequence {seq_id!r} would hold {n} tokens: {math.ceil(n / self.block_size)} blocks, "
                f"more than the arena's {self.num_blocks}"
            )

    # ---- queries -----------------------------------------------------------------------------------------

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def sequence(self, seq_id: Hashable) -> Sequence:
        """The sequence's state (read it; change it only through the pool)."""
        return self._get(seq_id, resident=False)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._get(seq_id, resident=False).blocks.tolist()

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._get(seq_id, resident=False).num_tokens

    def slots(self, seq_id: Hashable, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 slot ids of positions [start, stop) of a resident sequence (host array)."""
        seq = self._get(seq_id)
        stop = seq.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= seq.num_tokens:
            raise ValueError(f"slots: [{start}, {stop}) is outside the sequence's {seq.num_tokens} tokens")
        pos = np.arange(start, stop)
        bs = self.block_size
        return (seq.blocks.array()[pos // bs].astype(np.int64) * bs + pos % bs).astype(np.int32)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, seq_id: Hashable, n: int) -> int:
        """Blocks that appending n tokens to a resident sequence would take (copy-on-write included)."""
        cow, new = self._plan_append(self._get(seq_id), n, {})
        return int(cow) + new

    def can_append(self, seq_ids: SequenceT[Hashable], n: int = 1) -> bool:
        """Whether every sequence can get n more tokens now (a scheduler's check before a decode step)."""
        shared: dict[int, int] = {}
        need = 0
        for sid in seq_ids:
            cow, new = self._plan_append(self._get(sid), n, shared)
            need += int(cow) + new
        return need <= self.allocator.num_free

    # ---- adding and growing sequences ---------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, token_ids: Any) -> int:
        """Register a sequence and reserve blocks for its prompt; return how many prompt tokens were found in
        the prefix cache (their K/V is already there: the next step computes only the rest).

        Full blocks whose hash-chain key is cached are shared (reference counted), except that the last
        prompt token is always computed (its logits are needed), so a prompt that is entirely cached
        recomputes its last block into a new one.

        Raises
        ------
        SequenceTooLong
            The prompt is longer than max_seq_len or the whole arena.
        OutOfBlocks
            Not enough free blocks now (nothing reserved).
        """
        if seq_id is None:
            raise ValueError("add_sequence: seq_id None is reserved (it marks padding entries of a batch)")
        if seq_id in self._seqs:
            raise ValueError(f"add_sequence: the pool already holds a sequence {seq_id!r}")
        tokens = _token_list(token_ids, "add_sequence: token_ids")
        n = len(tokens)
        self._check_length(seq_id, n)
        bs = self.block_size
        hits: list[int] = []
        keys: list[bytes] = []
        queried = 0
        if self.prefix is not None:
            parent = None
            for i in range(n // bs):
                key = block_key(parent, tokens[i * bs : (i + 1) * bs], self.salt)
                queried += 1
                b = self.prefix.peek(key)
                if b is None:
                    break
                hits.append(b)
                keys.append(key)
                parent = key
            if hits and len(hits) * bs == n:
                hits.pop()
                keys.pop()
        new = math.ceil(n / bs) - len(hits)
        revive = sum(1 for b in hits if self.allocator.refcount(b) == 0)
        if new + revive > self.allocator.num_free:
            raise OutOfBlocks(new + revive, self.allocator.num_free, f"the prompt of sequence {seq_id!r}")
        # commit: nothing below can fail
        for b in hits:
            if self.allocator.refcount(b) == 0:
                self.allocator.reuse(b)
                self._set_fill(b, bs)
            else:
                self.allocator.incref([b])
        fresh = self.allocator.allocate(new)
        for j, b in enumerate(fresh):
            self._set_fill(b, min(bs, n - (len(hits) + j) * bs))
        if self.prefix is not None:
            self.prefix.queries += queried
            self.prefix.hits += len(hits)
        cached = len(hits) * bs
        self._seqs[seq_id] = Sequence(
            seq_id, tokens, BlockTable(hits + fresh), num_computed=cached, keys=keys, cached_tokens=cached
        )
        return cached

    def _plan_append(self, seq: Sequence, n: int, cow_taken: dict[int, int]) -> tuple[bool, int]:
        """(copy-on-write needed, new blocks) to append n tokens. `cow_taken` counts copy-on-writes already
        planned per block in the same operation (a sibling that copies away leaves the block less shared)."""
        if n <= 0:
            return False, 0
        bs = self.block_size
        ntok = len(seq.token_ids)
        if n == 1 and ntok % bs and self.allocator._ref[seq.blocks.ids[-1]] == 1:
            return False, 0  # the decode fast path: room in an unshared last block
        cow = False
        if ntok % bs:
            last = seq.blocks[-1]
            if self.allocator.refcount(last) - cow_taken.get(last, 0) > 1:
                cow = True
                cow_taken[last] = cow_taken.get(last, 0) + 1
        room = len(seq.blocks) * bs - ntok
        return cow, max(0, math.ceil((n - room) / bs))

    def _append(self, seq: Sequence, tokens: list[int]) -> None:
        """Append tokens (planned: the blocks are there to take). Copy-on-write of a shared last block:
        a new block, the old one's K/V copied in every layer (one arena copy), the table rewritten."""
        n = len(tokens)
        if n == 0:
            return
        bs = self.block_size
        ntok = len(seq.token_ids)
        if n == 1 and ntok % bs:
            last = seq.blocks.ids[-1]
            if self.allocator._ref[last] == 1:  # the decode fast path: one more token in an own block
                self._fill[last] += 1
                self._stored += 1
                seq.token_ids.append(tokens[0])
                return
        if ntok % bs and self.allocator.refcount(seq.blocks[-1]) > 1:
            old = seq.blocks[-1]
            (new,) = self.allocator.allocate(1)
            self.arena.copy_blocks([old], [new])
            self._set_fill(new, self._fill[old])
            self._release([old])
            seq.blocks.set(len(seq.blocks) - 1, new)
            self.cow_copies += 1
        room = len(seq.blocks) * bs - ntok
        extra = max(0, math.ceil((n - room) / bs))
        if extra:
            seq.blocks.extend(self.allocator.allocate(extra))
        end = ntok + n
        for i in range(ntok // bs, math.ceil(end / bs)):
            self._set_fill(seq.blocks[i], min(bs, end - i * bs))
        seq.token_ids.extend(tokens)

    def _register(self, seq: Sequence) -> None:
        """Enter the sequence's newly computed full blocks into the prefix cache (hash chain)."""
        if self.prefix is None or not seq.hashable:
            return
        bs = self.block_size
        while (len(seq.keys) + 1) * bs <= seq.num_computed:
            i = len(seq.keys)
            toks = seq.token_ids[i * bs : (i + 1) * bs]
            if min(toks) < 0:  # an unknown token: nothing from here on can be matched
                seq.hashable = False
                return
            key = block_key(seq.keys[-1] if seq.keys else None, toks, self.salt)
            seq.keys.append(key)
            self.prefix.insert(key, seq.blocks[i])

    def append_slots(self, seq_id: Hashable, n: int, token_ids: Any = None) -> np.ndarray:
        """Slots for n new tokens at the end of a resident sequence (the low-level path: the caller writes
        their K/V; every token of the sequence counts as computed afterwards).

        Allocates blocks as needed; a shared, partly filled last block (after a fork) is copied first
        (copy-on-write). Without token_ids the new tokens are unknown to the prefix cache (from the first
        unknown one on, the sequence's blocks are not shared with later prompts).

        Returns
        -------
        int32 (n,) host array of slot ids.
        """
        seq = self._get(seq_id)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"append_slots: n must be an int >= 0, got {n!r}")
        tokens = [-1] * n if token_ids is None else _token_list(token_ids, "append_slots: token_ids")
        if len(tokens) != n:
            raise ValueError(f"append_slots: token_ids has {len(tokens)} ids for n={n}")
        self._check_length(seq_id, seq.num_tokens + n)
        cow, new = self._plan_append(seq, n, {})
        if int(cow) + new > self.allocator.num_free:
            raise OutOfBlocks(
                int(cow) + new, self.allocator.num_free, f"appending {n} to sequence {seq_id!r}"
            )
        start = seq.num_tokens
        self._append(seq, tokens)
        seq.num_computed = seq.num_tokens
        self._register(seq)
        return self.slots(seq_id, start, start + n)

    # ---- fork, free, swap --------------------------------------------------------------------------------

    def fork(self, src: Hashable, dst: Hashable) -> None:
        """A new sequence `dst` sharing every block of `src` (parallel sampling, beam search). Allocates
        nothing: the first append to either one copies a shared partly-filled last block (copy-on-write)."""
        s = self._get(src)
        if dst is None:
            raise ValueError("fork: seq_id None is reserved (it marks padding entries of a batch)")
        if dst in self._seqs:
            raise ValueError(f"fork: the pool already holds a sequence {dst!r}")
        if s.num_pending:
            raise ValueError(
                f"fork: sequence {src!r} has {s.num_pending} prompt tokens not computed yet; prepare first"
            )
        self.allocator.incref(s.blocks.tolist())
        self._seqs[dst] = Sequence(
            dst,
            list(s.token_ids),
            BlockTable(s.blocks.tolist()),
            num_computed=s.num_computed,
            keys=list(s.keys),
            hashable=s.hashable,
            cached_tokens=s.cached_tokens,
        )

    def free_sequence(self, seq_id: Hashable) -> None:
        """Forget a sequence and drop its references (blocks nobody else holds become free; full blocks in
        the prefix cache stay reusable until evicted)."""
        seq = self._get(seq_id, resident=False)
        if seq.swapped is not None:
            self._swap_bytes -= seq.swapped.host.nbytes
            self._keep_alive(seq.swapped.host)  # its swap-out copy may still be writing into it
        else:
            self._release(seq.blocks.tolist())
        del self._seqs[seq_id]

    def swap_out(self, seq_id: Hashable) -> int:
        """Copy a resident sequence's blocks (all layers) to host memory (pinned on the GPU) and free them.
        Returns the bytes moved. The copy is queued on the current stream: device work queued later that
        reuses the freed blocks runs after it."""
        seq = self._get(seq_id)
        blocks = seq.blocks.tolist()
        host = self.arena.to_host(blocks)
        self._release(blocks)
        seq.blocks.clear()
        seq.swapped = _Swapped(host, len(blocks))
        self._swap_bytes += host.nbytes
        return host.nbytes

    def swap_in(self, seq_id: Hashable) -> int:
        """Bring a swapped-out sequence back: new (possibly different) blocks, the K/V copied back, the block
        table rewritten. Full blocks still in the prefix cache are shared instead of copied. Returns the
        bytes copied back.

        Raises OutOfBlocks (the sequence stays swapped out, nothing changes) when the blocks are not free."""
        seq = self._get(seq_id, resident=False)
        if seq.swapped is None:
            raise ValueError(f"swap_in: sequence {seq_id!r} is not swapped out")
        n = seq.swapped.num_blocks
        found: dict[int, int] = {}  # block index -> cached block holding the same prefix
        if self.prefix is not None:
            for i, key in enumerate(seq.keys[:n]):  # a key names the whole prefix: any hit is valid
                b = self.prefix.peek(key)
                if b is not None:
                    found[i] = b
        revive = sum(1 for b in found.values() if self.allocator.refcount(b) == 0)
        need = n - len(found) + revive
        if need > self.allocator.num_free:
            raise OutOfBlocks(need, self.allocator.num_free, f"swapping in sequence {seq_id!r}")
        for b in found.values():
            if self.allocator.refcount(b) == 0:
                self.allocator.reuse(b)
                self._set_fill(b, self.block_size)
            else:
                self.allocator.incref([b])
        fresh = iter(self.allocator.allocate(n - len(found)))
        table = [found[i] if i in found else next(fresh) for i in range(n)]
        copy_idx = [i for i in range(n) if i not in found]
        self.arena.from_host(seq.swapped.host, [table[i] for i in copy_idx], copy_idx)
        bs = self.block_size
        for i in copy_idx:
            self._set_fill(table[i], min(bs, seq.num_tokens - i * bs))
        self._keep_alive(seq.swapped.host)
        self._swap_bytes -= seq.swapped.host.nbytes
        seq.swapped = None
        seq.blocks = BlockTable(table)
        return len(copy_idx) * self.arena.block_bytes

    def _keep_alive(self, host: np.ndarray) -> None:
        """Hold a host buffer until the asynchronous copies queued so far are done (GPU only): the pinned
        memory must not go back to CuPy's pinned pool while a DMA still reads or writes it."""
        self._inflight = [(e, h) for e, h in self._inflight if not e.done]
        if self.arena.is_gpu:
            event = self.xp.cuda.Event(block=False, disable_timing=True)
            event.record()
            self._inflight.append((event, host))

    def synchronize(self) -> None:
        """Wait for the pool's queued copies (swap, step upload); then host copies can be read."""
        if self.arena.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()
            self._inflight.clear()

    # ---- one forward step --------------------------------------------------------------------------------

    def prepare(
        self,
        seq_ids: SequenceT[Hashable],
        new_token_lists: SequenceT[Any] | None = None,
        *,
        max_prompt_tokens: int | None = None,
        pad_to: int | None = None,
        block_table_width: int | None = None,
        unknown_tokens: bool = False,
    ) -> AttentionBatch:
        """Allocate the slots of one forward step and describe it.

        For each sequence the step covers its pending tokens (a prompt reserved by add_sequence, minus the
        cached prefix) followed by `new_token_lists[i]` (tokens appended now: a decode step's sampled token).
        Passing the prompt again for a sequence whose prompt is pending is accepted and means the same as
        passing nothing.

        Parameters
        ----------
        seq_ids : sequence of ids
            Resident sequences, each at most once.
        new_token_lists : sequence of token-id lists (or None entries), optional
        max_prompt_tokens : int, optional
            Chunked prefill: take at most this many pending tokens per sequence (new tokens can be appended
            to a sequence only once nothing of its prompt is pending).
        pad_to : int, optional
            Pad the batch to this many sequences (CUDA-graph batch buckets). The real sequences must share
            one q length; each padding entry gets that many tokens with token 0, position 0, slot -1 (not
            written), context length 0 and a table row of -1.
        block_table_width : int, optional
            Columns of block_tables (default: the longest table in the batch); at least that.
        unknown_tokens : bool
            New tokens may be UNKNOWN_TOKEN (-1): sampled by the previous step and still on the device. The
            caller writes their ids into `batch.tokens` on the device before the forward (the Generator's
            overlapped greedy decode). Like append_slots without ids, an unknown token ends the sequence's
            prefix caching from its block on.

        Returns
        -------
        AttentionBatch (views of the persistent step buffers: valid until the next prepare).

        Raises
        ------
        OutOfBlocks
            The step needs more blocks than are free (nothing changes).
        """
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("prepare: a sequence appears twice in seq_ids")
        if new_token_lists is None:
            new_token_lists = [None] * len(seq_ids)
        if len(new_token_lists) != len(seq_ids):
            raise ValueError(
                f"prepare: new_token_lists has {len(new_token_lists)} entries for {len(seq_ids)} sequences"
            )
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or max_prompt_tokens < 1):
            raise ValueError(f"prepare: max_prompt_tokens must be a positive int, got {max_prompt_tokens!r}")
        # ---- plan (no state changes) ----
        plans = []
        cow_taken: dict[int, int] = {}
        need = 0
        width = 1
        for sid, given in zip(seq_ids, new_token_lists, strict=True):
            seq = self._get(sid)
            extra = _token_list(given, f"prepare: new tokens of sequence {sid!r}", unknown_tokens)
            pending = seq.num_pending
            if pending and extra:
                if extra == seq.token_ids or extra == seq.token_ids[seq.num_computed :]:
                    extra = []  # the caller passed the prompt it added
                else:
                    raise ValueError(
                        f"prepare: sequence {sid!r} has {pending} prompt tokens pending; pass no new tokens "
                        "(or the same prompt) until they are computed"
                    )
            take = pending if max_prompt_tokens is None else min(pending, max_prompt_tokens)
            self._check_length(sid, seq.num_tokens + len(extra))
            cow, new = self._plan_append(seq, len(extra), cow_taken)
            need += int(cow) + new
            width = max(width, len(seq.blocks) + new)
            plans.append((seq, extra, take + len(extra)))
        if need > self.allocator.num_free:
            raise OutOfBlocks(need, self.allocator.num_free, f"a step over {len(seq_ids)} sequences")
        q_lens = [q for _, _, q in plans]
        num_real = len(plans)
        pad_q = 0
        if pad_to is not None:
            if pad_to < num_real:
                raise ValueError(f"prepare: pad_to={pad_to} is smaller than the batch ({num_real} sequences)")
            if len(set(q_lens)) > 1:
                raise ValueError("prepare: pad_to needs every sequence to have the same number of new tokens")
            pad_q = q_lens[0] if q_lens else 1
        if block_table_width is not None:
            if block_table_width < width:
                raise ValueError(
                    f"prepare: block_table_width={block_table_width} < the longest table ({width})"
                )
            width = block_table_width
        # ---- commit: nothing below can fail ----
        num_seqs = pad_to if pad_to is not None else num_real
        total = sum(q_lens) + (num_seqs - num_real) * pad_q
        h = self._steps.host_views(total, num_seqs, width)
        tbl = h["block_tables"]
        tbl.fill(-1)
        bs = self.block_size
        # decode-sized steps (every q <= 16) gather Python lists and assign each array once; long prompts
        # go through NumPy per sequence
        small = all(q <= 16 for q in q_lens)
        toks: list[int] = []
        poss: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx = []
        starts = []
        off = 0
        for i, (seq, extra, q) in enumerate(plans):
            start = seq.num_computed
            if extra:
                self._append(seq, extra)
            end = start + q
            seq.num_computed = end
            if self.prefix is not None and seq.hashable and end >= (len(seq.keys) + 1) * bs:
                self._register(seq)
            starts.append(start)
            if small:
                table = seq.blocks.ids
                toks.extend(seq.token_ids[start:end])
                for p in range(start, end):
                    poss.append(p)
                    slots.append(table[p // bs] * bs + p % bs)
            elif q:
                pos = np.arange(start, end, dtype=np.int32)
                h["tokens"][off : off + q] = seq.token_ids[start:end]
                h["positions"][off : off + q] = pos
                h["slot_mapping"][off : off + q] = seq.blocks.array()[pos // bs] * bs + pos % bs
            off += q
            cu.append(off)
            ctx.append(end)
            tbl[i, : len(seq.blocks)] = seq.blocks.array()
        if small and off:
            h["tokens"][:off] = toks
            h["positions"][:off] = poss
            h["slot_mapping"][:off] = slots
        if num_seqs > num_real:  # padding entries: not written (slot -1), nothing to attend to
            h["tokens"][off:] = 0
            h["positions"][off:] = 0
            h["slot_mapping"][off:] = -1
            cu.extend(off + pad_q * (j + 1) for j in range(num_seqs - num_real))
            ctx.extend([0] * (num_seqs - num_real))
        h["cu_seqlens_q"][:] = cu
        h["context_lens"][:] = ctx
        d = self._steps.upload(total, num_seqs, width)
        meta = dict(
            max_seqlen_q=max(q_lens + [pad_q], default=0),
            max_context=max(ctx, default=0),
            is_prefill=bool(num_real) and all(s == 0 for s in starts),
            seq_ids=tuple(seq_ids) + (None,) * (num_seqs - num_real),
        )
        host = AttentionBatch(**h, **meta) if self.arena.is_gpu else None
        batch = AttentionBatch(**d, **meta, host=host)
        if host is None:
            batch.host = batch
        return batch

    def block_owners(self, seq_ids: SequenceT[Hashable]) -> Any:
        """int32 (num_blocks,) on the pool's device: the batch index of the sequence holding each block,
        -1 for free or shared blocks (rf.paged_attention's debug check takes it as block_owners)."""
        owners = np.full(self.num_blocks, -1, dtype=np.int32)
        for i, sid in enumerate(seq_ids):
            for b in self._get(sid).blocks.tolist():
                owners[b] = i if self.allocator.refcount(b) == 1 else -1
        return self.xp.asarray(owners)

    # ---- accounting --------------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Blocks used/free/cached/shared, bytes, tokens stored, waste (reserved slots - tokens).

        O(sequences): the counts are kept up to date by every operation."""
        used = self.allocator.num_used
        resident = [s for s in self._seqs.values() if s.swapped is None]
        p = self.prefix
        return PoolStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            block_bytes=self.arena.block_bytes,
            blocks_used=used,
            blocks_free=self.allocator.num_free,
            blocks_cached=self.allocator.num_cached,
            blocks_shared=self.allocator.num_shared,
            bytes_used=used * self.arena.block_bytes,
            bytes_reserved=self.arena.nbytes,
            tokens_stored=self._stored,
            logical_tokens=sum(s.num_tokens for s in resident),
            reserved_slots=used * self.block_size,
            waste_slots=used * self.block_size - self._stored,
            sequences=len(self._seqs),
            sequences_swapped=len(self._seqs) - len(resident),
            swap_host_bytes=self._swap_bytes,
            prefix_hit_blocks=p.hits if p else 0,
            prefix_query_blocks=p.queries if p else 0,
            cow_copies=self.cow_copies,
            step_buffer_bytes=self._steps.nbytes * (2 if self.arena.is_gpu else 1),
        )

    def check(self) -> None:
        """Assert every invariant of the pool (tests and debugging; O(blocks + tokens)).

        - the allocator's own: free + used = total, refcount 0 exactly for free blocks;
        - each block's reference count equals the number of resident block tables holding it;
        - a table has ceil(tokens / block_size) distinct blocks; swapped sequences hold none;
        - a block held by several tables holds the same tokens in each (shared read-only), and the slots a
          step will write (pending tokens) are in blocks only their sequence holds;
        - the fill counts and tokens_stored match the tables; prefix-cache entries point at used or
          cached-free blocks, and every cached-free block is in the prefix cache.
        """
        a = self.allocator
        a.check()
        bs = self.block_size
        holders: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self._seqs.values():
            blocks = seq.blocks.tolist()
            if seq.swapped is not None:
                assert not blocks, f"swapped sequence {seq.seq_id!r} holds blocks"
                assert seq.swapped.num_blocks == math.ceil(seq.num_tokens / bs)
                continue
            assert len(blocks) == math.ceil(seq.num_tokens / bs), f"sequence {seq.seq_id!r}: table length"
            assert len(set(blocks)) == len(blocks), f"sequence {seq.seq_id!r}: a block twice in its table"
            assert 0 <= seq.num_computed <= seq.num_tokens
            for i, b in enumerate(blocks):
                holders.setdefault(b, []).append((seq, i))
        stored = 0
        for b in range(self.num_blocks):
            hs = holders.get(b, [])
            assert a.refcount(b) == len(hs), (
                f"block {b}: refcount {a.refcount(b)} but {len(hs)} tables hold it"
            )
            if not hs:
                continue
            fills = {min(bs, s.num_tokens - i * bs) for s, i in hs}
            assert fills == {self._fill[b]}, f"block {b}: fill {self._fill[b]} but holders have {fills}"
            stored += self._fill[b]
            if len(hs) > 1:
                toks = {tuple(s.token_ids[i * bs : (i + 1) * bs]) for s, i in hs}
                assert len(toks) == 1, f"shared block {b} holds different tokens for its holders"
                for s, i in hs:
                    assert s.num_computed >= min(s.num_tokens, (i + 1) * bs), (
                        f"shared block {b} has slots sequence {s.seq_id!r} has still to write"
                    )
        assert stored == self._stored, f"tokens stored {self._stored}, tables say {stored}"
        if self.prefix is not None:
            for b in list(self.prefix._by_block):
                assert a.refcount(b) > 0 or a.is_cached_free(b), (
                    f"prefix cache points at plain free block {b}"
                )
            for b in a._cached:
                assert b in self.prefix, f"cached free block {b} is not in the prefix cache"
        else:
            assert a.num_cached == 0

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"KVPool({s.sequences} seqs ({s.sequences_swapped} swapped), "
            f"blocks {s.blocks_used}/{s.num_blocks} used, {s.blocks_free} free ({s.blocks_cached} cached), "
            f"block_size={self.block_size}, "
            f"{s.tokens_stored} tokens, waste {100 * s.waste_ratio:.1f}%, {s.bytes_used / 2**20:.1f}/"
            f"{s.bytes_reserved / 2**20:.1f} MiB)"
        )
