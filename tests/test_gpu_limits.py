"""What tests on the CPU cannot show about the GPU kernels, checked without a GPU. Triton
(loca_kernels/*/triton.py; the interpreter runs them in numpy, at small sizes):
- every tl.dot states its input precision (on a GPU tl.dot multiplies float32 in TF32 by
  default, the interpreter in full float32);
- grids: only axis x may grow with the batch (CUDA caps axes y and z at 65535), checked on
  the grids the host wrappers launch at a batch of 10**6 (meta tensors: nothing allocated);
- offsets: a batch or row index is multiplied by a stride or size in int64 (the interpreter
  computes in numpy, and never at 2**31 elements), checked in the TTIR of the specialisations
  the host wrappers launch, compiled for sm_90 in a child process.
CUDA (csrc/*/kernels.cu), by reading the source: one-dimensional grids, and the block index
widened to 64 bits before it multiplies anything."""
import ast
import contextlib
import importlib
import json
import pathlib
import re

import pytest
import torch

from helpers import compile_for_gpu

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNEL_FILES = sorted((pathlib.Path(__file__).parents[1] / "loca_kernels").glob("*/triton.py"))


def _dot_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
            yield node


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.parent.name)
def test_every_tl_dot_states_its_input_precision(path):
    calls = list(_dot_calls(ast.parse(path.read_text(), filename=str(path))))
    implicit = [f"{path.parent.name}/triton.py:{call.lineno}" for call in calls
                if not any(keyword.arg == "input_precision" for keyword in call.keywords)]
    assert not implicit, f"tl.dot without input_precision (TF32 for float32 on a GPU) at {implicit}"


# ---- launches of the host wrappers, recorded instead of run -------------------------------

class _Launch:
    def __init__(self, module, name, grid, args, kwargs):
        self.module, self.name, self.grid, self.args, self.kwargs = module, name, grid, args, kwargs

    def arguments(self):
        """The launch's arguments as JSON, tensors as their dtype (for _SPECIALISE)."""
        def plain(value):
            return {"tensor": str(value.dtype).removeprefix("torch.")} if isinstance(value, torch.Tensor) else value
        return [plain(value) for value in self.args], {name: plain(value) for name, value in self.kwargs.items()}


# In the child: the (types, constexprs, options) Triton compiles for a launch's arguments, by its
# own rules (integers equal to 1 become constexprs unless do_not_specialize, ...).
_SPECIALISE = """
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

def specialise(kernel, args, kwargs):
    values = dict(zip([p.name for p in kernel.params], args), **kwargs)
    types, constexprs = {}, {}
    for param in kernel.params:
        value = values.pop(param.name)
        if isinstance(value, dict):
            value = torch.empty(1, dtype=getattr(torch, value["tensor"]), device="meta")
        if param.is_constexpr:
            constexprs[param.name] = value
            continue
        kind = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)[0]
        if kind == "constexpr":
            constexprs[param.name] = value
        else:
            types[param.name] = kind
    if "DOT_FP32" in constexprs:  # the interpreter's workaround, on in the parent: off on a GPU
        constexprs["DOT_FP32"] = False
    return types, constexprs, dict(values, sanitize_overflow=False)  # what is left: compile options
"""


