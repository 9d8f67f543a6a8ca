#!/usr/bin/env bash
# Build the wheel, install it into a scratch venv, and check it holds the rawformer.* namespace only,
# with the CUDA sources as package data.
set -euo pipefail
PY=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/rawformer-*.whl)
"$PY" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
assert tops == {"rawformer"}, f"wheel installs more than rawformer: {sorted(tops)}"
for needed in ("rawformer/cuda_src/common.cuh", "rawformer/cuda_src/softmax.cu", "rawformer/models/__init__.py",
               "rawformer/export/__init__.py", "rawformer/kernels/numba/__init__.py",
               "rawformer/models/stdlib-gpt.onnx", "rawformer/models/stdlib-gpt.json",
               "rawformer/training/__init__.py", "rawformer/commands/__init__.py", "rawformer/server/__init__.py",
               "rawformer/distributed/__init__.py", "rawformer/training/configs/stdlib-gpt.json"):
    assert needed in names, f"{needed} missing from the wheel"
print(f"wheel ok: {len(names)} files, top-level {sorted(tops)}")
PY
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
cd "$work" && "$work/venv/bin/python" -c "
import rawformer as rf, numpy as np
from rawformer.kernels import modules
assert (modules.source_dir() / 'softmax.cu').is_file()
print('installed wheel runs:', rf.softmax(np.zeros((2, 3), np.float32))[0])
"
