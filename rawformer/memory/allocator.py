"""Block allocator: integer block ids, reference counts and two free lists. Pure Python, O(1) per block.

Free blocks are of two kinds:
- plain free blocks (a LIFO stack: a block freed last is reused first, its memory is likely still in L2);
- cached free blocks: nobody holds them, but they still hold the K/V of a full block that the prefix cache
  can hand out again. They are kept in least-recently-freed order and given out (evicted) only when no
  plain block is left; `on_evict(block)` tells the prefix cache to forget the block.
Both kinds count as free: `num_free + num_used == num_blocks` always.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from rawformer.memory.errors import OutOfBlocks


class BlockAllocator:
    """Reference-counted allocation of `num_blocks` block ids 0..num_blocks-1.

    Parameters
    ----------
    num_blocks : int
        Blocks in the arena (>= 0).
    on_evict : callable(int) -> None, optional
        Called for a cached free block when `allocate` reuses it for other content.
    """

    __slots__ = ("num_blocks", "_ref", "_free", "_cached", "on_evict", "num_shared")

    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"BlockAllocator: num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        # the stack pops from the end: reversed so that a fresh pool hands out 0, 1, 2, ... (contiguous runs
        # make swap copies fewer and larger)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self.on_evict = on_evict
        self.num_shared = 0  # blocks with more than one holder (kept up to date: O(1) accounting)

    # ---- counts ------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (plain free + cached free)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold reusable prefix-cache content."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def is_cached_free(self, block: int) -> bool:
        return block in self._cached

    # ---- operations --------------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` blocks with reference count 1, or OutOfBlocks (nothing taken) when fewer than `n` are free.

        Plain free blocks go first; then cached free blocks, least recently freed first (evicted from the
        prefix cache through `on_evict`)."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self.num_free:
            raise OutOfBlocks(n, self.num_free, "allocate")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                if self.on_evict is not None:
                    self.on_evict(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def reuse(self, block: int) -> None:
        """Take a cached free block back (a prefix-cache hit on a block nobody holds): refcount 0 -> 1."""
        if block not in self._cached:
            raise ValueError(f"reuse: block {block} is not a cached free block")
        del self._cached[block]
        self._ref[block] = 1

    def incref(self, blocks: Iterable[int]) -> None:
        """One more holder for each block (each must be in use)."""
        blocks = list(blocks)
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"incref: block {b} is free")
        for b in blocks:
            self._ref[b] += 1
            if self._ref[b] == 2:
                self.num_shared += 1

    def free(self, blocks: Iterable[int], keep: Callable[[int], bool] | None = None) -> list[int]:
        """Drop one reference from each block; a block whose count reaches 0 becomes free: cached free when
        `keep(block)` is true (the prefix cache still knows it), plain free otherwise. Returns the blocks
        that became free."""
        blocks = list(blocks)
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"free: block {b} is already free")
        released = []
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 1:
                self.num_shared -= 1
            elif self._ref[b] == 0:
                if keep is not None and keep(b):
                    self._cached[b] = None
                else:
                    self._free.append(b)
                released.append(b)
        return released

    def uncache(self, block: int) -> None:
        """Move a cached free block to the plain free list (its prefix-cache entry was dropped)."""
        if block in self._cached:
            del self._cached[block]
            self._free.append(block)

    def check(self) -> None:
        """Assert the allocator's own invariants (tests and debugging; O(num_blocks))."""
        free = set(self._free)
        cached = set(self._cached)
        assert len(free) == len(self._free), "a block is twice on the free list"
        assert not (free & cached), "a block is both plain free and cached free"
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, f"block {b} has a negative reference count"
            assert (self._ref[b] == 0) == (b in free or b in cached), f"block {b}: refcount vs free lists"
        assert self.num_free + self.num_used == self.num_blocks
        assert self.num_shared == sum(1 for r in self._ref if r > 1), "num_shared is off"

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self.num_blocks}, used={self.num_used}, free={self.num_free}, "
            f"cached={self.num_cached})"
        )
