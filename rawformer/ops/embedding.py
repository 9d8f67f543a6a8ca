"""Embedding lookup (a row gather) and its backward (a deterministic scatter-add of gradient rows).

Formulas, with weight W (V, H) and integer ids of any shape:

    out[i..., :] = W[ids[i...], :]                                  (ids.shape + (H,))
    dW[v, :]     = sum over positions p with ids[p] == v of dout[p, :]   (float32 (V, H); 0 for unused v)

Ids must lie in [0, V). On the CPU an id outside it raises ValueError; on the GPU (no host sync to check)
the forward writes NaN rows for them and the backward drops them.

Arrays run where they live: NumPy inputs run the float64 references; CuPy inputs run `cuda_src/embedding.cu`.
The backward is deterministic (bit-identical from run to run) without float atomics: the positions are sorted
by id (a key id * P + position, unique, so any sort gives one order), each run of equal ids becomes a segment,
and one thread block owns each segment's output row: it adds the segment's dout rows in position order, in
fp32, and writes dW[v] once. Rows of dW no id touches are zeroed beforehand (or left as they are with
accumulate=True). A very frequent id (e.g. a padding token) is summed by one block: still correct, slower.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.ops import _checks
from rawformer.ops._checks import adopt_optional

__all__ = ["embedding", "embedding_backward", "embedding_backward_ref", "embedding_ref"]

_FAMILY = "embedding"
_THREADS = 128  # columns per block pass (the forward loops over H in 16-byte vectors)


# ---- float64 references ----------------------------------------------------------------------------------


def embedding_ref(weight: Any, ids: Any) -> np.ndarray:
    """float64 W[ids] of shape ids.shape + (H,)."""
    return _checks.f64(weight)[np.asarray(backend.to_numpy(ids)).astype(np.int64)]


def embedding_backward_ref(ids: Any, dout: Any, num_embeddings: int) -> np.ndarray:
    """float64 dW (num_embeddings, H): the rows of dout added at their ids."""
    g = _checks.f64(dout)
    h = g.shape[-1]
    flat = np.asarray(backend.to_numpy(ids)).astype(np.int64).reshape(-1)
    dw = np.zeros((num_embeddings, h), dtype=np.float64)
    np.add.at(dw, flat, g.reshape(-1, h))
    return dw


# ---- kernel plans ----------------------------------------------------------------------------------------


def _fwd_expr(dtype: Any) -> str:
    return f"embedding_forward_v1<{cuda_type(dtype)}, {_THREADS}>"


def _bwd_expr(dtype: Any) -> str:
    return f"embedding_backward_v1<{cuda_type(dtype)}, {_THREADS}>"


def _instantiations() -> list[str]:
    return [e(dt) for dt in _checks.GPU_DTYPES for e in (_fwd_expr, _bwd_expr)]


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _check_ids(ids: Any, like: Any, like_name: str) -> None:
    if backend.is_cupy(ids) != backend.is_cupy(like):
        raise ValueError(f"embedding: ids must live where {like_name} does (both NumPy or both CuPy)")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be an integer array, got dtype {ids.dtype}")


def _check_host_ids(ids: np.ndarray, num: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"embedding: id {bad} is outside [0, {num})")


def _check_num(num_embeddings: Any) -> int:
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, (int, np.integer)):
        raise TypeError(f"embedding_backward: num_embeddings must be an int, got {num_embeddings!r}")
    if num_embeddings < 0:
        raise ValueError(f"embedding_backward: num_embeddings must be >= 0, got {num_embeddings}")
    return int(num_embeddings)


# ---- public ops ------------------------------------------------------------------------------------------


def embedding(weight: Any, ids: Any, *, impl: str | None = None) -> Any:
    """Gather rows of an embedding table: out[i..., :] = weight[ids[i...], :].

    Parameters
    ----------
    weight : (V, H) float16 / float32 (float64 on the CPU); on the GPU its last dim must be contiguous
    ids : integer array of any shape on weight's device, values in [0, V)
    impl : None / "cuda" for GPU arrays

    Returns
    -------
    out : ids.shape + (H,), weight's dtype and kind (the gather is exact)
    """
    weight, give_back = adopt(weight, "weight")
    ids = adopt(ids, "ids")[0]
    _checks.check_float(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must have shape (V, H), got {tuple(weight.shape)}")
    _check_ids(ids, weight, "weight")
    which = _checks.check_impl(impl, weight)
    if which == "numba":
        raise ValueError("embedding: there is no Numba kernel; use impl='cuda'")
    num, h = weight.shape
    if which == "numpy":
        host = np.asarray(ids)
        _check_host_ids(host, num)
        return give_back(weight[host.astype(np.int64)].copy())
    cp = backend.require_cupy()
    out = cp.empty(tuple(ids.shape) + (h,), dtype=weight.dtype)
    rows = math.prod(ids.shape)
    if rows == 0 or h == 0:
        return give_back(out)
    w = weight if weight.strides[-1] == weight.itemsize else cp.ascontiguousarray(weight)
    w_stride = w.strides[0] // w.itemsize
    flat = cp.ascontiguousarray(ids.reshape(-1), dtype=cp.int64)
    launch(
        get_function(_FAMILY, _fwd_expr(w.dtype)),
        (rows,),
        (_THREADS,),
        (w, flat, out, i32(rows), i32(h), np.int64(w_stride), np.int64(num)),
        bytes_moved=2 * out.nbytes + 8 * rows,
    )
    return give_back(out)


def embedding_backward(
    ids: Any,
    dout: Any,
    num_embeddings: int,
    *,
    out: Any = None,
    accumulate: bool = False,
    impl: str | None = None,
) -> Any:
    """Gradient of `embedding` with respect to the table: dW[v] = sum of dout rows whose id is v.

    Parameters
    ----------
    ids : integer array of any shape, values in [0, num_embeddings)
    dout : ids.shape + (H,) float16 / float32 (float64 on the CPU) on ids' device
    num_embeddings : V, the table's row count
    out : optional (V, H) float32 (float64 for float64 dout on the CPU), C-contiguous, to write into
    accumulate : add into `out` instead of overwriting it (tied weights, gradient accumulation); needs out
    impl : None / "cuda" for GPU arrays

    Returns
    -------
    dweight : (V, H) float32 (`out` when given). Deterministic: no float atomics (module docstring).
    """
    dout, give_back = adopt(dout, "dout")
    ids = adopt(ids, "ids")[0]
    out_arr = adopt_optional(out, "out")
    num = _check_num(num_embeddings)
    _checks.check_float(dout, "dout")
    _check_ids(ids, dout, "dout")
    if dout.ndim != ids.ndim + 1 or tuple(dout.shape[:-1]) != tuple(ids.shape):
        raise ValueError(
            f"embedding_backward: dout has shape {tuple(dout.shape)}, expected ids.shape + (H,) = "
            f"{tuple(ids.shape)} + (H,)"
        )
    if not isinstance(accumulate, (bool, np.bool_)):
        raise TypeError(f"embedding_backward: accumulate must be True or False, got {accumulate!r}")
    if accumulate and out_arr is None:
        raise ValueError("embedding_backward: accumulate=True needs out")
    h = dout.shape[-1]
    acc_dtype = np.dtype(np.float64 if dout.dtype == np.float64 else np.float32)
    if out_arr is not None:
        if backend.is_cupy(out_arr) != backend.is_cupy(dout):
            raise ValueError("embedding_backward: out must live where dout does")
        if out_arr.dtype != acc_dtype:
            raise TypeError(f"embedding_backward: out must have dtype {acc_dtype}, got {out_arr.dtype}")
        _checks.check_shape(out_arr, "out", (num, h))
        if not out_arr.flags.c_contiguous:
            raise ValueError("embedding_backward: out must be C-contiguous")
    which = _checks.check_impl(impl, dout)
    if which == "numba":
        raise ValueError("embedding_backward: there is no Numba kernel; use impl='cuda'")

    if which == "numpy":
        host = np.asarray(ids)
        _check_host_ids(host, num)
        dw = embedding_backward_ref(host, dout, num).astype(acc_dtype)
        if out_arr is None:
            return give_back(dw)
        if accumulate:
            out_arr += dw
        else:
            out_arr[...] = dw
        return out

    cp = backend.require_cupy()
    if out_arr is None:
        dw = cp.zeros((num, h), dtype=cp.float32)
    else:
        dw = out_arr
        if not accumulate:
            dw.fill(0)
    positions = math.prod(ids.shape)
    if positions == 0 or h == 0 or num == 0:
        return give_back(dw) if out_arr is None else out
    g = cp.ascontiguousarray(dout.reshape(positions, h))
    # Sort positions by id with unique keys (id * P + position): one possible order, so the sum order per id
    # (position order) does not depend on the sort algorithm. Out-of-range ids sort to the ends and their
    # segments are skipped by the kernel.
    flat = ids.reshape(-1).astype(cp.int64)
    order = cp.sort(flat * positions + cp.arange(positions, dtype=cp.int64))
    sorted_ids = order // positions
    sorted_pos = order - sorted_ids * positions
    starts = cp.flatnonzero(cp.concatenate([cp.ones(1, dtype=cp.bool_), sorted_ids[1:] != sorted_ids[:-1]]))
    segments = int(starts.shape[0])
    bounds = cp.concatenate([starts, cp.array([positions], dtype=starts.dtype)]).astype(cp.int64)
    launch(
        get_function(_FAMILY, _bwd_expr(g.dtype)),
        (segments, -(-h // _THREADS)),
        (_THREADS,),
        (g, sorted_ids, sorted_pos, bounds, dw, i32(segments), i32(h), np.int64(num)),
        bytes_moved=g.nbytes + 4 * segments * h,
    )
    return give_back(dw) if out_arr is None else out
