"""The distribution builds as a wheel that installs the rawformer.* namespace only, sources included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_wheel_builds_and_runs():
    proc = subprocess.run(
        ["bash", str(ROOT / "tests" / "wheel_check.sh"), sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wheel ok" in proc.stdout and "installed wheel runs" in proc.stdout
