"""Register and shared-memory budgets of every kernel specialisation the library launches on a
GPU, measured without one.

Triton: each case runs a public op with backend="triton" on CPU tensors while a hook stands in
for JITFunction.run: it records what the host wrapper launches (kernel, argument types and
divisibility, constexprs, num_warps, num_stages) and launches nothing. Each distinct
specialisation is then compiled for sm_90 by Triton's own compiler, and ptxas's report of that
compile (Triton calls ptxas -v) gives registers, spills and stack; Triton's metadata gives the
shared memory. CUDA: csrc/*/kernels.cu compiled by nvcc for sm_90a with ptxas -v.

Blocks per SM follow the occupancy rules of sm_90 (H100, H200): 65536 registers allocated per
warp in units of 256, 228 KB of shared memory of which a block may have 227 KB and each block
reserves 1 KB, at most 64 warps and 32 blocks.

Run: python benchmarks/gpu_resources.py [--cases NAME ...] [--no-cuda] [--out FILE]
(without TRITON_INTERPRET: the interpreter replaces triton.language in its process). Writes
benchmarks/results/gpu-resources.md by default. tests/test_gpu_resources.py runs a subset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu-resources.md"

# sm_90 (H100, H200) limits per SM, and the largest shared memory one block may use.
SM_REGISTERS, REGISTER_UNIT = 65536, 256
SM_SHARED, BLOCK_SHARED_LIMIT, BLOCK_RESERVED_SHARED = 228 * 1024, 227 * 1024, 1024
SM_WARPS, SM_BLOCKS = 64, 32
CAPABILITY = 90


@dataclass
class Resources:
    kernel: str
    specialisation: str
    warps: int | None
    stages: int | None
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    vector_loads: str = ""
    cases: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def over_shared(self) -> bool:
        return self.shared > BLOCK_SHARED_LIMIT

    def blocks_per_sm(self) -> int | None:
        if self.warps is None:
            return None
        per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        by_regs = (SM_REGISTERS // per_warp) // self.warps if per_warp else SM_BLOCKS
        by_shared = SM_SHARED // (self.shared + BLOCK_RESERVED_SHARED)
        return min(by_regs, by_shared, SM_WARPS // self.warps, SM_BLOCKS)


# --- ptxas reports ----------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict:
    """{mangled entry: (registers, spill stores, spill loads, stack, static smem)} from ptxas -v."""
    found, entry, props = {}, None, (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry, props = m.group(1), (0, 0, 0)
        elif (m := _PROPERTIES.search(line)) and entry:
            props = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _USED.search(line)) and entry:
            stack, stores, loads = props
            found[entry] = (int(m.group(1)), stores, loads, stack, int(m.group(2) or 0))
            entry = None
    return found


def _vector_width(ptx: str) -> str:
    """The widest global load of the PTX: "v4", "v2" or "scalar"."""
    for width in ("v4", "v2"):
        if re.search(rf"ld\.global(\.\w+)*\.{width}\.", ptx):
            return width
    return "scalar"


# --- recording and compiling Triton launches --------------------------------------------------

@dataclass
class Launch:
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    def key(self) -> tuple:
        return (self.kernel.fn.__qualname__, str(self.signature), str(self.constexprs), str(self.attrs),
                str(self.options.__dict__))

    def describe(self) -> str:
        """Constexprs (NAME=value), runtime integers Triton specialised to 1 (name=1), the
        pointee types, and the integers it marks divisible by 16."""
        names = [p.name for p in self.kernel.params]
        consts = [f"{names[path[0]]}={value}" for path, value in self.constexprs.items()]
        types = ",".join(dict.fromkeys(t[1:] for t in self.signature.values() if t.startswith("*")))
        divisible = [names[path[0]] for path, attr in self.attrs.items()
                     if attr and not self.signature[names[path[0]]].startswith("*")]
        return " ".join(consts) + f" [{types}]" + (" %16:" + ",".join(divisible) if divisible else "")


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", CAPABILITY, 32)


@contextlib.contextmanager
def recording(launches: list):
    """Within: every Triton launch is recorded into `launches` (as a GPU would specialise it)
    instead of run, and the "triton" backend accepts CPU tensors."""
    import triton
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import loca_kernels._backends as backends

    backend = make_backend(_target())

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        launches.append(Launch(self, *self._pack_args(backend, kwargs, bound_args, specialization, options)[1:],
                               backend.parse_options(kwargs)))

    saved_run, saved_can_run = JITFunction.run, backends.triton_can_run
    JITFunction.run, backends.triton_can_run = record, (lambda device: True)
    try:
        yield
    finally:
        JITFunction.run, backends.triton_can_run = saved_run, saved_can_run
    del triton


def compile_launch(launch: Launch) -> Resources:
    """Compile one recorded launch for sm_90 and read its budget."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    log = io.StringIO()
    # Compile afresh (a cache hit runs no ptxas) and keep the log of Triton's own ptxas -v.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=_target(), options=launch.options.__dict__)
    report = parse_ptxas(log.getvalue())
    name = compiled.metadata.name
    registers, stores, loads, stack, static = report[name]
    return Resources(launch.kernel.fn.__module__.split(".")[-2] + "." + launch.kernel.fn.__name__,
                     launch.describe(), compiled.metadata.num_warps, compiled.metadata.num_stages, registers,
                     stores, loads, stack, static + compiled.metadata.shared, _vector_width(compiled.asm["ptx"]))


