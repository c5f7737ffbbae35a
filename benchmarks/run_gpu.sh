#!/usr/bin/env bash
# The GPU proof in one call of at most 10 minutes, on a bare GPU machine (no network): build the
# CUDA extension for sm_90a, test the CUDA and Triton kernels on the GPU, then the rest of the
# GPU tests, put the CUDA kernels under compute-sanitizer (memcheck, racecheck), run the
# benchmarks (ours, then the peers, then the compile-heavy peers), and print a summary last.
# Every stage has its own time budget, so that a slow stage cannot starve the rest; budgets plus
# the kill-after of every stage add up to at most 540 s (BUDGETS below; `--plan` prints them),
# leaving a minute of the 10 for start-up and copying back. Each stage logs under $OUT as it
# goes: a killed run still returns what it did.
#
#   bash benchmarks/run_gpu.sh --prepare         # here, before the call: writes benchmarks/COMMIT
#                                                # and downloads the xformers wheel (both ignored
#                                                # by git: carry them, see below)
#   OUT=/tmp/gpu bash benchmarks/run_gpu.sh      # on the GPU machine ($OUT from the device tool)
#   LOCA_GPU_REHEARSAL=1 bash benchmarks/run_gpu.sh  # on a CPU machine: what can run without a GPU
#   bash benchmarks/run_gpu.sh --plan            # the stages and their budgets, nothing run
#
# The device tool sends the working tree without ignored files and maybe without .git: call it
# with carry ["benchmarks/COMMIT", "benchmarks/wheels"]. The rehearsal builds the CPU extension,
# collects (does not run) the test stages, runs the benchmarks at their quick sizes, and counts
# a stage stopped at its budget as done (the budgets are the GPU's); a failed stage fails it.
# After a GPU run, commit $OUT/benchmarks.json as benchmarks/results/<device>-<commit>.json and
# regenerate BENCHMARKS.md with `python benchmarks/report.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL="${LOCA_GPU_REHEARSAL:-0}"
KILL_AFTER=3          # seconds between a stage's SIGINT (pytest still writes its reports) and SIGKILL
LIMIT=540
XFORMERS=xformers==0.0.35
# name budget: in the order the stages run.
BUDGETS="environment 15
xformers 25
build 120
backends 15
tests-kernels 95
memcheck 30
racecheck 30
tests-rest 35
bench-ours 50
bench-peers 40
bench-compiled 35
summary 10"
# The test modules of the ops' kernels: their CUDA and Triton cases run first.
KERNEL_TESTS="tests/test_attention.py tests/test_contrastive.py tests/test_crop.py tests/test_matching.py
tests/test_sinkhorn.py tests/test_targets.py"

budget() { awk -v s="$1" '$1 == s { print $2 }' <<<"$BUDGETS"; }
total_budget() { awk -v k="$KILL_AFTER" '{ t += $2 + k } END { print t }' <<<"$BUDGETS"; }
print_plan() {
  printf '%-16s %6s\n' stage "budget"
  awk -v k="$KILL_AFTER" '{ printf "%-16s %5ss + %ss kill-after\n", $1, $2, k }' <<<"$BUDGETS"
  printf '%-16s %5ss of %ss\n' total "$(total_budget)" "$LIMIT"
}
if [ "$(total_budget)" -gt "$LIMIT" ]; then
  print_plan; echo "run_gpu.sh: the budgets add up to more than $LIMIT s" >&2; exit 2
fi

case "${1:-}" in
  --plan) print_plan; exit 0 ;;
  --prepare)
    { git rev-parse HEAD && git status --porcelain --untracked-files=no | grep -q . && echo dirty; } \
      | paste -sd' ' > benchmarks/COMMIT
    echo "run_gpu.sh: benchmarks/COMMIT: $(cat benchmarks/COMMIT)"
    ls benchmarks/wheels/xformers-*.whl >/dev/null 2>&1 \
      || python -m pip download -q "$XFORMERS" --no-deps -d benchmarks/wheels || exit 1
    echo "run_gpu.sh: wheels: $(ls benchmarks/wheels)"
    echo 'run_gpu.sh: call the device tool with carry ["benchmarks/COMMIT", "benchmarks/wheels"]'
    exit 0 ;;
  "") ;;
  *) echo "run_gpu.sh: unknown argument $1 (expected --plan, --prepare or none)" >&2; exit 2 ;;
