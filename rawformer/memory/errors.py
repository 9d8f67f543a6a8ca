"""The memory pool's errors: every one is a `MemoryPoolError`, raised before any state changed."""

from __future__ import annotations


class MemoryPoolError(Exception):
    """Base class of the pool's errors. The pool is unchanged when one is raised."""


class OutOfBlocks(MemoryPoolError):
    """Not enough free KV blocks for the request: a recoverable condition (wait, preempt, swap out).

    Attributes
    ----------
    needed : int
        Blocks the request needed.
    free : int
        Blocks that were free (the request took none of them).
    """

    def __init__(self, needed: int, free: int, what: str = "request"):
        self.needed = int(needed)
        self.free = int(free)
        super().__init__(f"out of KV blocks: {what} needs {self.needed} blocks, {self.free} are free")


class SequenceTooLong(MemoryPoolError, ValueError):
    """A sequence longer than the pool can ever hold (its max_seq_len, or more blocks than the arena has).
    Unlike OutOfBlocks, waiting does not help."""


class UnknownSequence(MemoryPoolError, KeyError):
    """A sequence id the pool does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown sequence"
