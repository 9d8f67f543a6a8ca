"""Reading .safetensors files: headers first, tensors on demand, through a read-only memory map.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64 N, then N bytes of JSON
    {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
then the data; offsets are relative to the first byte after the header, tensors are C-order little-endian.

We read it ourselves rather than through the `safetensors` package because its NumPy backend cannot return
BF16 tensors (NumPy has no bfloat16), and Llama checkpoints are BF16. Here a BF16 tensor is widened exactly to
float32 (its 16 bits are the top half of a float32). Every header is checked before any tensor is read:
offsets inside the file, sizes matching shape x dtype. Files written by the `safetensors` package (the "hf"
extra, used by the tests) read back bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["DTYPES", "SafetensorsError", "SafetensorsFile", "read_safetensors"]

# safetensors dtype name -> NumPy dtype as stored (BF16 is read as its raw uint16 bits, then widened)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


class SafetensorsError(ValueError):
    """A malformed or unsupported .safetensors file (the message names the file and the tensor)."""


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked at construction, tensors read by `get`.

    Parameters
    ----------
    path : the file
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: too short for a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{self.path}: header length {n} does not fit the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dt, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {e!r}"
                ) from None
            if dt not in DTYPES:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has dtype {dt}, which we do not read "
                    f"(known: {', '.join(DTYPES)})"
                )
            nbytes = math.prod(shape) * DTYPES[dt].itemsize
            if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ({dt} {list(shape)}, {nbytes} bytes) has data offsets "
                    f"[{begin}, {end}] outside the {data_size} data bytes or of the wrong size"
                )
            self._entries[name] = (dt, shape, int(begin), int(end))
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> str:
        """The stored dtype name ("F16", "BF16", ...)."""
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array: a read-only view of the file's memory map (BF16: a float32 copy)."""
        dt, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype=np.float32 if dt == "BF16" else DTYPES[dt])
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + begin : self._data_start + end]
        a = np.ndarray(shape, dtype=DTYPES[dt], buffer=raw)
        if dt == "BF16":  # bfloat16 = the high 16 bits of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, name -> NumPy array (views of a memory map; BF16 as float32)."""
    f = SafetensorsFile(path)
    return {name: f.get(name) for name in f.keys()}
