"""GPU-side plumbing: device arrays in and out, mixed devices refused, debug timing, compile cache."""

from __future__ import annotations

import numpy as np
import pytest

import rawformer as rf
from rawformer import backend
from rawformer.kernels import modules

pytestmark = pytest.mark.gpu


def test_info_reports_the_device():
    from rawformer import cli

    rows = cli.info()
    assert rows["backend"] == "gpu"
    assert rows["compute capability"][0].isdigit()


def test_cupy_in_cupy_out(cp):
    x = cp.random.standard_normal((3, 5), dtype=cp.float32)
    y = rf.softmax(x)
    assert isinstance(y, cp.ndarray) and y.device == x.device and y.dtype == x.dtype


def test_mixed_devices_are_refused(cp):
    x = cp.ones((4, 8), cp.float32)
    with pytest.raises(ValueError, match="weight"):
        rf.layer_norm(x, np.ones(8, np.float32))


def test_numba_device_array_round_trip(cp):
    from rawformer.kernels.numba import _numba

    cuda = _numba.cuda
    x = cuda.to_device(np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32))
    y = rf.softmax(x)
    assert type(y).__module__.startswith("numba")
    np.testing.assert_allclose(y.copy_to_host(), rf.softmax(x.copy_to_host()), rtol=1e-5, atol=1e-7)


def test_torch_cuda_tensor_round_trip(cp):
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 77, device="cuda", dtype=torch.float16)
    y = rf.softmax(x)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.softmax(x.float(), -1), rtol=2e-3, atol=1e-3)


def test_debug_mode_prints_kernel_time(cp, monkeypatch, capsys):
    monkeypatch.setenv("RAWFORMER_DEBUG", "1")
    rf.softmax(cp.random.standard_normal((64, 1000), dtype=cp.float32))
    err = capsys.readouterr().err
    assert "[rawformer]" in err and "softmax" in err and "ms" in err


def test_functions_are_compiled_once(cp):
    x = cp.random.standard_normal((16, 100), dtype=cp.float32)
    rf.softmax(x)
    before = modules._module.cache_info().misses
    rf.softmax(x)
    assert modules._module.cache_info().misses == before


def test_backend_is_gpu():
    assert backend.name() == "gpu"
