"""Decode steps as CUDA graphs: one captured forward per (batch bucket, block-table width), replayed.

A decode step launches a few hundred small kernels (per layer: norms, GEMMs, the KV write, paged
attention, ...); at batch 1 Python would spend more time launching them than the GPU spends running them.
So the step is captured once with CuPy stream capture (`Stream.begin_capture` / `end_capture`) and each
later step is one `Graph.launch`.

What a graph captures is addresses and launch parameters, so everything a step changes must live in memory
whose address does not change, and every host-side decision must be the same at every replay:

- Inputs: the pool's persistent step buffers (rawformer.memory.StepBuffers). `pool.prepare(...,
  pad_to=bucket, block_table_width=W)` lays a step out identically every time (tokens, positions, slots,
  cu_seqlens, context lengths, block tables at fixed offsets of one device buffer) and writes it with one
  host-to-device copy before the launch. The token and position arrays a graph reads are those views.
- Shapes: the batch is padded to a bucket of sequences (1, 2, 4, 8, 16, 32, 64, ...; padding entries have
  slot -1 and context 0: nothing written, nothing attended), one new token per sequence, W block-table
  columns (which also fixes rf.paged_attention's split-KV layout: it is chosen from W, not from the
  context lengths, which the kernels read from the device buffer).
- Intermediates and the logits: allocated during capture from a private CuPy memory pool that belongs to
  the graph and is used by nothing else, so no other allocation can take that memory between replays.
  The logits array (bucket, V) is the graph's output buffer: each replay overwrites it; read it before the
  next launch (stream order makes a read queued after the launch safe).
- Before capturing, the step runs once eagerly in the same private pool on the same stream: kernels get
  compiled and loaded, and the pool holds the blocks the capture will ask for. Running the step again is
  harmless: it rewrites the same K/V into the same slots.
- GEMMs: CuPy's cuBLAS wrappers refuse to run while a stream captures, so the models' projections go
  through rawformer.kernels.gemm.matmul (cublasGemmEx through a handle of our own, with a preallocated
  workspace). `gemm.prepare()` creates that handle and binds it to the capture stream before the
  warm-up; eager steps use the same call, so replays compute what eager steps compute. Nothing else in a
  decode step may call a CuPy cuBLAS routine (cupy.matmul / dot / einsum / linalg).

A graph is keyed by (bucket, W) and remembers the device addresses of the six input arrays. The tokens
view starts the pool's step buffer in every layout, so its address is the buffer's: when it changes (the
buffer grows when a larger step, e.g. a big prefill, does not fit), or a graph's own input addresses differ,
every graph is dropped and recaptured on its next use (`invalidations` counts it). The eager path
(`Generator(use_graphs=False)`) runs the same padded shapes, so both give the same tokens.

If a capture fails, DecodeGraphs.run raises GraphCaptureError (stats.error says why); the Generator warns
once and runs the rest of its decode steps eagerly (same tokens, slower), so a capture problem shows up in
the stats and the tests that count replays, not as a failed generation.

Capture needs a stream other than the legacy default stream: the Generator runs its GPU work on its own
non-blocking stream. RAWFORMER_DEBUG=1 (which synchronises around every launch) turns graphs off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_BUCKETS",
    "CupyCapture",
    "DecodeGraphs",
    "GraphCaptureError",
    "GraphStats",
    "bucket_for",
    "input_pointers",
]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INPUT_FIELDS = ("tokens", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "block_tables")


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None when n is larger than every bucket (the step then runs eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def _address(a: Any) -> int:
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy
    return int(ptr) if ptr is not None else int(a.ctypes.data)  # NumPy (the CPU test backend)


def input_pointers(batch: Any) -> tuple[int, ...]:
    """Device addresses of a step's input arrays (what a captured graph reads)."""
    return tuple(_address(getattr(batch, f)) for f in INPUT_FIELDS)


