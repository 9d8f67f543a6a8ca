"""Every kernel instantiation a launcher can request compiles with nvcc for sm_80 and sm_90.

CuPy compiles these at run time through NVRTC; CI has no GPU (and CuPy cannot compile without a driver), so
nvcc checks the same sources and name expressions here: one translation unit per family that takes the
address of each registered template instantiation, which forces it to be compiled.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import rawformer  # noqa: F401  (importing the ops registers every kernel family)
from rawformer.kernels import modules

NVCC = shutil.which("nvcc")
FAMILIES = modules.registered_families()


def test_every_family_is_registered():
    assert {"softmax", "norms", "activations", "attention", "paged_attention", "rope"} <= set(FAMILIES)
    for family, expressions in FAMILIES.items():
        assert expressions, f"family {family} registers no instantiations"
        assert len(set(expressions)) == len(expressions), f"family {family} lists an expression twice"


def _translation_unit(family: str, expressions: list[str]) -> str:
    lines = [f'#include "{family}.cu"', "void* const rawformer_instantiations[] = {"]
    lines += [f"    (void*)&{expr}," for expr in expressions]
    lines.append("};")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA compile check skipped")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles(family, arch, tmp_path):
    source = tmp_path / f"{family}_all.cu"
    source.write_text(_translation_unit(family, FAMILIES[family]))
    cmd = [
        NVCC,
        *modules.COMPILE_OPTIONS,
        f"-arch={arch}",
        f"-I{modules.source_dir()}",
        "-Xptxas=-warn-spills",
        "-c",
        str(source),
        "-o",
        str(tmp_path / f"{family}.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed for {family} ({arch}):\n{proc.stderr[-6000:]}"
    spills = [line for line in proc.stderr.splitlines() if re.search(r"\d+ bytes spill", line)]
    assert not spills or arch != "sm_90", f"register spills in {family} on {arch}:\n" + "\n".join(spills)
