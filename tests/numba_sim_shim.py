"""Warp shuffles for the Numba CUDA simulator (test-side only).

The simulator (NUMBA_ENABLE_CUDASIM=1) runs each CUDA thread as a Python thread and implements
`cuda.syncthreads()` as a barrier over the block's live threads, but it has no `shfl_*_sync`. Our kernels call
`shfl_xor_sync` uniformly (every thread of a block, the same number of times), so a shuffle can be built from
two barriers: publish the value in a per-block table, wait, read the partner's entry, wait again (so no one
overwrites its entry before its partner has read it).

`install()` adds the method to the simulator's fake `cuda` module class (the object kernels see as `cuda`
while they run). Import this module only in a process started with NUMBA_ENABLE_CUDASIM=1.
"""

from __future__ import annotations

import threading

_TABLE = "_rawformer_shfl_values"


def _shfl_xor_sync(self, mask, value, lane_mask):
    thread = threading.current_thread()
    table = thread._manager.__dict__.setdefault(_TABLE, {})  # one table per block (BlockManager)
    table[thread.thread_id] = value
    thread.syncthreads()
    partner = thread.thread_id ^ int(lane_mask)  # lane_mask < 32: the partner is in the same warp
    result = table[partner]
    thread.syncthreads()
    return result


def install() -> None:
    from numba.cuda.core import config

    if not config.ENABLE_CUDASIM:
        raise RuntimeError("the shuffle shim is for the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 first")
    from numba.cuda.simulator import kernelapi

    kernelapi.FakeCUDAModule.shfl_xor_sync = _shfl_xor_sync
