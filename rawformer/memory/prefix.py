"""Prefix sharing: full blocks are found by a hash chain over their token ids.

Block i of a sequence has the key H(key of block i-1, token ids of block i) (block 0: H(salt, tokens)), so a
key names the whole prefix up to the end of its block, not just the block's own tokens: two sequences share
block i only when all their tokens up to the end of block i are identical. H is BLAKE2b with a 16-byte digest
over the parent key and the token ids as little-endian int64, which makes a collision (two different prefixes
reading each other's K/V) practically impossible, unlike Python's 64-bit `hash`.

Only full blocks whose K/V a forward step has been handed (see KVPool.prepare) are entered, so a hit always
refers to content that is written before it is read; full blocks are never written again, so they can be
shared read-only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16


def block_key(parent: bytes | None, token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """The hash-chain key of one full block: H(parent key, token ids); `parent` None for block 0."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(parent if parent is not None else b"root:" + salt)
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.digest()


def chain_keys(
    token_ids: Sequence[int], block_size: int, salt: bytes = b"", start: bytes | None = None
) -> list[bytes]:
    """The keys of every full block of `token_ids` (len(token_ids) // block_size of them)."""
    keys = []
    parent = start
    for i in range(len(token_ids) // block_size):
        parent = block_key(parent, token_ids[i * block_size : (i + 1) * block_size], salt)
        keys.append(parent)
    return keys


class PrefixCache:
    """Two maps: key -> block and block -> key. A block has at most one key and a key one block (the first
    block registered under it; a second sequence computing the same block keeps its own copy unshared)."""

    __slots__ = ("_by_key", "_by_block", "hits", "queries")

    def __init__(self) -> None:
        self._by_key: dict[bytes, int] = {}
        self._by_block: dict[int, bytes] = {}
        self.hits = 0  # blocks found (statistics)
        self.queries = 0  # blocks looked up

    def lookup(self, key: bytes) -> int | None:
        self.queries += 1
        b = self._by_key.get(key)
        if b is not None:
            self.hits += 1
        return b

    def peek(self, key: bytes) -> int | None:
        """lookup without counting it in the statistics."""
        return self._by_key.get(key)

    def insert(self, key: bytes, block: int) -> bool:
        """Register `block` under `key`; False (nothing changed) if the key or the block is taken."""
        if key in self._by_key or block in self._by_block:
            return False
        self._by_key[key] = block
        self._by_block[block] = key
        return True

    def forget(self, block: int) -> None:
        """Drop the block's entry (it is about to hold other content)."""
        key = self._by_block.pop(block, None)
        if key is not None:
            del self._by_key[key]

    def key_of(self, block: int) -> bytes | None:
        return self._by_block.get(block)

    def __contains__(self, block: int) -> bool:
        return block in self._by_block

    def __len__(self) -> int:
        return len(self._by_key)

    def clear(self) -> None:
        self._by_key.clear()
        self._by_block.clear()
