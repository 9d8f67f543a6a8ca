"""A GEMM that can be captured in a CUDA graph: `matmul(a, b, out=None)` for 2-D arrays.

    C (M, N) = A (M, K) @ B (K, N),   fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F; fp64 for fp64)

Why not cupy.matmul: CuPy's cuBLAS wrappers call `cublas.setStream(handle, current stream)` before every
call, and that wrapper raises NotImplementedError while the stream is capturing. cuBLAS itself supports
capture (cuBLAS docs, "CUDA Graphs Support"): scalars in host pointer mode are baked into the graph, and a
user-owned workspace (cublasSetWorkspace) keeps it from allocating during capture. So CuPy arrays go through
libcublas directly (ctypes), with a handle of our own:

- one handle per device, created on first use (never during a capture: `prepare()` before capturing, which
  rawformer.runtime.cuda_graphs does), with a WORKSPACE_BYTES device buffer taken once from cudaMalloc
  (not from a CuPy pool: a graph's private pool is freed with the graph, the workspace must outlive it);
- the handle is bound to CuPy's current stream whenever that changes (cublasSetStream, then
  cublasSetWorkspace again: setStream resets the workspace to cuBLAS's default pool); the bound Stream
  object is held, so its address cannot be reused by a new stream unnoticed. The warm-up step before a
  capture runs on the capture stream, so nothing is re-bound during the capture itself (PyTorch re-binds
  both on every call, captures included: they are host-side settings, not stream work);
- eager calls and captured calls take the same path (same handle, workspace and call), so a replayed graph
  computes bit for bit what the eager step computes.

One workspace per device is shared by every stream: GEMMs of one device must not run on two streams at
the same time (rawformer never does: a Generator runs everything on its own stream and synchronizes at the
end of a wave). Host calls are serialized by a lock.

Layouts (cuBLAS is column-major): a row-major (r, c) matrix with row stride ld is the column-major (c, r)
matrix with leading dimension ld. So C^T (N, M) = B^T (N, K) @ A^T (K, M) is one cublasGemmEx with B first:
a C-contiguous (or row-sliced) operand is passed as it is (CUBLAS_OP_N, ld = its row stride); a transposed
view of one (strides (1, ld), e.g. `wte.T`) is passed with CUBLAS_OP_T and ld = its column stride. Any
other layout is copied once to C order. `out` must have unit column stride (row stride >= N).

NumPy arrays: `a @ b` (the float64 / float32 reference path). `RAWFORMER_GEMM=cupy` makes eager CuPy calls
use cupy.matmul (a diagnostic switch; calls during a capture still come here). When libcublas cannot be
loaded (CublasNotFound, which says what was tried), eager calls fall back to cupy.matmul and a call during
a capture raises it, so the Generator's capture fails with that message and its steps run eagerly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rawformer import backend

__all__ = [
    "WORKSPACE_BYTES",
    "CublasNotFound",
    "GemmPlan",
    "find_cublas",
    "library_path",
    "matmul",
    "plan_gemm",
    "prepare",
]

WORKSPACE_BYTES = 32 * 1024 * 1024  # cuBLAS docs: 32 MiB recommended on Hopper (and enough below it)

# cublas_api.h / library_types.h (checked against the cuBLAS 13.1 headers)
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F = 0, 1, 2
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F = 68, 70
CUBLAS_GEMM_DEFAULT = -1
_CUDA_TYPE = {
    np.dtype(np.float16): CUDA_R_16F,
    np.dtype(np.float32): CUDA_R_32F,
    np.dtype(np.float64): CUDA_R_64F,
}
_INT_MAX = 2**31 - 1

_FORCE_CUPY = os.environ.get("RAWFORMER_GEMM", "").strip().lower() == "cupy"


class CublasNotFound(RuntimeError):
    """libcublas could not be located or loaded (the message lists what was tried)."""


# ---- finding libcublas -------------------------------------------------------------------------------------

_MAPS_LIB = re.compile(r"(/\S*/libcublas\.so(?:\.\d+)*)\s*$")


def cublas_paths_in_maps(maps_text: str) -> list[str]:
    """Paths of libcublas.so* (not libcublasLt) mapped in a /proc/<pid>/maps text, first seen first."""
    seen: list[str] = []
    for line in maps_text.splitlines():
        m = _MAPS_LIB.search(line)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def _major_of(path: str) -> int | None:
    m = re.search(r"libcublas\.so\.(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else None


def pick_cublas(paths: Sequence[str], cuda_major: int | None) -> str | None:
    """The library to use among mapped ones: the one whose soname major is CUDA's, else the first."""
    if not paths:
        return None
    if cuda_major is not None:
        for p in paths:
            if _major_of(p) == cuda_major:
                return p
    return paths[0]