# --- the shapes -------------------------------------------------------------------------------
# Each case runs the public op as the benchmarks (benchmarks/bench_*.py, GPU --full sizes) or a
# training recipe (python/loca_train/config.py, official presets) calls it; tensors are left
# uninitialised: nothing is computed.

def _contrastive(n, k, d, dtype):
    def run():
        import torch

        import loca_kernels as lk
        query = torch.empty(n, d, dtype=dtype).requires_grad_()
        positive = torch.empty(n, d, dtype=dtype)
        buffer = torch.empty(d, k, dtype=dtype)                    # DenseCL's (D, K), read transposed
        lk.queue_contrastive_loss(query, positive, buffer.t(), backend="triton")
    return run


def _sinkhorn(n, k, dtype, mode):
    def run():
        import torch

        import loca_kernels as lk
        lk.sinkhorn(torch.empty(n, k, dtype=dtype), mode=mode, iterations=3, backend="triton")
    return run


def _attention(bk, views, nq, nk, visible, heads, d, dtype, pattern):
    def run():
        import torch

        import loca_kernels as lk
        g = torch.Generator().manual_seed(0)
        q = torch.zeros(views * bk, nq, heads, d, dtype=dtype).requires_grad_()
        kv = torch.zeros(bk, nk, 2, heads, d, dtype=dtype).requires_grad_()
        if pattern == "run":
            keep = lk.KeepRun(lk.consecutive_keep(1, nk, visible, generator=g)[:, 0], visible)
        else:
            keep = lk.random_keep(bk, nk, visible, generator=g)
        out = lk.masked_cross_attention(q, kv[:, :, 0], kv[:, :, 1], keep, backend="triton")
        torch.autograd.grad(out, (q, kv), torch.zeros_like(out))
    return run


def _crop(views, channels, side, regions, out, dtype):
    def run():
        import torch

        import loca_kernels as lk
        features = torch.zeros(views, channels, side, side, dtype=dtype).requires_grad_()
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(views, 4)
        region = torch.tensor([0.1, 0.2, 0.7, 0.9]).expand(views, regions, 4)
        pooled = lk.crop_features(features, boxes, region, (out, out), backend="triton")
        torch.autograd.grad(pooled, features, torch.zeros_like(pooled))
    return run


def _matching(batch, na, nb, c, dtype):
    def run():
        import torch

        import loca_kernels as lk
        a = torch.randn(batch, na, c, dtype=dtype).requires_grad_()
        b = torch.randn(batch, nb, c, dtype=dtype).requires_grad_()
        _, similarity = lk.patch_matching(a, b, backend="triton")
        torch.autograd.grad(similarity.sum(), (a, b))
    return run