esac

OUT="${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs"
LOGS="$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/stages.tsv"
status=0
print_plan

# stage NAME COMMAND...: run with NAME's budget (SIGINT first, so pytest still writes its
# reports), log to $LOGS/NAME.log, record "name budget result seconds" in $OUT/stages.tsv.
stage() {
  local name=$1 limit t0=$SECONDS result; shift
  limit=$(budget "$name")
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" >"$LOGS/$name.log" 2>&1
  case $? in
    0) result=ok ;;
    124|137) if [ "$REHEARSAL" = 1 ]; then result="stopped at budget (CPU)"; else result=over-budget; status=1; fi ;;
    *) result=FAILED; status=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$result" "$((SECONDS - t0))" | tee -a "$OUT/stages.tsv"
  [ "$result" = ok ]
}
skipped() { printf '%s\t%s\tskipped (%s)\t0\n' "$1" "$(budget "$1")" "$2" | tee -a "$OUT/stages.tsv"; }

# The commit: benchmarks/COMMIT (written by --prepare: the copy sent may have no .git), else git.
if [ -s benchmarks/COMMIT ]; then
  cp benchmarks/COMMIT "$OUT/commit.txt"
else
  git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || echo unknown > "$OUT/commit.txt"
fi

stage environment python - "$OUT/environment.json" <<'EOF'
import json, platform, subprocess, sys
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
                                    capture_output=True, text=True, timeout=10).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(json.dumps(info))
EOF

