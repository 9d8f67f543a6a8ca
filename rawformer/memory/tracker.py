"""Statistics of CuPy's caching allocator for activations and workspace: current and peak bytes, and how
often the pool had to grow through cudaMalloc (which synchronises the device: the hot path should show none
after warm-up).

CuPy routes every device allocation through the current allocator (by default the MemoryPool's malloc).
`AllocatorStats` installs a thin wrapper with `cupy.cuda.set_allocator`: each call goes to the pool's
malloc, and the pool's used/total bytes before and after tell whether the pool grew (total_bytes went up: a
cudaMalloc happened) and how many bytes are in use. Frees need no hook: the pool's used_bytes() drops when
an array dies. On the CPU there is no such pool and the tracker is a no-op (all counters stay 0).

    with AllocatorStats() as mem:
        logits = model.forward(batch, arena)
    print(mem)   # current / peak bytes, allocations, growth events
"""

from __future__ import annotations

from typing import Any

from rawformer import backend


class AllocatorStats:
    """Counting wrapper around CuPy's default memory pool; a context manager (install on enter, restore the
    previous allocator on exit). `available` is False (and everything 0) without CuPy and a GPU.

    Attributes
    ----------
    allocations : int
        Allocation requests seen.
    growth_events : int
        Requests the pool served by growing (cudaMalloc): its total_bytes increased.
    grown_bytes : int
        Bytes the pool grew by in those events.
    peak_bytes : int
        Highest pool used_bytes() seen right after an allocation, relative to `base_bytes`.
    base_bytes : int
        The pool's used_bytes() when the tracker was installed (what was live before).
    """

    def __init__(self, pool: Any = None):
        self._cp = backend.cupy_module()
        self.available = self._cp is not None
        self._pool = pool if pool is not None or not self.available else self._cp.get_default_memory_pool()
        self._previous: Any = None
        self._installed = False
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the current in-use bytes become the new base."""
        self.allocations = 0
        self.growth_events = 0
        self.grown_bytes = 0
        self.base_bytes = self._pool.used_bytes() if self.available else 0
        self.peak_bytes = 0

    @property
    def current_bytes(self) -> int:
        """Bytes in use in the pool now, relative to base_bytes (can be negative if older arrays died)."""
        return self._pool.used_bytes() - self.base_bytes if self.available else 0

    @property
    def pool_total_bytes(self) -> int:
        """Bytes the pool holds from the device (in use + cached free)."""
        return self._pool.total_bytes() if self.available else 0

    def _malloc(self, size: int) -> Any:
        before = self._pool.total_bytes()
        mem = self._pool.malloc(size)
        after = self._pool.total_bytes()
        self.allocations += 1
        if after > before:
            self.growth_events += 1
            self.grown_bytes += after - before
        self.peak_bytes = max(self.peak_bytes, self._pool.used_bytes() - self.base_bytes)
        return mem

    def install(self) -> AllocatorStats:
        """Route CuPy's allocations through the counter (no-op on CPU)."""
        if self.available and not self._installed:
            cuda = self._cp.cuda
            get = getattr(cuda, "get_allocator", None) or getattr(cuda.memory, "get_allocator", None)
            self._previous = get() if get is not None else self._cp.get_default_memory_pool().malloc
            cuda.set_allocator(self._malloc)
            self._installed = True
        return self

    def uninstall(self) -> None:
        """Restore the allocator that was current before install."""
        if self._installed:
            self._cp.cuda.set_allocator(self._previous)
            self._installed = False

    def __enter__(self) -> AllocatorStats:
        self.reset()
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def as_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "allocations": self.allocations,
            "growth_events": self.growth_events,
            "grown_bytes": self.grown_bytes,
            "current_bytes": self.current_bytes,
            "peak_bytes": self.peak_bytes,
            "pool_total_bytes": self.pool_total_bytes,
        }

    def __repr__(self) -> str:
        if not self.available:
            return "AllocatorStats(no GPU: not tracking)"
        mib = 2**20
        return (
            f"AllocatorStats(current {self.current_bytes / mib:.2f} MiB, "
            f"peak {self.peak_bytes / mib:.2f} MiB, {self.allocations} allocations, "
            f"{self.growth_events} growth events (+{self.grown_bytes / mib:.2f} MiB cudaMalloc), "
            f"pool holds {self.pool_total_bytes / mib:.2f} MiB)"
        )
