"""What a device can hold at once: its limits (read once per device) and how many blocks of a compiled
kernel are resident per SM. Launchers size persistent and one-wave grids from these."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from rawformer import backend


@dataclass(frozen=True)
class DeviceLimits:
    sms: int
    compute_capability: int  # 90 for sm_90
    threads_per_sm: int
    regs_per_sm: int
    smem_per_sm: int
    smem_per_block_optin: int  # the most shared memory one block may opt in to


@functools.cache
def limits_of(device_id: int) -> DeviceLimits:
    """The limits of CUDA device `device_id`, read once."""
    cp = backend.require_cupy()
    dev = cp.cuda.Device(device_id)
    props = cp.cuda.runtime.getDeviceProperties(device_id)
    return DeviceLimits(
        sms=int(props["multiProcessorCount"]),
        compute_capability=int(dev.compute_capability),
        threads_per_sm=int(props["maxThreadsPerMultiProcessor"]),
        regs_per_sm=int(props["regsPerMultiprocessor"]),
        smem_per_sm=int(props["sharedMemPerMultiprocessor"]),
        smem_per_block_optin=int(props["sharedMemPerBlockOptin"]),
    )


def device_limits() -> DeviceLimits:
    """The limits of CuPy's current device."""
    return limits_of(backend.require_cupy().cuda.Device().id)


def resident_blocks(kernel: Any, threads: int, shared_mem: int, limits: DeviceLimits) -> int:
    """How many blocks of `kernel` (a compiled RawKernel) fit on one SM at once, at least 1.

    Registers are allocated per warp in units of 256, from four equal SM sub-partitions; each block also
    reserves 1 KB of shared memory for the system.
    """
    try:
        regs = int(kernel.num_regs)
    except Exception:  # an attribute query failing must not stop the launch: assume a heavy kernel
        regs = 128
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 4 * ((limits.regs_per_sm // 4) // regs_per_warp) // warps
    by_threads = limits.threads_per_sm // threads
    by_smem = limits.smem_per_sm // (shared_mem + 1024)
    return max(1, min(by_regs, by_threads, by_smem, 32))