def _targets(batch, views, grid, rule):
    def run():
        import torch

        import loca_kernels as lk
        boxes = torch.tensor([0.0, 0.0, 96.0, 96.0]).expand(batch, views, 4).contiguous()
        ref = torch.tensor([0.0, 0.0, 224.0, 224.0]).expand(batch, 4).contiguous()
        size = (96, 96) if rule == "scenic" else None
        lk.relative_position_targets(boxes, ref, grid, (14, 14), rule=rule, query_size=size, backend="triton")
    return run


def cases() -> dict:
    """{name: (what it stands for, run)}: the GPU benchmark and training-recipe shapes."""
    import torch
    fp32, bf16 = torch.float32, torch.bfloat16
    found = {}
    # bench_contrastive (N = B x 49, K 65536, D 128, fp32); DenseCL official D 128, MMC official
    # D 256 (projection_dim), the tiny presets D 64 K 1024; bf16 for mixed precision.
    for n, k, d, dtype, what in ((32 * 49, 65536, 128, fp32, "bench, DenseCL"),
                                 (256 * 49, 65536, 128, fp32, "bench"), (32 * 49, 65536, 256, fp32, "MMC official"),
                                 (32 * 49, 65536, 128, bf16, "DenseCL bf16"), (32 * 49, 65536, 256, bf16, "MMC bf16"),
                                 (8 * 49, 1024, 64, fp32, "tiny presets")):
        found[f"contrastive-n{n}-k{k}-d{d}-{str(dtype)[6:]}"] = (what, _contrastive(n, k, d, dtype))
    # bench_sinkhorn (N = B x 196, K 4096 = LOCA's prototypes, fp32 and bf16, both modes); tiny
    # presets K 256; K 8192 (the widest one-tile case) and 65536 (the multi-tile path).
    for n, k, dtype, mode, what in ((64 * 196, 4096, fp32, "loca", "bench, LOCA official"),
                                    (64 * 196, 4096, bf16, "loca", "bench"), (64 * 196, 4096, fp32, "swav", "bench"),
                                    (256 * 196, 4096, bf16, "swav", "bench"), (16 * 196, 256, fp32, "loca", "tiny"),
                                    (16 * 196, 8192, fp32, "loca", "one-tile limit"),
                                    (16 * 196, 65536, fp32, "loca", "multi-tile")):
        found[f"sinkhorn-n{n}-k{k}-{str(dtype)[6:]}-{mode}"] = (what, _sinkhorn(n, k, dtype, mode))
    # bench_attention (Bk 32..256, V 10, Nq 36, Nk 196, 39 visible, H 12, D 64, bf16); LOCA's
    # large query (Nq 196); D 128, the largest head dim the kernels take.
    for bk, nq, d, dtype, pattern, what in ((32, 36, 64, bf16, "run", "bench, LOCA focal"),
                                            (32, 36, 64, bf16, "random", "bench"),
                                            (32, 196, 64, bf16, "random", "LOCA large query"),
                                            (32, 36, 64, fp32, "random", "fp32"),
                                            (32, 36, 128, bf16, "random", "head dim limit"),
                                            (32, 36, 128, fp32, "random", "head dim limit fp32")):
        found[f"attention-bk{bk}-nq{nq}-d{d}-{str(dtype)[6:]}-{pattern}"] = (
            what, _attention(bk, 10, nq, 196, 39, 12, d, dtype, pattern))
    # bench_crop / GTSA (C 768: 14 x 14 globals to 10 x 10 and 4 x 4, 6 x 6 locals to 4 x 4);
    # 32 x 32 maps (MAX_SIDE).
    for views, side, regions, out, dtype, what in ((8, 14, 1, 10, fp32, "bench, GTSA global"),
                                                   (8, 14, 8, 4, fp32, "bench, GTSA teacher local"),
                                                   (32, 6, 2, 4, fp32, "bench, GTSA student local"),
                                                   (8, 14, 1, 10, bf16, "GTSA bf16"),
                                                   (4, 32, 2, 7, fp32, "32 x 32 maps"),
                                                   (4, 32, 1, 32, fp32, "32 x 32 maps")):
        found[f"crop-c768-{side}x{side}-r{regions}-out{out}-{str(dtype)[6:]}"] = (
            what, _crop(views, 768, side, regions, out, dtype))
    # bench_matching: DenseCL C5 (B 32, 49 x 49, C 2048), GTSA ViT-S (B 64, 196 x 196, C 384).
    for batch, na, c, dtype, what in ((32, 49, 2048, bf16, "bench, DenseCL"), (64, 196, 384, bf16, "bench, GTSA"),
                                      (4, 196, 384, fp32, "fp32")):
        found[f"matching-b{batch}-n{na}-c{c}-{str(dtype)[6:]}"] = (what, _matching(batch, na, na, c, dtype))
    # bench_targets: LOCA's 9 focal views (6 x 6) and the large query (14 x 14).
    for views, grid, rule in ((9, (6, 6), "centre"), (1, (14, 14), "centre"), (9, (6, 6), "scenic")):
        found[f"targets-v{views}-{grid[0]}x{grid[1]}-{rule}"] = ("bench, LOCA", _targets(256, views, grid, rule))
    return found


