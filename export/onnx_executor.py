"""Run an ONNX graph node by node on rawformer ops (NumPy on the CPU, CuPy on the GPU).

    ex = OnnxExecutor("model.onnx")                      # or an OnnxModel from read_onnx
    out = ex.run({"input_ids": ids})                     # dict output name -> array
    ex = OnnxExecutor(path, device="gpu", dtype="float16", profile=True); ex.run(...); ex.profile_table()

Before anything runs, every node is checked against the op table (export/onnx_ops.py) and all the
unsupported ones are reported in one UnsupportedOpsError, each with its node name, domain and opset.

Shapes are dynamic: nothing is planned for a fixed shape. Each run checks the feeds against the graph's
declared inputs (rank, static dims, a symbolic dim such as "batch" equal across the inputs that share it)
and the nodes then compute with the actual shapes (Shape / Reshape / Expand ... read them as they come).
Values are dropped right after their last reader, so a run holds only the live activations.

Where arrays live: float initializers of 64+ elements (the weights) go to the device in the run dtype
once, at construction; small constants and all integer tensors stay NumPy on the host (shape arithmetic
never touches the GPU; see onnx_ops.py).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rawformer.export.onnx_file import OnnxModel, read_onnx, require_onnx, tensor_to_array
from rawformer.export.onnx_ops import OPS

from rawformer import backend

__all__ = ["MAX_OPSET", "Node", "OnnxExecutor", "UnsupportedOpsError", "default_feeds"]

MAX_OPSET = 23  # ai.onnx opsets whose semantics the table implements (newer ones are refused, not guessed)
WEIGHT_MIN_SIZE = 64  # float initializers this large are weights: moved to the device in the run dtype


class UnsupportedOpsError(NotImplementedError):
    """The graph holds ops the executor does not implement; `.nodes` lists (name, domain, op_type, opset)."""

    def __init__(self, file: Any, nodes: list[tuple[str, str, str, int, str]]) -> None:
        self.nodes = nodes
        kinds = sorted({(d or "ai.onnx", t, v) for _, d, t, v, _ in nodes})
        lines = [
            f"  {n!r}: {d or 'ai.onnx'}::{t} (opset {v}){' ' + why if why else ''}"
            for n, d, t, v, why in nodes
        ]
        super().__init__(
            f"{file}: {len(nodes)} node(s) use ops the executor does not support "
            f"({', '.join(f'{d}::{t}@{v}' for d, t, v in kinds)}):\n" + "\n".join(lines)
        )


@dataclass
class _Context:
    """What ops may need from the executor."""

    xp: Any
    dtype: np.dtype | None

    def to_device(self, a: np.ndarray) -> Any:
        return a if self.xp is np else self.xp.asarray(a)


@dataclass
class Node:
    """A node ready to run: its op function, attributes decoded to Python / NumPy, its domain's opset."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: Any
    ctx: _Context
    drop_after: list[str] = field(default_factory=list)  # values whose last reader this node is


def _attrs(proto: Any, model: OnnxModel) -> dict[str, Any]:
    onnx = require_onnx()
    out: dict[str, Any] = {}
    for a in proto.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = tensor_to_array(a.t, model.folder, model.path)
        elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = a  # only ops with subgraphs read these, and none is supported
        else:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            out[a.name] = v
    return out


