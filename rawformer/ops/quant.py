"""Weight-only INT8 (W8A16): quantizing a linear layer's weight, and `int8_linear`, its fused dequant GEMV.

A float matrix W (K, N) of `y = x @ W` (the models' (in, out) convention) becomes int8 values and fp16 scales,
symmetric (no zero point), per output channel or per group of `group_size` inputs of a channel:

    per channel   s[n]     = fp16(max_k |W[k, n]| / 127)               q[n, k] = rint(W[k, n] / s[n])
    group-wise    s[n, g]  = fp16(max_{k in group g} |W[k, n]| / 127)  q[n, k] = rint(W[k, n] / s[n, k // G])
    dequantized   W~[k, n] = q[n, k] * s(n, k)                          (q clipped to [-127, 127])

q is stored (N, Kp) row-major, output channel after output channel, each row zero padded to Kp = K rounded up
to 16, so every row is whole 16-byte chunks (what the GEMV kernel loads). The scale is rounded to fp16 before
q is computed from it, so W~ is what the kernels use, exactly.

`int8_linear(x, qw, bias)` = x @ W~ + bias, x (..., K) -> (..., N) in x's dtype. NumPy inputs run the float64
reference (`int8_linear_ref`); CuPy inputs (float16 / float32) the kernels of cuda_src/int8_gemv.cu:

    path "gemv"  (default for M <= GEMV_PATH_MAX_ROWS rows of x): int8_gemv, one launch per GEMV_MAX_TOKENS
                 (8) rows; weights streamed once per launch as int8, dequantized in registers, fp32
                 accumulation. Two launches (M <= 16) read fewer bytes than the GEMM path's 5 per weight.
                 Versions (int8_gemv.cu's header): v1 one row and one 16-byte load per lane in flight, v2 two
                 rows x 4 loads, v3 one row x 8 loads (a whole row of K <= 4096 at once); the default
                 (`default_gemv_version`) is v3, v1 for K > 4096 with N >= V1_MIN_ROWS, v2 for DUAL and for
                 N >= V2_MIN_ROWS. Launched with programmatic dependent launch (rawformer.kernels.pdl):
                 weight loads start before the previous kernel ends, x is read after it.
    path "gemm"  (M > GEMV_PATH_MAX_ROWS: prefill, large batches): int8_dequant writes W~^T as x's dtype into
                 a temporary (N, Kp) buffer (CuPy's pool hands the same memory back every call), then cuBLAS
                 (rawformer.kernels.gemm.matmul, capturable in CUDA graphs) reads it transposed in place.
                 A first version: it moves 1 + 2 + 2 bytes per weight where a dequantizing tensor-core GEMM
                 would move 1; it is the fallback until one exists.
`version=` picks the GEMV variant (the header of int8_gemv.cu lists them); `path=` forces a path.
`int8_linear_swiglu(x, qg, qu, bg, bu)` = silu(x @ Wg~ + bg) * (x @ Wu~ + bu): one DUAL GEMV launch (both
matrices, SwiGLU on the fp32 sums) per 8 rows on the GEMV path, two GEMMs and rf.swiglu on the GEMM path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.arrays import adopt
from rawformer.kernels import cuda_type, get_function, launch, register_family
from rawformer.kernels.gemm import matmul
from rawformer.kernels.launch import i32
from rawformer.kernels.specialize import cpp_bool
from rawformer.ops import _checks
from rawformer.ops._checks import check_version, f64

__all__ = [
    "GEMV_MAX_TOKENS",
    "GEMV_PATH_MAX_ROWS",
    "GROUP_SIZES",
    "QuantizedWeight",
    "dequantize_int8",
    "int8_linear",
    "int8_linear_ref",
    "int8_linear_swiglu",
    "int8_linear_swiglu_ref",
    "quantize_int8",
]

_FAMILY = "int8_gemv"
CHUNK = 16  # int8 weights per 16-byte load; q rows are padded to a multiple of it
QMAX = 127
GROUP_SIZES = (128,)  # group-wise quantization: the group sizes the kernels are instantiated for
GEMV_MAX_TOKENS = 8  # rows of x per GEMV launch (the kernels' M template argument goes up to this)
# default path: the GEMV for up to this many rows (ceil(M / 8) passes over the int8 weights), above it the
# dequantize + cuBLAS GEMM (5 bytes per weight whatever M). A guess until bench/quant.py --tokens measures it.
GEMV_PATH_MAX_ROWS = 16
GEMV_VERSIONS = (1, 2, 3)
# version -> (rows per warp R, chunks in flight per lane and row U (halved for DUAL), warps per CTA W);
# see the header of int8_gemv.cu
_GEMV_CONFIGS = {1: (1, 1, 4), 2: (2, 4, 8), 3: (1, 8, 8)}
GEMV_TOKENS = (1, 2, 4, 8)  # compiled token counts M; a launch of m rows uses the smallest M >= m
NORM_MAX_TOKENS = 1  # int8_gemv_norm (rf.int8_add_rms_norm_linear) is compiled for batch-1 decode steps
# default version (`default_gemv_version`): v3 (a whole row of K <= 4096 in flight per warp, 8 loads per
# lane) everywhere but large matrices (K > 4096 and N >= V1_MIN_ROWS), where v1's 64 resident warps per SM
# measured best (H100: 95% of the copy ceiling at 8192x28672 and 28672x8192), and v2 (two rows per warp,
# 4 chunks each) for the DUAL gate/up kernel and for K <= 4096 with N >= V2_MIN_ROWS: in the 1B decoder's
# CUDA graph (22 of each back to back) the fused-norm gate/up pair took 8.9 us with v2 vs 11.2 with v3, and
# the 2048 x 32000 lm head 24.6 vs 27.0 (v3 stays best for the qkv, o and down projections)
V1_MIN_ROWS = 8192
V2_MIN_ROWS = 16384
_DEQUANT_THREADS = 256  # int8_dequant's launch bounds
_NULL = np.uintp(0)  # a null device pointer
_QUANT_CHUNK_ELEMENTS = 1 << 26  # quantize this many weights at a time (bounds the float32 temporaries)


# ---- the quantized weight ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """An INT8 weight standing for the float matrix W~ (K, N) of `y = x @ W~` (see the module docstring).

    q : int8 (N, Kp), Kp = K rounded up to 16 (zero padded); NumPy or CuPy
    scales : float16 (N,) per channel, or (N, ceil(K / group_size)) group-wise; where q lives
    in_features : K
    group_size : None (per output channel) or one of GROUP_SIZES
    """

    q: Any
    scales: Any
    in_features: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        q, s, k = self.q, self.scales, self.in_features
        if getattr(q, "ndim", None) != 2 or np.dtype(q.dtype) != np.int8:
            raise TypeError(
                f"QuantizedWeight: q must be a 2-D int8 array, got {getattr(q, 'dtype', type(q))}"
            )
        if backend.is_cupy(q) != backend.is_cupy(s) or np.dtype(s.dtype) != np.float16:
            raise TypeError("QuantizedWeight: scales must be float16, on q's device")
        if not q.flags.c_contiguous or not s.flags.c_contiguous:
            raise ValueError("QuantizedWeight: q and scales must be C-contiguous")
        if q.shape[1] != padded_k(k):
            raise ValueError(f"QuantizedWeight: q has {q.shape[1]} columns, expected {padded_k(k)} for K={k}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"QuantizedWeight: group_size must be None or one of {GROUP_SIZES}")
        want = (q.shape[0],) if self.group_size is None else (q.shape[0], num_groups(k, self.group_size))
        if tuple(s.shape) != want:
            raise ValueError(f"QuantizedWeight: scales have shape {tuple(s.shape)}, expected {want}")

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): the shape of the float matrix it replaces in `x @ W`."""
        return (self.in_features, self.out_features)

    ndim = 2

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV streams: the int8 values (padding included) and the scales."""
        return int(self.q.nbytes + self.scales.nbytes)

    @property
    def T(self) -> QuantizedWeightT:  # noqa: N802  (the array attribute it mirrors)
        """A transposed handle: models that compute `x @ w.T` (tied lm heads) hold this; its .T is self."""
        return QuantizedWeightT(self)

    def __repr__(self) -> str:
        where = "cupy" if backend.is_cupy(self.q) else "numpy"
        g = "channel" if self.group_size is None else f"group {self.group_size}"
        return f"QuantizedWeight(K={self.in_features}, N={self.out_features}, {g}, {where})"


@dataclass(frozen=True, eq=False)
class QuantizedWeightT:
    """The (N, K) view of a QuantizedWeight, for code that writes `linear(h, head.T)`."""

    base: QuantizedWeight

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802
        return self.base

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.out_features, self.base.in_features)


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 16-byte int8 chunks."""
    return -(-k // CHUNK) * CHUNK


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


# ---- quantize / dequantize (any device, array-module code) -------------------------------------------------


def _check_group_size(group_size: Any) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be None or an int, got {group_size!r}")
    if int(group_size) not in GROUP_SIZES:
        raise ValueError(f"group_size must be None (per channel) or one of {GROUP_SIZES}, got {group_size}")
    return int(group_size)


def quantize_int8(w: Any, *, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric INT8 quantization of the (K, N) weight of `x @ w`, per output channel or group-wise.

    Parameters
    ----------
    w : (K, N) float array (NumPy or CuPy; transposed views such as `embedding.T` are fine)
    group_size : None (one scale per output channel n) or one of GROUP_SIZES (one scale per n and per
        `group_size` consecutive inputs k)

    Returns
    -------
    QuantizedWeight on w's device: q int8 (N, Kp), scales float16 (N,) or (N, ceil(K / group_size)).
    Computed in float32 (the scale rounded to fp16 first, q = clip(rint(w / s), -127, 127)). Raises
    ValueError for non-finite weights or a scale beyond float16's range.
    """
    w, _ = adopt(w, "w")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"w must be a 2-D (in, out) matrix, got shape {getattr(w, 'shape', None)}")
    if np.dtype(w.dtype) not in _checks.FLOAT_DTYPES:
        raise TypeError(f"w must be float16 / float32 / float64, got {w.dtype}")
    group = _check_group_size(group_size)
    xp = backend.array_module(w)
    k, n = (int(d) for d in w.shape)
    if k == 0:
        raise ValueError("w has no input features (K = 0)")
    kp = padded_k(k)
    width = kp if group is None else num_groups(k, group) * group  # padded so groups reshape evenly
    q = xp.zeros((n, kp), dtype=np.int8)
    scales = xp.zeros((n,) if group is None else (n, num_groups(k, group)), dtype=np.float16)
    step = max(1, _QUANT_CHUNK_ELEMENTS // max(width, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = xp.zeros((r1 - r0, width), dtype=np.float32)
        rows[:, :k] = w[:, r0:r1].T  # (rows, K): output channels as rows
        if not bool(xp.isfinite(rows).all()):
            raise ValueError(f"w has non-finite values (in output channels {r0}..{r1 - 1})")
        grouped = rows.reshape(r1 - r0, -1, width if group is None else group)  # (rows, groups, G)
        amax = xp.abs(grouped).max(axis=2)  # (rows, groups)
        s32 = amax / np.float32(QMAX)
        if bool((s32 > np.float32(np.finfo(np.float16).max)).any()):
            raise ValueError("w has magnitudes beyond 127 * 65504: its scales do not fit float16")
        s16 = s32.astype(np.float16)
        s32 = s16.astype(np.float32)
        safe = xp.where(s32 > 0, s32, np.float32(1.0))  # an all-zero channel / group: q = 0, scale 0
        vals = xp.clip(xp.rint(grouped / safe[:, :, None]), -QMAX, QMAX).astype(np.int8)
        q[r0:r1] = vals.reshape(r1 - r0, width)[:, :kp]
        scales[r0:r1] = s16[:, 0] if group is None else s16
    if backend.is_cupy(q):  # the kernels load q and scales before their PDL wait: q and scales must be
        xp.cuda.get_current_stream().synchronize()  # complete before a kernel that reads them is launched
    return QuantizedWeight(q, scales, k, group)


def _scale_matrix(qw: QuantizedWeight, xp: Any, dtype: Any) -> Any:
    """(N, K) per-element scales."""
    k = qw.in_features
    s = qw.scales.astype(dtype)
    if qw.group_size is None:
        return xp.broadcast_to(s[:, None], (qw.out_features, k))
    return xp.repeat(s, qw.group_size, axis=1)[:, :k]


def dequantize_int8(qw: QuantizedWeight, dtype: Any = None) -> Any:
    """The float matrix W~ (K, N) a QuantizedWeight stands for, on its device.

    dtype: float64 (the default on NumPy), float32 or float16 (the default on CuPy). On CuPy, float16 /
    float32 run the int8_dequant kernel (the GEMM path's) and return a transposed view of an (N, Kp) buffer;
    float64 runs array-module code."""
    _check_qweight(qw)
    gpu = backend.is_cupy(qw.q)
    dtype = np.dtype(dtype if dtype is not None else (np.float16 if gpu else np.float64))
    if gpu and dtype in _checks.GPU_DTYPES:
        return _dequant_cupy(qw, dtype)[:, : qw.in_features].T
    xp = backend.array_module(qw.q)
    calc = np.float64 if dtype == np.float64 else np.float32
    k = qw.in_features
    w = qw.q[:, :k].astype(calc) * _scale_matrix(qw, xp, calc)
    return w.T.astype(dtype, copy=False)


def int8_linear_ref(x: Any, qw: QuantizedWeight, bias: Any = None) -> np.ndarray:
    """float64 x @ W~ + bias: x (..., K) -> (..., N)."""
    w = f64(dequantize_int8(qw, np.float64))
    y = f64(x) @ w
    return y + f64(bias) if bias is not None else y


# ---- kernels -----------------------------------------------------------------------------------------------


def _group_arg(group_size: int | None) -> int:
    return 0 if group_size is None else group_size


def gemv_tokens(rows: int) -> int:
    """The compiled token count M (GEMV_TOKENS) a launch for `rows` (1..8) rows of x uses."""
    return next(t for t in GEMV_TOKENS if t >= rows)


def default_gemv_version(kp: int, n: int, dual: bool = False) -> int:
    """The GEMV version for a padded K and N, plain or DUAL (see V1_MIN_ROWS, V2_MIN_ROWS)."""
    if kp > 4096 and n >= V1_MIN_ROWS:
        return 1
    return 2 if dual or n >= V2_MIN_ROWS else 3


def gemv_expression(
    dtype: Any, tokens: int, group_size: int | None, version: int, dual: bool = False, norm: bool = False
) -> str:
    """The kernel for a launch of `tokens` rows of x (1..8; compiled for gemv_tokens(tokens)); norm: its
    int8_gemv_norm twin (compiled for NORM_MAX_TOKENS rows)."""
    r, u, w = _GEMV_CONFIGS[version]
    m = gemv_tokens(tokens)
    name = "int8_gemv_norm" if norm else "int8_gemv"
    return f"{name}<{cuda_type(dtype)}, {m}, {_group_arg(group_size)}, {r}, {u}, {w}, {cpp_bool(dual)}>"


def dequant_expression(dtype: Any, group_size: int | None) -> str:
    return f"int8_dequant<{cuda_type(dtype)}, {_group_arg(group_size)}>"


def _instantiations() -> list[str]:
    exprs = []
    for dtype in _checks.GPU_DTYPES:
        for group in (None, *GROUP_SIZES):
            exprs.append(dequant_expression(dtype, group))
            for tokens in GEMV_TOKENS:
                for version in GEMV_VERSIONS:
                    exprs.append(gemv_expression(dtype, tokens, group, version))
                    exprs.append(gemv_expression(dtype, tokens, group, version, dual=True))
                    if tokens <= NORM_MAX_TOKENS:
                        exprs.append(gemv_expression(dtype, tokens, group, version, norm=True))
                        exprs.append(gemv_expression(dtype, tokens, group, version, dual=True, norm=True))
    return exprs


register_family(_FAMILY, _instantiations)


def _ngroups(qw: QuantizedWeight) -> int:
    return 1 if qw.group_size is None else int(qw.scales.shape[1])


def _dequant_cupy(qw: QuantizedWeight, dtype: Any) -> Any:
    """W~^T as `dtype`, (N, Kp) C-contiguous (padding columns are zero)."""
    cp = backend.require_cupy()
    n, kp = qw.q.shape
    out = cp.empty((n, kp), dtype=dtype)
    total = n * (kp // CHUNK)
    if total == 0:
        return out
    kernel = get_function(_FAMILY, dequant_expression(dtype, qw.group_size))
    grid = min(-(-total // _DEQUANT_THREADS), 132 * 16)  # grid-stride beyond a few waves
    launch(
        kernel, (grid,), (_DEQUANT_THREADS,),
        (qw.q, qw.scales, out, i32(n), i32(kp // CHUNK), i32(kp), i32(_ngroups(qw))),
        bytes_moved=qw.nbytes + out.nbytes,
        # plain launch: the PDL chain test (tests/test_quant.py) read NaN outputs from a captured int8 chain
        # on the H100 with pdl=True; the kernels keep their (harmless) rf::pdl_wait calls
    )  # fmt: skip
    return out


def _gemv_cupy(
    x2: Any,
    qw: QuantizedWeight,
    bias: Any,
    version: int | None,
    up: QuantizedWeight | None = None,
    bias2: Any = None,
    norm: tuple[Any, ...] | None = None,
    out: Any = None,
) -> Any:
    """x2 (M, K) contiguous CuPy -> (M, N), 8 rows of x per launch; with `up`: silu(x2 W~ + b) * (x2 U~ + b2)
    (the DUAL kernel). version None: default_gemv_version. With `norm` = (a2, ln_w, s_out, eps): the
    int8_gemv_norm kernel, whose input is rms_norm(x2 + a2) * ln_w computed in its prologue (one launch of
    at most NORM_MAX_TOKENS rows; the caller, ops/int8_norm_linear.py, checked K == Kp and alignment).
    out: the (M, N) result buffer (default: a new one)."""
    cp = backend.require_cupy()
    m, k = x2.shape
    n, kp = qw.q.shape
    y = cp.empty((m, n), dtype=x2.dtype) if out is None else out
    if m == 0 or n == 0:
        return y
    norm_args, smem = (), 0
    if norm is not None:  # one launch (m <= NORM_MAX_TOKENS), x2 unpadded (K == Kp)
        a2, ln_w, s_out, eps = norm
        norm_args = (
            _NULL if a2 is None else a2, i32(kp), _NULL if ln_w is None else ln_w,
            _NULL if s_out is None else s_out, i32(kp), np.float32(eps),
        )  # fmt: skip
        smem = m * kp * x2.itemsize  # h staged in shared memory
    elif k != kp or x2.data.ptr % 16:  # rows of whole 16-byte chunks, zero beyond K (0 * garbage: NaN)
        xp_ = cp.zeros((m, kp), dtype=x2.dtype)
        xp_[:, :k] = x2
        x2 = xp_
    version = version or default_gemv_version(kp, n, up is not None)
    r, _, warps = _GEMV_CONFIGS[version]
    grid = (-(-n // (warps * r)),)
    chunks, ngroups = kp // CHUNK, _ngroups(qw)
    b = _NULL if bias is None else bias
    dual = up is not None
    second = (up.q, up.scales, _NULL if bias2 is None else bias2) if dual else (_NULL, _NULL, _NULL)
    moved = qw.nbytes * (2 if dual else 1)
    for i in range(0, m, GEMV_MAX_TOKENS):
        rows = min(GEMV_MAX_TOKENS, m - i)
        expr = gemv_expression(x2.dtype, rows, qw.group_size, version, dual, norm=norm is not None)
        launch(
            get_function(_FAMILY, expr), grid, (32 * warps,),
            (x2[i : i + rows], qw.q, qw.scales, b, *second, y[i : i + rows], i32(rows), i32(n), i32(chunks),
             i32(kp), i32(kp), i32(ngroups), i32(n), *norm_args),
            shared_mem=smem, bytes_moved=moved + rows * (kp + n) * x2.itemsize,
            pdl=True,  # x is read after rf::pdl_wait, through rf::after_pdl_wait (cuda_src/int8_gemv.cu)
        )  # fmt: skip
    return y


def _gemm_cupy(x2: Any, qw: QuantizedWeight, bias: Any) -> Any:
    w_t = _dequant_cupy(qw, x2.dtype)  # (N, Kp)
    y = matmul(x2, w_t[:, : qw.in_features].T)  # cuBLAS reads the transposed view in place
    if bias is not None:
        y += bias
    return y


# ---- the op ------------------------------------------------------------------------------------------------


def _check_qweight(qw: Any) -> None:  # dequantize_int8's check
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight (from quantize_int8), got {type(qw).__name__}")


def _check_weight_for(x: Any, qw: Any, name: str) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name} must be a QuantizedWeight (from quantize_int8), got {type(qw).__name__}")
    if x.ndim < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last axis must be {name}'s K = {qw.in_features}")
    if backend.is_cupy(x) != backend.is_cupy(qw.q):
        raise ValueError(f"x and {name} must both live on the GPU (CuPy) or both on the CPU (NumPy)")
    if backend.is_cupy(x) and x.device != qw.q.device:
        raise ValueError(f"x is on {x.device} but {name} is on {qw.q.device}")


def _check_bias(x: Any, bias: Any, name: str, n: int) -> Any:
    if bias is None:
        return None
    bias = adopt(bias, name)[0]
    _checks.check_same_place(x, "x", **{name: bias})
    _checks.check_shape(bias, name, (n,))
    if backend.is_cupy(bias) and not bias.flags.c_contiguous:
        bias = backend.require_cupy().ascontiguousarray(bias)
    return bias


def _check_path(path: Any, version: Any, gpu: bool) -> None:
    if path not in (None, "gemv", "gemm"):
        raise ValueError(f"path must be None, 'gemv' or 'gemm', got {path!r}")
    if not gpu and (path is not None or version is not None):
        raise ValueError("path= and version= pick CUDA kernels; x is a CPU (NumPy) array")
    if gpu:
        check_version(version, GEMV_VERSIONS, "cuda")


def _default_path(rows: int) -> str:
    return "gemv" if rows <= GEMV_PATH_MAX_ROWS else "gemm"


def _rows(x: Any, k: int) -> Any:
    """x (..., K) CuPy as a C-contiguous (M, K) matrix (a copy only when needed)."""
    cp = backend.require_cupy()
    return cp.ascontiguousarray(x).reshape(math.prod(x.shape[:-1]), k)


def int8_linear(
    x: Any, qweight: QuantizedWeight, bias: Any = None, *, path: str | None = None, version: int | None = None
) -> Any:
    """y = x @ W~ + bias with W~ the dequantized INT8 weight (see the module docstring for the paths).

    Parameters
    ----------
    x : (..., K) float array: NumPy (float64 reference, result cast to x's dtype) or CuPy float16 / float32
    qweight : QuantizedWeight of K inputs and N outputs, on x's device
    bias : (N,) of x's dtype and device, or None
    path : None (GEMV for up to GEMV_PATH_MAX_ROWS rows, else GEMM), "gemv" or "gemm"
    version : GEMV variant (GEMV_VERSIONS); CUDA only

    Returns
    -------
    (..., N) array of x's dtype and kind.
    """
    x, give_back = adopt(x, "x")
    _checks.check_float(x, "x")
    _check_weight_for(x, qweight, "qweight")
    bias = _check_bias(x, bias, "bias", qweight.out_features)
    gpu = backend.is_cupy(x)
    _check_path(path, version, gpu)
    lead, n = tuple(x.shape[:-1]), qweight.out_features
    if not gpu:
        return give_back(int8_linear_ref(x, qweight, bias).astype(x.dtype).reshape(*lead, n))
    x2 = _rows(x, qweight.in_features)
    if (path or _default_path(x2.shape[0])) == "gemv":
        y = _gemv_cupy(x2, qweight, bias, version)
    else:
        y = _gemm_cupy(x2, qweight, bias)
    return give_back(y.reshape(*lead, n))


def int8_linear_swiglu_ref(
    x: Any, w_gate: QuantizedWeight, w_up: QuantizedWeight, b_gate: Any = None, b_up: Any = None
) -> np.ndarray:
    """float64 silu(x @ Wg~ + b_gate) * (x @ Wu~ + b_up), silu(z) = z / (1 + exp(-z))."""
    g = int8_linear_ref(x, w_gate, b_gate)
    u = int8_linear_ref(x, w_up, b_up)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * u


def int8_linear_swiglu(
    x: Any,
    w_gate: QuantizedWeight,
    w_up: QuantizedWeight,
    b_gate: Any = None,
    b_up: Any = None,
    *,
    path: str | None = None,
    version: int | None = None,
) -> Any:
    """silu(x @ Wg~ + b_gate) * (x @ Wu~ + b_up): a Llama MLP's gate / up projections and SwiGLU.

    Parameters
    ----------
    x : (..., K) float array (NumPy: the float64 reference; CuPy float16 / float32: the kernels)
    w_gate, w_up : QuantizedWeights of the same K, N and group size, on x's device
    b_gate, b_up : (N,) of x's dtype, or None
    path : None (GEMV for up to GEMV_PATH_MAX_ROWS rows, else GEMM), "gemv" or "gemm"
    version : GEMV variant (GEMV_VERSIONS, each has a DUAL form); CUDA only

    Returns
    -------
    (..., N) of x's dtype. GEMV path: one DUAL int8_gemv launch per 8 rows reads both matrices and applies
    SwiGLU to the fp32 sums; GEMM path: two int8_linear GEMMs and rf.swiglu.
    """
    x, give_back = adopt(x, "x")
    _checks.check_float(x, "x")
    _check_weight_for(x, w_gate, "w_gate")
    _check_weight_for(x, w_up, "w_up")
    if w_up.shape != w_gate.shape or w_up.group_size != w_gate.group_size:
        raise ValueError(
            f"w_up {w_up!r} must have w_gate's shape and grouping ({w_gate!r}) for the fused kernel"
        )
    n = w_gate.out_features
    b_gate = _check_bias(x, b_gate, "b_gate", n)
    b_up = _check_bias(x, b_up, "b_up", n)
    gpu = backend.is_cupy(x)
    _check_path(path, version, gpu)
    lead = tuple(x.shape[:-1])
    if not gpu:
        return give_back(
            int8_linear_swiglu_ref(x, w_gate, w_up, b_gate, b_up).astype(x.dtype).reshape(*lead, n)
        )
    x2 = _rows(x, w_gate.in_features)
    if (path or _default_path(x2.shape[0])) == "gemv":
        y = _gemv_cupy(x2, w_gate, b_gate, version, up=w_up, bias2=b_up)
    else:
        from rawformer.ops.activations import swiglu

        y = swiglu(_gemm_cupy(x2, w_gate, b_gate), _gemm_cupy(x2, w_up, b_up))
    return give_back(y.reshape(*lead, n))
