"""Randomized operation sequences on a small KVPool, checked against invariants after every operation.

A `Driver` runs seeded random operations (add with shared prefixes, prefill / decode / chunked steps,
append_slots, fork, free, swap_out, swap_in) on a tiny pool that runs out of blocks often. Each step writes
every new token's K/V into the arena through the batch's slot_mapping, as a model would; the K/V of a token
is a known function of (token id, position, layer, K|V, head, dim), exact in float32. After every operation:

- pool.check(): refcount == number of tables holding the block, free + used == total, shared blocks hold
  the same tokens for every holder and are never written, fill counts and tokens_stored agree;
- every resident sequence's computed slots hold exactly its own K/V (so copy-on-write, swap and prefix
  sharing moved the right data);
- an operation that raised (OutOfBlocks, SequenceTooLong, ValueError) changed nothing: free counts, stats,
  every sequence's state and the arena's bytes are as before.

The same Driver runs on CuPy in tests/test_memory_gpu.py and must produce the same log and arena bytes.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from rawformer import backend
from rawformer.memory import KVArena, KVPool, MemoryPoolError, OutOfBlocks


def kv_values(
    tokens: np.ndarray, positions: np.ndarray, layers: int, kv_heads: int, head_dim: int
) -> np.ndarray:
    """(layers, 2, T, kv_heads, head_dim) float32: token*512 + position + index/32, exact in float32."""
    idx = np.arange(layers * 2 * kv_heads * head_dim).reshape(layers, 2, 1, kv_heads, head_dim) / 32.0
    base = (np.asarray(tokens, np.float64) * 512 + np.asarray(positions, np.float64)).reshape(1, 1, -1, 1, 1)
    return (base + idx).astype(np.float32)


class Driver:
    """Seeded random operations on one pool (NumPy or CuPy arena), with the checks of the module doc."""

    PREFIXES = ([1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4], [2, 2, 2, 2, 3, 3, 3, 3], [4, 5, 4, 5, 4, 5, 4, 5, 1])

    def __init__(
        self,
        xp: types.ModuleType,
        seed: int,
        num_blocks: int = 20,
        block_size: int = 4,
        prefix_caching: bool = True,
        max_seq_len: int = 40,
    ):
        self.xp = xp
        self.rng = np.random.default_rng(seed)
        self.arena = KVArena(2, 1, 2, "float32", block_size, num_blocks=num_blocks, xp=xp)
        self.pool = KVPool(self.arena, prefix_caching=prefix_caching, max_seq_len=max_seq_len, max_tokens=8)
        self.bs = block_size
        self.next_id = 0
        self.log: list = []
        self.counts = {"ok": 0, "OutOfBlocks": 0, "other errors": 0}

    # ---- the arena as a model would write it ----

    def flat(self):
        a = self.arena
        return a.data.reshape(a.layers, 2, a.num_blocks * a.block_size, a.kv_heads, a.head_dim)

    def write(self, slots, tokens, positions) -> None:
        if len(tokens) == 0:
            return
        vals = kv_values(tokens, positions, self.arena.layers, self.arena.kv_heads, self.arena.head_dim)
        self.flat()[:, :, self.xp.asarray(slots)] = self.xp.asarray(vals)

    def verify_data(self) -> None:
        flat = backend.to_numpy(self.flat())
        for sid in self.pool.seq_ids:
            seq = self.pool.sequence(sid)
            if seq.is_swapped or seq.num_computed == 0:
                continue
            slots = self.pool.slots(sid, 0, seq.num_computed)
            want = kv_values(seq.token_ids[: seq.num_computed], np.arange(seq.num_computed), 2, 1, 2)
            np.testing.assert_array_equal(flat[:, :, slots], want, err_msg=f"K/V of sequence {sid}")

    # ---- failure must change nothing ----

    def snapshot(self):
        p = self.pool
        seqs = {
            sid: (list(s.token_ids), s.blocks.tolist(), s.num_computed, list(s.keys), s.is_swapped)
            for sid, s in p._seqs.items()
        }
        return p.allocator.num_free, p.stats(), seqs, backend.to_numpy(self.arena.data).copy()

    def attempt(self, name: str, fn, *args, **kw):
        before = self.snapshot()
        try:
            out = fn(*args, **kw)
        except (MemoryPoolError, ValueError) as exc:
            kind = "OutOfBlocks" if isinstance(exc, OutOfBlocks) else "other errors"
            self.counts[kind] += 1
            self.log.append((name, type(exc).__name__))
            after = self.snapshot()
            assert after[0] == before[0], f"{name} failed but the free-block count changed"
            assert after[1] == before[1], f"{name} failed but the stats changed"
            assert after[2] == before[2], f"{name} failed but a sequence changed"
            np.testing.assert_array_equal(after[3], before[3], err_msg=f"{name} failed but the arena changed")
            return None
        self.counts["ok"] += 1
        return out

    # ---- operations ----

    def resident(self) -> list:
        return [s for s in self.pool.seq_ids if not self.pool.sequence(s).is_swapped]

    def swapped(self) -> list:
        return [s for s in self.pool.seq_ids if self.pool.sequence(s).is_swapped]

    def pick(self, items: list):
        return items[int(self.rng.integers(len(items)))] if items else None

    def op_add(self) -> None:
        r = self.rng
        prefix = self.PREFIXES[int(r.integers(3))][: int(r.integers(0, 13))]
        prompt = prefix + r.integers(0, 8, int(r.integers(0, 7))).tolist()
        if r.random() < 0.05:
            prompt = list(range(45))  # over max_seq_len
        sid = self.next_id
        self.next_id += 1
        cached = self.attempt("add", self.pool.add_sequence, sid, prompt)
        self.log.append(("add", sid, len(prompt), cached))

    def op_step(self) -> None:
        r = self.rng
        res = self.resident()
        if not res:
            return
        ids = [s for s in res if r.random() < 0.6] or [res[0]]
        r.shuffle(ids)
        lists = []
        for s in ids:
            if self.pool.sequence(s).num_pending:
                lists.append(None)
            else:
                lists.append(r.integers(0, 8, 1 if r.random() < 0.8 else int(r.integers(2, 5))).tolist())
        chunk = int(r.integers(1, 6)) if r.random() < 0.3 else None
        batch = self.attempt("prepare", self.pool.prepare, ids, lists, max_prompt_tokens=chunk)
        if batch is None:
            return
        h = batch.host
        self.write(batch.slot_mapping, h.tokens.tolist(), h.positions.tolist())
        self.log.append(
            ("step", tuple(ids), h.tokens.tolist(), h.positions.tolist(), h.slot_mapping.tolist(),
             h.cu_seqlens_q.tolist(), h.context_lens.tolist(), h.block_tables.tolist(), h.is_prefill)
        )  # fmt: skip
        # the batch agrees with the sequences it describes
        for i, sid in enumerate(ids):
            seq = self.pool.sequence(sid)
            assert h.context_lens[i] == seq.num_computed
            row = h.block_tables[i]
            assert (
                row[: len(seq.blocks)].tolist() == seq.blocks.tolist()
                and (row[len(seq.blocks) :] == -1).all()
            )
            lo, hi = h.cu_seqlens_q[i], h.cu_seqlens_q[i + 1]
            want = self.pool.slots(sid, seq.num_computed - (hi - lo), seq.num_computed)
            np.testing.assert_array_equal(h.slot_mapping[lo:hi], want)

    def op_append(self) -> None:
        sid = self.pick([s for s in self.resident() if not self.pool.sequence(s).num_pending])
        if sid is None:
            return
        n = int(self.rng.integers(0, 6))
        toks = self.rng.integers(0, 8, n).tolist()
        start = self.pool.sequence(sid).num_tokens
        slots = self.attempt("append", self.pool.append_slots, sid, n, toks)
        if slots is not None:
            self.write(slots, toks, list(range(start, start + n)))
            self.log.append(("append", sid, slots.tolist()))

    def op_fork(self) -> None:
        sid = self.pick(self.resident())
        if sid is None:
            return
        dst = self.next_id
        self.next_id += 1
        self.attempt("fork", self.pool.fork, sid, dst)

    def op_free(self) -> None:
        sid = self.pick(self.pool.seq_ids)
        if sid is not None:
            self.pool.free_sequence(sid)
            self.log.append(("free", sid))

    def op_swap_out(self) -> None:
        sid = self.pick(self.resident())
        if sid is not None:
            self.log.append(("swap_out", sid, self.attempt("swap_out", self.pool.swap_out, sid)))

    def op_swap_in(self) -> None:
        sid = self.pick(self.swapped())
        if sid is not None:
            self.log.append(("swap_in", sid, self.attempt("swap_in", self.pool.swap_in, sid)))

    def run(self, ops: int) -> list:
        table = [
            (self.op_add, 0.17),
            (self.op_step, 0.35),
            (self.op_append, 0.08),
            (self.op_fork, 0.08),
            (self.op_free, 0.17),
            (self.op_swap_out, 0.07),
            (self.op_swap_in, 0.08),
        ]
        fns, weights = zip(*table, strict=True)
        p = np.asarray(weights) / sum(weights)
        for _ in range(ops):
            fns[int(self.rng.choice(len(fns), p=p))]()
            self.pool.check()
            self.verify_data()
            s = self.pool.stats()
            assert s.blocks_used + s.blocks_free == s.num_blocks
            assert s.waste_slots == s.reserved_slots - s.tokens_stored >= 0
        self.pool.synchronize()
        return self.log


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_every_invariant(seed):
    d = Driver(np, seed)
    d.run(250)
    assert d.counts["ok"] > 100
    s = d.pool.stats()
    assert s.prefix_hit_blocks > 0  # the shared prefixes do hit


def test_random_operations_hit_every_path():
    """Over a few seeds, the random runs run out of blocks, copy on write, share prefixes and swap."""
    out_of_blocks = cow = hits = swaps = 0
    for seed in range(6, 10):
        d = Driver(np, seed, num_blocks=14)
        d.run(200)
        out_of_blocks += d.counts["OutOfBlocks"]
        cow += d.pool.cow_copies
        hits += d.pool.stats().prefix_hit_blocks
        swaps += sum(1 for e in d.log if e[0] == "swap_in" and len(e) == 3 and e[2] is not None)
    assert out_of_blocks > 5 and cow > 5 and hits > 5 and swaps > 5, (out_of_blocks, cow, hits, swaps)


@pytest.mark.parametrize("block_size", [1, 8])
def test_random_operations_other_geometries(block_size):
    Driver(np, 100 + block_size, num_blocks=60 // block_size + 2, block_size=block_size).run(150)


def test_random_operations_without_prefix_caching():
    d = Driver(np, 42, prefix_caching=False)
    d.run(200)
    assert d.pool.stats().prefix_hit_blocks == 0 and d.pool.stats().blocks_cached == 0


def test_free_everything_returns_every_block():
    d = Driver(np, 7)
    d.run(150)
    for sid in d.pool.seq_ids:
        d.pool.free_sequence(sid)
    s = d.pool.stats()
    assert (s.blocks_used, s.blocks_free, s.tokens_stored, s.sequences) == (0, s.num_blocks, 0, 0)
    d.pool.check()
