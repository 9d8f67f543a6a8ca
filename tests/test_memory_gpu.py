"""The memory pool's GPU paths (CuPy): the arena on the device, cudaMemcpy2D block copies, pinned-memory
swap, the one-transfer step upload, no device allocation on the hot path, the caching-allocator statistics,
and the pool driving rf.kv_write / rf.paged_attention kernels. Every test is marked gpu (skipped without one).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_memory_random import Driver

import rawformer as rf
from rawformer.memory import AllocatorStats, KVArena, KVPool

pytestmark = pytest.mark.gpu


def _arena(cp, num_blocks=12, block_size=16, layers=3, kv_heads=2, head_dim=8, dtype="float16"):
    arena = KVArena(layers, kv_heads, head_dim, dtype, block_size, num_blocks=num_blocks, xp=cp)
    arena.data[...] = cp.random.RandomState(3).standard_normal(arena.data.shape).astype(dtype)
    return arena


def test_arena_on_device(cp):
    arena = KVArena(2, 4, 64, "float16", 16, budget_bytes=10 << 20, xp=cp)
    assert isinstance(arena.data, cp.ndarray) and arena.is_gpu
    assert arena.num_blocks == (10 << 20) // arena.block_bytes
    assert arena.k(1).data.ptr == arena.data[1, 0].data.ptr and arena.k(1).flags.c_contiguous
    assert not bool(arena.data.any())
    with pytest.raises(TypeError, match="float16 or float32"):
        KVArena(1, 1, 8, "float64", num_blocks=1, xp=cp)


def test_arena_budget_fraction_uses_free_device_memory(cp):
    free = cp.cuda.runtime.memGetInfo()[0]
    arena = KVArena(1, 1, 64, "float16", 16, budget_fraction=0.01, xp=cp)
    expect = int(0.01 * free) // arena.block_bytes
    assert abs(arena.num_blocks - expect) <= max(2, expect // 50)  # free memory moves a little


def test_copy_blocks_matches_numpy(cp):
    arena = _arena(cp)
    host = cp.asnumpy(arena.data)
    src, dst = [1, 2, 3, 9, 0], [5, 6, 7, 4, 11]
    arena.copy_blocks(src, dst)
    host[:, :, dst] = host[:, :, src]
    np.testing.assert_array_equal(cp.asnumpy(arena.data), host)


def test_copies_row_by_row_when_the_pitch_is_too_long(cp):
    """An arena row longer than cudaMemcpy2D's max pitch is copied row by row: same result."""
    arena = _arena(cp)
    assert arena.max_pitch >= 2**31 - 1
    arena._max_pitch = arena.block_row_bytes  # force the fallback
    host = cp.asnumpy(arena.data)
    arena.copy_blocks([1, 2, 8], [3, 4, 0])
    host[:, :, [3, 4, 0]] = host[:, :, [1, 2, 8]]
    np.testing.assert_array_equal(cp.asnumpy(arena.data), host)
    out = arena.to_host([5, 6, 2])
    arena.from_host(out, [9, 10, 11])
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(out, host[:, :, [5, 6, 2]])
    np.testing.assert_array_equal(cp.asnumpy(arena.data)[:, :, [9, 10, 11]], host[:, :, [5, 6, 2]])


def test_swap_buffers_are_pinned_and_round_trip(cp):
    arena = _arena(cp)
    before = cp.asnumpy(arena.data)
    blocks = [4, 5, 6, 1, 10]
    out = arena.to_host(blocks)
    cp.cuda.get_current_stream().synchronize()
    attrs = cp.cuda.runtime.pointerGetAttributes(out.ctypes.data)
    # page-locked host memory (cudaMemoryTypeHost = 1), not pageable memory (unregistered = 0)
    assert attrs.type == getattr(cp.cuda.runtime, "memoryTypeHost", 1)
    np.testing.assert_array_equal(out, before[:, :, blocks])
    arena.data[...] = 0
    arena.from_host(out, [0, 1, 2, 7, 8])
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cp.asnumpy(arena.data)[:, :, [0, 1, 2, 7, 8]], before[:, :, blocks])


def test_swap_is_ordered_on_the_stream(cp):
    """swap_out's copy is queued; a kernel queued after it that overwrites the freed blocks must not change
    what comes back with swap_in."""
    pool = KVPool(_arena(cp, num_blocks=6), prefix_caching=False)
    pool.add_sequence("a", list(range(40)))
    pool.prepare(["a"])
    table = pool.block_table("a")
    kv = cp.asnumpy(pool.arena.data[:, :, table])
    pool.swap_out("a")
    pool.add_sequence("b", list(range(90)))  # takes the freed blocks
    pool.arena.data[:, :, pool.block_table("b")] = 7  # device work right after the queued copy
    pool.free_sequence("b")
    pool.swap_in("a")
    pool.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(pool.arena.data[:, :, pool.block_table("a")]), kv)
    pool.check()