class CupyCapture:
    """Warm-up, stream capture and launch of one decode step with CuPy (see the module docstring)."""

    def __init__(self) -> None:
        from rawformer import backend

        self.cp = backend.require_cupy()

    def capture(self, step: Callable[[], Any]) -> tuple[Any, Any, Any]:
        """(graph, output array, private memory pool) of `step` captured on the current stream."""
        cp = self.cp
        stream = cp.cuda.get_current_stream()
        if stream.ptr in (0, cp.cuda.runtime.streamLegacy):
            raise RuntimeError(
                "CUDA graph capture needs a non-default stream: run the step inside `with cupy.cuda.Stream("
                "non_blocking=True):` (the Generator does)"
            )
        from rawformer.kernels import gemm

        gemm.prepare()  # cuBLAS handle + workspace bound to this stream: nothing of that during capture
        mempool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(mempool.malloc):
            step()  # warm-up: compile/load kernels, fill the private pool
            stream.begin_capture()
            try:
                out = step()
            except BaseException:
                try:
                    stream.end_capture()
                except Exception:  # an invalidated capture reports its own error: the first one matters
                    pass
                raise
            graph = stream.end_capture()
        return graph, out, mempool

    def launch(self, graph: Any) -> None:
        graph.launch(stream=self.cp.cuda.get_current_stream())

    def release(self, graph: Any, mempool: Any) -> None:
        """Drop a graph and its memory (after the stream has finished any launch of it)."""
        self.cp.cuda.get_current_stream().synchronize()
        del graph
        if mempool is not None:
            mempool.free_all_blocks()


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured as a CUDA graph (the step itself may still run eagerly)."""


@dataclass
class GraphStats:
    captures: int = 0  # graphs captured (each also ran one eager warm-up step)
    replays: int = 0  # Graph.launch calls
    invalidations: int = 0  # times the step buffers moved and every graph was dropped
    keys: list[tuple[int, int]] = field(default_factory=list)  # (bucket, width) of the graphs held now
    error: str | None = None  # why a capture failed (the Generator then runs its steps eagerly)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Captured:
    graph: Any
    output: Any
    mempool: Any
    pointers: tuple[int, ...]


class DecodeGraphs:
    """The captured decode steps of one model over one arena.

    Parameters
    ----------
    forward : callable(batch) -> logits (bucket, V): the eager step (model.forward(batch, arena))
    backend : how to capture and launch (default CupyCapture; tests on the CPU pass a stand-in)

    `run(batch)` replays the graph of the batch's (num_seqs, block-table width), capturing it on first use.
    The batch must come from `pool.prepare(..., pad_to=bucket, block_table_width=W)` with one new token per
    sequence. Returns the graph's logits buffer (valid until the next run). `run(batch, greedy=True)` runs
    a graph that also takes the argmax of every row and returns those token ids (bucket,) instead: a greedy
    step then copies a few bytes to the host instead of launching a reduction from Python.
    """

    def __init__(self, forward: Callable[[Any], Any], backend: Any = None) -> None:
        self.forward = forward
        self.backend = backend if backend is not None else CupyCapture()
        self._graphs: dict[tuple[int, int, bool], _Captured] = {}
        self._base: int | None = None
        self.stats = GraphStats()

    def _step(self, batch: Any, greedy: bool) -> Any:
        logits = self.forward(batch)
        return logits.argmax(axis=1) if greedy else logits

    def run(self, batch: Any, greedy: bool = False) -> Any:
        num_seqs = int(batch.context_lens.shape[0])
        if int(batch.tokens.shape[0]) != num_seqs:
            raise ValueError("DecodeGraphs.run: a graph step takes exactly one new token per sequence")
        key = (num_seqs, int(batch.block_tables.shape[1]), bool(greedy))
        ptrs = input_pointers(batch)
        cap = self._graphs.get(key)
        # tokens sit at the start of the pool's step buffer in every layout: a new address there means the
        # buffer moved (it grew), and every graph reads the old one
        moved = self._base is not None and ptrs[0] != self._base
        if moved or (cap is not None and cap.pointers != ptrs):
            if self._graphs:
                self.clear()
                self.stats.invalidations += 1
            cap = None
        self._base = ptrs[0]
        if cap is None:
            try:
                graph, out, mempool = self.backend.capture(lambda: self._step(batch, greedy))
            except Exception as exc:
                self.stats.error = f"capture of (bucket, width) {key[:2]} failed: {type(exc).__name__}: {exc}"
                raise GraphCaptureError(self.stats.error) from exc
            cap = _Captured(graph, out, mempool, ptrs)
            self._graphs[key] = cap
            self.stats.captures += 1
            self.stats.keys = sorted({k[:2] for k in self._graphs})
        self.backend.launch(cap.graph)
        self.stats.replays += 1
        return cap.output

    def clear(self) -> None:
        """Drop every graph (their memory goes back once the stream is done with them)."""
        graphs, self._graphs = self._graphs, {}
        for cap in graphs.values():
            self.backend.release(cap.graph, cap.mempool)
        self.stats.keys = []

    def __len__(self) -> int:
        return len(self._graphs)
