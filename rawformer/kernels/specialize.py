"""Choosing a template instantiation from the input: the small rules every launcher shares.

The launchers turn (dtype, row length, alignment) into compile-time template arguments; these helpers spell
the pieces the same way everywhere, so a name expression built by a launcher matches the one its family
registered for the compile check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

VECTOR_BYTES = 16  # the widest global access one thread makes (uint4 / float4)


def cpp_bool(flag: bool) -> str:
    """A template argument for a bool: "true" / "false"."""
    return "true" if flag else "false"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def full_vector_width(dtype: Any) -> int:
    """Elements in one 16-byte access of `dtype` (8 for float16, 4 for float32)."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def vector_width(dtype: Any, arrays: Iterable[Any], cols: int | None = None) -> int:
    """The vector width a kernel may use: 16 / itemsize when every array (None skipped) starts 16-byte
    aligned and, when `cols` is given, a row is a whole number of vectors; else 1 (scalar accesses)."""
    vw = full_vector_width(dtype)
    if cols is not None and cols % vw:
        return 1
    if any(a is not None and a.data.ptr % VECTOR_BYTES for a in arrays):
        return 1
    return vw
