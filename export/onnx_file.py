"""Reading ONNX files safely: the graph, its tensors (inline or external data), checked before use.

    model = read_onnx("model.onnx")      # OnnxModel: nodes in topological order, initializers as arrays
    model.initializers["wte"]            # NumPy arrays (external data memory-mapped read-only)

What is checked, each failure an OnnxFileError (a ValueError) naming the file:
- the file is a regular file that parses as an ONNX ModelProto (a truncated or corrupt protobuf is caught);
- every tensor's declared size (dims x element size) equals the bytes it holds, inline or external;
- external data (the `location` of a tensor stored beside the model) stays inside the model's folder:
  absolute paths, `..` components and symbolic links leading out are refused, the file must exist, and
  offset + length must lie inside it. This is the path-traversal class of ONNX CVEs (a model that makes
  its reader open /etc/passwd or ../../secret). Nothing outside the folder is opened, not even to stat;
- every node input is produced by a node, a graph input or an initializer, and the graph has no cycle
  (the nodes are returned in a topological order, whatever order the file lists them in).
No pickle, no code execution: tensors are bytes reinterpreted with a fixed NumPy dtype. Model-local
functions are inlined with onnx.inliner.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

__all__ = ["ONNX_DTYPES", "OnnxFileError", "OnnxModel", "read_onnx", "require_onnx", "tensor_to_array"]


class OnnxFileError(ValueError):
    """An ONNX file that cannot be read safely: malformed, truncated, sizes that disagree, data outside."""


def require_onnx() -> Any:
    """The onnx package, or ImportError saying which extra installs it."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the test extra
        raise ImportError("reading ONNX files needs the onnx package: pip install 'rawformer[onnx]'") from e
    return onnx


# TensorProto.DataType -> NumPy dtype of the stored elements (BFLOAT16 is read as uint16 bits, then widened)
ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
    16: np.dtype(np.uint16),
}  # fmt: skip
BFLOAT16 = 16
# the typed repeated field holding a tensor's values when it has no raw_data
_FIELD = {1: "float_data", 11: "double_data", 7: "int64_data", 12: "uint64_data", 13: "uint64_data"}