def triton_resources(names) -> list[Resources]:
    """Compile every distinct specialisation the named cases launch; one row each, naming the
    cases that launch it."""
    table = cases()
    unknown = [name for name in names if name not in table]
    if unknown:
        raise SystemExit(f"gpu_resources: unknown cases {unknown}; known: {sorted(table)}")
    distinct, users = {}, {}
    for name in names:
        launches = []
        with recording(launches):
            table[name][1]()
        for launch in launches:
            distinct.setdefault(launch.key(), launch)
            users.setdefault(launch.key(), []).append(name)
    rows = []
    for i, (key, launch) in enumerate(distinct.items()):
        row = compile_launch(launch)
        print(f"gpu_resources: {i + 1}/{len(distinct)} {row.kernel} ({row.specialisation}): {row.warps} warps, "
              f"{row.registers} registers, {row.spill_stores}/{row.spill_loads} B spilled, {row.stack} B stack, "
              f"{row.shared} B shared", file=sys.stderr, flush=True)
        row.cases = ", ".join(dict.fromkeys(users[key]))
        rows.append(row)
    return rows


# --- CUDA -------------------------------------------------------------------------------------

def _demangle(names: list[str]) -> dict:
    """{mangled: demangled} by cu++filt (beside nvcc) or c++filt; the names as given without either."""
    nvcc = shutil.which("nvcc")
    tools = [shutil.which("cu++filt"), nvcc and os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cu++filt"),
             shutil.which("c++filt")]
    for tool in filter(None, tools):
        if os.path.exists(tool):
            done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
            if done.returncode == 0:
                return dict(zip(names, done.stdout.splitlines()))
    return {name: name for name in names}


def _launch_threads(source: str) -> dict:
    """{kernel name: threads per block} from __launch_bounds__(kThreads) and the constants of a
    kernels.cu, for the occupancy of its kernels."""
    constants = {}
    for name, value in re.findall(r"constexpr int (\w+) = ([\w\s*+]+);", source):
        try:
            constants[name] = eval(value, {}, dict(constants))  # noqa: S307  (our own constants)
        except Exception:  # noqa: BLE001  (a constant that is not a plain product)
            continue
    threads = {}
    for bound, kernel in re.findall(r"__launch_bounds__\((\w+)\)\s+(\w+)\(", source):
        threads[kernel] = constants.get(bound, int(bound) if bound.isdigit() else None)
    for kernel, bound in re.findall(r"(\w+)<<<[^,]+,\s*(\w+)", source):
        threads.setdefault(re.sub(r"<.*", "", kernel), constants.get(bound, int(bound) if bound.isdigit() else None))
    return threads


