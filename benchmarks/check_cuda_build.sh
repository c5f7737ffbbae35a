#!/usr/bin/env bash
# Builds the CUDA extension for real on a machine without a GPU and checks its registration:
# in a new venv with the CUDA build of torch (torch==2.14.1, CUDA 13.0 like the local nvcc),
# compile and link every source (CPU and CUDA) for sm_90a, import loca_kernels, and assert that
# every operator bound in a csrc/<op>/bind_cuda.cpp has a CUDA kernel. Nothing
# built runs without a GPU, but compile and link errors, missing symbols and registration
# mistakes show. Run it before every submission that touches csrc/ (README, "Checking the
# CUDA build"); it is too slow for .ci/run.
#
# Usage: benchmarks/check_cuda_build.sh [VENV_DIR]
#   VENV_DIR  where the venv goes (kept; an existing one with the same torch is reused, which
#             skips the install). Default: a temporary folder, deleted at the end.
# Environment (defaults): LOCA_CHECK_TORCH (torch==2.14.1), TORCH_CUDA_ARCH_LIST (9.0a),
#   MAX_JOBS (2), CUDA_HOME (the toolkit folder nvcc reports as TOP=), PYTHON (python3).
# The build runs in a copy of the working tree (tracked and untracked, not ignored files), so
# the source tree's own build/ and loca_kernels/_C*.so are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_spec="${LOCA_CHECK_TORCH:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-2}"
export LOCA_KERNELS_CUDA=1

work=$(mktemp -d "${TMPDIR:-/tmp}/loca-cuda-build.XXXXXX")
if [ $# -ge 1 ]; then
  venv=$(realpath -m "$1")
else
  venv="$work/venv"
fi
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)

# The CUDA toolkit: CUDA_HOME if set, else the folder nvcc itself reports (TOP=), which also
# sees through a wrapper script on PATH.
if [ -z "${CUDA_HOME:-}" ]; then
  command -v nvcc >/dev/null || { echo "check_cuda_build: no nvcc on PATH and CUDA_HOME unset" >&2; exit 1; }
  top=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$top" ] || { echo "check_cuda_build: nvcc --dryrun printed no TOP=" >&2; exit 1; }
  CUDA_HOME=$(realpath "$top")
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "check_cuda_build: $CUDA_HOME/bin/nvcc not found" >&2; exit 1; }
echo "check_cuda_build: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"

# 1. The venv: torch with CUDA, then the project's requirements.
want_version=${torch_spec#torch==}
if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" = "$want_version" ]; then
  echo "check_cuda_build: reusing $venv"
else
  [ ! -e "$venv" ] || { echo "check_cuda_build: $venv exists and has no $torch_spec; give a new path" >&2; exit 1; }
  echo "check_cuda_build: creating $venv with $torch_spec (several GB; a few minutes)"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q "$torch_spec" -r requirements.txt
command -v cmake >/dev/null || "$py" -m pip install -q cmake
"$py" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' has no CUDA'; print('check_cuda_build: torch', torch.__version__, 'CUDA', torch.version.cuda)"
t1=$(date +%s)

# 2. The build, in a copy of the working tree. No extra CMake arguments: CMakeLists.txt takes
# what the toolkit lacks (nvrtc, the math libraries) from torch's own CUDA wheel.
src="$work/src"
mkdir -p "$src"
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | tar -C "$root" --null -T - --ignore-failed-read -cf - | tar -C "$src" -xf -
[ -f "$src/setup.py" ] || { echo "check_cuda_build: copying the working tree failed" >&2; exit 1; }
"$py" -m pip install --no-build-isolation --no-deps "$src" \
  > "$work/build.log" 2>&1 || {
    grep -E "CMake Error|error:" -A 6 "$work/build.log" | head -n 80; echo ...; tail -n 30 "$work/build.log"
    echo "check_cuda_build: build FAILED" >&2; exit 1; }
grep -E "loca_kernels: |Successfully installed" "$work/build.log" || true
t2=$(date +%s)

# 3. Import and registration check (outside the source tree, so that the installed package is
# the one imported).
(cd "$work" && "$py" - "$root/csrc" <<'EOF'
import glob, json, os, re, sys

import torch
import loca_kernels

csrc = sys.argv[1]
declared = set(re.findall(r'm\.def\("(\w+)\(', open(os.path.join(csrc, "ops.cpp")).read()))
# The operators with a CUDA-extension kernel (csrc/<op>/bind_cuda.cpp); the others run on CUDA
# tensors through their Triton twins.
bound = {name for path in glob.glob(os.path.join(csrc, "*", "bind_cuda.cpp"))
         for name in re.findall(r'm\.impl\("(\w+)"', open(path).read())}
registered = {n.split("::", 1)[1].split(".", 1)[0]
              for n in torch._C._dispatch_get_all_op_names() if n.startswith("loca_kernels::")}
assert declared, "no m.def(...) found in csrc/ops.cpp"
assert bound, "no m.impl(...) found in csrc/*/bind_cuda.cpp"
assert declared <= registered, f"declared in csrc/ops.cpp but not registered: {sorted(declared - registered)}"
missing = []
for name in sorted(registered):
    if name.endswith("_triton"):
        continue
    op = getattr(torch.ops.loca_kernels, name).default
    cpu, cuda = op.has_kernel_for_dispatch_key("CPU"), op.has_kernel_for_dispatch_key("CUDA")
    note = "  (Triton on CUDA tensors)" if cpu and name not in bound else ""
    print(f"  loca_kernels::{name:28s} CPU {'yes' if cpu else 'no ':3s}  CUDA {'yes' if cuda else 'no '}{note}")
    if name in bound and not cuda:
        missing.append(name)
b = loca_kernels.backends()
print(json.dumps(b, indent=1))
assert not missing, f"bound in a bind_cuda.cpp but no CUDA kernel registered: {missing}"
assert b["extension"] and b["cuda_kernels"], "backends() reports no extension or no CUDA kernels"
print(f"check_cuda_build: OK, the {len(bound)} operators of csrc/*/bind_cuda.cpp have CUDA kernels")
EOF
)
t3=$(date +%s)
[ $# -ge 1 ] || echo "check_cuda_build: deleting the temporary venv"
echo "check_cuda_build: venv $((t1 - t0)) s, build $((t2 - t1)) s, check $((t3 - t2)) s, total $((t3 - t0)) s"
