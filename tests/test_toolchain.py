"""The kernel toolchain's host-side rules: specialisation helpers, family registry, launch argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import rawformer  # noqa: F401  (registers the kernel families)
from rawformer.kernels import modules, occupancy, specialize
from rawformer.kernels.launch import i32, launch


def _at(ptr: int) -> SimpleNamespace:
    """A stand-in device array: only its address matters to the vector-width rule."""
    return SimpleNamespace(data=SimpleNamespace(ptr=ptr))


def test_vector_width_rule():
    assert specialize.vector_width(np.float16, [_at(0), _at(256), _at(4096)], 4096) == 8
    assert specialize.vector_width(np.float32, [_at(0), _at(256)], 12) == 4
    assert specialize.vector_width(np.float16, [_at(0), _at(256)], 12) == 1  # a row is not whole vectors
    assert specialize.vector_width(np.float16, [_at(0), None], None) == 8  # None skipped, any length
    assert specialize.vector_width(np.float32, [_at(0), _at(260)], None) == 1  # a misaligned pointer
    assert specialize.full_vector_width(np.float16) == 8 and specialize.full_vector_width(np.float32) == 4


def test_small_helpers():
    assert [specialize.next_pow2(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert specialize.cpp_bool(True) == "true" and specialize.cpp_bool(False) == "false"


def test_cuda_type_names():
    assert modules.cuda_type(np.float16) == "__half"
    assert modules.cuda_type("float32") == "float"
    with pytest.raises(TypeError, match="int32"):
        modules.cuda_type(np.int32)


def test_registry_refuses_unknown_sources():
    with pytest.raises(FileNotFoundError, match="no_such_family"):
        modules.register_family("no_such_family", lambda: [])


def test_sources_ship_with_the_package():
    names = {p.name for p in modules.source_dir().iterdir()}
    assert {"common.cuh", "softmax.cu", "norms.cu", "activations.cu"} <= names


def test_launch_refuses_untyped_scalars():
    kernel = SimpleNamespace(name="k")
    with pytest.raises(TypeError, match="NumPy scalars"):
        launch(kernel, (1,), (32,), (3,))
    with pytest.raises(OverflowError):
        i32(2**31)
    assert i32(-5) == np.int32(-5)


H100 = occupancy.DeviceLimits(
    sms=132,
    compute_capability=90,
    threads_per_sm=2048,
    regs_per_sm=65536,
    smem_per_sm=233472,
    smem_per_block_optin=232448,
)


def test_resident_blocks():
    def kernel(regs):
        return SimpleNamespace(num_regs=regs)

    assert occupancy.resident_blocks(kernel(32), 256, 0, H100) == 8  # thread bound
    assert occupancy.resident_blocks(kernel(80), 256, 8192, H100) == 3
    assert occupancy.resident_blocks(kernel(128), 256, 0, H100) == 2  # register bound
    assert occupancy.resident_blocks(kernel(32), 256, 100_000, H100) == 2  # shared memory bound
    assert occupancy.resident_blocks(kernel(64), 1024, 200_000, H100) == 1
    assert occupancy.resident_blocks(object(), 128, 0, H100) >= 1  # no attribute: a safe guess