def cuda_resources() -> list[Resources]:
    """ptxas -v of every kernel of csrc/*/kernels.cu for sm_90a."""
    rows = []
    for source in sorted((ROOT / "csrc").glob("*/kernels.cu")):
        done = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90a", f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v",
                               "-c", str(source), "-o", os.devnull], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"gpu_resources: nvcc failed on {source}:\n{done.stderr[-3000:]}")
        report = parse_ptxas(done.stderr)
        names = _demangle(list(report))
        threads = _launch_threads(source.read_text())
        for mangled, (registers, stores, loads, stack, static) in report.items():
            full = names[mangled].replace("(anonymous namespace)::", "")
            base = re.sub(r"^.*::", "", re.sub(r"[<(].*", "", full))
            block = threads.get(base)
            rows.append(Resources(f"{source.parent.name}.{base}", re.sub(r"^[^<]*", "", re.sub(r"\(.*", "", full)),
                                  block // 32 if block else None, None, registers, stores, loads, stack, static))
    return rows


# --- the report -------------------------------------------------------------------------------

def _kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def table(rows: list[Resources], *, cuda: bool = False) -> str:
    lines = ["| kernel | specialisation | warps | stages | regs | spill st/ld B | stack B | smem KB | blocks/SM |"
             + ("" if cuda else " loads | cases |"),
             "|---|---|---|---|---|---|---|---|---|" + ("" if cuda else "---|---|")]
    for r in rows:
        flag = " **SPILL**" if r.spills else ""
        smem = _kb(r.shared) + (" **OVER 227**" if r.over_shared else "")
        blocks = r.blocks_per_sm()
        blocks = "-" if blocks is None else blocks
        line = (f"| {r.kernel} | {r.specialisation} | {r.warps or '-'} | {r.stages or '-'} | {r.registers} | "
                f"{r.spill_stores}/{r.spill_loads}{flag} | {r.stack} | {smem} | {blocks} |")
        lines.append(line + ("" if cuda else f" {r.vector_loads} | {r.cases} |"))
    return "\n".join(lines)


def worst(rows: list[Resources]) -> list[str]:
    """One line per kind of worst case: most registers, spills, stack, shared memory."""
    if not rows:
        return []
    out = []
    for label, key in (("most registers", lambda r: r.registers), ("most spill bytes", lambda r: r.spill_stores +
                                                                     r.spill_loads),
                       ("largest stack", lambda r: r.stack), ("most shared memory", lambda r: r.shared)):
        r = max(rows, key=key)
        out.append(f"- {label}: {r.kernel} ({r.specialisation}, {r.warps} warps): {r.registers} registers, "
                   f"{r.spill_stores}/{r.spill_loads} B spilled, {r.stack} B stack, {_kb(r.shared)} KB shared")
    return out


def report(triton_rows: list[Resources], cuda_rows: list[Resources], seconds: float) -> str:
    import triton
    spilling = [r for r in triton_rows + cuda_rows if r.spills]
    over = [r for r in triton_rows + cuda_rows if r.over_shared]
    scalar = [r for r in triton_rows if r.vector_loads == "scalar"]
    parts = [
        "# GPU register and shared-memory budgets (sm_90, H100/H200)",
        "",
        f"Written by `python benchmarks/gpu_resources.py` (triton {triton.__version__}, ptxas of its compile; "
        f"CUDA: nvcc -arch=sm_90a -Xptxas -v), {seconds:.0f} s on the CPU, no GPU. Each Triton row is one "
        "specialisation that the host wrappers launch at the shapes listed under `cases` (their Triton types and "
        "the runtime integers Triton marks divisible by 16, `%16`). Limits per SM: 65536 registers, 228 KB of "
        "shared memory (227 KB per block), 64 warps, 32 blocks. `loads`: the widest global load in the PTX.",
        "",
        f"Spilling: {len(spilling)} of {len(triton_rows) + len(cuda_rows)}; shared memory over 227 KB: {len(over)}; "
        f"Triton kernels with only scalar global loads: {len(scalar)}.",
        "",
        "## Worst cases (Triton)", "", *worst(triton_rows), "",
        "## Triton", "", table(triton_rows), "",
    ]
    if cuda_rows:
        parts += ["## CUDA (csrc/*/kernels.cu)", "",
                  "Shared memory here is static only: the attention mma kernels and the Sinkhorn pass also take "
                  "dynamic shared memory sized at launch (kernels.cu).", "", table(cuda_rows, cuda=True), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all); --list shows them")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of csrc/*/kernels.cu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_resources: unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    if args.list:
        print("\n".join(f"{name}: {what}" for name, (what, _) in cases().items()))
        return 0
    start = time.time()
    triton_rows = triton_resources(args.cases or list(cases()))
    cuda_rows = [] if args.no_cuda else cuda_resources()
    text = report(triton_rows, cuda_rows, time.time() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
