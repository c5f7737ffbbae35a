#!/usr/bin/env bash
# The GPU proof in one call of at most 10 minutes, on a bare GPU machine (no network): build the
# CUDA extension for sm_90a, run every op, backend and dtype on the GPU, put the CUDA kernels
# under compute-sanitizer (memcheck, racecheck), run the benchmarks, and print a summary table
# last. Every stage has its own time budget, so that a slow stage cannot starve the rest, and
# writes its log under $OUT as it goes: a killed run still returns what it did.
#
#   OUT=/tmp/gpu bash benchmarks/run_gpu.sh          # on the GPU machine ($OUT from the device tool)
#   LOCA_GPU_REHEARSAL=1 bash benchmarks/run_gpu.sh  # on a CPU machine: GPU stages skipped
#
# Budgets (seconds) add up to 540, leaving a minute of the 10 for start-up and copying back.
# Commit $OUT/benchmarks.json as benchmarks/results/<device>-<commit>.json and regenerate
# BENCHMARKS.md with `python benchmarks/report.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}"
REHEARSAL="${LOCA_GPU_REHEARSAL:-0}"
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
status=0

# stage NAME BUDGET COMMAND...: run with a time limit (SIGINT first, so pytest still writes its
# reports), log to $OUT/NAME.log, record "name result seconds" in $OUT/stages.tsv.
stage() {
  local name=$1 budget=$2; shift 2
  local t0=$SECONDS result
  timeout --signal=INT --kill-after=15 "$budget" "$@" >"$OUT/$name.log" 2>&1
  case $? in
    0) result=ok ;;
    124) result="over-budget(${budget}s)"; status=1 ;;
    *) result=FAILED; status=1 ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - t0))" | tee -a "$OUT/stages.tsv"
}
skipped() { printf '%s\tskipped (%s)\t0\n' "$1" "$2" | tee -a "$OUT/stages.tsv"; }

git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || echo unknown > "$OUT/commit.txt"
python - > "$OUT/environment.json" <<'EOF'
import json, platform, subprocess
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, multiprocessors=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
print(json.dumps(info, indent=1))
EOF

if [ "$REHEARSAL" = 1 ]; then
  stage build 150 env LOCA_KERNELS_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    python -m pip install -q --no-build-isolation --no-deps -e .
else
  stage build 150 env LOCA_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="${MAX_JOBS:-16}" \
    python -m pip install -q --no-build-isolation --no-deps -e .
fi
stage backends 30 python -c "import json, loca_kernels; print(json.dumps(loca_kernels.backends(), indent=1))"

# Every test parametrized on a CUDA backend or device (ids "cuda-cuda", "triton-cuda",
# "torch-cuda", and tests named for CUDA): every op, backend and dtype at least once; and
# test_timm.py, since timm imports there.
stage tests 170 python -m pytest tests/ -q -x -p no:cacheprovider -k "cuda or timm" -rs --durations=15 \
  --junitxml="$OUT/tests.xml"

if [ "$REHEARSAL" = 1 ] || ! command -v compute-sanitizer >/dev/null; then
  skipped memcheck "no GPU or no compute-sanitizer"
  skipped racecheck "no GPU or no compute-sanitizer"
else
  stage memcheck 50 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
  stage racecheck 50 compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
fi

# The full sizes (those the GPU goals are about), at fewer rounds than --full's 20: the budget
# covers every benchmark once.
stage benchmarks 170 env LOCA_BENCH_ROUNDS="${LOCA_BENCH_ROUNDS:-5}" python -m pytest benchmarks/ --benchmark-only --full -q \
  -p no:cacheprovider --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds

python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"== summary ({out}, commit {(out / 'commit.txt').read_text().strip()[:10]}) ==")
print(f"{'stage':<12} {'result':<28} {'s':>5}")
for line in (out / "stages.tsv").read_text().splitlines():
    name, result, seconds = line.split("\t")
    print(f"{name:<12} {result:<28} {seconds:>5}")
tests = out / "tests.log"
if tests.exists() and tests.read_text().strip():
    print("tests:", tests.read_text().strip().splitlines()[-1])
bench = out / "benchmarks.json"
if bench.exists():
    rows = json.loads(bench.read_text())["benchmarks"]
    print(f"{'benchmark':<72} {'median ms':>10}")
    for row in rows:
        print(f"{row['fullname'].split('::')[-1][:72]:<72} {row['stats']['median'] * 1e3:>10.3f}")
EOF
exit $status
