"""The paged memory pool on NumPy: allocator, arena, prefix cache, KVPool operations, errors, accounting.

Every failing operation is checked to leave the pool unchanged (free-block counts, stats, invariants).
The GPU paths (cudaMemcpy2D copies, pinned swap buffers, the step upload, the allocator hooks) are in
tests/test_memory_gpu.py; randomized operation sequences in tests/test_memory_random.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import rawformer as rf
from rawformer.memory import (
    AllocatorStats,
    AttentionBatch,
    BlockAllocator,
    BlockTable,
    KVArena,
    KVPool,
    MemoryPoolError,
    OutOfBlocks,
    PrefixCache,
    SequenceTooLong,
    UnknownSequence,
    block_key,
)
from rawformer.memory import arena as arena_mod
from rawformer.memory.arena import runs
from rawformer.memory.batch import StepBuffers
from rawformer.memory.prefix import chain_keys


def make_pool(
    num_blocks=16, block_size=4, layers=2, kv_heads=2, head_dim=3, dtype="float32", fill=True, **kw
):
    arena = KVArena(layers, kv_heads, head_dim, dtype, block_size, num_blocks=num_blocks, xp=np)
    if fill:  # distinct values everywhere, so copies are visible
        arena.data[...] = np.arange(arena.data.size, dtype=np.float64).reshape(arena.data.shape) % 1000
    return KVPool(arena, **kw)


def snapshot(pool: KVPool):
    """Everything an error must leave as it was."""
    seqs = {
        sid: (list(s.token_ids), s.blocks.tolist(), s.num_computed, list(s.keys), s.swapped is None)
        for sid, s in pool._seqs.items()
    }
    return pool.allocator.num_free, pool.stats(), seqs, pool.arena.data.copy()


def assert_unchanged(pool: KVPool, before) -> None:
    free, stats, seqs, data = before
    assert pool.allocator.num_free == free
    assert pool.stats() == stats
    now = {
        sid: (list(s.token_ids), s.blocks.tolist(), s.num_computed, list(s.keys), s.swapped is None)
        for sid, s in pool._seqs.items()
    }
    assert now == seqs
    np.testing.assert_array_equal(pool.arena.data, data)
    pool.check()


# ---- BlockAllocator ----------------------------------------------------------------------------------------


def test_allocator_counts_and_order():
    a = BlockAllocator(5)
    assert (a.num_free, a.num_used, a.num_cached) == (5, 0, 0)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(0) == []
    assert (a.num_free, a.num_used) == (2, 3)
    a.incref([1])
    assert a.refcount(1) == 2
    assert a.free([1, 2]) == [2]
    assert a.refcount(1) == 1 and a.refcount(2) == 0
    assert a.allocate(1) == [2]  # LIFO: the block freed last comes back first
    a.check()
    assert "used=3" in repr(a)


def test_allocator_out_of_blocks_changes_nothing():
    a = BlockAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfBlocks) as exc:
        a.allocate(2)
    assert isinstance(exc.value, MemoryPoolError)
    assert (exc.value.needed, exc.value.free) == (2, 1)
    assert "needs 2 blocks, 1 are free" in str(exc.value)
    assert a.num_free == 1
    a.check()


def test_allocator_errors():
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockAllocator(bad)
    a = BlockAllocator(3)
    with pytest.raises(ValueError, match="n must be"):
        a.allocate(-1)
    with pytest.raises(ValueError, match="already free"):
        a.free([0])
    with pytest.raises(ValueError, match="is free"):
        a.incref([0])
    with pytest.raises(ValueError, match="not a cached free block"):
        a.reuse(0)
    b = a.allocate(1)
    with pytest.raises(ValueError, match="already free"):
        a.free([b[0], 1])  # all checked before any is freed
    assert a.refcount(b[0]) == 1
    assert BlockAllocator(0).allocate(0) == []


def test_allocator_cached_blocks_evicted_last_in_lru_order():
    evicted = []
    a = BlockAllocator(4, on_evict=evicted.append)
    blocks = a.allocate(4)
    a.free([blocks[2]], keep=lambda b: True)
    a.free([blocks[0]], keep=lambda b: True)
    a.free([blocks[3]], keep=lambda b: False)
    assert (a.num_free, a.num_cached) == (3, 2)
    assert a.is_cached_free(2) and not a.is_cached_free(3)
    assert a.allocate(1) == [3]  # plain free blocks first
    assert evicted == []
    assert a.allocate(1) == [2]  # then the least recently freed cached block
    assert evicted == [2]
    a.reuse(0)  # a prefix hit revives a cached block without eviction
    assert a.refcount(0) == 1 and a.num_cached == 0
    a.free([0], keep=lambda b: True)
    a.uncache(0)
    assert a.num_cached == 0 and a.num_free == 1
    a.check()


# ---- KVArena -----------------------------------------------------------------------------------------------


def test_arena_layout_and_views():
    arena = KVArena(3, 2, 5, "float16", block_size=8, num_blocks=7, xp=np)
    assert arena.data.shape == (3, 2, 7, 8, 2, 5)
    assert arena.data.flags.c_contiguous and arena.data.dtype == np.float16
    assert not arena.data.any()  # zeroed once
    assert arena.k(1).shape == (7, 8, 2, 5) and arena.k(1).flags.c_contiguous
    assert np.shares_memory(arena.k(2), arena.data[2, 0]) and np.shares_memory(arena.v(0), arena.data[0, 1])
    assert arena.token_bytes == 2 * 3 * 2 * 5 * 2
    assert arena.block_bytes == arena.token_bytes * 8
    assert arena.nbytes == arena.data.nbytes
    assert arena.num_slots == 56
    assert "num_blocks=7" in repr(arena) and "numpy" in repr(arena)


def test_arena_budget_sizing(monkeypatch):
    bb = KVArena(2, 1, 4, "float32", 4, num_blocks=1, xp=np).block_bytes  # 2*2*1*4*4*4 = 256
    assert KVArena(2, 1, 4, "float32", 4, budget_bytes=10 * bb + bb - 1, xp=np).num_blocks == 10
    monkeypatch.setattr(arena_mod, "host_available_bytes", lambda: 100 * bb)
    assert KVArena(2, 1, 4, "float32", 4, budget_fraction=0.25, xp=np).num_blocks == 25
    with pytest.raises(ValueError, match="holds no block"):
        KVArena(2, 1, 4, "float32", 4, budget_bytes=bb - 1, xp=np)
    with pytest.raises(ValueError, match="exactly one"):
        KVArena(2, 1, 4, "float32", 4, xp=np)
    with pytest.raises(ValueError, match="exactly one"):
        KVArena(2, 1, 4, "float32", 4, num_blocks=3, budget_bytes=10**6, xp=np)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="budget_fraction"):
            KVArena(2, 1, 4, "float32", 4, budget_fraction=bad, xp=np)
    with pytest.raises(ValueError, match="budget_bytes"):
        KVArena(2, 1, 4, "float32", 4, budget_bytes=1e6, xp=np)
    with pytest.raises(ValueError, match="num_blocks"):
        KVArena(2, 1, 4, "float32", 4, num_blocks=0, xp=np)


def test_arena_argument_errors():
    with pytest.raises(ValueError, match="layers"):
        KVArena(0, 1, 4, "float32", num_blocks=1, xp=np)
    with pytest.raises(ValueError, match="kv_heads"):
        KVArena(1, 1.0, 4, "float32", num_blocks=1, xp=np)
    with pytest.raises(ValueError, match="head_dim"):
        KVArena(1, 1, -4, "float32", num_blocks=1, xp=np)
    with pytest.raises(ValueError, match="block_size"):
        KVArena(1, 1, 4, "float32", block_size=0, num_blocks=1, xp=np)
    with pytest.raises(TypeError, match="dtype"):
        KVArena(1, 1, 4, "int32", num_blocks=1, xp=np)
    with pytest.raises(TypeError, match="dtype"):
        KVArena(1, 1, 4, "not-a-dtype", num_blocks=1, xp=np)
    with pytest.raises(TypeError, match="xp"):
        KVArena(1, 1, 4, "float32", num_blocks=1, xp=math)
    assert KVArena(1, 1, 4, "float64", num_blocks=1, xp=np).dtype == np.float64  # float64 on NumPy


def test_runs():
    assert list(runs([3, 4, 5, 9, 1, 2], [0, 1, 2, 3, 4, 5])) == [(3, 0, 3), (9, 3, 1), (1, 4, 2)]
    assert list(runs([2, 3], [5, 9])) == [(2, 5, 1), (3, 9, 1)]
    assert list(runs([], [])) == []


def test_arena_copy_blocks_every_layer():
    pool = make_pool(num_blocks=8)
    arena = pool.arena
    before = arena.data.copy()
    arena.copy_blocks([1, 2, 6], [4, 5, 0])
    expect = before.copy()
    expect[:, :, [4, 5, 0]] = before[:, :, [1, 2, 6]]
    np.testing.assert_array_equal(arena.data, expect)
    with pytest.raises(ValueError, match="differ in length"):
        arena.copy_blocks([1], [2, 3])


def test_arena_host_round_trip():
    pool = make_pool(num_blocks=9)
    arena = pool.arena
    blocks = [5, 6, 7, 2, 0]
    host = arena.to_host(blocks)
    assert host.shape == (arena.layers, 2, 5, arena.block_size, arena.kv_heads, arena.head_dim)
    np.testing.assert_array_equal(host, arena.data[:, :, blocks])
    original = arena.data.copy()
    arena.data[...] = -1
    arena.from_host(host, [1, 2, 3, 8, 4])
    np.testing.assert_array_equal(arena.data[:, :, [1, 2, 3, 8, 4]], original[:, :, blocks])
    arena.from_host(host, [0], indices=[3])
    np.testing.assert_array_equal(arena.data[:, :, 0], original[:, :, 2])
    assert arena.to_host([]).shape[2] == 0


def test_arena_gpu_pointer_arithmetic_on_host_memory():
    """The GPU path's byte offsets and pitches (copy_blocks, to_host, from_host), run on host memory with a
    memmove standing in for cudaMemcpy2DAsync: the same result as the NumPy path."""
    import ctypes

    pool = make_pool(num_blocks=9)
    arena = pool.arena
    ref = arena.data.copy()
    calls = []

    def memcpy2d(dst, dpitch, src, spitch, width):  # cudaMemcpy2D semantics, 2*layers rows
        assert width <= dpitch and width <= spitch
        calls.append(width)
        for r in range(2 * arena.layers):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)

    arena.is_gpu = True  # take the pointer path; the data stays in NumPy
    arena._base = lambda: arena.data.ctypes.data
    arena._memcpy2d = memcpy2d
    arena.copy_blocks([1, 2, 6], [4, 5, 0])
    ref[:, :, [4, 5, 0]] = ref[:, :, [1, 2, 6]]
    np.testing.assert_array_equal(arena.data, ref)
    assert len(calls) == 2  # (1,2)->(4,5) is one run
    blocks = [5, 6, 7, 2]
    out = arena.to_host(blocks, out=np.empty((2, 2, 4, 4, 2, 3), np.float32))
    np.testing.assert_array_equal(out, ref[:, :, blocks])
    arena.from_host(out, [8, 1, 3], indices=[3, 0, 1])
    ref[:, :, [8, 1, 3]] = out[:, :, [3, 0, 1]]
    np.testing.assert_array_equal(arena.data, ref)


def test_arena_layout_is_what_kv_write_and_paged_attention_take():
    arena = KVArena(2, 2, 4, "float32", 4, num_blocks=6, xp=np)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((5, 2, 4)).astype(np.float32)
    v = rng.standard_normal((5, 2, 4)).astype(np.float32)
    slots = np.array([21, 3, 9, 10, -1], dtype=np.int32)
    rf.kv_write(k, v, arena.k(1), arena.v(1), slots)
    flat_k = arena.data[1, 0].reshape(-1, 2, 4)
    np.testing.assert_array_equal(flat_k[slots[:4]], k[:4])
    np.testing.assert_array_equal(arena.data[1, 1].reshape(-1, 2, 4)[slots[:4]], v[:4])
    assert not arena.data[0].any()  # layer 0 untouched


# ---- prefix keys -------------------------------------------------------------------------------------------


def test_block_key_is_a_chain():
    a = block_key(None, [1, 2, 3, 4])
    assert a == block_key(None, np.array([1, 2, 3, 4]))
    assert len(a) == 16
    assert a != block_key(None, [1, 2, 3, 5])
    assert a != block_key(None, [1, 2, 3, 4], salt=b"other model")
    b = block_key(a, [5, 6, 7, 8])
    assert b != block_key(block_key(None, [0, 2, 3, 4]), [5, 6, 7, 8])  # same tokens, other prefix
    assert chain_keys(list(range(1, 9)) + [9], 4) == [a, b]
    cache = PrefixCache()
    assert cache.insert(a, 3) and not cache.insert(a, 4) and not cache.insert(b, 3)
    assert cache.lookup(a) == 3 and cache.lookup(b) is None
    assert (cache.hits, cache.queries) == (1, 2)
    assert 3 in cache and cache.key_of(3) == a and len(cache) == 1
    cache.forget(3)
    assert cache.peek(a) is None and len(cache) == 0


# ---- KVPool basics -----------------------------------------------------------------------------------------


def test_prefill_then_decode_batches():
    pool = make_pool(num_blocks=16, block_size=4)
    assert pool.add_sequence("a", [10, 11, 12, 13, 14, 15]) == 0
    assert pool.add_sequence("b", np.arange(20, 29)) == 0
    assert pool.block_table("a") == [0, 1] and pool.block_table("b") == [2, 3, 4]
    batch = pool.prepare(["a", "b"], [[10, 11, 12, 13, 14, 15], None])  # passing the prompt again is fine
    assert isinstance(batch, AttentionBatch) and batch.is_prefill
    np.testing.assert_array_equal(batch.tokens, [10, 11, 12, 13, 14, 15, *range(20, 29)])
    np.testing.assert_array_equal(batch.positions, [*range(6), *range(9)])
    np.testing.assert_array_equal(batch.slot_mapping, [*range(6), *range(8, 17)])
    np.testing.assert_array_equal(batch.cu_seqlens_q, [0, 6, 15])
    np.testing.assert_array_equal(batch.context_lens, [6, 9])
    np.testing.assert_array_equal(batch.block_tables, [[0, 1, -1], [2, 3, 4]])
    assert (batch.max_seqlen_q, batch.max_context, batch.num_seqs, batch.num_tokens) == (9, 9, 2, 15)
    assert batch.seq_ids == ("a", "b")
    assert all(getattr(batch, f).dtype == np.int32 for f in ("tokens", "positions", "slot_mapping"))
    np.testing.assert_array_equal(batch.last_token_index, [5, 14])
    np.testing.assert_array_equal(batch.q_lens, [6, 9])
    assert batch.host is batch  # NumPy: the arrays are already on the host
    batch = pool.prepare(["b", "a"], [[7], [8]])
    assert not batch.is_prefill
    np.testing.assert_array_equal(batch.tokens, [7, 8])
    np.testing.assert_array_equal(batch.positions, [9, 6])
    np.testing.assert_array_equal(batch.slot_mapping, [17, 6])
    np.testing.assert_array_equal(batch.context_lens, [10, 7])
    np.testing.assert_array_equal(batch.block_tables, [[2, 3, 4], [0, 1, -1]])
    assert pool.sequence("a").token_ids == [10, 11, 12, 13, 14, 15, 8]
    np.testing.assert_array_equal(pool.slots("a"), [0, 1, 2, 3, 4, 5, 6])
    pool.check()
    s = pool.stats()
    assert (s.blocks_used, s.tokens_stored, s.reserved_slots, s.waste_slots) == (5, 17, 20, 3)
    assert s.waste_ratio == pytest.approx(3 / 20)
    assert s.bytes_used == 5 * pool.arena.block_bytes and s.bytes_reserved == pool.arena.nbytes
    assert "waste" in str(s) and "KVPool(2 seqs" in repr(pool)


def test_prepare_without_tokens_and_empty_batches():
    pool = make_pool()
    pool.add_sequence(0, [1, 2, 3])
    batch = pool.prepare([0])
    assert batch.is_prefill and batch.num_tokens == 3
    batch = pool.prepare([0])  # nothing pending, nothing appended: a zero-length entry
    assert batch.num_tokens == 0 and list(batch.context_lens) == [3] and not batch.is_prefill
    assert list(batch.last_token_index) == [-1]
    pool.add_sequence(1, [4, 5])
    batch = pool.prepare([0, 1], [[6], None])
    assert list(batch.last_token_index) == [0, 2] and list(batch.q_lens) == [1, 2]
    batch = pool.prepare([])
    assert batch.num_seqs == 0 and batch.num_tokens == 0 and batch.max_context == 0


def test_append_slots_low_level_path():
    pool = make_pool(num_blocks=6, block_size=4)
    pool.add_sequence("s", [])
    slots = pool.append_slots("s", 6, token_ids=[1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(slots, range(6))
    assert slots.dtype == np.int32
    assert len(pool.prefix) == 1  # the first block is full and computed
    slots = pool.append_slots("s", 3)  # unknown tokens: no key for the block they land in
    np.testing.assert_array_equal(slots, [6, 7, 8])
    pool.append_slots("s", 0)
    assert not pool.sequence("s").hashable and len(pool.prefix) == 1
    assert pool.blocks_needed("s", 4) == 1 and pool.blocks_needed("s", 3) == 0
    assert pool.can_append(["s"], 11) and not pool.can_append(["s"], 16)
    pool.check()
    with pytest.raises(ValueError, match="n must be"):
        pool.append_slots("s", -1)
    with pytest.raises(ValueError, match="2 ids for n=3"):
        pool.append_slots("s", 3, token_ids=[1, 2])
    with pytest.raises(TypeError, match="ints"):
        pool.append_slots("s", 1, token_ids=[1.5])
    with pytest.raises(ValueError, match="negative"):
        pool.append_slots("s", 1, token_ids=[-3])


def test_chunked_prefill():
    pool = make_pool(num_blocks=8, block_size=4)
    pool.add_sequence("p", list(range(100, 111)))
    b = pool.prepare(["p"], max_prompt_tokens=4)
    assert b.is_prefill and list(b.positions) == [0, 1, 2, 3] and list(b.context_lens) == [4]
    b = pool.prepare(["p"], max_prompt_tokens=4)
    assert not b.is_prefill and list(b.positions) == [4, 5, 6, 7] and list(b.context_lens) == [8]
    with pytest.raises(ValueError, match="pending"):
        pool.prepare(["p"], [[5]], max_prompt_tokens=2)
    b = pool.prepare(["p"], max_prompt_tokens=4)
    assert list(b.tokens) == [108, 109, 110] and list(b.context_lens) == [11]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        pool.prepare(["p"], max_prompt_tokens=0)
    pool.check()


def test_pad_to_and_block_table_width():
    pool = make_pool(num_blocks=8, block_size=4)
    for i in range(2):
        pool.add_sequence(i, [1, 2, 3, 4, 5][: 3 + i])
    pool.prepare([0, 1])
    b = pool.prepare([0, 1], [[7], [8]], pad_to=4, block_table_width=5)
    assert b.num_seqs == 4 and b.block_tables.shape == (4, 5)
    np.testing.assert_array_equal(b.slot_mapping, [3, 8, -1, -1])
    np.testing.assert_array_equal(b.context_lens, [4, 5, 0, 0])
    np.testing.assert_array_equal(b.cu_seqlens_q, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b.block_tables[2:], -1)
    assert b.seq_ids == (0, 1, None, None) and b.max_seqlen_q == 1
    before = snapshot(pool)  # argument errors are found before anything changes
    with pytest.raises(ValueError, match="pad_to"):
        pool.prepare([0, 1], [[7], [8]], pad_to=1)
    with pytest.raises(ValueError, match="block_table_width"):
        pool.prepare([0, 1], [[7], [8]], block_table_width=1)
    assert_unchanged(pool, before)
    pool.add_sequence(2, [1, 2, 3])
    with pytest.raises(ValueError, match="same number of new tokens"):
        pool.prepare([0, 2], [[7], None], pad_to=4)
    pool.check()


def test_prepare_argument_errors_change_nothing():
    pool = make_pool()
    pool.add_sequence("a", [1, 2, 3])
    pool.add_sequence("b", [4, 5])
    before = snapshot(pool)
    with pytest.raises(ValueError, match="twice"):
        pool.prepare(["a", "a"])
    with pytest.raises(ValueError, match="entries for 2"):
        pool.prepare(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="pending"):
        pool.prepare(["a", "b"], [None, [9]])
    with pytest.raises(UnknownSequence):
        pool.prepare(["a", "zzz"])
    assert_unchanged(pool, before)


def test_step_buffers_are_persistent_and_grow_when_needed():
    pool = make_pool(num_blocks=256, block_size=4, max_seqs=2, max_tokens=4)
    steps = pool._steps
    cap = steps.capacity
    pool.add_sequence(0, [1, 2])
    b1 = pool.prepare([0])
    assert np.shares_memory(b1.tokens, steps.host)
    assert steps.grown == 0
    n = cap // 3 + 1
    pool.add_sequence(1, list(range(n)))
    pool.prepare([1])
    assert steps.grown == 1 and steps.capacity >= StepBuffers.size(n, 1, math.ceil(n / 4))
    b3 = pool.prepare([0, 1], [[5], [6]])
    assert np.shares_memory(b3.block_tables, steps.host) and steps.grown == 1


def test_block_owners():
    pool = make_pool(num_blocks=8, block_size=4)
    pool.add_sequence("a", list(range(8)))
    pool.prepare(["a"])
    pool.add_sequence("b", list(range(9)))
    owners = pool.block_owners(["b", "a"])
    assert owners.dtype == np.int32 and owners.shape == (8,)
    assert list(owners[:3]) == [-1, -1, 0]  # blocks 0, 1 shared (prefix); 2 is b's own


def test_unknown_and_duplicate_sequences():
    pool = make_pool()
    pool.add_sequence("a", [1])
    with pytest.raises(ValueError, match="already holds"):
        pool.add_sequence("a", [1])
    with pytest.raises(ValueError, match="reserved"):
        pool.add_sequence(None, [1])
    for call in (
        lambda: pool.append_slots("x", 1),
        lambda: pool.free_sequence("x"),
        lambda: pool.swap_out("x"),
        lambda: pool.swap_in("x"),
        lambda: pool.fork("x", "y"),
        lambda: pool.block_table("x"),
    ):
        with pytest.raises(UnknownSequence, match="no sequence 'x'") as exc:
            call()
        assert isinstance(exc.value, KeyError) and isinstance(exc.value, MemoryPoolError)
    with pytest.raises(TypeError, match="1-D"):
        pool.add_sequence("m", [[1, 2]])
    with pytest.raises(TypeError, match="KVArena"):
        KVPool("arena")
    with pytest.raises(ValueError, match="max_seq_len"):
        KVPool(pool.arena, max_seq_len=0)
    assert "a" in pool and len(pool) == 1 and pool.seq_ids == ["a"]


# ---- errors leave the pool unchanged -----------------------------------------------------------------------


def test_out_of_blocks_add_sequence():
    pool = make_pool(num_blocks=4, block_size=4)
    pool.add_sequence("a", list(range(9)))  # 3 blocks
    before = snapshot(pool)
    with pytest.raises(OutOfBlocks) as exc:
        pool.add_sequence("b", list(range(100, 106)))  # 2 blocks, 1 free
    assert (exc.value.needed, exc.value.free) == (2, 1)
    assert "b" not in pool
    assert_unchanged(pool, before)


def test_too_long_prompts():
    pool = make_pool(num_blocks=4, block_size=4, max_seq_len=10)
    before = snapshot(pool)
    with pytest.raises(SequenceTooLong, match="max_seq_len=10"):
        pool.add_sequence("a", list(range(11)))
    assert_unchanged(pool, before)
    pool2 = make_pool(num_blocks=4, block_size=4, max_seq_len=100)
    with pytest.raises(SequenceTooLong, match="more than the arena's 4") as exc:
        pool2.add_sequence("a", list(range(17)))
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, MemoryPoolError)
    pool.add_sequence("a", list(range(10)))
    pool.prepare(["a"])
    before = snapshot(pool)
    with pytest.raises(SequenceTooLong):
        pool.append_slots("a", 1)
    with pytest.raises(SequenceTooLong):
        pool.prepare(["a"], [[1]])
    assert_unchanged(pool, before)


def test_out_of_blocks_append_and_prepare():
    pool = make_pool(num_blocks=5, block_size=4)
    pool.add_sequence("a", list(range(8)))
    pool.add_sequence("b", list(range(20, 27)))
    pool.prepare(["a", "b"])
    before = snapshot(pool)  # 1 block free
    with pytest.raises(OutOfBlocks) as exc:
        pool.append_slots("a", 5)
    assert (exc.value.needed, exc.value.free) == (2, 1)
    assert_unchanged(pool, before)
    # a decode step: b fits in its last block, a needs one block each... a: 1 new block; plus c's 1 block
    pool.add_sequence("c", [5])
    pool.prepare(["c"])
    before = snapshot(pool)  # 0 free
    with pytest.raises(OutOfBlocks) as exc:
        pool.prepare(["b", "a"], [[1], [2]])  # b fits, a does not: nothing of the step happens
    assert exc.value.needed == 1 and exc.value.free == 0
    assert_unchanged(pool, before)
    pool.prepare(["b"], [[1]])  # b alone fits in its last block
    pool.check()


def test_out_of_blocks_fork_cow_and_swap_in():
    pool = make_pool(num_blocks=4, block_size=4)
    pool.add_sequence("a", list(range(6)))
    pool.prepare(["a"])
    pool.fork("a", "b")
    pool.add_sequence("c", list(range(50, 58)))  # takes the last 2 blocks
    before = snapshot(pool)
    with pytest.raises(OutOfBlocks):  # appending to b must copy the shared last block: no block
        pool.prepare(["b"], [[9]])
    assert_unchanged(pool, before)
    with pytest.raises(ValueError, match="already holds"):
        pool.fork("a", "c")
    with pytest.raises(UnknownSequence):
        pool.fork("zz", "d")
    assert_unchanged(pool, before)
    pool.free_sequence("c")
    pool.swap_out("a")  # b still holds the shared blocks: nothing freed
    assert pool.allocator.num_free == 2
    pool.add_sequence("d", list(range(60, 68)))
    before = snapshot(pool)
    with pytest.raises(OutOfBlocks) as exc:
        pool.swap_in("a")
    assert (exc.value.needed, exc.value.free) == (1, 0)  # block 0 is full and still in the prefix cache
    assert pool.sequence("a").is_swapped
    assert_unchanged(pool, before)
    with pytest.raises(ValueError, match="not swapped out"):
        pool.swap_in("b")
    with pytest.raises(ValueError, match="swapped out"):
        pool.swap_out("a")
    with pytest.raises(ValueError, match="swapped out"):
        pool.prepare(["a"], [[1]])
    assert_unchanged(pool, before)


def test_fork_of_a_pending_prompt_is_refused():
    pool = make_pool()
    pool.add_sequence("a", [1, 2, 3])
    before = snapshot(pool)
    with pytest.raises(ValueError, match="not computed yet"):
        pool.fork("a", "b")
    assert_unchanged(pool, before)


# ---- prefix sharing ----------------------------------------------------------------------------------------


def test_prefix_sharing_by_full_blocks():
    pool = make_pool(num_blocks=16, block_size=4)
    system = [7, 7, 1, 2, 3, 4, 5, 6]  # two full blocks
    assert pool.add_sequence("a", system + [10, 11]) == 0
    assert pool.add_sequence("early", system + [12]) == 0  # a's blocks are not computed yet: no sharing
    pool.prepare(["a", "early"])
    assert pool.add_sequence("b", system + [20, 21, 22]) == 8
    tb = pool.block_table("b")
    assert tb[:2] == pool.block_table("a")[:2] and tb[2] not in pool.block_table("a")
    assert [pool.allocator.refcount(b) for b in tb] == [2, 2, 1]
    batch = pool.prepare(["b"])  # only the uncached tokens are computed
    assert not batch.is_prefill
    np.testing.assert_array_equal(batch.tokens, [20, 21, 22])
    np.testing.assert_array_equal(batch.positions, [8, 9, 10])
    np.testing.assert_array_equal(batch.context_lens, [11])
    assert pool.add_sequence("c", [7, 7, 1, 2, 9, 9, 9, 9]) == 4  # one block in common
    assert pool.add_sequence("d", [0, 7, 1, 2, 3, 4, 5, 6]) == 0  # same 2nd block tokens, other prefix
    s = pool.stats()
    assert s.blocks_shared == 2 and s.prefix_hit_blocks == 3
    assert s.logical_tokens - s.tokens_stored == 12  # b and c share 8 + 4 tokens
    pool.check()


def test_whole_prompt_hit_recomputes_the_last_block():
    pool = make_pool(num_blocks=8, block_size=4)
    prompt = list(range(1, 9))
    pool.add_sequence("a", prompt)
    pool.prepare(["a"])
    assert pool.add_sequence("b", prompt) == 4  # the last token's logits are needed
    batch = pool.prepare(["b"])
    np.testing.assert_array_equal(batch.positions, [4, 5, 6, 7])
    assert pool.block_table("b")[0] == pool.block_table("a")[0]
    assert pool.block_table("b")[1] != pool.block_table("a")[1]
    pool.check()


def test_freed_prefix_blocks_are_reused_then_evicted():
    pool = make_pool(num_blocks=4, block_size=4)
    pool.add_sequence("a", list(range(10)))
    pool.prepare(["a"])
    pool.free_sequence("a")
    s = pool.stats()
    assert (s.blocks_used, s.blocks_free, s.blocks_cached) == (0, 4, 2)  # 2 full blocks stay findable
    assert pool.add_sequence("b", list(range(9))) == 8
    assert pool.stats().blocks_cached == 0 and pool.allocator.num_used == 3
    pool.check()
    pool.free_sequence("b")
    pool.add_sequence("c", list(range(100, 116)))  # needs all 4 blocks: the cached ones are evicted
    assert len(pool.prefix) == 0
    pool.free_sequence("c")
    assert pool.add_sequence("d", list(range(9))) == 0
    pool.check()


def test_prefix_caching_off_and_salt():
    pool = make_pool(prefix_caching=False)
    pool.add_sequence("a", list(range(8)))
    pool.prepare(["a"])
    assert pool.add_sequence("b", list(range(9))) == 0
    pool.free_sequence("a")
    assert pool.stats().blocks_cached == 0
    pool.check()
    salted = make_pool(salt=b"m1")
    salted.add_sequence("a", list(range(8)))
    salted.prepare(["a"])
    assert salted.sequence("a").keys[0] != block_key(None, range(4))
    assert salted.sequence("a").keys[0] == block_key(None, range(4), salt=b"m1")


# ---- copy-on-write and fork --------------------------------------------------------------------------------


def test_fork_shares_and_copy_on_write_copies_every_layer():
    pool = make_pool(num_blocks=8, block_size=4)
    pool.add_sequence("p", [1, 2, 3, 4, 5, 6])
    pool.prepare(["p"])
    free = pool.allocator.num_free
    pool.fork("p", "c")
    assert pool.allocator.num_free == free  # fork allocates nothing
    assert pool.block_table("c") == pool.block_table("p")
    assert all(pool.allocator.refcount(b) == 2 for b in pool.block_table("p"))
    last = pool.block_table("p")[1]
    data = pool.arena.data.copy()
    batch = pool.prepare(["c", "p"], [[7], [8]])
    new = pool.block_table("c")[1]
    assert new != last and pool.block_table("p")[1] == last  # p kept the original (c copied away first)
    np.testing.assert_array_equal(pool.arena.data[:, :, new], data[:, :, last])  # every layer, K and V
    np.testing.assert_array_equal(batch.slot_mapping, [new * 4 + 2, last * 4 + 2])
    assert pool.cow_copies == 1  # p's block was no longer shared: no second copy
    assert pool.block_table("c")[0] == pool.block_table("p")[0]
    assert pool.allocator.num_free == free - 1
    pool.check()
    pool.fork("p", "c2")
    pool.append_slots("p", 1)  # the parent writes: the parent copies
    assert pool.cow_copies == 2 and pool.block_table("c2")[1] == last
    pool.check()


def test_fork_at_a_block_boundary_needs_no_copy():
    pool = make_pool(num_blocks=8, block_size=4)
    pool.add_sequence("p", list(range(8)))
    pool.prepare(["p"])
    pool.fork("p", "c")
    pool.prepare(["p", "c"], [[1], [2]])
    assert pool.cow_copies == 0
    assert pool.block_table("p")[:2] == pool.block_table("c")[:2]
    assert pool.block_table("p")[2] != pool.block_table("c")[2]
    pool.check()


def test_fork_siblings_that_all_write_plan_exact_block_counts():
    pool = make_pool(num_blocks=5, block_size=4)
    pool.add_sequence("p", [1, 2])
    pool.prepare(["p"])
    pool.fork("p", "c1")
    pool.fork("p", "c2")
    pool.add_sequence("x", list(range(8)))  # 3 blocks left free... now 2 after x? 1 + 2 = 3 used, 2 free
    assert pool.allocator.num_free == 2
    pool.prepare(["p", "c1", "c2"], [[3], [4], [5]])  # 2 copies; the last writer keeps the original
    assert pool.cow_copies == 2 and pool.allocator.num_free == 0
    pool.check()


# ---- swap --------------------------------------------------------------------------------------------------


def test_swap_round_trip_moves_blocks_and_keeps_data():
    pool = make_pool(num_blocks=6, block_size=4, prefix_caching=False)
    pool.add_sequence("a", list(range(10)))
    pool.prepare(["a"])
    old_table = pool.block_table("a")
    kv = pool.arena.data[:, :, old_table].copy()
    nbytes = pool.swap_out("a")
    assert nbytes == 3 * pool.arena.block_bytes
    s = pool.stats()
    assert (s.blocks_used, s.sequences_swapped, s.swap_host_bytes) == (0, 1, nbytes)
    assert pool.block_table("a") == []
    pool.add_sequence("other", list(range(100, 108)))  # takes the swapped-out blocks
    pool.arena.data[:, :, pool.block_table("other")] = -5
    pool.check()
    assert pool.swap_in("a") == nbytes
    new_table = pool.block_table("a")
    assert new_table != old_table and not set(new_table) & set(pool.block_table("other"))
    np.testing.assert_array_equal(pool.arena.data[:, :, new_table], kv)
    assert pool.stats().swap_host_bytes == 0
    batch = pool.prepare(["a"], [[5]])
    np.testing.assert_array_equal(batch.block_tables, [new_table])
    assert batch.slot_mapping[0] == new_table[2] * 4 + 2
    pool.check()


def test_swap_in_shares_blocks_still_in_the_prefix_cache():
    pool = make_pool(num_blocks=8, block_size=4)
    pool.add_sequence("a", list(range(10)))
    pool.prepare(["a"])
    pool.fork("a", "b")
    table = pool.block_table("a")
    pool.swap_out("a")
    assert pool.stats().blocks_used == 3  # b still holds them
    pool.swap_in("a")
    assert pool.block_table("a")[:2] == table[:2]  # full blocks found by key: shared, not copied
    assert pool.block_table("a")[2] != table[2]
    pool.check()


def test_free_a_swapped_sequence():
    pool = make_pool()
    pool.add_sequence("a", [1, 2, 3, 4, 5])
    pool.prepare(["a"])
    pool.swap_out("a")
    pool.free_sequence("a")
    s = pool.stats()
    assert (s.sequences, s.swap_host_bytes, s.blocks_used) == (0, 0, 0)
    pool.synchronize()
    pool.check()


# ---- numbers through the real ops --------------------------------------------------------------------------


def _kv(token: int, pos: int, layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """The K/V a model would compute for a token at a position: (layers, 2, kv_heads, head_dim)."""
    return np.random.default_rng([token, pos]).standard_normal((layers, 2, kv_heads, head_dim))


def test_paged_attention_through_the_pool_matches_dense_attention():
    """Prefill, prefix sharing, fork + copy-on-write and swap, with K/V written by rf.kv_write into the arena
    and read by rf.paged_attention (NumPy paths): every step equals dense attention over the sequence."""
    L, H, KVH, D, BS = 2, 4, 2, 8, 8
    arena = KVArena(L, KVH, D, "float64", BS, num_blocks=16, xp=np)
    pool = KVPool(arena)
    rng = np.random.default_rng(5)
    history: dict = {}

    def step(ids, new):
        batch = pool.prepare(ids, new)
        kv = (
            np.stack(
                [_kv(int(t), int(p), L, KVH, D) for t, p in zip(batch.tokens, batch.positions, strict=True)]
            )
            if batch.num_tokens
            else np.zeros((0, L, 2, KVH, D))
        )
        for layer in range(L):
            rf.kv_write(kv[:, layer, 0], kv[:, layer, 1], arena.k(layer), arena.v(layer), batch.slot_mapping)
        for i, sid in enumerate(ids):
            history.setdefault(sid, []).extend(
                zip(batch.tokens[batch.cu_seqlens_q[i] : batch.cu_seqlens_q[i + 1]].tolist(),
                    batch.positions[batch.cu_seqlens_q[i] : batch.cu_seqlens_q[i + 1]].tolist(), strict=True)
            )  # fmt: skip
        # decode-style check: the last token of each sequence attends over its whole context
        q = rng.standard_normal((len(ids), 1, H, D))
        for layer in range(L):
            out = rf.paged_attention(
                q, arena.k(layer), arena.v(layer), batch.block_tables, batch.context_lens
            )
            for i, sid in enumerate(ids):
                seq = pool.sequence(sid)
                ctx = [
                    _kv(t, p, L, KVH, D)[layer] for p, t in enumerate(seq.token_ids[: batch.context_lens[i]])
                ]
                k = np.stack([c[0] for c in ctx]).repeat(H // KVH, axis=1)  # (n, H, D)
                v = np.stack([c[1] for c in ctx]).repeat(H // KVH, axis=1)
                s = np.einsum("hd,nhd->hn", q[i, 0], k) / math.sqrt(D)
                w = np.exp(s - s.max(-1, keepdims=True))
                ref = np.einsum("hn,nhd->hd", w / w.sum(-1, keepdims=True), v)
                np.testing.assert_allclose(out[i, 0], ref, rtol=1e-10, atol=1e-12)

    system = list(rng.integers(0, 50, 9))
    pool.add_sequence("a", system + [1, 2])
    step(["a"], None)
    pool.add_sequence("b", system + [3])  # shares 2 blocks with a
    step(["b", "a"], [None, [4]])
    pool.fork("b", "b2")
    step(["b", "b2", "a"], [[5], [6], [7]])
    pool.swap_out("a")
    pool.add_sequence("c", list(range(30, 45)))
    step(["c"], None)
    pool.free_sequence("c")
    pool.swap_in("a")
    for t in range(6):
        step(["a", "b", "b2"], [[t], [t + 10], [t + 20]])
    pool.check()
    assert pool.cow_copies >= 1 and pool.stats().prefix_hit_blocks >= 1


# ---- caching allocator statistics on the CPU ---------------------------------------------------------------


def test_allocator_stats_is_a_noop_without_gpu():
    from rawformer import backend

    if backend.cupy_module() is not None:
        pytest.skip("a GPU is present: tests/test_memory_gpu.py covers the real tracker")
    with AllocatorStats() as mem:
        np.zeros(1000)
    assert not mem.available
    assert mem.as_dict()["growth_events"] == 0 and mem.peak_bytes == 0 and mem.current_bytes == 0
    assert "not tracking" in repr(mem)
    mem.uninstall()


def test_block_table_container():
    t = BlockTable([3, 1])
    t.extend([5, 6, 7, 8])
    assert len(t) == 6 and t[-1] == 8 and list(t) == [3, 1, 5, 6, 7, 8] and t == [3, 1, 5, 6, 7, 8]
    t.set(0, 9)
    assert t.array().dtype == np.int32 and t.tolist()[0] == 9
    with pytest.raises(IndexError):
        t[6]
    t.clear()
    assert len(t) == 0 and "BlockTable([])" == repr(t)
