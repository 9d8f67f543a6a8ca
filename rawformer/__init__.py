"""rawformer: a transformer runtime whose hot paths are hand-written CUDA kernels.

    import rawformer as rf
    y = rf.softmax(x)          # x: NumPy, CuPy, or any DLPack / CUDA-array-interface array

Ops run where their input lives: CuPy arrays run the CUDA kernels (or the Numba ones with impl="numba"),
NumPy arrays run the float64 NumPy reference that sits beside each launcher.
"""

from rawformer import backend
from rawformer.loading import LoadedModel, load
from rawformer.ops import *  # noqa: F403  (the public ops)
from rawformer.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["backend", "__version__", "LoadedModel", "load", *_ops_all]
