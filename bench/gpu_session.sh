#!/usr/bin/env bash
# One GPU session in one command (the device tool's budget is per call): install, GPU tests, the demo,
# the benchmarks. Logs and results go under $OUT (bench/out without the device tool).
# Usage: bench/gpu_session.sh [pytest-timeout-s] [bench-timeout-s]
#   TESTS="tests/test_attention.py ..."  only these test files (default: every gpu-marked test)
#   BENCHES="kernels attention"          which bench/<name>.py to run, each with $BENCH_ARGS (default both)
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
T_TEST=${1:-330}; T_BENCH=${2:-240}
TESTS=${TESTS:-tests}; BENCHES=${BENCHES:-kernels attention}; BENCH_ARGS=${BENCH_ARGS:-}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; rawformer info; \
  rawformer demo --dtype float16 --rows 4096 --cols 4096; } > "$OUT/demo.log" 2>&1
# shellcheck disable=SC2086
timeout "$T_TEST" python3 -m pytest -q -m gpu -n 8 --tb=short -rf -p no:cacheprovider $TESTS > "$OUT/gpu-tests.log" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | cut -c1-220 | head -40; tail -3 "$OUT/gpu-tests.log"
for bench in $BENCHES; do
  # shellcheck disable=SC2086
  timeout "$T_BENCH" python3 "bench/$bench.py" --out "$OUT" $BENCH_ARGS > "$OUT/bench-$bench.log" 2>&1
  echo "bench $bench rc=$?"; grep -A40 "^ACCEPTANCE" "$OUT/bench-$bench.log" | cut -c1-200
done
cat "$OUT/demo.log"
