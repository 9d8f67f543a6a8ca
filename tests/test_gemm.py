"""rawformer.kernels.gemm: the capturable GEMM.

CPU: the NumPy path, argument errors, `linear`, the cuBLAS argument plan (checked by emulating a
column-major cublasGemmEx over the operands' raw buffers), and the libcublas lookup. GPU: matmul against
float64 on odd shapes and layouts, out=, a matmul captured in a CUDA graph and replayed on new data, eager ==
replay bit for bit, a change of stream."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from rawformer.models.common import linear
from tolerances import assert_close, poison

from rawformer.kernels import gemm

# (M, K, N): ones, primes, non-powers of two, a GPT-2-like projection, zero sizes
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 17, 5), (37, 129, 61), (4, 768, 2304), (64, 97, 1000), (2, 64, 1)]
ZERO_SHAPES = [(0, 5, 3), (5, 0, 3), (4, 3, 0)]


def _operand(xp, rng, rows, cols, layout, dtype):
    """A (rows, cols) operand in one of the layouts the models pass: C order, a transposed view (`wte.T`),
    a column slice of a wider matrix (q of a fused qkv), or a strided view that has to be copied."""
    if layout == "c":
        base, view = (rows, cols), lambda x: x
    elif layout == "t":
        base, view = (cols, rows), lambda x: x.T
    elif layout == "slice":
        base, view = (rows, cols + 3), lambda x: x[:, 1 : cols + 1]
    else:  # "step": every other row and column
        base, view = (2 * rows, 2 * cols), lambda x: x[::2, ::2]
    return view(xp.asarray(rng.standard_normal(base).astype(dtype)))


# ---- CPU: the NumPy path -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + ZERO_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_matmul_is_a_at_b(rng, shape, dtype):
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).T.copy().T.astype(dtype)  # any layout: NumPy handles it
    out = gemm.matmul(a, b)
    assert out.dtype == dtype and out.shape == (m, n)
    _check(out, a, b, dtype)
    buf = poison(np, (m, n), dtype)
    assert gemm.matmul(a, b, out=buf) is buf
    np.testing.assert_array_equal(buf, out)


def test_numpy_matmul_known_values():
    a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    b = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    np.testing.assert_array_equal(gemm.matmul(a, b), [[5, 2, 0], [11, 4, -1], [17, 6, -2]])
    np.testing.assert_array_equal(gemm.matmul(a, a.T), [[5, 11, 17], [11, 25, 39], [17, 39, 61]])


def test_matmul_argument_errors():
    a, b = np.ones((3, 4)), np.ones((4, 2))
    with pytest.raises(ValueError, match="2-D"):
        gemm.matmul(np.ones(4), b)
    with pytest.raises(ValueError, match="2-D"):
        gemm.matmul(a, np.ones((1, 4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        gemm.matmul([[1.0]], b)
    with pytest.raises(ValueError, match="do not chain"):
        gemm.matmul(a, np.ones((3, 2)))


@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_numpy(rng, lead, bias):
    x = rng.standard_normal((*lead, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32) if bias else None
    y = linear(x, w, b)
    ref = x.astype(np.float64) @ w.astype(np.float64) + (0.0 if b is None else b.astype(np.float64))
    assert y.shape == (*lead, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_linear_transposed_weight_numpy(rng):
    """The tied lm head: linear(h, wte.T) with wte (V, H)."""
    h = rng.standard_normal((3, 8)).astype(np.float32)
    wte = rng.standard_normal((11, 8)).astype(np.float32)
    np.testing.assert_allclose(linear(h, wte.T), h.astype(np.float64) @ wte.T.astype(np.float64), rtol=1e-5)


# ---- CPU: the cuBLAS argument plan, emulated ---------------------------------------------------------------


def _offset(x):
    """(flat base buffer, element offset of x[0, 0] in it)."""
    base = x
    while base.base is not None:
        base = base.base
    off = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize
    return base.reshape(-1), off


def _col_major(buf, off, trans, rows, cols, ld):
    """op(X) as cuBLAS reads it: X stored column-major with leading dimension ld; (rows, cols) = op(X)."""
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    idx = off + (i * ld + j if trans == gemm.CUBLAS_OP_T else i + j * ld)
    return buf[idx]


def _emulate(a, b):
    """Row-major C = a @ b computed the way cublasGemmEx would run the plan (column-major, B first)."""
    m, n = a.shape[0], b.shape[1]
    c_ld = n + 2  # a C with padded rows: ldc must be honoured
    plan = gemm.plan_gemm(a.shape, gemm._elem_strides(a), b.shape, gemm._elem_strides(b), c_ld)
    if plan is None:
        return None
    assert (plan.m, plan.n, plan.k) == (n, m, a.shape[1])
    bb, boff = _offset(b)
    ab, aoff = _offset(a)
    # cuBLAS argument checks: lda >= rows of the stored first operand, ldb likewise, ldc >= m
    assert plan.lda >= max(1, plan.m if plan.transa == gemm.CUBLAS_OP_N else plan.k)
    assert plan.ldb >= max(1, plan.k if plan.transb == gemm.CUBLAS_OP_N else plan.n)
    assert plan.ldc >= max(1, plan.m)
    op_a = _col_major(bb, boff, plan.transa, plan.m, plan.k, plan.lda)  # (N, K) = B^T
    op_b = _col_major(ab, aoff, plan.transb, plan.k, plan.n, plan.ldb)  # (K, M) = A^T
    ct = op_a @ op_b  # (N, M) column-major C^T ...
    cbuf = np.full(plan.ldc * max(m, 1), np.nan)
    for j in range(m):  # ... written column by column with ldc
        cbuf[j * plan.ldc : j * plan.ldc + n] = ct[:, j]
    return cbuf.reshape(max(m, 1), plan.ldc)[:m, :n]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("la", ["c", "t", "slice", "step"])
@pytest.mark.parametrize("lb", ["c", "t", "slice", "step"])
def test_plan_emulated_matches_numpy(rng, shape, la, lb):
    m, k, n = shape
    a = _operand(np, rng, m, k, la, np.float64)
    b = _operand(np, rng, k, n, lb, np.float64)
    got = _emulate(a, b)
    needs_copy = (
        gemm.operand_layout(a.shape, gemm._elem_strides(a)) is None
        or gemm.operand_layout(b.shape, gemm._elem_strides(b)) is None
    )
    if got is None:
        assert needs_copy
        got = _emulate(np.ascontiguousarray(a), np.ascontiguousarray(b))
    else:
        assert not needs_copy
    np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)


def test_operand_layout_cases():
    assert gemm.operand_layout((3, 4), (4, 1)) == (False, 4)  # C order
    assert gemm.operand_layout((3, 4), (7, 1)) == (False, 7)  # row slice
    assert gemm.operand_layout((3, 4), (1, 3)) == (True, 3)  # transposed view
    assert gemm.operand_layout((3, 4), (1, 5)) == (True, 5)  # transposed view of a row slice
    assert gemm.operand_layout((1, 4), (999, 1)) == (False, 4)  # one row: its stride does not matter
    assert gemm.operand_layout((3, 1), (1, 0)) == (False, 1)  # one column
    assert gemm.operand_layout((3, 4), (8, 2)) is None  # every other column: copy
    assert gemm.operand_layout((3, 4), (2, 1)) is None  # overlapping rows: copy
    assert gemm.operand_layout((3, 1), (0, 1)) is None  # a broadcast column: copy
    assert gemm.operand_layout((3, 4), (-4, 1)) is None  # reversed rows: copy


# ---- CPU: finding libcublas --------------------------------------------------------------------------------

MAPS = """\
7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f10-7f11 r-xp 00000000 08:01 2 /opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublasLt.so.13
7f20-7f21 r-xp 00000000 08:01 3 /opt/venv/lib/python3.12/site-packages/nvidia/cu12/lib/libcublas.so.12
7f30-7f31 r-xp 00000000 08:01 4 /opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13
7f31-7f32 r--p 00100000 08:01 4 /opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13
7f40-7f41 rw-p 00000000 00:00 0
7f50-7f51 r-xp 00000000 08:01 5 /usr/local/cuda/lib64/libcublas.so (deleted)
"""


def test_cublas_paths_in_maps():
    paths = gemm.cublas_paths_in_maps(MAPS)
    assert paths == [
        "/opt/venv/lib/python3.12/site-packages/nvidia/cu12/lib/libcublas.so.12",
        "/opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13",
    ]  # no libcublasLt, no duplicates, no deleted files, no anonymous mappings
    assert gemm.cublas_paths_in_maps("") == []


def test_pick_cublas_prefers_cuda_major():
    paths = gemm.cublas_paths_in_maps(MAPS)
    assert gemm.pick_cublas(paths, 13).endswith("libcublas.so.13")
    assert gemm.pick_cublas(paths, 12).endswith("libcublas.so.12")
    assert gemm.pick_cublas(paths, 11) == paths[0]  # no match: the first one mapped
    assert gemm.pick_cublas(paths, None) == paths[0]
    assert gemm.pick_cublas([], 13) is None


class _Loader:
    def __init__(self, ok):
        self.ok, self.tried = set(ok), []

    def __call__(self, name):
        self.tried.append(name)
        if name in self.ok:
            return ("lib", name)
        raise OSError(f"{name}: cannot open shared object file")


def test_find_cublas_uses_the_mapped_library_first():
    path = "/opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13"
    loader = _Loader([path, "libcublas.so.13"])
    lib, name = gemm.find_cublas(MAPS, 13, loader=loader, find_library=lambda n: "libcublas.so.13")
    assert name == path and loader.tried == [path]


def test_find_cublas_falls_back_to_find_library_then_sonames():
    loader = _Loader(["libcublas.so.12"])
    lib, name = gemm.find_cublas("", 12, loader=loader, find_library=lambda n: None)
    assert name == "libcublas.so.12" and loader.tried == ["libcublas.so.12"]
    loader = _Loader(["libcublas.so.11"])
    lib, name = gemm.find_cublas("", None, loader=loader, find_library=lambda n: "libcublas.so.11")
    assert name == "libcublas.so.11" and loader.tried == ["libcublas.so.11"]
    loader = _Loader(["libcublas.so"])
    lib, name = gemm.find_cublas("", None, loader=loader, find_library=lambda n: None)
    assert loader.tried == ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]


def test_find_cublas_clear_error_when_missing():
    loader = _Loader([])
    with pytest.raises(gemm.CublasNotFound, match="cannot load libcublas") as info:
        gemm.find_cublas(MAPS, 13, loader=loader, find_library=lambda n: None)
    msg = str(info.value)
    assert "libcublas.so.13" in msg and "libcublas.so.12" in msg and "LD_LIBRARY_PATH" in msg
    assert isinstance(info.value, RuntimeError)


# ---- CPU: the CuPy path against a fake CuPy and a fake libcublas ------------------------------------------
#
# The fake arrays are NumPy arrays with CuPy's attributes (`data.ptr` is the host address); the fake
# cublasGemmEx reads and writes host memory at the pointers it is given, with cuBLAS's column-major
# semantics. So the whole call (pointers, ops, sizes, leading dimensions, alpha / beta, handle binding) is
# checked here; only the real library is left to the GPU run.

_NP_OF = {gemm.CUDA_R_16F: np.float16, gemm.CUDA_R_32F: np.float32, gemm.CUDA_R_64F: np.float64}


class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class _FakeArray:
    def __init__(self, arr):
        self.arr = arr
        self.shape, self.strides, self.itemsize = arr.shape, arr.strides, arr.itemsize
        self.dtype, self.ndim = arr.dtype, arr.ndim
        self.data = _Ptr(arr.__array_interface__["data"][0])

    @property
    def T(self):
        return _FakeArray(self.arr.T)

    def __getitem__(self, idx):
        return _FakeArray(self.arr[idx])

    def fill(self, v):
        self.arr.fill(v)


class _FakeStream:
    def __init__(self, ptr):
        self.ptr = ptr


class _FakeCupy:
    def __init__(self):
        fake = self
        self.capturing = False
        self.stream = _FakeStream(0x5000)
        self.memory = []

        class _Runtime:
            @staticmethod
            def getDevice():
                return 0

            @staticmethod
            def streamIsCapturing(ptr):
                return fake.capturing

        class _Cuda:
            runtime = _Runtime

            @staticmethod
            def get_current_stream():
                return fake.stream

            @staticmethod
            def Memory(size):
                buf = np.zeros(size, np.uint8)
                fake.memory.append(buf)
                return _Ptr(buf.ctypes.data)

        self.cuda = _Cuda

    def empty(self, shape, dtype):
        return _FakeArray(np.empty(shape, dtype))

    def ascontiguousarray(self, a):
        return _FakeArray(np.ascontiguousarray(a.arr))

    def may_share_memory(self, a, b):
        return np.may_share_memory(a.arr, b.arr)

    def matmul(self, a, b, out=None):
        self.cupy_matmuls = getattr(self, "cupy_matmuls", 0) + 1
        out.arr[...] = a.arr @ b.arr
        return out


def _host(ptr, dtype, count):
    ctype = np.ctypeslib.as_ctypes_type(np.dtype(dtype)) if dtype != np.float16 else ctypes.c_uint16
    raw = np.ctypeslib.as_array((ctype * count).from_address(ptr))
    return raw.view(dtype) if dtype == np.float16 else raw


class _FakeLib:
    """libcublas as far as rawformer.kernels.gemm uses it, emulated on host memory."""

    path = "fake-libcublas.so"

    def __init__(self):
        self.calls = []

    def create(self, handle_ref):
        self.calls.append(("create",))
        handle_ref._obj.value = 0x1234
        return 0

    def set_stream(self, handle, stream):
        self.calls.append(("set_stream", handle, stream))
        return 0

    def set_workspace(self, handle, ptr, size):
        self.calls.append(("set_workspace", handle, size))
        assert ptr  # a real buffer (cudaMalloc, 256-byte aligned, on the GPU)
        return 0

    def gemm_ex(self, h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo):
        self.calls.append(("gemm", h, ta, tb, m, n, k, lda, ldb, ldc, compute, algo))
        assert at == bt == ct and algo == gemm.CUBLAS_GEMM_DEFAULT
        dt = _NP_OF[at]
        scal = ctypes.c_double if compute == gemm.CUBLAS_COMPUTE_64F else ctypes.c_float
        assert compute in (gemm.CUBLAS_COMPUTE_32F, gemm.CUBLAS_COMPUTE_64F)
        al, be = scal.from_address(alpha).value, scal.from_address(beta).value

        def op(ptr, trans, rows, cols, ld):  # op(X) (rows, cols) of X stored column-major
            srows, scols = (rows, cols) if trans == gemm.CUBLAS_OP_N else (cols, rows)
            assert ld >= max(1, srows)
            flat = _host(ptr, dt, ld * (scols - 1) + srows).astype(np.float64)
            stored = np.stack([flat[j * ld : j * ld + srows] for j in range(scols)], axis=1)
            return stored if trans == gemm.CUBLAS_OP_N else stored.T

        res = al * (op(A, ta, m, k, lda) @ op(B, tb, k, n, ldb))  # (m, n)
        assert ldc >= max(1, m) and be == 0.0
        cflat = _host(C, dt, ldc * (n - 1) + m)
        for j in range(n):
            cflat[j * ldc : j * ldc + m] = res[:, j].astype(dt)
        return 0

    def check(self, status, what):
        assert status == 0, what


@pytest.fixture
def fake_gpu(monkeypatch):
    fake_cp, fake_lib = _FakeCupy(), _FakeLib()
    monkeypatch.setattr(gemm.backend, "require_cupy", lambda: fake_cp)
    monkeypatch.setattr(gemm.backend, "is_cupy", lambda a: isinstance(a, _FakeArray))
    monkeypatch.setattr(gemm, "_lib", fake_lib)
    monkeypatch.setattr(gemm, "_devices", {})
    return fake_cp, fake_lib


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + ZERO_SHAPES)
@pytest.mark.parametrize("layouts", [("c", "c"), ("c", "t"), ("t", "c"), ("slice", "t"), ("step", "step")])
def test_cupy_path_on_fake_cublas(fake_gpu, rng, dtype, shape, layouts):
    fake_cp, fake_lib = fake_gpu
    m, k, n = shape
    a = _FakeArray(_operand(np, rng, m, k, layouts[0], dtype))
    b = _FakeArray(_operand(np, rng, k, n, layouts[1], dtype))
    out = gemm.matmul(a, b)
    assert isinstance(out, _FakeArray) and out.shape == (m, n) and out.dtype == dtype
    _check(out.arr, a.arr, b.arr, dtype)
    wide = _FakeArray(poison(np, (m, n + 4), dtype))
    gemm.matmul(a, b, out=wide[:, :n])
    _check(wide.arr[:, :n], a.arr, b.arr, dtype)
    assert np.isnan(wide.arr[:, n:]).all()
    gemms = [c for c in fake_lib.calls if c[0] == "gemm"]
    assert len(gemms) == (2 if m and n and k else 0)


def test_cupy_path_binds_handle_then_stream_then_workspace(fake_gpu, rng):
    fake_cp, fake_lib = fake_gpu
    a = _FakeArray(rng.standard_normal((3, 5)).astype(np.float32))
    b = _FakeArray(rng.standard_normal((5, 2)).astype(np.float32))
    gemm.prepare()
    gemm.matmul(a, b)
    gemm.matmul(a, b)
    names = [c[0] for c in fake_lib.calls]
    assert names == ["create", "set_stream", "set_workspace", "gemm", "gemm"]
    assert fake_lib.calls[1] == ("set_stream", 0x1234, 0x5000)
    assert fake_lib.calls[2] == ("set_workspace", 0x1234, gemm.WORKSPACE_BYTES)
    assert len(fake_cp.memory) == 1  # one workspace, allocated once
    # a new current stream: re-bound, and the workspace set again (setStream resets it)
    fake_cp.stream = _FakeStream(0x6000)
    gemm.matmul(a, b)
    assert [c[0] for c in fake_lib.calls[5:]] == ["set_stream", "set_workspace", "gemm"]
    assert fake_lib.calls[5] == ("set_stream", 0x1234, 0x6000)
    # during a capture on the bound stream: the GEMM call only
    fake_cp.capturing = True
    gemm.matmul(a, b)
    assert [c[0] for c in fake_lib.calls[8:]] == ["gemm"]
    # column-major C^T = B^T A^T: B first, both op N for C-order operands
    assert fake_lib.calls[-1][1:10] == (0x1234, gemm.CUBLAS_OP_N, gemm.CUBLAS_OP_N, 2, 3, 5, 2, 5, 2)


def test_cupy_path_first_use_inside_a_capture_is_an_error(fake_gpu, rng):
    fake_cp, fake_lib = fake_gpu
    fake_cp.capturing = True
    a = _FakeArray(np.ones((2, 2), np.float32))
    with pytest.raises(RuntimeError, match="prepare"):
        gemm.matmul(a, a.T)
    assert fake_lib.calls == []


def test_cupy_path_without_libcublas(fake_gpu, monkeypatch, rng):
    """No libcublas: eager calls fall back to cupy.matmul; a call during a capture raises CublasNotFound."""
    fake_cp, fake_lib = fake_gpu
    tries = []

    def missing():
        tries.append(1)
        raise gemm.CublasNotFound("cannot load libcublas (test)")

    monkeypatch.setattr(gemm, "_lib", None)
    monkeypatch.setattr(gemm, "_lib_error", None)
    monkeypatch.setattr(gemm, "find_cublas", missing)
    a = _FakeArray(rng.standard_normal((3, 5)).astype(np.float32))
    b = _FakeArray(rng.standard_normal((5, 2)).astype(np.float32))
    out = gemm.matmul(a, b)
    _check(out.arr, a.arr, b.arr, np.float32)
    gemm.matmul(a, b)
    assert fake_cp.cupy_matmuls == 2 and len(tries) == 1  # the failure is remembered
    fake_cp.capturing = True
    with pytest.raises(gemm.CublasNotFound, match="cannot load libcublas"):
        gemm.matmul(a, b)
    with pytest.raises(gemm.CublasNotFound):
        gemm.prepare()


def test_cupy_path_argument_errors(fake_gpu):
    a = _FakeArray(np.ones((3, 4), np.float16))
    b = _FakeArray(np.ones((4, 2), np.float16))
    with pytest.raises(TypeError, match="one dtype"):
        gemm.matmul(a, _FakeArray(np.ones((4, 2), np.float32)))
    with pytest.raises(TypeError, match="one dtype"):
        gemm.matmul(_FakeArray(np.ones((3, 4), np.int32)), _FakeArray(np.ones((4, 2), np.int32)))
    with pytest.raises(TypeError, match="NumPy arrays or all CuPy"):
        gemm.matmul(a, np.ones((4, 2), np.float16))
    with pytest.raises(ValueError, match="out must be"):
        gemm.matmul(a, b, out=_FakeArray(np.empty((3, 3), np.float16)))
    with pytest.raises(ValueError, match="unit column stride"):
        gemm.matmul(a, b, out=_FakeArray(np.empty((2, 3), np.float16)).T)
    with pytest.raises(ValueError, match="rows overlap"):
        gemm.matmul(
            a, b, out=_FakeArray(np.lib.stride_tricks.as_strided(np.empty(4, np.float16), (3, 2), (2, 2)))
        )
    sq = _FakeArray(np.ones((4, 4), np.float16))
    with pytest.raises(ValueError, match="overlaps"):
        gemm.matmul(sq, sq, out=sq)


# ---- GPU ---------------------------------------------------------------------------------------------------


def _ref(a, b):
    from rawformer import backend

    return backend.to_numpy(a).astype(np.float64) @ backend.to_numpy(b).astype(np.float64)


def _check(out, a, b, dtype):
    # the error of a K-term fp32-accumulated dot grows with sqrt(K): scale the floor by the terms' size
    k = a.shape[1]
    terms_arr = _ref(abs(a), abs(b))
    terms = float(terms_arr.max()) if k and terms_arr.size else 0.0
    assert_close(out, _ref(a, b), dtype, scale=terms)


@pytest.mark.gpu
def test_gpu_library_found(cp):
    assert "cublas" in gemm.library_path()
    gemm.prepare()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", SHAPES + ZERO_SHAPES)
@pytest.mark.parametrize(
    "layouts",
    [("c", "c"), ("c", "t"), ("t", "c"), ("t", "t"), ("slice", "slice"), ("step", "t"), ("c", "step")],
)
def test_gpu_matmul_vs_float64(cp, rng, dtype, shape, layouts):
    m, k, n = shape
    a = _operand(cp, rng, m, k, layouts[0], dtype)
    b = _operand(cp, rng, k, n, layouts[1], dtype)
    out = gemm.matmul(a, b)
    assert isinstance(out, cp.ndarray) and out.dtype == dtype and out.shape == (m, n)
    _check(out, a, b, dtype)
    buf = poison(cp, (m, n), dtype)
    assert gemm.matmul(a, b, out=buf) is buf
    _check(buf, a, b, dtype)
    # a padded out: rows of a wider buffer
    wide = poison(cp, (m, n + 5), dtype)
    gemm.matmul(a, b, out=wide[:, :n])
    _check(wide[:, :n], a, b, dtype)
    assert bool(cp.isnan(wide[:, n:]).all()) or n == 0 or m == 0


@pytest.mark.gpu
def test_gpu_matmul_float64(cp, rng):
    a = cp.asarray(rng.standard_normal((9, 33)))
    b = cp.asarray(rng.standard_normal((21, 33))).T
    _check(gemm.matmul(a, b), a, b, np.float64)


@pytest.mark.gpu
def test_gpu_matmul_errors(cp):
    a = cp.ones((3, 4), dtype=np.float16)
    with pytest.raises(TypeError, match="one dtype"):
        gemm.matmul(a, cp.ones((4, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="one dtype"):
        gemm.matmul(a.astype(np.int32), cp.ones((4, 2), dtype=np.int32))
    with pytest.raises(TypeError, match="NumPy arrays or all CuPy"):
        gemm.matmul(a, np.ones((4, 2), dtype=np.float16))
    with pytest.raises(ValueError, match="out must be"):
        gemm.matmul(a, cp.ones((4, 2), dtype=np.float16), out=cp.empty((3, 3), dtype=np.float16))
    with pytest.raises(ValueError, match="unit column stride"):
        gemm.matmul(a, cp.ones((4, 2), dtype=np.float16), out=cp.empty((2, 3), dtype=np.float16).T)
    with pytest.raises(ValueError, match="overlaps"):
        sq = cp.ones((4, 4), dtype=np.float16)
        gemm.matmul(sq, sq, out=sq)


def _capture(cp, stream, fn):
    """(graph, output) of fn captured on `stream`, after one eager warm-up there (as CupyCapture does)."""
    with stream:
        gemm.prepare()
        fn()
        stream.synchronize()
        stream.begin_capture()
        try:
            out = fn()
        finally:
            graph = stream.end_capture()
    return graph, out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(1, 768, 2304), (4, 129, 61), (64, 97, 1000)])
def test_gpu_matmul_in_cuda_graph_replayed_on_new_data(cp, rng, dtype, shape):
    """A captured matmul (row-major x, a transposed weight view like the tied head, a bias add) replays on
    whatever the input buffers hold at launch time, and equals the eager call bit for bit."""
    m, k, n = shape
    x = cp.asarray(rng.standard_normal((m, k)).astype(dtype))
    wte = cp.asarray(rng.standard_normal((n, k)).astype(dtype))  # (V, H): the head reads wte.T
    bias = cp.asarray(rng.standard_normal(n).astype(dtype))
    out = cp.empty((m, n), dtype=dtype)
    stream = cp.cuda.Stream(non_blocking=True)

    def step():
        gemm.matmul(x, wte.T, out=out)
        cp.add(out, bias, out=out)  # in place: nothing allocated during the capture
        return out

    graph, res = _capture(cp, stream, step)
    assert res is out
    for trial in range(3):
        x[...] = cp.asarray(rng.standard_normal((m, k)).astype(dtype))
        if trial == 2:
            wte[...] = cp.asarray(rng.standard_normal((n, k)).astype(dtype))
        out.fill(np.nan)
        # the new inputs and the poison were written on the current stream, which a non-blocking stream
        # does not wait for: finish them before the replay reads the buffers
        cp.cuda.get_current_stream().synchronize()
        with stream:
            graph.launch(stream)
        stream.synchronize()
        ref = _ref(x, wte.T) + cp.asnumpy(bias).astype(np.float64)
        terms = float(np.abs(_ref(abs(x), abs(wte.T))).max())
        assert_close(out, ref, dtype, scale=terms)
        replayed = out.copy()
        with stream:
            step()
        stream.synchronize()
        assert bool((out == replayed).all()), "eager and replayed GEMMs differ"


@pytest.mark.gpu
def test_gpu_matmul_captured_with_private_pool(cp, rng):
    """out=None inside the capture: the output comes from a private pool, as in CupyCapture."""
    a = cp.asarray(rng.standard_normal((8, 40)).astype(np.float16))
    b = cp.asarray(rng.standard_normal((40, 24)).astype(np.float16))
    stream = cp.cuda.Stream(non_blocking=True)
    pool = cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(pool.malloc):
        graph, out = _capture(cp, stream, lambda: linear(a, b))
    a[...] = cp.asarray(rng.standard_normal((8, 40)).astype(np.float16))
    cp.cuda.get_current_stream().synchronize()  # the non-blocking stream does not wait for this write
    with stream:
        graph.launch(stream)
    stream.synchronize()
    _check(out, a, b, np.float16)


@pytest.mark.gpu
def test_gpu_matmul_follows_the_current_stream(cp, rng):
    """The handle is re-bound when CuPy's current stream changes (default stream, then two others)."""
    a = cp.asarray(rng.standard_normal((5, 64)).astype(np.float32))
    b = cp.asarray(rng.standard_normal((64, 7)).astype(np.float32))
    results = [gemm.matmul(a, b)]
    for _ in range(2):
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            results.append(gemm.matmul(a, b))
        s.synchronize()
    for r in results:
        _check(r, a, b, np.float32)
        assert bool((r == results[0]).all())