# xformers, a peer the machine's image lacks: the wheel brought along (--prepare), installed
# beside the image's torch without its dependencies. Whether it imports and runs there is the
# last line of its log (in the summary); it is benchmarked only where it runs, and a wheel that
# does not fit that torch fails no stage.
wheel=$(ls benchmarks/wheels/xformers-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
  skipped xformers "no wheel in benchmarks/wheels (run --prepare)"
else
  stage xformers bash -c '
    python -m pip install -q --no-deps --no-index --no-compile --target "$1" "$2" || exit 1
    PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" python - "$1" <<"EOF"
import pathlib, sys
try:
    import torch, xformers, xformers.ops as xops
except Exception as error:  # noqa: BLE001
    sys.exit(print(f"xformers does not import: {type(error).__name__}: {error}"))
line = f"xformers {xformers.__version__} imports beside torch {torch.__version__}"
if not torch.cuda.is_available():
    sys.exit(print(line + " (no GPU: not run)"))
try:
    q, k, v = (torch.randn(2, 77, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out = xops.memory_efficient_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    error = (out - ref.transpose(1, 2)).abs().max().item()
    assert error < 1e-2, f"memory_efficient_attention differs from SDPA by {error}"
except Exception as error:  # noqa: BLE001
    sys.exit(print(f"{line} but does not run: {type(error).__name__}: {error}"))
(pathlib.Path(sys.argv[1]) / "RUNS").touch()
print(f"{line} and runs memory_efficient_attention (max difference to SDPA {error:.1e})")
EOF' xformers "$WORK/xformers" "$wheel"
  [ -e "$WORK/xformers/RUNS" ] && export PYTHONPATH="$WORK/xformers${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$REHEARSAL" = 1 ]; then
  build=(env LOCA_KERNELS_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}")
else
  build=(env LOCA_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="${MAX_JOBS:-16}")
fi
if ! stage build "${build[@]}" python -m pip install -q --no-build-isolation --no-deps -e .; then
  # Without the extension the package still imports from the source tree: the Triton kernels,
  # the reference backend and the trainer are tested and benchmarked all the same.
  export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  echo "run_gpu.sh: no extension; tests and benchmarks import the source tree (PYTHONPATH)" | tee -a "$LOGS/build.log"
fi
stage backends python -c "import json, loca_kernels; print(json.dumps(loca_kernels.backends(), indent=1))"

# Tests: every case parametrized on a CUDA backend or device, or on Triton (ids "cuda-cuda",
# "triton-cuda", "torch-cuda", tests named for CUDA or Triton) and test_timm (timm is there):
# the kernels' modules first (then compute-sanitizer on the CUDA kernels), then the other
# modules. No -x: one failure must not hide the rest.
tests=(python -m pytest -q -p no:cacheprovider -rs --durations=10)
[ "$REHEARSAL" = 1 ] && tests+=(--collect-only)        # the GPU cases skip on a CPU: collect them
# shellcheck disable=SC2086  # KERNEL_TESTS is a list of paths
stage tests-kernels "${tests[@]}" $KERNEL_TESTS -k "cuda or triton" --junitxml="$LOGS/tests-kernels.xml"

if [ "$REHEARSAL" = 1 ] || ! command -v compute-sanitizer >/dev/null; then
  skipped memcheck "no GPU or no compute-sanitizer"
  skipped racecheck "no GPU or no compute-sanitizer"
else
  # No caching allocator under memcheck: each tensor its own allocation, so that an access past
  # a tensor's end is outside any allocation, not inside a cached block.
  stage memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
  stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
fi

# shellcheck disable=SC2086
stage tests-rest "${tests[@]}" tests/ $(printf -- '--ignore=%s ' $KERNEL_TESTS) -k "cuda or triton or timm" \
  --junitxml="$LOGS/tests-rest.xml"

# Benchmarks at the full sizes (those the GPU goals are about; the rehearsal's at the quick
# ones), fewer rounds than --full's 20. Ours first, then the peers, the compile-heavy peers
# (FlexAttention, torch.compile) last; each stage its own JSON, merged in the summary.
bench=(python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds)
[ "$REHEARSAL" = 1 ] || bench+=(--full)
rounds="${LOCA_BENCH_ROUNDS:-$([ "$REHEARSAL" = 1 ] && echo 1 || echo 5)}"
for impls in ours peers compiled; do
  stage "bench-$impls" env LOCA_BENCH_IMPLS=$impls LOCA_BENCH_ROUNDS="$rounds" "${bench[@]}" \
    --benchmark-json="$WORK/bench-$impls.json"
done

stage summary python - "$OUT" "$WORK" <<'EOF'
import json, pathlib, sys
out, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
commit = (out / "commit.txt").read_text().split()
# One JSON of every benchmark stage, with the commit the copy on the GPU machine could not read.
merged = None
for impls in ("ours", "peers", "compiled"):
    path = work / f"bench-{impls}.json"
    if path.exists() and path.stat().st_size:
        data = json.loads(path.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    if commit and not merged.get("commit_info", {}).get("id"):
        merged["commit_info"] = {"id": commit[0], "dirty": "dirty" in commit[1:]}
    (out / "benchmarks.json").write_text(json.dumps(merged, indent=1))
    print(f"{'benchmark':<72} {'median ms':>10}")
    for row in merged["benchmarks"]:
        print(f"{row['fullname'].split('::')[-1][:72]:<72} {row['stats']['median'] * 1e3:>10.3f}")
EOF

cp "$LOGS/summary.log" "$OUT/summary.txt" 2>/dev/null
# The device tool brings back at most 8 files: the logs travel as one archive.
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"

echo "== summary ($OUT, commit $(cut -c1-12 "$OUT/commit.txt")) =="
cat "$OUT/summary.txt" 2>/dev/null
tar -xzOf "$OUT/logs.tar.gz" logs/xformers.log 2>/dev/null | tail -n 1 | sed 's/^/xformers: /'
for name in tests-kernels tests-rest; do
  tar -xzOf "$OUT/logs.tar.gz" "logs/$name.log" 2>/dev/null | grep -v '^$' | tail -n 1 | sed "s/^/$name: /"
done
printf '%-16s %6s  %-26s %5s\n' stage budget result s
awk -F'\t' '{ printf "%-16s %6s  %-26s %5s\n", $1, $2, $3, $4 }' "$OUT/stages.tsv"
printf '%-16s %6s of %s s (kill-after %s s a stage), %s s wall\n' total "$(total_budget)" "$LIMIT" "$KILL_AFTER" "$SECONDS"
exit $status
