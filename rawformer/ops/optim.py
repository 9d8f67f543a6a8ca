"""Multi-tensor optimizer kernels: AdamW (decoupled weight decay) and the global gradient L2 norm.

AdamW, per element of every tensor (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"; the update
torch.optim.AdamW makes), with t = step (1-based):

    g  = grad_scale * grad                       (e.g. 1 / loss_scale * clip coefficient)
    m  = beta1 * m + (1 - beta1) * g             (exp_avg, float32)
    v  = beta2 * v + (1 - beta2) * g^2           (exp_avg_sq, float32)
    p  = p * (1 - lr * wd) - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

p is the parameter itself or, with master_params, its float32 master copy; the (float16) parameter then
receives the master's rounded value. weight_decay is one number or one per tensor (no decay for biases and
norms: pass 0 for those).

grad_norm: sqrt(sum over all tensors and elements of g^2), accumulated in float32; inf or NaN when any
element is (the overflow check of dynamic loss scaling).

Arrays run where they live: NumPy lists run the float64 references (results cast back); CuPy lists run
`cuda_src/optim.cu`. Multi-tensor launch: the launcher builds one table of device pointers and sizes per
call (int64 (T, 6), uploaded in one copy; tables are cached by their pointers) and a prefix sum of
per-tensor chunk counts; one launch covers every tensor, each block finding its tensor by binary search
over the prefix sum. grad_norm writes one fp32 partial per block, and a second one-block kernel adds the
partials in a fixed order (deterministic) and takes the square root.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.launch import i32
from rawformer.ops import _checks

__all__ = ["adamw_ref", "adamw_step", "grad_norm", "grad_norm_ref"]

_FAMILY = "optim"
_THREADS = 512
_CHUNK = _THREADS * 4 * 8  # elements per block-chunk: 4 per thread per iteration, 8 iterations
_NORM_BLOCKS_MAX = 1024  # grad_norm partials: at most this many blocks (grid-stride over the chunks)
_TABLE_CACHE_MAX = 64
_table_cache: dict[tuple[Any, ...], Any] = {}


# ---- float64 references ----------------------------------------------------------------------------------


def adamw_ref(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (new param, new exp_avg, new exp_avg_sq) for one tensor, by the module docstring's formula."""
    p, m, v = _checks.f64(param), _checks.f64(exp_avg), _checks.f64(exp_avg_sq)
    g = _checks.f64(grad) * grad_scale
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    p = p * (1.0 - lr * weight_decay) - lr * (m / bc1) / (np.sqrt(v / bc2) + eps)
    return p, m, v


