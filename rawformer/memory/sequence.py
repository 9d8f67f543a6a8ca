"""A sequence's state in the pool: its token ids, its block table, how much of it a step has computed."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


class BlockTable:
    """A sequence's block table: a Python list (cheap scalar access on the host path) mirrored in a growable
    int32 array (so a step copies a whole row into the batch's block_tables with one array assignment)."""

    __slots__ = ("ids", "_arr")

    def __init__(self, blocks: Iterable[int] = ()):
        self.ids: list[int] = [int(b) for b in blocks]
        self._arr = np.empty(max(4, len(self.ids)), dtype=np.int32)
        self._arr[: len(self.ids)] = self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        try:
            return self.ids[i]
        except IndexError:
            raise IndexError(f"block table index {i} out of range ({len(self.ids)} blocks)") from None

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.ids))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockTable):
            return self.ids == other.ids
        return self.ids == list(other) if isinstance(other, (list, tuple)) else NotImplemented

    def set(self, i: int, block: int) -> None:
        self.ids[i] = block
        self._arr[i] = block

    def extend(self, blocks: list[int]) -> None:
        n = len(self.ids)
        need = n + len(blocks)
        if need > len(self._arr):
            grown = np.empty(max(need, 2 * len(self._arr)), dtype=np.int32)
            grown[:n] = self._arr[:n]
            self._arr = grown
        self._arr[n:need] = blocks
        self.ids.extend(blocks)

    def clear(self) -> None:
        self.ids.clear()

    def array(self) -> np.ndarray:
        """The table as an int32 view (valid until the next change)."""
        return self._arr[: len(self.ids)]

    def tolist(self) -> list[int]:
        return list(self.ids)

    def __repr__(self) -> str:
        return f"BlockTable({self.ids})"


@dataclass(eq=False)
class Sequence:
    """One sequence held by a KVPool.

    token_ids[p] is the token at position p (-1 where a caller appended slots without saying which token);
    position p lives in slot blocks[p // block_size] * block_size + p % block_size. Tokens
    [0, num_computed) have been handed to a forward step (KVPool.prepare) or to the caller (append_slots);
    the rest (a prompt reserved by add_sequence) are pending and go into the next step.
    """

    seq_id: Hashable
    token_ids: list[int]
    blocks: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    keys: list[bytes] = field(default_factory=list)  # hash-chain keys of its first len(keys) full blocks
    hashable: bool = True  # False from the first unknown token id on: no more keys
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was added
    swapped: object | None = None  # the host copy of its blocks while swapped out

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_swapped(self) -> bool:
        return self.swapped is not None
