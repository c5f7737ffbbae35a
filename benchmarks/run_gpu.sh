#!/usr/bin/env bash
# On a bare GPU machine (no network): build the CUDA extension, run the whole test suite on
# the GPU, put every CUDA kernel under compute-sanitizer (memcheck, racecheck), run the
# benchmarks with JSON output, and print a summary last. Results go to $OUT (default
# benchmarks/results/<date>); commit them and regenerate BENCHMARKS.md with report.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" >"$OUT/$name.log" 2>&1; then result=ok; else result=FAILED; status=1; fi
  echo "$name: $result in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
}

step build env LOCA_KERNELS_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  python -m pip install --no-build-isolation --no-deps -e .
step backends python -c "import json, loca_kernels; print(json.dumps(loca_kernels.backends()))"
step tests python -m pytest tests/ -q -x -p no:cacheprovider
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
step benchmarks python -m pytest benchmarks/ --benchmark-only -q \
  --benchmark-json="$OUT/benchmarks.json" -p no:cacheprovider
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true

echo "== summary ($OUT) =="
cat "$OUT/summary.txt"
tail -n 3 "$OUT/tests.log"
exit $status