def test_batches_live_on_device_with_host_twins(cp):
    pool = KVPool(_arena(cp))
    pool.add_sequence(0, list(range(20)))
    pool.add_sequence(1, list(range(5)))
    batch = pool.prepare([0, 1])
    for name in ("tokens", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "block_tables"):
        dev, host = getattr(batch, name), getattr(batch.host, name)
        assert isinstance(dev, cp.ndarray) and dev.dtype == np.int32 and isinstance(host, np.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(dev), host)
    assert batch.is_prefill and batch.host.is_prefill


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_same_on_cupy_and_numpy(cp, seed):
    """The same seeded operations on a NumPy and a CuPy pool: the same batches, outcomes and arena bytes."""
    a = Driver(np, seed)
    b = Driver(cp, seed)
    assert a.run(200) == b.run(200)
    np.testing.assert_array_equal(cp.asnumpy(b.arena.data), a.arena.data)


def test_hot_path_allocates_no_device_memory(cp):
    """After warm-up, decode steps (prepare, copy-on-write, append_slots, swap) allocate nothing through
    CuPy's allocator: the step arrays are views of the persistent buffers, block copies are memcpy2D."""
    pool = KVPool(_arena(cp, num_blocks=64))
    for i in range(4):
        pool.add_sequence(i, list(range(10 + 7 * i)))
    pool.prepare(range(4))
    pool.prepare(range(4), [[1]] * 4)  # warm-up: events, first copies
    pool.fork(0, 10)
    with AllocatorStats() as mem:
        for t in range(40):
            pool.prepare([0, 1, 2, 3, 10], [[t]] * 5)  # includes one copy-on-write (fork 10)
        pool.append_slots(1, 3, [1, 2, 3])
        pool.swap_out(2)
        pool.swap_in(2)
    assert pool.cow_copies >= 1
    assert mem.allocations == 0 and mem.growth_events == 0, mem
    pool.check()


def test_allocator_stats_counts_and_restores(cp):
    pool = cp.get_default_memory_pool()
    get_allocator = getattr(cp.cuda, "get_allocator", None)
    previous = get_allocator() if get_allocator else None
    with AllocatorStats() as mem:
        assert mem.available
        a = cp.empty(1 << 20, dtype=cp.uint8)
        b = cp.empty(3 << 20, dtype=cp.uint8)
        assert mem.allocations == 2
        assert mem.peak_bytes >= 4 << 20 and mem.current_bytes >= 4 << 20
        del b
        assert mem.current_bytes < 4 << 20 and mem.peak_bytes >= 4 << 20
        pool.free_all_blocks()
        big = cp.empty(1 << 30, dtype=cp.uint8)  # nothing cached this large: the pool must grow
        assert mem.growth_events >= 1 and mem.grown_bytes >= 1 << 30
        del big, a
    if get_allocator is not None:
        assert get_allocator() == previous
    n = mem.allocations
    cp.empty(10)
    assert mem.allocations == n  # uninstalled
    assert "growth events" in repr(mem) and mem.as_dict()["available"]


def test_kernels_read_what_the_pool_wrote(cp):
    """Pool + rf.kv_write + rf.paged_attention on the GPU (float32) match the same operations on NumPy,
    through a prefix hit, a fork with copy-on-write and a swap round trip."""
    L, H, KVH, D, BS = 2, 8, 2, 64, 16
    rng = np.random.default_rng(9)
    pools = {xp: KVPool(KVArena(L, KVH, D, "float32", BS, num_blocks=40, xp=xp)) for xp in (np, cp)}
    outs: dict = {np: [], cp: []}

    def step(ids, new):
        q = rng.standard_normal((len(ids), 1, H, D)).astype(np.float32)
        for xp, pool in pools.items():
            batch = pool.prepare(ids, new)
            h = batch.host
            kv = np.stack(
                [np.random.default_rng([int(t), int(p)]).standard_normal((L, 2, KVH, D)) for t, p in
                 zip(h.tokens, h.positions, strict=True)]
            ).astype(np.float32)  # fmt: skip
            for layer in range(L):
                k, v = xp.asarray(kv[:, layer, 0]), xp.asarray(kv[:, layer, 1])
                rf.kv_write(k, v, pool.arena.k(layer), pool.arena.v(layer), batch.slot_mapping)
                out = rf.paged_attention(
                    xp.asarray(q),
                    pool.arena.k(layer),
                    pool.arena.v(layer),
                    batch.block_tables,
                    batch.context_lens,
                )
                outs[xp].append(np.asarray(out.get() if xp is cp else out))

    prompt = rng.integers(0, 100, 40).tolist()
    for pool in pools.values():
        pool.add_sequence("a", prompt)
    step(["a"], None)
    for pool in pools.values():
        assert pool.add_sequence("b", prompt[:35] + [1, 2]) == 32
    step(["b", "a"], [None, [5]])
    for pool in pools.values():
        pool.fork("a", "a2")
    step(["a", "a2", "b"], [[6], [7], [8]])
    for pool in pools.values():
        pool.swap_out("b")
        pool.swap_in("b")
    for t in range(5):
        step(["a", "a2", "b"], [[t], [t + 1], [t + 2]])
    for got, want in zip(outs[cp], outs[np], strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    for pool in pools.values():
        pool.check()