@dataclass
class OnnxModel:
    """A checked ONNX model.

    path : the .onnx file
    proto : the onnx.ModelProto (external tensors are not loaded into it)
    nodes : the graph's NodeProtos in a topological order
    initializers : name -> NumPy array (read-only memory maps for external data)
    opsets : domain ("" = ai.onnx) -> opset version
    inputs : the graph inputs that are not initializers: name -> (elem_type, dims), a dim an int or a name
    outputs : the graph output names
    """

    path: Path
    proto: Any
    nodes: list[Any]
    initializers: dict[str, np.ndarray]
    opsets: dict[str, int]
    inputs: dict[str, tuple[int, list[int | str | None]]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent


def _check_location(location: str, folder: Path, file: Path, tensor: str) -> Path:
    """The resolved path of an external-data location, refused unless it stays inside `folder`."""
    where = f"{file}: tensor {tensor!r} has external data location {location!r}"
    if not location or "\x00" in location:
        raise OnnxFileError(f"{where}: an empty or NUL-containing path")
    if (
        PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or (PureWindowsPath(location).drive)
    ):
        raise OnnxFileError(f"{where}: absolute paths are refused (data must sit in the model's folder)")
    parts = PureWindowsPath(location).parts  # splits on / and \ alike
    if any(p == ".." for p in parts):
        raise OnnxFileError(f"{where}: '..' is refused (data must sit in the model's folder)")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, target]) != root:
        raise OnnxFileError(f"{where}: it leads out of the model's folder {root} (a symbolic link?)")
    try:
        st = os.stat(target)
    except OSError:
        raise OnnxFileError(f"{where}: no such file in {root}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxFileError(f"{where}: not a regular file")
    return Path(target)


def _external(t: Any, folder: Path, file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    target = _check_location(location, folder, file, t.name)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise OnnxFileError(
            f"{file}: tensor {t.name!r}: external data offset / length not integers"
        ) from None
    need = count * dtype.itemsize
    size = target.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise OnnxFileError(f"{file}: tensor {t.name!r}: negative external data offset / length")
    if length is not None and length != need:
        raise OnnxFileError(
            f"{file}: tensor {t.name!r} declares {length} bytes of external data in {location!r}, its "
            f"shape {list(t.dims)} needs {need}"
        )
    if offset + need > size:
        raise OnnxFileError(
            f"{file}: tensor {t.name!r} needs bytes [{offset}, {offset + need}) of {location!r}, which has "
            f"{size} (truncated?)"
        )
    if need == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(target, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def tensor_to_array(t: Any, folder: Path, file: Path) -> np.ndarray:
    """A TensorProto as a NumPy array, after checking its declared size against the bytes it holds.

    Inline tensors are copied out of the protobuf; external ones are memory-mapped read-only after the
    location and size checks of `_check_location` / `_external`. BFLOAT16 becomes float32."""
    name = t.name or "<unnamed>"
    if t.data_type not in ONNX_DTYPES:
        raise OnnxFileError(f"{file}: tensor {name!r} has unsupported data type {t.data_type}")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise OnnxFileError(f"{file}: tensor {name!r} has negative dims {dims}")
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    dtype = ONNX_DTYPES[t.data_type]
    if t.data_location == 1:  # EXTERNAL
        flat = _external(t, folder, file, dtype, count)
    elif t.HasField("raw_data"):
        if len(t.raw_data) != count * dtype.itemsize:
            raise OnnxFileError(
                f"{file}: tensor {name!r} holds {len(t.raw_data)} bytes, its shape {dims} and type need "
                f"{count * dtype.itemsize}"
            )
        flat = np.frombuffer(t.raw_data, dtype=dtype).copy()
    else:
        fld = _FIELD.get(t.data_type, "int32_data")  # the narrow ints, bool, float16 bits live in int32_data
        values = getattr(t, fld)
        if len(values) != count:
            raise OnnxFileError(
                f"{file}: tensor {name!r} holds {len(values)} values in {fld}, its shape {dims} needs {count}"
            )
        if t.data_type in (10, BFLOAT16):  # 16-bit floats stored as their bit patterns in int32_data
            flat = np.asarray(values, dtype=np.int32).astype(np.uint16).view(dtype)
        else:
            flat = np.asarray(values).astype(dtype)
    if t.data_type == BFLOAT16:
        flat = _bf16_to_f32(np.asarray(flat))
    return flat.reshape(dims)


def _dims(vi: Any) -> tuple[int, list[int | str | None]]:
    tt = vi.type.tensor_type
    dims: list[int | str | None] = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tt.elem_type, dims


def topological_order(nodes: list[Any], available: set[str], file: Path) -> list[Any]:
    """The nodes in an order where every node comes after the producers of its inputs (Kahn's algorithm).

    Raises OnnxFileError for an input nobody produces, a value produced twice, or a cycle (naming its
    nodes)."""
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if not o:
                continue
            if o in producer or o in available:
                raise OnnxFileError(f"{file}: value {o!r} is produced twice (node {n.name or n.op_type!r})")
            producer[o] = i
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for x in set(n.input):
            if not x or x in available:
                continue
            if x not in producer:
                raise OnnxFileError(
                    f"{file}: node {n.name or n.op_type!r} reads {x!r}, which no node, graph input or "
                    "initializer provides"
                )
            waiting[i] += 1
            users[producer[x]].append(i)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i, w in enumerate(waiting) if w > 0]
        raise OnnxFileError(
            f"{file}: the graph has a cycle through {len(stuck)} nodes: {', '.join(map(repr, stuck[:8]))}"
            f"{' ...' if len(stuck) > 8 else ''}"
        )
    return order


def read_onnx(path: str | os.PathLike) -> OnnxModel:
    """Read and check an ONNX file (see the module docstring for every check).

    Parameters
    ----------
    path : the .onnx file; external data files must sit in its folder

    Returns
    -------
    OnnxModel

    Raises
    ------
    FileNotFoundError : no such file
    OnnxFileError (a ValueError) : malformed / truncated protobuf, bad tensor sizes, external data outside
        the folder or missing, undefined inputs, a cycle
    """
    onnx = require_onnx()
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no ONNX file {file}")
    if not file.is_file():
        raise OnnxFileError(f"{file}: not a regular file")
    try:
        proto = onnx.load_model(str(file), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends: all mean "malformed")
        raise OnnxFileError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise OnnxFileError(f"{file}: no graph (or an empty one): truncated or not an ONNX model")
    if proto.functions:  # model-local functions (some exporters emit them): expand them into the graph
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as e:  # noqa: BLE001
            raise OnnxFileError(f"{file}: cannot inline its local functions ({e})") from None
    g = proto.graph
    folder = file.resolve().parent
    inits = {t.name: tensor_to_array(t, folder, file) for t in g.initializer}
    if g.sparse_initializer:
        raise OnnxFileError(f"{file}: sparse initializers are not supported")
    inputs = {vi.name: _dims(vi) for vi in g.input if vi.name not in inits}
    nodes = topological_order(list(g.node), set(inits) | set(inputs), file)
    produced = set(inits) | set(inputs) | {o for n in nodes for o in n.output}
    missing = [o.name for o in g.output if o.name not in produced]
    if missing:
        raise OnnxFileError(f"{file}: graph outputs {missing} are produced by no node")
    opsets = {(o.domain or ""): int(o.version) for o in proto.opset_import}
    if "ai.onnx" in opsets:
        opsets.setdefault("", opsets["ai.onnx"])
    return OnnxModel(file, proto, nodes, inits, opsets, inputs, [o.name for o in g.output])
