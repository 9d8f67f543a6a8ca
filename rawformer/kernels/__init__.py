"""The kernel toolchain: CUDA sources in `cuda_src/` compiled per (device, template instantiation) with
CuPy's RawModule, launched with error reporting and optional debug timing; `numba/` holds the Numba CUDA
versions of the same ops."""

from rawformer.kernels.launch import launch
from rawformer.kernels.modules import cuda_type, get_function, register_family, registered_families

__all__ = ["cuda_type", "get_function", "launch", "register_family", "registered_families"]
