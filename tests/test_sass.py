"""The tensor-core kernels really run on tensor cores: their sm_90 SASS holds HMMA instructions.

nvcc builds a cubin of each such instantiation (the same source and name expression the launcher asks NVRTC
for) and nvdisasm (the `nvidia-cuda-nvdisasm` wheel of the test extra, or the CUDA toolkit's) prints its
SASS. A kernel whose mma.sync inline PTX got lost, or that fell back to a scalar path, fails here on CPU CI.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import rawformer  # noqa: F401  (importing the ops registers every kernel family)
from rawformer.kernels import modules

NVCC = shutil.which("nvcc")
# family -> the kernel templates that run on tensor cores
TENSOR_CORE = {
    "attention": ("attention_v2<", "attention_v4<"),
    "attention_backward": ("attention_backward_v2<",),
    "mla_decode": ("mla_decode_v1<", "mla_decode_v2<", "mla_decode_v3<"),
    "paged_attention": ("paged_attention_v2<", "paged_attention_v3<", "paged_attention_v4<"),
}


def _nvdisasm() -> str | None:
    found = shutil.which("nvdisasm")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for candidate in sorted(Path(root).glob("cu*/bin/nvdisasm")):
            return str(candidate)
    return None


NVDISASM = _nvdisasm()
CASES = [
    (family, expr)
    for family, markers in TENSOR_CORE.items()
    for expr in modules.registered_families().get(family, [])
    if expr.startswith(markers)
]


def test_tensor_core_kernels_exist():
    for family in TENSOR_CORE:
        assert any(f == family for f, _ in CASES), f"family {family} registers no tensor-core instantiation"


@pytest.mark.skipif(NVCC is None or NVDISASM is None, reason="needs nvcc and nvdisasm")
@pytest.mark.parametrize("family, expression", CASES, ids=[f"{f}:{e}" for f, e in CASES])
def test_sass_has_hmma(family, expression, tmp_path):
    source = tmp_path / "one.cu"
    source.write_text(
        f'#include "{family}.cu"\nvoid* const rawformer_instantiation = (void*)&{expression};\n'
    )
    cubin = tmp_path / "one.cubin"
    cmd = [NVCC, *modules.COMPILE_OPTIONS, "-arch=sm_90", f"-I{modules.source_dir()}", "-cubin", str(source)]
    proc = subprocess.run([*cmd, "-o", str(cubin)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sass = subprocess.run([NVDISASM, str(cubin)], capture_output=True, text=True, check=True).stdout
    hmma = re.findall(r"\bHMMA\.16816\.F32\b", sass)
    assert hmma, f"{expression}: no HMMA.16816.F32 in its SASS"
    assert "LDSM" in sass, f"{expression}: no ldmatrix (LDSM) in its SASS"