def default_feeds(
    inputs: dict[str, tuple[int, list[int | str | None]]], input_ids: np.ndarray, given: dict[str, Any]
) -> dict[str, Any]:
    """Feeds for a transformer graph from token ids (B, S), for the inputs not `given`:
    attention_mask ones, token_type_ids zeros, position_ids 0..S-1, and an empty KV cache for
    past_key_values.* / past.* inputs (the first symbolic dim is the batch, other symbolic dims, the past
    length, are 0; static dims as declared), so files exported with a cache run as a whole-sequence forward.

    Raises ValueError naming an input it cannot fill."""
    from rawformer.export.onnx_file import ONNX_DTYPES

    b, s = input_ids.shape
    feeds = dict(given)
    for name, (elem, dims) in inputs.items():
        if name in feeds:
            continue
        if name == "input_ids":
            feeds[name] = input_ids
        elif name == "attention_mask":
            feeds[name] = np.ones((b, s), dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((b, s), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif name.startswith(("past_key_values", "past.", "past_")) and dims:
            shape, seen_batch = [], False
            for d in dims:
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif not seen_batch:
                    shape.append(b)
                    seen_batch = True
                else:
                    shape.append(0)
            feeds[name] = np.zeros(shape, dtype=ONNX_DTYPES.get(elem, np.dtype(np.float32)))
        else:
            raise ValueError(f"graph input {name!r} {dims}: no default for it; pass it explicitly")
    return feeds


def _device(device: str) -> Any:
    if device == "auto":
        return backend.cupy_module() or np
    if device in ("gpu", "cuda"):
        return backend.require_cupy()
    if device == "cpu":
        return np
    raise ValueError(f"OnnxExecutor: device must be 'auto', 'cpu' or 'gpu', got {device!r}")


class OnnxExecutor:
    """An ONNX graph run on rawformer ops.

    Parameters
    ----------
    model : path of a .onnx file, or an OnnxModel (read_onnx)
    device : "cpu", "gpu" or "auto" (the GPU when CuPy finds one)
    dtype : run dtype of the float weights and float inputs (float16 / float32; None: as stored; on the CPU
        float32 or float64). Small float constants keep their dtype; mixed float16 / float32 arithmetic
        runs in float32, products in float16
    profile : record the time of every node (with a device sync per node on the GPU): `timings`,
        `profile_table()`

    Raises
    ------
    UnsupportedOpsError : listing every node whose op (or opset) is not supported, before anything runs
    """

    def __init__(self, model: OnnxModel | str | os.PathLike, *, device: str = "cpu", dtype: Any = None,
                 profile: bool = False) -> None:  # fmt: skip
        self.model = model if isinstance(model, OnnxModel) else read_onnx(model)
        self.xp = _device(device)
        self.dtype = None if dtype is None else np.dtype(dtype)
        if self.dtype is not None and self.dtype.kind != "f":
            raise ValueError(f"OnnxExecutor: dtype must be a float dtype, got {self.dtype}")
        self.profile = profile
        self.timings: list[tuple[str, str, float]] = []
        ctx = _Context(self.xp, self.dtype)
        m = self.model
        bad: list[tuple[str, str, str, int, str]] = []
        self.nodes: list[Node] = []
        for i, p in enumerate(m.nodes):
            domain = "" if p.domain in ("", "ai.onnx") else p.domain
            opset = m.opsets.get(domain, 1 if domain else 0)
            name = p.name or f"{p.op_type}_{i}"
            entry = OPS.get((domain, p.op_type))
            why = ""
            if entry is None:
                why = ""
            elif opset < entry.min_opset:
                why = f"(supported from opset {entry.min_opset})"
            elif domain == "" and opset > MAX_OPSET:
                why = f"(opsets up to {MAX_OPSET} are supported)"
            if entry is None or why:
                bad.append((name, domain, p.op_type, opset, why))
                continue
            self.nodes.append(
                Node(
                    name, p.op_type, domain, list(p.input), list(p.output), _attrs(p, m), opset, entry.fn, ctx
                )
            )
        if bad:
            raise UnsupportedOpsError(m.path, bad)
        self.input_names = list(m.inputs)
        self.output_names = list(m.outputs)
        self.constants = {n: self._place(a) for n, a in m.initializers.items()}
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for x in n.inputs:
                if x:
                    last[x] = i
        keep = set(self.output_names) | set(self.constants)
        for x, i in last.items():
            if x not in keep:
                self.nodes[i].drop_after.append(x)

    def _place(self, a: np.ndarray) -> Any:
        """Weights (float, 64+ elements) to the device in the run dtype; everything else stays on the host."""
        if a.dtype.kind == "f" and a.size >= WEIGHT_MIN_SIZE:
            t = self.dtype or a.dtype
            if self.xp is not np and t == np.float64:
                t = np.dtype(np.float32)
            host = np.ascontiguousarray(a, dtype=t)
            return self.xp.asarray(host) if self.xp is not np else host
        return np.asarray(a)

    # ---- running -------------------------------------------------------------------------------------------

    def _check_feeds(self, feeds: dict[str, Any]) -> dict[str, Any]:
        from rawformer.export.onnx_file import ONNX_DTYPES

        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise ValueError(f"OnnxExecutor: unknown inputs {unknown}; the graph takes {self.input_names}")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"OnnxExecutor: missing inputs {missing}")
        sym: dict[str, tuple[int, str]] = {}
        out = {}
        for name in self.input_names:
            a = feeds[name]
            if not (isinstance(a, np.ndarray) or backend.is_cupy(a)):
                a = np.asarray(a)
            elem, dims = self.model.inputs[name]
            want = ONNX_DTYPES.get(elem)
            if want is not None:
                if want.kind in "iub" and a.dtype.kind not in "iub":
                    raise ValueError(f"OnnxExecutor: input {name!r} must be {want}, got {a.dtype}")
                if want.kind == "f":
                    want = self.dtype or want
                if a.dtype != want:
                    a = a.astype(want)
            if dims:
                if a.ndim != len(dims):
                    raise ValueError(
                        f"OnnxExecutor: input {name!r} has rank {a.ndim}, the graph declares {dims}"
                    )
                for i, (d, n) in enumerate(zip(dims, a.shape, strict=True)):
                    if isinstance(d, int) and d > 0 and d != n:
                        raise ValueError(
                            f"OnnxExecutor: input {name!r} dim {i} is {n}, the graph declares {d}"
                        )
                    if isinstance(d, str):
                        if d in sym and sym[d][0] != n:
                            raise ValueError(
                                f"OnnxExecutor: dim {d!r} is {sym[d][0]} in input {sym[d][1]!r} but {n} in "
                                f"{name!r}"
                            )
                        sym[d] = (n, name)
            if a.dtype.kind == "f" and self.xp is not np:
                a = self.xp.asarray(a)
            out[name] = a
        return out

    def run(self, feeds: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Run the graph. feeds / keyword arguments: input name -> array. Returns output name -> array
        (on the device for float outputs of a GPU run)."""
        env: dict[str, Any] = dict(self.constants)
        env.update(self._check_feeds({**(feeds or {}), **kw}))
        prof = self.profile
        if prof:
            self.timings = []
        sync = (lambda: self.xp.cuda.get_current_stream().synchronize()) if self.xp is not np else None
        for n in self.nodes:
            args = [env[x] if x else None for x in n.inputs]
            t0 = time.perf_counter() if prof else 0.0
            try:
                res = n.fn(n, *args)
            except Exception as e:
                if type(e) not in (ValueError, TypeError, NotImplementedError, IndexError):
                    raise
                shapes = [None if a is None else tuple(a.shape) for a in args]
                where = f"node {n.name!r} ({n.domain or 'ai.onnx'}::{n.op_type}) on inputs {shapes}"
                raise type(e)(f"{where}: {e}") from e
            if prof:
                if sync:
                    sync()
                self.timings.append((n.name, n.op_type, time.perf_counter() - t0))
            if not isinstance(res, tuple):
                res = (res,)
            for name, v in zip(n.outputs, res, strict=False):
                if name:
                    env[name] = v
            for x in n.drop_after:
                env.pop(x, None)
        return {o: env[o] for o in self.output_names}

    __call__ = run

    def profile_table(self) -> dict[str, tuple[int, float]]:
        """op_type -> (nodes, seconds) of the last profiled run."""
        agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for _, t, s in self.timings:
            agg[t][0] += 1
            agg[t][1] += s
        return {k: (int(v[0]), float(v[1])) for k, v in sorted(agg.items(), key=lambda kv: -kv[1][1])}
