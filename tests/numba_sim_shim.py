"""Warp shuffles and a faster block runner for the Numba CUDA simulator (test-side only).

The simulator (NUMBA_ENABLE_CUDASIM=1) runs each CUDA thread as a Python thread and implements
`cuda.syncthreads()` as a barrier over the block's live threads, but it has no `shfl_*_sync`. Our kernels call
`shfl_xor_sync` uniformly (every thread of a block, the same number of times), so a shuffle can be built from
two barriers: publish the value in a per-block table, wait, read the partner's entry, wait again (so no one
overwrites its entry before its partner has read it).

The simulator's own block runner finds a barrier complete by busy-polling every thread's flag in a Python loop
that competes with the threads for the GIL (about a second per 128-thread block with a few reductions). Our
kernels reach every barrier with every thread of the block (as CUDA requires), so the runner here gives each
block one `threading.Barrier` and joins the threads: ten times faster. It is also stricter: a barrier that
not every thread reaches times out and fails the test instead of passing with the live threads only. An
exception in one thread aborts the barrier, and the first real exception is re-raised.

`install()` adds the shuffle to the simulator's fake `cuda` module class (the object kernels see as `cuda`
while they run) and replaces `BlockManager.run`. Import this module only in a process started with
NUMBA_ENABLE_CUDASIM=1.
"""

from __future__ import annotations

import threading

import numpy as np

_TABLE = "_rawformer_shfl_values"
BARRIER_TIMEOUT_S = 120.0


def _shfl_xor_sync(self, mask, value, lane_mask):
    thread = threading.current_thread()
    table = thread._manager.__dict__.setdefault(_TABLE, {})  # one table per block (BlockManager)
    table[thread.thread_id] = value
    thread.syncthreads()
    partner = thread.thread_id ^ int(lane_mask)  # lane_mask < 32: the partner is in the same warp
    result = table[partner]
    thread.syncthreads()
    return result


def _run_block(self, grid_point, *args):
    """BlockManager.run: every thread of the block, one shared barrier, no polling."""
    from numba.cuda.simulator.kernel import BlockThread

    points = list(np.ndindex(*self._block_dim))
    barrier = threading.Barrier(len(points), timeout=BARRIER_TIMEOUT_S)

    def body():
        try:
            self._f(*args)
        except BaseException:
            barrier.abort()  # the others leave their barrier with BrokenBarrierError
            raise

    threads = []
    for point in points:
        thread = BlockThread(body, self, grid_point, point, self._debug)
        thread.syncthreads = barrier.wait
        threads.append(thread)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [t.exception for t in threads if t.exception]
    first = [e for e in errors if not isinstance(e[0], threading.BrokenBarrierError)] or errors
    if first:
        raise first[0][0].with_traceback(first[0][1])


def install() -> None:
    from numba.cuda.core import config

    if not config.ENABLE_CUDASIM:
        raise RuntimeError("the shuffle shim is for the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 first")
    from numba.cuda.simulator import kernel, kernelapi

    kernelapi.FakeCUDAModule.shfl_xor_sync = _shfl_xor_sync
    kernel.BlockManager.run = _run_block
