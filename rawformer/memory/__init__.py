"""The paged memory pool: one KV arena per model carved into fixed-size blocks, a reference-counted block
allocator, per-sequence block tables with prefix sharing, copy-on-write, fork and swap, the per-step
AttentionBatch the models consume, and statistics of CuPy's caching allocator.

    arena = KVArena(layers, kv_heads, head_dim, "float16", block_size=16, budget_fraction=0.8)
    pool = KVPool(arena)
    pool.add_sequence(0, prompt_ids)
    batch = pool.prepare([0])                 # prefill step
    logits = model.forward(batch, arena)
    batch = pool.prepare([0], [[next_id]])    # decode step
"""

from rawformer.memory.allocator import BlockAllocator
from rawformer.memory.arena import KVArena
from rawformer.memory.batch import AttentionBatch
from rawformer.memory.errors import MemoryPoolError, OutOfBlocks, SequenceTooLong, UnknownSequence
from rawformer.memory.int8_arena import Int8KVArena
from rawformer.memory.latent import LatentArena
from rawformer.memory.pool import KVPool, PoolStats
from rawformer.memory.prefix import PrefixCache, block_key
from rawformer.memory.sequence import BlockTable, Sequence
from rawformer.memory.tracker import AllocatorStats

__all__ = [
    "AllocatorStats",
    "AttentionBatch",
    "BlockAllocator",
    "BlockTable",
    "KVArena",
    "Int8KVArena",
    "KVPool",
    "LatentArena",
    "MemoryPoolError",
    "OutOfBlocks",
    "PoolStats",
    "PrefixCache",
    "Sequence",
    "SequenceTooLong",
    "UnknownSequence",
    "block_key",
]