def _read_maps() -> str:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cuda_major() -> int | None:
    cp = backend.cupy_module()
    if cp is None:
        return None
    try:
        return int(cp.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        return None


def _load_cupy_cublas() -> None:
    """Make CuPy load its cuBLAS (its cublas module links it), so /proc/self/maps shows which one."""
    try:
        import cupy_backends.cuda.libs.cublas  # noqa: F401
    except Exception:
        pass


def find_cublas(
    maps_text: str | None = None,
    cuda_major: int | None = None,
    loader: Callable[[str], Any] = ctypes.CDLL,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> tuple[Any, str]:
    """(loaded library, its path or name): the libcublas CuPy loaded, found in /proc/self/maps (so both use
    one copy), else what ctypes.util.find_library("cublas") names, else the sonames libcublas.so.<CUDA
    major>, .13, .12, .so. Raises CublasNotFound naming every candidate tried and why it failed."""
    if maps_text is None:
        _load_cupy_cublas()
        maps_text = _read_maps()
    if cuda_major is None:
        cuda_major = _cuda_major()
    candidates: list[str] = []
    mapped = pick_cublas(cublas_paths_in_maps(maps_text), cuda_major)
    if mapped:
        candidates.append(mapped)
    named = find_library("cublas")
    if named:
        candidates.append(named)
    majors = ([cuda_major] if cuda_major else []) + [13, 12]
    candidates += [f"libcublas.so.{m}" for m in dict.fromkeys(majors)] + ["libcublas.so"]
    errors = []
    for name in dict.fromkeys(candidates):
        try:
            return loader(name), name
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise CublasNotFound(
        "rawformer.kernels.gemm: cannot load libcublas (needed to run GEMMs inside CUDA graphs). Tried: "
        + "; ".join(errors)
        + ". CuPy's cuBLAS was not found in /proc/self/maps; install the CUDA toolkit's cuBLAS (or the "
        "nvidia-cublas wheel) where the dynamic loader finds it (LD_LIBRARY_PATH)."
    )


# ---- the library and one handle per device -----------------------------------------------------------------


class _Cublas:
    """The few libcublas entry points used here, with their C signatures."""

    def __init__(self, lib: Any, path: str) -> None:
        self.path = path
        vp, i, st = ctypes.c_void_p, ctypes.c_int, ctypes.c_int  # cublasStatus_t is an enum (int)

        def fn(name: str, args: list[Any]) -> Any:
            f = getattr(lib, name)
            f.argtypes, f.restype = args, st
            return f

        self.create = fn("cublasCreate_v2", [ctypes.POINTER(vp)])
        self.set_stream = fn("cublasSetStream_v2", [vp, vp])
        self.set_workspace = fn("cublasSetWorkspace_v2", [vp, vp, ctypes.c_size_t])
        # handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
        # computeType, algo
        self.gemm_ex = fn("cublasGemmEx", [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i])
        try:
            self.status_string = lib.cublasGetStatusString
            self.status_string.argtypes, self.status_string.restype = [i], ctypes.c_char_p
        except AttributeError:
            self.status_string = None

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = self.status_string(status).decode() if self.status_string is not None else ""
            raise RuntimeError(f"{what} failed: cuBLAS status {status} {name}".rstrip())


@dataclass
class _Device:
    handle: int
    workspace: Any  # cupy.cuda.Memory, kept for the life of the process (graphs point into it)
    stream: Any = None  # the cupy Stream the handle is bound to, held so its address cannot be reused


_lock = threading.Lock()
_lib: _Cublas | None = None
_lib_error: CublasNotFound | None = None
_devices: dict[int, _Device] = {}
# alpha = 1, beta = 0 in host pointer mode: their values are read at call (or capture) time
_ONE_F, _ZERO_F = ctypes.c_float(1.0), ctypes.c_float(0.0)
_ONE_D, _ZERO_D = ctypes.c_double(1.0), ctypes.c_double(0.0)
_SCALARS_F = (ctypes.addressof(_ONE_F), ctypes.addressof(_ZERO_F))
_SCALARS_D = (ctypes.addressof(_ONE_D), ctypes.addressof(_ZERO_D))


def _library() -> _Cublas:
    """The loaded library (found once; a failure is remembered and raised again without searching)."""
    global _lib, _lib_error
    if _lib is None:
        if _lib_error is not None:
            raise _lib_error
        try:
            lib, path = find_cublas()
            _lib = _Cublas(lib, path)
        except CublasNotFound as exc:
            _lib_error = exc
            raise
        except AttributeError as exc:  # a libcublas without these entry points (older than CUDA 11)
            _lib_error = CublasNotFound(f"rawformer.kernels.gemm: {path} lacks an entry point: {exc}")
            raise _lib_error from exc
    return _lib


def library_path() -> str:
    """The libcublas this module calls (path or soname); loads it on first use."""
    return _library().path


def _is_capturing(cp: Any, stream: Any) -> bool:
    try:
        return bool(cp.cuda.runtime.streamIsCapturing(stream.ptr))
    except Exception:  # an invalidated capture raises: it is a capture all the same
        return True


def _device_state(cp: Any, stream: Any) -> _Device:
    """The handle of the current device, bound to `stream` (created on first use; lock held)."""
    dev = int(cp.cuda.runtime.getDevice())
    state = _devices.get(dev)
    if state is None:
        lib = _library()  # CublasNotFound first: it is the cause, whatever else is wrong
        if stream.ptr not in (0,) and _is_capturing(cp, stream):
            raise RuntimeError(
                "rawformer.kernels.gemm: the first GEMM on a device ran inside a stream capture; call "
                "rawformer.kernels.gemm.prepare() (or run the step once eagerly) before capturing, since "
                "creating the cuBLAS handle and its workspace cannot be captured"
            )
        h = ctypes.c_void_p()
        lib.check(lib.create(ctypes.byref(h)), "cublasCreate")
        workspace = cp.cuda.Memory(WORKSPACE_BYTES)  # plain cudaMalloc: no pool owns it
        state = _Device(int(h.value or 0), workspace)
        _devices[dev] = state
    if state.stream is None or state.stream.ptr != stream.ptr:
        lib = _library()
        lib.check(lib.set_stream(state.handle, stream.ptr), "cublasSetStream")
        # setStream put the handle back on cuBLAS's default workspace pool: ours again
        lib.check(lib.set_workspace(state.handle, state.workspace.ptr, WORKSPACE_BYTES), "cublasSetWorkspace")
        state.stream = stream
    return state


def prepare() -> None:
    """Create the current device's handle and workspace and bind them to CuPy's current stream.

    Call before `stream.begin_capture()` on the capture stream (CUDA graph capture cannot create them).
    Raises CublasNotFound when libcublas cannot be loaded."""
    cp = backend.require_cupy()
    with _lock:
        _device_state(cp, cp.cuda.get_current_stream())


# ---- layouts -----------------------------------------------------------------------------------------------


def operand_layout(shape: tuple[int, int], strides: tuple[int, int]) -> tuple[bool, int] | None:
    """(transposed, leading dimension) of a 2-D operand with element strides, as cuBLAS reads it, or None
    when it must be copied first.

    Row-major (unit column stride): (False, row stride); a transposed view (unit row stride): (True,
    column stride). A size-1 axis has no meaningful stride, so it never disqualifies a layout."""
    rows, cols = shape
    s0, s1 = strides
    if cols == 1 or s1 == 1:
        ld = s0 if rows > 1 else max(cols, 1)
        if ld >= max(cols, 1):
            return False, ld
    if rows == 1 or s0 == 1:
        ld = s1 if cols > 1 else max(rows, 1)
        if ld >= max(rows, 1):
            return True, ld
    return None


@dataclass(frozen=True)
class GemmPlan:
    """One cublasGemmEx computing row-major C = A @ B as column-major C^T = op(B) op(A), B passed first."""

    transa: int  # op of cuBLAS's first operand (our B)
    transb: int  # op of cuBLAS's second operand (our A)
    m: int  # N
    n: int  # M
    k: int  # K
    lda: int  # leading dimension of B as passed
    ldb: int  # leading dimension of A as passed
    ldc: int  # row stride of C


def plan_gemm(
    a_shape: tuple[int, int],
    a_strides: tuple[int, int],
    b_shape: tuple[int, int],
    b_strides: tuple[int, int],
    c_row_stride: int,
) -> GemmPlan | None:
    """The cuBLAS call for A (M, K) @ B (K, N) into a row-major C with row stride c_row_stride (all strides
    in elements), or None when A or B needs a copy to C order first."""
    (m_rows, k), (_, n) = a_shape, b_shape
    la, lb = operand_layout(a_shape, a_strides), operand_layout(b_shape, b_strides)
    if la is None or lb is None:
        return None
    (ta, lda), (tb, ldb) = la, lb
    # B row-major (K, N) is the column-major (N, K) matrix B^T: op N; a transposed B view is op T
    return GemmPlan(
        transa=CUBLAS_OP_T if tb else CUBLAS_OP_N,
        transb=CUBLAS_OP_T if ta else CUBLAS_OP_N,
        m=n, n=m_rows, k=k, lda=ldb, ldb=lda, ldc=max(c_row_stride, n, 1),
    )  # fmt: skip


def _elem_strides(x: Any) -> tuple[int, int]:
    item = x.itemsize
    return (x.strides[0] // item, x.strides[1] // item)


# ---- matmul ------------------------------------------------------------------------------------------------


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """C = a @ b for 2-D arrays, capturable in a CUDA graph for CuPy arrays.

    Parameters
    ----------
    a : (M, K) NumPy or CuPy array; CuPy: float16 / float32 / float64, any strides (C-contiguous, row
        slices and transposed views are read in place, other layouts copied once)
    b : (K, N), same kind and dtype as a
    out : optional (M, N) array of that dtype with unit column stride, not overlapping a or b

    Returns
    -------
    (M, N) array (out when given). CuPy: cublasGemmEx with fp32 accumulation (fp64 for float64) on CuPy's
    current stream; NumPy: a @ b.
    """
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
        raise ValueError(
            f"matmul: a and b must be 2-D, got a {getattr(a, 'shape', type(a))} and b "
            f"{getattr(b, 'shape', type(b))}"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain (a.shape[1] != b.shape[0])"
        )
    a_gpu, b_gpu = backend.is_cupy(a), backend.is_cupy(b)
    if a_gpu != b_gpu or (out is not None and backend.is_cupy(out) != a_gpu):
        raise TypeError("matmul: a, b (and out) must all be NumPy arrays or all CuPy arrays")
    if not a_gpu:
        return a @ b if out is None else np.matmul(a, b, out=out)
    return _matmul_cupy(a, b, out)


def _matmul_cupy(a: Any, b: Any, out: Any) -> Any:
    cp = backend.require_cupy()
    dtype = np.dtype(a.dtype)
    if b.dtype != dtype or dtype not in _CUDA_TYPE:
        raise TypeError(
            f"matmul: a and b must share one dtype (float16, float32 or float64), got {a.dtype} and {b.dtype}"
        )
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = cp.empty((m, n), dtype=dtype)
    else:
        if out.dtype != dtype or tuple(out.shape) != (m, n):
            raise ValueError(f"matmul: out must be ({m}, {n}) {dtype}, got {tuple(out.shape)} {out.dtype}")
        if n > 1 and m > 0 and out.strides[1] != out.itemsize:
            raise ValueError("matmul: out must have unit column stride (C order rows)")
        if m > 1 and n > 0 and out.strides[0] < n * out.itemsize:
            raise ValueError("matmul: out rows overlap (row stride < N elements)")
        if cp.may_share_memory(out, a) or cp.may_share_memory(out, b):
            raise ValueError("matmul: out overlaps a or b")
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    stream = cp.cuda.get_current_stream()
    if _FORCE_CUPY and not _is_capturing(cp, stream):
        return cp.matmul(a, b, out=out)
    c_ld = out.strides[0] // out.itemsize if m > 1 else n
    sa, sb = _elem_strides(a), _elem_strides(b)
    plan = plan_gemm(a.shape, sa, b.shape, sb, c_ld)
    if plan is None:
        if operand_layout(a.shape, sa) is None:
            a = cp.ascontiguousarray(a)
        if operand_layout(b.shape, sb) is None:
            b = cp.ascontiguousarray(b)
        plan = plan_gemm(a.shape, _elem_strides(a), b.shape, _elem_strides(b), c_ld)
        assert plan is not None
    if max(plan.m, plan.n, plan.k, plan.lda, plan.ldb, plan.ldc) > _INT_MAX:
        if _is_capturing(cp, stream):
            raise ValueError(f"matmul: ({m}, {k}) @ ({k}, {n}) exceeds cuBLAS's 32-bit sizes; cannot capture")
        return cp.matmul(a, b, out=out)
    try:
        lib = _library()
    except CublasNotFound:
        if _is_capturing(cp, stream):
            raise
        return cp.matmul(a, b, out=out)  # eager steps still run; a capture reports the error
    ctype = _CUDA_TYPE[dtype]
    if dtype == np.float64:
        compute, (one, zero) = CUBLAS_COMPUTE_64F, _SCALARS_D
    else:
        compute, (one, zero) = CUBLAS_COMPUTE_32F, _SCALARS_F
    with _lock:
        state = _device_state(cp, stream)
        status = lib.gemm_ex(
            state.handle, plan.transa, plan.transb, plan.m, plan.n, plan.k,
            one, b.data.ptr, ctype, plan.lda, a.data.ptr, ctype, plan.ldb,
            zero, out.data.ptr, ctype, plan.ldc, compute, CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
    if status:  # the message only on failure: formatting it (numpy dtype str) costs microseconds per call
        lib.check(status, f"cublasGemmEx ({m}, {k}) @ ({k}, {n}) {dtype}")
    return out
