"""Backend choice, array adoption (DLPack and friends), and the `rawformer` command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from foreign import DLPackOnly

import rawformer as rf
from rawformer import arrays, backend, cli


def test_forced_cpu(monkeypatch):
    monkeypatch.setenv("RAWFORMER_BACKEND", "cpu")
    assert backend.name() == "cpu"
    assert backend.xp() is np


def test_forced_gpu_without_gpu_is_a_clear_error(monkeypatch):
    if backend.cupy_module() is not None:
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("RAWFORMER_BACKEND", "gpu")
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        backend.name()


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv("RAWFORMER_BACKEND", "tpu")
    with pytest.raises(ValueError, match="RAWFORMER_BACKEND"):
        backend.name()


def test_automatic_choice_matches_cupy(monkeypatch):
    monkeypatch.delenv("RAWFORMER_BACKEND", raising=False)
    assert backend.name() == ("gpu" if backend.cupy_module() is not None else "cpu")


def test_adopt_dlpack_is_zero_copy():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    view, give_back = arrays.adopt(DLPackOnly(a), "x")
    assert isinstance(view, np.ndarray)
    assert np.shares_memory(view, a)
    assert give_back(view) is not None


def test_adopt_rejects_non_arrays():
    with pytest.raises(TypeError, match="x must be an array"):
        arrays.adopt([1.0, 2.0], "x")
    with pytest.raises(TypeError, match="x must be an array"):
        arrays.adopt(object(), "x")


def test_op_on_dlpack_input_returns_values():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    y = rf.softmax(DLPackOnly(x))
    np.testing.assert_allclose(np.asarray(y), rf.softmax(x), rtol=0, atol=0)


def test_torch_tensor_round_trip():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 33, dtype=torch.float32)
    y = rf.softmax(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, torch.softmax(x, -1), rtol=1e-6, atol=1e-7)


def test_info_lists_backend_and_versions(monkeypatch):
    monkeypatch.setenv("RAWFORMER_BACKEND", "cpu")
    rows = cli.info()
    assert rows["backend"] == "cpu"
    assert rows["numpy"] == np.__version__
    for key in ("device", "cupy", "numba", "mpi4py", "onnx"):
        assert key in rows


def test_cli_info_runs_as_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "rawformer", "info"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend" in proc.stdout and "numpy" in proc.stdout


def test_cli_demo_small(capsys):
    assert cli.main(["demo", "--rows", "7", "--cols", "33"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "cpu (numpy)" in out
    # every max error printed is a small finite number
    errors = [float(line.split()[-1]) for line in out.splitlines() if "cpu (numpy)" in line]
    assert errors and all(0 <= e < 1e-5 for e in errors)


def test_cli_without_command_shows_usage():
    with pytest.raises(SystemExit):
        cli.main([])