def grad_norm_ref(grads: Sequence[Any]) -> float:
    """float64 sqrt(sum of squares) over every element of every array."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.sqrt(sum(float(np.sum(np.square(_checks.f64(g)))) for g in grads))


# ---- kernel plans ----------------------------------------------------------------------------------------


def _adamw_expr(p_dtype: Any, g_dtype: Any, master: bool) -> str:
    return (
        f"adamw_v1<{cuda_type(p_dtype)}, {cuda_type(g_dtype)}, {'true' if master else 'false'}, {_THREADS}>"
    )


def _norm_expr(g_dtype: Any) -> str:
    return f"grad_norm_partial_v1<{cuda_type(g_dtype)}, {_THREADS}>"


_NORM_FINISH = f"grad_norm_finish_v1<{_THREADS}>"


def _instantiations() -> list[str]:
    exprs = [_NORM_FINISH]
    for g in _checks.GPU_DTYPES:
        exprs.append(_norm_expr(g))
        for p in _checks.GPU_DTYPES:
            exprs.append(_adamw_expr(p, g, False))
        exprs.append(_adamw_expr(np.float16, g, True))
        exprs.append(_adamw_expr(np.float32, g, True))
    return list(dict.fromkeys(exprs))


register_family(_FAMILY, _instantiations)


# ---- argument checks -------------------------------------------------------------------------------------


def _as_list(arrays: Any, name: str) -> list[Any]:
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of arrays, got {type(arrays).__name__}")
    for i, a in enumerate(arrays):
        if not (isinstance(a, np.ndarray) or backend.is_cupy(a)):
            raise TypeError(f"{name}[{i}] must be a NumPy or CuPy array, got {type(a).__name__}")
    return list(arrays)


def _check_list(arrays: list[Any], name: str, like: list[Any], dtypes: tuple[Any, ...], gpu: bool) -> None:
    if len(arrays) != len(like):
        raise ValueError(f"{name} has {len(arrays)} arrays but params has {len(like)}")
    for i, (a, p) in enumerate(zip(arrays, like, strict=True)):
        if backend.is_cupy(a) != gpu:
            raise ValueError(
                f"{name}[{i}] is a {'GPU' if backend.is_cupy(a) else 'CPU'} array; all must match"
            )
        if a.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] has dtype {a.dtype}; expected one of {', '.join(map(str, dtypes))}")
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"{name}[{i}] has shape {tuple(a.shape)} but params[{i}] has {tuple(p.shape)}")
        if gpu and not a.flags.c_contiguous:
            raise ValueError(f"{name}[{i}] must be C-contiguous (updated in place as a flat buffer)")
        if gpu and a.device != like[0].device:
            raise ValueError(f"{name}[{i}] is on {a.device} but params[0] is on {like[0].device}")
        if not gpu and not a.flags.writeable and name != "grads":
            raise ValueError(f"{name}[{i}] is read-only")


def _check_hparams(step: Any, lr: Any, beta1: Any, beta2: Any, eps: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"adamw_step: step must be an int >= 1 (1-based), got {step!r}")
    if _checks.check_scalar(lr, "lr") < 0:
        raise ValueError(f"adamw_step: lr must be >= 0, got {lr!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= _checks.check_scalar(b, name) < 1.0:
            raise ValueError(f"adamw_step: {name} must be in [0, 1), got {b!r}")
    if _checks.check_scalar(eps, "eps") < 0:
        raise ValueError(f"adamw_step: eps must be >= 0, got {eps!r}")


def _decays(weight_decay: Any, count: int) -> list[float]:
    if isinstance(weight_decay, (list, tuple)):
        if len(weight_decay) != count:
            raise ValueError(f"adamw_step: weight_decay has {len(weight_decay)} values for {count} tensors")
        return [_checks.check_scalar(w, "weight_decay") for w in weight_decay]
    return [_checks.check_scalar(weight_decay, "weight_decay")] * count


# ---- multi-tensor tables ---------------------------------------------------------------------------------


def _table(columns: list[list[Any]], sizes: list[int], extra: list[float] | None) -> tuple[Any, Any, int]:
    """Device arrays (int64 (T, C) pointers + size, int64 (T + 1,) chunk prefix sums, float32 (T,) extra)
    and the total chunk count; cached by the pointers, sizes and extra values."""
    cp = backend.require_cupy()
    ptrs = [[0 if a is None else a.data.ptr for a in col] for col in columns]
    key = (cp.cuda.Device().id, tuple(map(tuple, ptrs)), tuple(sizes), tuple(extra or ()))
    hit = _table_cache.get(key)
    if hit is not None:
        return hit
    rows = np.array([[*(col[i] for col in ptrs), sizes[i]] for i in range(len(sizes))], dtype=np.int64)
    chunks = np.concatenate([[0], np.cumsum([-(-s // _CHUNK) for s in sizes])]).astype(np.int64)
    host = np.concatenate([rows.reshape(-1), chunks])
    dev = cp.asarray(host)
    ext = cp.asarray(np.asarray(extra if extra is not None else [0.0], dtype=np.float32))
    entry = (dev, ext, int(chunks[-1]))
    if len(_table_cache) >= _TABLE_CACHE_MAX:
        _table_cache.clear()
    _table_cache[key] = entry
    return entry


# ---- public ops ------------------------------------------------------------------------------------------


def adamw_step(
    params: Sequence[Any],
    grads: Sequence[Any],
    exp_avg: Sequence[Any],
    exp_avg_sq: Sequence[Any],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | Sequence[float] = 0.0,
    grad_scale: float = 1.0,
    master_params: Sequence[Any] | None = None,
) -> None:
    """One AdamW step over every tensor, in place (formula in the module docstring).

    Parameters
    ----------
    params : list of float16 / float32 arrays (float64 on the CPU), C-contiguous on the GPU
    grads : list, same shapes; float16 / float32 (dtypes may differ from params)
    exp_avg, exp_avg_sq : lists of float32 (float64 allowed on the CPU) moments, same shapes
    step : 1-based step count (bias correction 1 - beta^step)
    lr, beta1, beta2, eps : the usual hyper-parameters
    weight_decay : decoupled decay, one value or one per tensor
    grad_scale : multiplies every gradient before use (1 / loss scale, times the clip coefficient)
    master_params : optional list of float32 master copies: the update is applied to them and params get
        the rounded result (fp16 params with fp32 masters)

    On the GPU all grads share one dtype and all params one dtype (one kernel instantiation, one launch).
    """
    params = _as_list(params, "params")
    gpu_first = bool(params) and backend.is_cupy(params[0])
    grads = _as_list(grads, "grads")
    m_list = _as_list(exp_avg, "exp_avg")
    v_list = _as_list(exp_avg_sq, "exp_avg_sq")
    masters = None if master_params is None else _as_list(master_params, "master_params")
    _check_hparams(step, lr, beta1, beta2, eps)
    scale = _checks.check_scalar(grad_scale, "grad_scale")
    decays = _decays(weight_decay, len(params))
    if not params:
        return
    allowed = _checks.GPU_DTYPES if gpu_first else _checks.FLOAT_DTYPES
    state_dtypes = (np.dtype(np.float32),) if gpu_first else (np.dtype(np.float32), np.dtype(np.float64))
    _check_list(params, "params", params, allowed, gpu_first)
    _check_list(grads, "grads", params, allowed, gpu_first)
    _check_list(m_list, "exp_avg", params, state_dtypes, gpu_first)
    _check_list(v_list, "exp_avg_sq", params, state_dtypes, gpu_first)
    if masters is not None:
        _check_list(masters, "master_params", params, state_dtypes, gpu_first)
    hp = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps))

    if not gpu_first:
        for i, p in enumerate(params):
            src = masters[i] if masters is not None else p
            new_p, new_m, new_v = adamw_ref(
                src, grads[i], m_list[i], v_list[i], weight_decay=decays[i], grad_scale=scale, **hp
            )
            m_list[i][...] = new_m
            v_list[i][...] = new_v
            if masters is not None:
                masters[i][...] = new_p
                p[...] = new_p.astype(masters[i].dtype).astype(p.dtype)
            else:
                p[...] = new_p
        return

    for name, lst in (("params", params), ("grads", grads)):
        if len({a.dtype for a in lst}) > 1:
            raise TypeError(f"adamw_step: all {name} must share one dtype on the GPU")
    columns = [params, grads, m_list, v_list, masters if masters is not None else [None] * len(params)]
    sizes = [int(p.size) for p in params]
    table, decay_dev, chunks = _table(columns, sizes, decays)
    if chunks == 0:
        return
    bc1, bc2 = 1.0 - hp["beta1"] ** hp["step"], 1.0 - hp["beta2"] ** hp["step"]
    moved = sum(p.nbytes + g.nbytes + 16 * p.size for p, g in zip(params, grads, strict=True))
    if masters is not None:
        moved += 8 * sum(sizes)
    launch(
        get_function(_FAMILY, _adamw_expr(params[0].dtype, grads[0].dtype, masters is not None)),
        (chunks,),
        (_THREADS,),
        (
            table, decay_dev, i32(len(params)),
            np.float32(hp["lr"]), np.float32(hp["beta1"]), np.float32(hp["beta2"]), np.float32(hp["eps"]),
            np.float32(1.0 / bc1), np.float32(1.0 / math.sqrt(bc2)), np.float32(scale),
        ),
        bytes_moved=moved,
    )  # fmt: skip


def grad_norm(grads: Sequence[Any]) -> Any:
    """Global L2 norm sqrt(sum_i sum_j g_ij^2) over a list of gradient arrays, in one pass per dtype.

    Parameters
    ----------
    grads : list of float16 / float32 arrays (float64 on the CPU), C-contiguous on the GPU

    Returns
    -------
    norm : a 0-d float32 array on the grads' device (float64 when every CPU grad is float64); inf or NaN if
        any element is non-finite. An empty list gives a 0-d NumPy float32 zero.
    """
    grads = _as_list(grads, "grads")
    if not grads:
        return np.zeros((), dtype=np.float32)
    gpu = backend.is_cupy(grads[0])
    allowed = _checks.GPU_DTYPES if gpu else _checks.FLOAT_DTYPES
    _check_list(grads, "grads", grads, allowed, gpu)
    if not gpu:
        out = np.float64 if all(g.dtype == np.float64 for g in grads) else np.float32
        return np.asarray(grad_norm_ref(grads), dtype=out)

    cp = backend.require_cupy()
    groups: dict[Any, list[Any]] = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    plans = []
    for dtype, lst in groups.items():
        table, _, chunks = _table([lst], [int(g.size) for g in lst], None)
        plans.append((dtype, lst, table, chunks, min(chunks, _NORM_BLOCKS_MAX)))
    total_blocks = sum(p[4] for p in plans)
    partials = cp.empty((max(total_blocks, 1),), dtype=cp.float32)
    norm = cp.empty((), dtype=cp.float32)
    offset = 0
    for dtype, lst, table, chunks, blocks in plans:
        if blocks == 0:
            continue
        launch(
            get_function(_FAMILY, _norm_expr(dtype)),
            (blocks,),
            (_THREADS,),
            (table, i32(len(lst)), partials[offset:], i32(chunks)),
            bytes_moved=sum(g.nbytes for g in lst),
        )
        offset += blocks
    launch(get_function(_FAMILY, _NORM_FINISH), (1,), (_THREADS,), (partials, i32(offset), norm))
    return norm
