"""Shared by every test file: one tolerance table per dtype, an assertion that reports the
max absolute and relative error and any NaN/inf mismatch, the (backend, device) parameters of
an op, and compiling Triton kernels for a GPU in a child process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

# (atol, rtol) for a kernel computing in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None,
                 name: str = "output") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, at the tolerance of
    `dtype` (default: actual's dtype), comparing in float64; NaN and inf must sit at the same
    places with the same values."""
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    same_nan = torch.equal(a.isnan(), e.isnan())
    same_inf = torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()])
    if not (same_nan and same_inf):
        raise AssertionError(f"{name}: NaN/inf mismatch: {int(a_bad.sum())} non-finite values in actual, "
                             f"{int(e_bad.sum())} in expected (first actual at "
                             f"{a_bad.nonzero()[:1].tolist()}, expected at {e_bad.nonzero()[:1].tolist()})")
    finite = ~e_bad
    err = (a - e).abs()[finite]
    if err.numel() == 0:
        return
    bound = atol + rtol * e.abs()[finite]
    worst = int(torch.argmax(err - bound))
    if (err > bound).any():
        rel = err / e.abs()[finite].clamp_min(1e-30)
        raise AssertionError(
            f"{name} ({dtype}): {int((err > bound).sum())} of {err.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); max abs error {err.max().item():.3e}, max rel error "
            f"{rel.max().item():.3e}; worst element: actual {a[finite][worst].item():.6e} vs "
            f"expected {e[finite][worst].item():.6e}")


def backend_params(operator: str, *, reference: bool = True) -> list:
    """pytest params (backend, device): every backend of the op whose C++ operator is
    loca_kernels::<operator>, on the device it runs on here, skipped with the reason when it
    cannot run. "torch" (the reference, when `reference`) and "cpu" take CPU tensors, "cuda"
    CUDA tensors, "triton" CUDA tensors where a GPU exists, else CPU tensors under the
    interpreter (conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
    from loca_kernels._backends import EXTENSION_ERROR, support

    # A misspelt operator would otherwise skip every fused backend as "built without a kernel".
    if EXTENSION_ERROR is None and not hasattr(torch.ops.loca_kernels, operator):
        raise ValueError(f"backend_params: loca_kernels::{operator} is not an operator of the extension")
    gpu = torch.cuda.is_available()
    pairs = [("torch", "cpu")] * reference + [("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu"), ("cuda", "cuda")]
    params = []
    for backend, device in pairs:
        reason = None
        if device == "cuda" and not gpu:
            reason = "no CUDA device"
        elif backend != "torch":
            reason = support(operator, torch.device(device))[backend]()
        params.append(pytest.param(backend, device, id=f"{backend}-{device}",
                                   marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


# NaN and infinite inputs (each op's SPEC section says where they spread). NaN inputs make
# numpy, which runs the Triton interpreter, warn.
NON_FINITE = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="+inf"),
              pytest.param(float("-inf"), id="-inf")]
IGNORE_NUMPY_NAN_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def non_finite_params(backends: list, cases: dict) -> list:
    """pytest params (backend, device, *case, value) of a non-finite input test: each case
    (id -> tuple of arguments) with NaN, +inf and -inf on every backend of `backends`
    (backend_params), except under the slow Triton interpreter, where case i takes one value
    only (the values in turn)."""
    params = []
    for backend in backends:
        interpreted = backend.id == "triton-cpu"
        for i, (case_id, case) in enumerate(cases.items()):
            for j, value in enumerate(NON_FINITE):
                if not interpreted or j == i % len(NON_FINITE):
                    params.append(pytest.param(*backend.values, *case, *value.values, marks=backend.marks,
                                               id=f"{backend.id}-{case_id}-{value.id}"))
    return params


# Run in a child process: the Triton interpreter (TRITON_INTERPRET=1, set for the tests)
# patches triton.language in its process, which breaks a later compile in that process.
_COMPILE_PRELUDE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import compile_triton_kernel
"""


def compile_for_gpu(script: str, timeout: float = 900) -> str:
    """Run `script` in a fresh Python process without TRITON_INTERPRET, with
    `compile_triton_kernel` imported; fail with its stderr unless it exits 0. Returns stdout."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = _COMPILE_PRELUDE.format(tests=os.path.dirname(os.path.abspath(__file__))) + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"compiling for a GPU failed:\n{done.stderr[-4000:]}"
    return done.stdout


def _triton_source(kernel, types: dict, constexprs: dict):
    from triton.compiler import ASTSource

    signature = {param.name: types.get(param.name, "constexpr") for param in kernel.params}
    missing = [name for name, kind in signature.items() if kind == "constexpr" and name not in constexprs]
    assert not missing, f"{kernel.fn.__name__}: no type or constexpr value for {missing}"
    return ASTSource(kernel, signature, constexprs=constexprs)


def compile_triton_kernel(kernel, types: dict, constexprs: dict, *, capability: int = 90, options=None) -> str:
    """Compile a @triton.jit kernel to PTX for sm_<capability> with Triton's own compiler (no
    GPU needed) and return the PTX. `types` gives the Triton type of each runtime argument
    ("*fp16", "i32", ...); every other parameter is a constexpr taken from `constexprs`."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(_triton_source(kernel, types, constexprs), target=GPUTarget("cuda", capability, 32),
                              options=options or {})
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx
    return ptx


def triton_ttir(kernel, types: dict, constexprs: dict, *, capability: int = 90, options=None) -> str:
    """The TTIR of a kernel for sm_<capability> (arguments as compile_triton_kernel's): Triton's
    first IR after its own passes (helper functions inlined, values named after the source),
    in a fraction of a second where PTX takes seconds."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    source = _triton_source(kernel, types, constexprs)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    parsed = backend.parse_options(options or {})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, parsed, backend.get_codegen_implementation(parsed), backend.get_module_map(),
                            context)
    stages = {}
    backend.add_stages(stages, parsed, source.language)
    return str(stages["ttir"](module, {}))