@contextlib.contextmanager
def _recorded_launches():
    """Every Triton kernel launch of the loca_kernels Triton modules, recorded, not run."""
    launches = []
    patch = pytest.MonkeyPatch()

    class Recorder:
        def __init__(self, module, name):
            self.module, self.name = module, name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(_Launch(self.module, self.name, grid, args, kwargs))

    for path in KERNEL_FILES:
        module = importlib.import_module(f"loca_kernels.{path.parent.name}.triton")
        for name, value in vars(module).items():
            if isinstance(value, (triton.runtime.JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                patch.setattr(module, name, Recorder(module.__name__, name))
    try:
        yield launches
    finally:
        patch.undo()


def _host_wrappers(batch):
    """Calls of every Triton host wrapper (the functions behind the operators) on meta tensors,
    LOCA / DenseCL / GTSA shapes with `batch` images, in float32."""
    from loca_kernels.attention import triton as attention
    from loca_kernels.contrastive import triton as contrastive
    from loca_kernels.crop import triton as crop
    from loca_kernels.matching import triton as matching
    from loca_kernels.sinkhorn import triton as sinkhorn
    from loca_kernels.targets import triton as targets

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    views, heads, d = 10, 12, 64
    q, k = t(views * batch, 36, heads, d), t(batch, 196, heads, d)
    lse = t(views * batch, heads, 36)
    run = (t(1, 1, dtype=torch.int32), t(1, dtype=torch.int32), True)          # LOCA: one run for all
    lists = (t(views * batch, 39, dtype=torch.int32), t(views * batch, dtype=torch.int32), False)  # per row
    for keep in (run, lists):
        yield attention.attention_forward_triton._init_fn(q, k, k, *keep, 0.125)
        yield attention.attention_backward_triton._init_fn(q, q, k, k, q, lse, *keep, 0.125)
    for n, kk in ((batch * 196, 4096), (batch * 196, 65536)):
        for normalize, write in ((True, True), (True, False), (False, False)):
            yield sinkhorn.sinkhorn_pass_triton._init_fn(t(n, kk), t(kk), 20.0, normalize, write)
    yield contrastive.queue_contrastive_forward_triton._init_fn(t(batch * 49, 128), t(batch * 49, 128),
                                                                t(128, 65536).t(), 5.0, True)
    boxes, regions = t(2 * batch, 4), t(2 * batch, 1, 4)
    flips, turns = t(2 * batch, dtype=torch.bool), t(2 * batch, dtype=torch.int64)
    yield crop.crop_features_triton._init_fn(t(2 * batch, 768, 14, 14), boxes, regions, [10, 10], flips, turns, -1)
    yield crop.crop_features_backward_triton._init_fn(t(2 * batch, 1, 768, 10, 10), boxes, regions, [14, 14], flips,
                                                      turns, -1)
    a = t(batch, 49, 2048)
    yield matching.patch_matching_triton._init_fn(a, a)
    yield matching.patch_matching_backward_triton._init_fn(t(batch, 49), a, a, t(batch, 49, dtype=torch.int64))
    yield targets.relative_position_targets_triton._init_fn(
        t(batch, views, 4, dtype=torch.float64), t(batch, 4, dtype=torch.float64), [14, 14], [14, 14],
        t(batch, views, dtype=torch.bool), t(batch, dtype=torch.bool), t(batch, views, dtype=torch.int64), -100,
        None)


def _launches(batch):
    with _recorded_launches() as launches:
        for _ in _host_wrappers(batch):
            pass
    return launches


def test_grids_put_the_batch_on_axis_x_only():
    launches = _launches(10 ** 6)
    assert {launch.name for launch in launches} >= {"_forward_kernel", "_grad_q_kernel", "_grad_kv_kernel",
                                                    "_sinkhorn_pass_kernel", "_backward_kernel", "_grad_a_kernel",
                                                    "_grad_b_kernel", "_targets_kernel"}
    for launch in launches:
        grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        assert len(grid) == 3 and grid[0] < 2 ** 31 and max(grid[1:]) <= 65535, \
            f"{launch.module}.{launch.name}: grid {launch.grid} at a batch of 10**6 (axis x < 2**31, y and z <= 65535)"


_OP = re.compile(r"^\s*(?P<results>%[\w.#:]+(?:, %[\w.#:]+)*) = (?P<op>[\w.]+) (?P<rest>.*)$")
_FOR = re.compile(r"scf\.for %(?P<iv>[\w.]+) = %(?P<lb>[\w.#]+) to %(?P<ub>[\w.#]+)")
_ARG = re.compile(r"%(?P<name>\w+): i(?:32|64)\b")
# Ops whose result grows with an operand; a remainder is bounded by its divisor (a block
# count, a head count), so it does not carry the batch index on.
_CARRY = {"arith.addi", "arith.subi", "arith.muli", "arith.divsi", "arith.divui", "arith.extsi", "arith.extui",
          "arith.trunci", "arith.maxsi", "arith.minsi", "arith.select", "tt.splat", "tt.broadcast", "tt.expand_dims"}


def narrow_index_products(ttir: str) -> list:
    """The int32 multiplications in `ttir` of a value derived from the program id along axis x
    (the batch, row or view index) by a value derived from an integer argument of the kernel
    (a stride or size): an offset that wraps past 2**31."""
    def name(token):
        return token.lstrip("%").split("#")[0].split(":")[0]

    from_program, from_argument, narrow = set(), set(), []
    for line in ttir.splitlines():
        if "tt.func" in line:
            from_argument.update(match["name"] for match in _ARG.finditer(line.split(") attributes")[0]))
            continue
        loop = _FOR.search(line)
        if loop:
            for marks in (from_program, from_argument):
                if name(loop["lb"]) in marks or name(loop["ub"]) in marks:
                    marks.add(loop["iv"])
        match = _OP.match(line)
        if not match:
            continue
        results = [name(r.strip()) for r in match["results"].split(",")]
        body = match["rest"].split(" loc(")[0]
        operands = {name(token) for token in re.findall(r"%[\w.#]+", body.split(" : ")[0])}
        if match["op"] == "tt.get_program_id" and body.startswith("x"):
            from_program.update(results)
        if match["op"] == "arith.muli" and re.search(r":\s*(tensor<[^>]*xi32>|i32)\s*$", body):
            a, b = sorted(operands) if len(operands) == 2 else (next(iter(operands)),) * 2
            if (a in from_program and b in from_argument) or (b in from_program and a in from_argument):
                narrow.append(line.strip())
        if match["op"] in _CARRY:
            for marks in (from_program, from_argument):
                if operands & marks:
                    marks.update(results)
    return narrow


def test_offsets_that_grow_with_the_batch_are_64_bit():
    launches = [(launch.module, launch.name, *launch.arguments()) for launch in _launches(256)]
    out = compile_for_gpu(_SPECIALISE + f"""
import importlib, json
from helpers import triton_ttir

found = []
for module, name, args, kwargs in json.loads({json.dumps(launches)!r}):
    kernel = getattr(importlib.import_module(module), name)
    types, constexprs, options = specialise(kernel, args, kwargs)
    found.append(triton_ttir(kernel, types, constexprs, options=options))
print(json.dumps(found))
""", timeout=600)
    irs = json.loads(out.strip().splitlines()[-1])
    narrow = {f"{module}.{name}": found for (module, name, _, _), ir in zip(launches, irs)
              if (found := narrow_index_products(ir))}
    assert not narrow, "int32 products of a batch/row index and a stride (wrap past 2**31):\n" + \
        "\n".join(f"{kernel}:\n  " + "\n  ".join(lines) for kernel, lines in narrow.items())


CUDA_FILES = sorted((pathlib.Path(__file__).parents[1] / "csrc").glob("*/kernels.cu"))


@pytest.mark.parametrize("path", CUDA_FILES, ids=lambda p: p.parent.name)
def test_cuda_kernels_use_grid_axis_x_only_and_64_bit_block_offsets(path):
    # A source check (the kernels' launch arithmetic runs on the device): every launch is
    # <<<blocks, threads>>> with a 1-D block count, and blockIdx.x (32-bit unsigned) is cast to
    # int64_t before a product, as static_cast<int64_t>(blockIdx.x) * n.
    source = path.read_text()
    other_axes = re.findall(r"(?:blockIdx|gridDim)\.[yz]|\bdim3\b", source)
    narrow = [line.strip() for line in source.splitlines()
              if re.search(r"(?<!<int64_t>\()blockIdx\.x\s*\*", line)]
    assert not other_axes and not narrow, \
        f"{path.parent.name}/kernels.cu: grid axes {other_axes}, 32-bit products {narrow}"
