"""Reverse-mode autograd over rawformer ops: a Tensor wrapping a NumPy or CuPy array, a graph, backward().

    from rawformer import autograd as ag
    w = ag.Tensor(weights, requires_grad=True)          # a leaf (parameter)
    loss = ag.cross_entropy(ag.linear(x, w), targets)   # every op records its node
    loss.backward()                                     # w.grad: d loss / d w, w's shape and dtype

Every op here runs a fused rawformer op forward and its hand-written backward (the `*_backward` ops and
cuBLAS GEMMs); NumPy arrays run the float64 references, CuPy arrays the kernels, exactly as `rf.*` does.

The graph. An op whose inputs need gradients records a Node (its input Tensors and a closure that maps the
gradients of its outputs to those of its inputs; the closure holds whatever the backward needs: inputs,
outputs, saved statistics). `backward()` orders the nodes reachable from the root (the tape of this graph,
reverse topological order), runs each closure once with the summed gradients of its outputs, and frees the
node as soon as it ran, so activation memory falls as the backward proceeds. Gradients reach leaves (Tensors
with requires_grad and no node, i.e. parameters) in `.grad`, summed over uses and over backward calls
(gradient accumulation) until the caller clears them (`t.grad = None`).

Gradients between nodes are never written in place: an op may pass its incoming gradient through (add,
reshape), so several nodes can hold one array. A leaf that would receive such a shared array gets a copy;
afterwards its `.grad` is its own and later contributions add into it in place.

Grad-ready hooks (data parallel): `t.register_grad_ready_hook(fn)` calls `fn(t)` inside backward() as
soon as every use of `t` in this graph has contributed, i.e. `t.grad` is final for this backward call.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import rawformer as rf
from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels.gemm import matmul as _gemm

__all__ = [
    "Tensor",
    "add",
    "attention",
    "cross_entropy",
    "embedding",
    "enable_grad",
    "gelu",
    "is_grad_enabled",
    "layer_norm",
    "linear",
    "log_softmax",
    "matmul",
    "mean",
    "mul",
    "no_grad",
    "reshape",
    "rms_norm",
    "rope",
    "softmax",
    "split",
    "sum",
    "swiglu",
]

_GRAD_ENABLED = True


def is_grad_enabled() -> bool:
    """Whether ops record the graph now (False inside `no_grad()`)."""
    return _GRAD_ENABLED


@contextlib.contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    global _GRAD_ENABLED
    before = _GRAD_ENABLED
    _GRAD_ENABLED = enabled
    try:
        yield
    finally:
        _GRAD_ENABLED = before


def no_grad() -> contextlib.AbstractContextManager[None]:
    """Context in which ops record nothing (evaluation, optimizer updates): outputs need no gradient."""
    return _grad_mode(False)


def enable_grad() -> contextlib.AbstractContextManager[None]:
    """Context that turns recording back on inside a `no_grad()` block."""
    return _grad_mode(True)


class _Node:
    """One recorded op: where its inputs' gradients go, how many outputs it made, its backward closure.

    `edges` has one entry per input: None (no gradient wanted), the input Tensor itself when it is a leaf
    (a parameter), or (producer node, output index) for an intermediate. Intermediates are not referenced,
    so an activation no backward needs is freed after the forward. `backward(grads)` takes the gradient of
    each output (one array for a one-output op, else a tuple with None for an output nothing depended on)
    and returns one gradient (or None) per input."""

    __slots__ = ("edges", "n_out", "backward", "name")

    def __init__(self, edges: tuple[Any, ...], n_out: int, backward: Callable, name: str) -> None:
        self.edges = edges
        self.n_out = n_out
        self.backward: Callable | None = backward
        self.name = name


class Tensor:
    """An array (NumPy or CuPy) with an optional gradient.

    Parameters
    ----------
    data : numpy.ndarray or cupy.ndarray (any DLPack / CUDA-array-interface array is viewed as one)
    requires_grad : a leaf that collects gradients in `.grad`
    name : optional label (parameters carry their weight name)
    """

    __slots__ = ("data", "grad", "requires_grad", "name", "_node", "_index", "_hooks", "_grad_owned")

    def __init__(self, data: Any, requires_grad: bool = False, name: str | None = None) -> None:
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data): data is already a Tensor; use .data or .detach()")
        self.data, _ = adopt(data, "data")
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)
        self.name = name
        self._node: _Node | None = None
        self._index = 0
        self._hooks: list[Callable[[Tensor], None]] = []
        self._grad_owned = False

    # ---- array-like surface ----
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def xp(self) -> Any:
        """numpy or cupy, whichever holds the data."""
        return backend.array_module(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def numpy(self) -> np.ndarray:
        """A host copy of the data."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        """The value of a one-element tensor as a Python float (a device sync on the GPU)."""
        if self.size != 1:
            raise ValueError(f"item() needs a one-element tensor, this one has shape {self.shape}")
        return float(backend.to_numpy(self.data).reshape(()))

    def detach(self) -> Tensor:
        """The same data, outside the graph."""
        return Tensor(self.data)

    def __repr__(self) -> str:
        where = "cuda" if backend.is_cupy(self.data) else "cpu"
        extra = ", requires_grad=True" if self.requires_grad else ""
        label = f", name={self.name!r}" if self.name else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={where}{extra}{label})"

    def __add__(self, other: Tensor) -> Tensor:
        return add(self, other)

    def __mul__(self, c: float) -> Tensor:
        return mul(self, c)

    __rmul__ = __mul__

    def reshape(self, *shape: Any) -> Tensor:
        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)

    # ---- gradients ----
    def register_grad_ready_hook(self, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        """Call `fn(self)` inside backward() once `self.grad` is final for that backward call.

        Only for leaves that require grad. Returns a function that removes the hook. The hook may
        all-reduce `self.grad` in place or replace it with an array of the same shape and dtype; later
        accumulation adds into whatever `self.grad` is then. A backward in which this tensor receives no
        gradient does not call the hook."""
        if not self.requires_grad or not self.is_leaf:
            raise ValueError("grad-ready hooks go on leaf tensors with requires_grad=True (parameters)")
        if not callable(fn):
            raise TypeError(f"hook must be callable, got {type(fn).__name__}")
        self._hooks.append(fn)

        def remove() -> None:
            if fn in self._hooks:
                self._hooks.remove(fn)

        return remove

    def use_grad_buffer(self, buffer: Any, *, keep: bool = True) -> None:
        """Make `buffer` the storage of this leaf's gradient: `.grad` becomes `buffer`, and later backward
        calls add into it in place for as long as `.grad` is that array.

        Data parallel uses it to hand out views of its flat all-reduce buckets (PyTorch DDP's
        gradient_as_bucket_view): backward then writes the gradients where they are reduced, with no copy
        into the bucket and none back. Setting `.grad = None` (optimizer.zero_grad) detaches the buffer;
        the next backward then allocates a fresh gradient unless the buffer is attached again.

        Parameters
        ----------
        buffer : array of this tensor's shape and dtype, of the same kind (NumPy / CuPy) as `.data`, sharing
            no memory with it; typically a reshaped slice of a larger flat buffer
        keep : True: `buffer` receives the current gradient (a copy of `.grad`, zeros when it is None), so
            nothing accumulated so far is lost. False: `buffer` is taken as it is (the caller has already
            zeroed it, e.g. a whole bucket with one memset instead of one fill per parameter)
        """
        if not self.requires_grad or not self.is_leaf:
            raise ValueError("use_grad_buffer: only leaves with requires_grad=True (parameters) have .grad")
        if backend.is_cupy(buffer) != backend.is_cupy(self.data) or not hasattr(buffer, "dtype"):
            raise TypeError(
                f"use_grad_buffer: buffer must be a {type(self.data).__name__} like .data, "
                f"got {type(buffer).__name__}"
            )
        if tuple(buffer.shape) != self.shape or buffer.dtype != self.dtype:
            raise ValueError(
                f"use_grad_buffer: buffer is {tuple(buffer.shape)} {buffer.dtype}, expected {self.shape} "
                f"{self.dtype}"
            )
        if _may_share(buffer, self.data):
            raise ValueError("use_grad_buffer: buffer overlaps .data (backward would overwrite the weights)")
        if keep and self.grad is not buffer:
            if self.grad is None:
                buffer.fill(0)
            elif tuple(self.grad.shape) != self.shape:
                raise ValueError(f"use_grad_buffer: .grad is {tuple(self.grad.shape)}, expected {self.shape}")
            else:
                buffer[...] = self.grad
        self.grad = buffer
        self._grad_owned = True

    def backward(self, grad: Any = None) -> None:
        """Accumulate d self / d leaf into the `.grad` of every leaf that requires grad.

        Parameters
        ----------
        grad : the gradient of some scalar with respect to this tensor: an array of its shape, or a Python
            number (a scalar tensor's seed, e.g. a loss scale; default 1.0 for a one-element tensor)
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad (no parameter led to it)")
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward(): give grad for a non-scalar tensor of shape {self.shape}")
            grad = 1.0
        elif not isinstance(grad, (int, float)):
            grad, _ = adopt(grad, "grad")
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward(): grad has shape {tuple(grad.shape)}, expected {self.shape}")
        _run_backward(self, grad)


# ---- the engine --------------------------------------------------------------------------------------------


def _topo_order(root: _Node) -> list[_Node]:
    """Nodes reachable from `root`, every node after all nodes that consume its outputs (reverse topological
    order). Iterative DFS: graphs of deep models exceed Python's recursion limit."""
    post: list[_Node] = []
    seen = {id(root)}
    stack: list[tuple[_Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        if node.backward is None:
            raise RuntimeError(f"backward(): the graph through {node.name} was already freed by a backward")
        edges = node.edges
        while i < len(edges):
            e = edges[i]
            i += 1
            if isinstance(e, tuple) and id(e[0]) not in seen:
                seen.add(id(e[0]))
                stack.append((node, i))
                stack.append((e[0], 0))
                break
        else:
            post.append(node)
    post.reverse()
    return post


def _may_share(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return False
    return bool(backend.array_module(a).may_share_memory(a, b))


def _accumulate_leaf(t: Tensor, g: Any, shared: bool) -> None:
    if isinstance(g, (int, float)):  # the seed of a scalar leaf
        g, shared = t.xp.full(t.shape, g, dtype=t.dtype), False
    if g.dtype != t.dtype:
        g = g.astype(t.dtype)
        shared = False
    if t.grad is None:
        t.grad = g.copy() if shared else g
        t._grad_owned = True
    elif t._grad_owned and t.grad.shape == t.shape:
        t.grad += g  # in place: grads of parameters live across micro-steps
    else:  # a grad the caller put there (not ours to overwrite)
        t.grad = t.grad + g
        t._grad_owned = True


def _run_backward(root: Tensor, seed: Any) -> None:
    if root._node is None:  # a leaf: d root / d root
        _accumulate_leaf(root, seed, shared=True)
        for hook in list(root._hooks):
            hook(root)
        return
    order = _topo_order(root._node)
    pending: dict[int, int] = {}  # id(leaf) -> uses not yet back-propagated
    for node in order:
        for e in node.edges:
            if isinstance(e, Tensor):
                pending[id(e)] = pending.get(id(e), 0) + 1

    received: set[int] = set()  # leaves that got a gradient in this backward
    grads: dict[int, list[Any]] = {id(root._node): [None] * root._node.n_out}
    grads[id(root._node)][root._index] = seed
    for node in order:
        outs = grads.pop(id(node), None)
        fn, edges = node.backward, node.edges
        node.backward, node.edges = None, ()  # free what the closure saved as soon as it has run
        if outs is None or all(g is None for g in outs):
            in_grads: Sequence[Any] = (None,) * len(edges)
        else:
            assert fn is not None
            in_grads = fn(outs[0] if node.n_out == 1 else tuple(outs))
            if len(in_grads) != len(edges):
                raise RuntimeError(f"{node.name} backward returned {len(in_grads)} grads for {len(edges)}")
        for e, g in zip(edges, in_grads, strict=True):
            if e is None:
                continue
            if isinstance(e, Tensor):  # a leaf
                if g is not None:
                    _accumulate_leaf(e, g, shared=any(_may_share(g, o) for o in outs or () if o is not None))
                    received.add(id(e))
                pending[id(e)] -= 1
                if pending[id(e)] == 0 and id(e) in received:
                    for hook in list(e._hooks):
                        hook(e)
            elif g is not None:
                producer, index = e
                slot = grads.setdefault(id(producer), [None] * producer.n_out)
                prev = slot[index]
                slot[index] = g if prev is None else prev + g  # never in place: g may be shared


def _record(name: str, outputs: Sequence[Any], inputs: Sequence[Tensor | None], backward: Callable) -> Any:
    """Wrap op outputs as Tensors; record a node when grad mode is on and an input requires grad.

    Returns one Tensor for one output, else a tuple of Tensors."""
    needs = _GRAD_ENABLED and any(t is not None and t.requires_grad for t in inputs)
    node = None
    if needs:
        edges = tuple(
            None if t is None or not t.requires_grad else t if t._node is None else (t._node, t._index)
            for t in inputs
        )
        node = _Node(edges, len(outputs), backward, name)
    tensors = []
    for i, data in enumerate(outputs):
        if isinstance(data, np.generic):  # NumPy reductions of 0-d arrays give scalars
            data = np.asarray(data)
        out = Tensor(data, requires_grad=needs)
        out._node, out._index = node, i
        tensors.append(out)
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be an autograd Tensor, got {type(x).__name__}")


def _needs(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


_ONES: dict[tuple[Any, ...], Any] = {}


def _ones_row(xp: Any, n: int, dtype: Any) -> Any:
    """A cached (1, n) row of ones on the current device (the left operand of a column-sum GEMM)."""
    key = (n, np.dtype(dtype), xp.cuda.Device().id)
    row = _ONES.get(key)
    if row is None:
        if len(_ONES) > 64:
            _ONES.clear()
        row = _ONES[key] = xp.ones((1, n), dtype=dtype)
    return row


def _sum_rows(g: Any, dtype: Any) -> Any:
    """g summed over every axis but the last, accumulated in float32 (or float64), in `dtype`.

    On the GPU a GEMM with a row of ones (cuBLAS, fp32 accumulation): a column sum that reads g once,
    coalesced, where an axis-0 reduction kernel would stride across rows."""
    g2 = g.reshape(-1, g.shape[-1])
    if backend.is_cupy(g) and g2.shape[0] > 1:
        xp = backend.array_module(g)
        return _mm(_ones_row(xp, g2.shape[0], g.dtype), g2)[0].astype(dtype, copy=False)
    acc = np.float64 if g.dtype == np.float64 else np.float32
    return g2.sum(axis=0, dtype=acc).astype(dtype, copy=False)


def _unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum g down to `shape` (the inverse of NumPy broadcasting), in float32 or wider for float16."""
    if tuple(g.shape) == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    if lead > 0 and tuple(g.shape[lead:]) == tuple(shape) and backend.is_cupy(g):
        flat = g.reshape(-1, math.prod(shape))  # (leading, rest): a column sum (position embeddings)
        return _sum_rows(flat, g.dtype).reshape(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    acc = np.float64 if g.dtype == np.float64 else np.float32
    return g.sum(axis=axes, dtype=acc).reshape(shape).astype(g.dtype, copy=False)


def _mm(a: Any, b: Any) -> Any:
    """a @ b for 2-D arrays: cuBLAS (fp32 accumulation) on the GPU, NumPy on the CPU."""
    return _gemm(a, b)


# ---- shape ops ---------------------------------------------------------------------------------------------


def reshape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """A view of x with another shape (x must be C-contiguous where the view needs it)."""
    x = _tensor(x, "x")
    shape = tuple(int(s) for s in shape)
    y = x.data.reshape(shape)
    before = x.shape
    return _record("reshape", [y], [x], lambda g: (g.reshape(before),))


def split(x: Tensor, sections: int, axis: int = -1) -> tuple[Tensor, ...]:
    """`sections` equal views of x along `axis` (e.g. q | k | v of a packed projection).

    Backward writes the pieces' gradients into one array of x's shape (zeros for a piece without one)."""
    x = _tensor(x, "x")
    axis = axis % x.ndim
    n = x.shape[axis]
    if n % sections:
        raise ValueError(f"split: axis {axis} of length {n} does not split into {sections} equal parts")
    w = n // sections
    index = [slice(None)] * x.ndim
    views = []
    for i in range(sections):
        index[axis] = slice(i * w, (i + 1) * w)
        views.append(x.data[tuple(index)])

    def backward(gs: tuple[Any, ...]) -> tuple[Any]:
        gx = x.xp.empty(x.shape, dtype=x.dtype)
        for i, g in enumerate(gs):
            index[axis] = slice(i * w, (i + 1) * w)
            gx[tuple(index)] = 0 if g is None else g
        return (gx,)

    out = _record("split", views, [x], backward)
    return out if isinstance(out, tuple) else (out,)


# ---- elementwise -------------------------------------------------------------------------------------------


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b with NumPy broadcasting (residual adds, position embeddings)."""
    a, b = _tensor(a, "a"), _tensor(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"add: a is {a.dtype} but b is {b.dtype}")
    y = a.data + b.data
    # the closure keeps shapes only: an add's inputs need not outlive the forward on its account
    shape_a, shape_b, need_a, need_b = a.shape, b.shape, _needs(a), _needs(b)

    def backward(g: Any) -> tuple[Any, Any]:
        return (
            _unbroadcast(g, shape_a) if need_a else None,
            _unbroadcast(g, shape_b) if need_b else None,
        )

    return _record("add", [y], [a, b], backward)


def mul(x: Tensor, c: float) -> Tensor:
    """x * c for a Python number c."""
    x = _tensor(x, "x")
    c = float(c)
    y = x.data * x.dtype.type(c)
    return _record("mul", [y], [x], lambda g: (g * c if isinstance(g, float) else g * g.dtype.type(c),))


def sum(x: Tensor) -> Tensor:  # noqa: A001  (the op's natural name; builtins.sum is not used here)
    """Sum of every element (accumulated in float32 or wider), a 0-d Tensor of x's dtype."""
    x = _tensor(x, "x")
    acc = np.float64 if x.dtype == np.float64 else np.float32
    y = x.xp.asarray(x.data.sum(dtype=acc)).astype(x.dtype)

    def backward(g: Any) -> tuple[Any]:
        gx = x.xp.empty(x.shape, dtype=x.dtype)
        gx[...] = g
        return (gx,)

    return _record("sum", [y], [x], backward)


def mean(x: Tensor) -> Tensor:
    """Mean of every element, a 0-d Tensor."""
    return mul(sum(x), 1.0 / max(x.size, 1))


# ---- GEMMs -------------------------------------------------------------------------------------------------


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D tensors. da = g @ b^T, db = a^T @ g (cuBLAS reads the transposed views in place)."""
    a, b = _tensor(a, "a"), _tensor(b, "b")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: a and b must be 2-D, got {a.shape} and {b.shape}")
    y = _mm(a.data, b.data)

    def backward(g: Any) -> tuple[Any, Any]:
        return (_mm(g, b.data.T) if _needs(a) else None, _mm(a.data.T, g) if _needs(b) else None)

    return _record("matmul", [y], [a, b], backward)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, transposed: bool = False) -> Tensor:
    """y = x @ W + b over the last axis of x.

    Parameters
    ----------
    x : (..., in)
    weight : (in, out) (GPT-2's Conv1D layout), or (out, in) with transposed=True (nn.Linear layout, and
        the tied lm head read from the (vocab, hidden) token embedding)
    bias : None or (out,)

    Gradients: dx = g W^T, dW = x^T g (or g^T x when transposed), db = g summed over rows (fp32 sums).
    """
    x, weight = _tensor(x, "x"), _tensor(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D, got shape {weight.shape}")
    n_in = weight.shape[1] if transposed else weight.shape[0]
    if x.shape[-1] != n_in:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight {weight.shape} takes {n_in}")
    w = weight.data.T if transposed else weight.data  # (in, out), a view
    lead = x.shape[:-1]
    x2 = x.data.reshape(-1, n_in)
    y = _mm(x2, w)
    if bias is not None:
        y += bias.data
    y = y.reshape(*lead, w.shape[1])

    def backward(g: Any) -> tuple[Any, Any, Any]:
        g2 = g.reshape(-1, w.shape[1])
        dx = _mm(g2, w.T).reshape(x.shape) if _needs(x) else None
        dw = None
        if _needs(weight):
            dw = _mm(g2.T, x2) if transposed else _mm(x2.T, g2)
        db = _sum_rows(g2, bias.dtype) if _needs(bias) else None
        return dx, dw, db

    return _record("linear", [y], [x, weight, bias], backward)


# ---- embedding ---------------------------------------------------------------------------------------------


def _embedding_ops() -> Any:
    return importlib.import_module("rawformer.ops.embedding")


def embedding(weight: Tensor, ids: Any) -> Tensor:
    """Rows of `weight` (num, dim) picked by integer `ids` (any shape): (*ids.shape, dim).

    The backward is a scatter-add of the output gradient into a float32 (num, dim) buffer
    (rf.embedding_backward), cast to the weight's dtype."""
    weight = _tensor(weight, "weight")
    ids = ids.data if isinstance(ids, Tensor) else ids
    ops = _embedding_ops()
    y = ops.embedding(weight.data, ids)

    def backward(g: Any) -> tuple[Any]:
        dw = ops.embedding_backward(ids, g, weight.shape[0])
        return (dw.astype(weight.dtype, copy=False),)

    return _record("embedding", [y], [weight], backward)


# ---- normalisation and activations -------------------------------------------------------------------------


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """softmax along `axis`; dx = y * (g - sum(g * y)) (rf.softmax_backward)."""
    x = _tensor(x, "x")
    y = rf.softmax(x.data, axis)
    return _record("softmax", [y], [x], lambda g: (rf.softmax_backward(g, y, axis),))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log_softmax along `axis`; dx = g - exp(y) sum(g) (rf.log_softmax_backward)."""
    x = _tensor(x, "x")
    y = rf.log_softmax(x.data, axis)
    return _record("log_softmax", [y], [x], lambda g: (rf.log_softmax_backward(g, y, axis),))


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Layer norm over the last axis (rf.layer_norm; backward rf.layer_norm_backward from saved mean/rstd)."""
    x = _tensor(x, "x")
    w = None if weight is None else weight.data
    b = None if bias is None else bias.data
    y, mu, rstd = rf.layer_norm(x.data, w, b, eps, return_stats=True)

    def backward(g: Any) -> tuple[Any, Any, Any]:
        dx, dw, db = rf.layer_norm_backward(g, x.data, w, mu, rstd, has_bias=b is not None)
        return dx, dw, db

    return _record("layer_norm", [y], [x, weight, bias], backward)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMS norm over the last axis (rf.rms_norm; backward rf.rms_norm_backward from the saved rstd)."""
    x = _tensor(x, "x")
    w = None if weight is None else weight.data
    y, rstd = rf.rms_norm(x.data, w, eps, return_stats=True)

    def backward(g: Any) -> tuple[Any, Any]:
        dx, dw = rf.rms_norm_backward(g, x.data, w, rstd)
        return dx, dw

    return _record("rms_norm", [y], [x, weight], backward)


def gelu(x: Tensor, bias: Tensor | None = None, approximate: str = "tanh") -> Tensor:
    """gelu(x + bias) (bias fused, as after a bias-free GEMM); backward rf.gelu_backward gives dx, dbias."""
    x = _tensor(x, "x")
    b = None if bias is None else bias.data
    y = rf.gelu(x.data, b, approximate=approximate)

    def backward(g: Any) -> tuple[Any, Any]:
        return rf.gelu_backward(g, x.data, b, approximate=approximate)

    return _record("gelu", [y], [x, bias], backward)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; backward rf.swiglu_backward."""
    gate, up = _tensor(gate, "gate"), _tensor(up, "up")
    y = rf.swiglu(gate.data, up.data)
    return _record("swiglu", [y], [gate, up], lambda g: rf.swiglu_backward(g, gate.data, up.data))


def rope(x: Tensor, positions: Any, inv_freq: Any, *, style: str = "neox") -> Tensor:
    """Rotary embedding of x (batch, seq, heads, D) at `positions` (seq,) with frequencies inv_freq (D/2,)
    (rf.rope, NeoX halves by default). A rotation by theta is undone by one by -theta, and the transpose of
    a rotation is its inverse: the backward is rf.rope with -inv_freq."""
    x = _tensor(x, "x")
    if x.ndim != 4:
        raise ValueError(f"rope: x must be (batch, seq, heads, head_dim), got shape {x.shape}")
    b, t, h, d = x.shape
    xp = x.xp
    pos = xp.tile(xp.asarray(positions), b)  # (B T,): rf.rope takes token rows
    freq = xp.asarray(inv_freq, dtype=np.float32)
    y = rf.rope(x.data.reshape(b * t, h, d), pos, inv_freq=freq, style=style).reshape(x.shape)
    shape = x.shape  # the closure keeps no activation

    def backward(g: Any) -> tuple[Any]:
        return (rf.rope(g.reshape(b * t, h, d), pos, inv_freq=-freq, style=style).reshape(shape),)

    return _record("rope", [y], [x], backward)


# ---- attention ---------------------------------------------------------------------------------------------


def _attention_backward_op() -> Any:
    return importlib.import_module("rawformer.ops.attention_backward").attention_backward


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Fused attention, (batch, seq, heads, D) layouts (rf.attention); out like q.

    The forward keeps its output and log-sum-exp; the backward (rf.attention_backward, FlashAttention-2
    style) recomputes the scores tile by tile from them, so no (seq x seq) array is ever stored."""
    q, k, v = _tensor(q, "q"), _tensor(k, "k"), _tensor(v, "v")
    out, lse = rf.attention(q.data, k.data, v.data, causal=causal, scale=scale, return_lse=True)

    def backward(g: Any) -> tuple[Any, Any, Any]:
        dq, dk, dv = _attention_backward_op()(q.data, k.data, v.data, out, g, lse, causal=causal, scale=scale)
        return dq, dk, dv

    return _record("attention", [out], [q, k, v], backward)


# ---- loss --------------------------------------------------------------------------------------------------


def _loss_ops() -> Any:
    return importlib.import_module("rawformer.ops.loss")


def cross_entropy(
    logits: Tensor,
    targets: Any,
    *,
    ignore_index: int = -100,
    grad_scale: float = 1.0,
    inplace: bool = False,
    count: int | None = None,
) -> Tensor:
    """Mean cross-entropy of (N, V) logits against int targets (N,); a 0-d float32 Tensor.

        loss = mean over rows with target != ignore_index of (lse_i - logits[i, target_i])

    When the graph is recorded, rf.cross_entropy writes the gradient in the same pass as the loss
    (softmax - onehot, scaled), so the backward does no work when it receives the expected seed.

    Parameters
    ----------
    logits : (N, V) Tensor
    targets : int array (N,) (NumPy or CuPy, where logits live), or a Tensor of one
    ignore_index : target value of rows that count for nothing
    grad_scale : the seed backward will be called with (a loss scale, 1 / accumulation steps); the gradient
        is written pre-multiplied by it, a different seed costs one extra pass over the logits
    inplace : write the gradient over the logits' own buffer (they are dead after the loss: saves an
        (N, V) array). The logits Tensor's data is then garbage, so only for logits used nowhere else.
    count : the number of counted rows (targets != ignore_index) when the caller knows it (from host
        targets); else it is computed, one device-to-host sync on the GPU
    """
    logits = _tensor(logits, "logits")
    t = targets.data if isinstance(targets, Tensor) else targets
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, V), got shape {logits.shape}")
    xp = logits.xp
    if count is None:
        count = int((t != ignore_index).sum())
    denom = max(count, 1)
    record = _GRAD_ENABLED and logits.requires_grad
    dl = None
    if record:  # a leaf's data is its own (a parameter): never overwritten
        dl = logits.data if inplace and not logits.is_leaf else xp.empty_like(logits.data)
    rows, _ = _loss_ops().cross_entropy(
        logits.data, t, ignore_index=ignore_index, dlogits=dl, grad_scale=float(grad_scale) / denom
    )
    acc = np.float64 if rows.dtype == np.float64 else np.float32
    loss = (xp.asarray(rows.sum(dtype=acc)) / denom).astype(rows.dtype)
    expected = float(grad_scale)

    def backward(g: Any) -> tuple[Any]:
        if isinstance(g, (int, float)):
            if g == expected:
                return (dl,)
            return (dl * dl.dtype.type(g / expected),)
        return (dl * (g / expected).astype(dl.dtype),)

    return _record("cross_entropy", [loss], [logits], backward)
