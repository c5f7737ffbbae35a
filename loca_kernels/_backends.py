"""What was built, what can run here, and which backend an op call uses.

Backends:
  "torch"  the pure-PyTorch reference (always available, any device)
  "cpu"    C++ kernels of the extension loca_kernels._C, on CPU tensors
  "cuda"   CUDA kernels of the extension, on CUDA tensors
  "triton" Triton kernels, on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)

`backend=None` takes LOCA_KERNELS_BACKEND when set, otherwise the first backend of
PREFERENCE for the tensors' device that supports the call. A backend named by the
caller (or by the environment variable) that cannot run the call raises.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
# The Triton interpreter is never chosen automatically: it exists for testing.
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

try:
    from . import _C  # noqa: F401  (registers the C++ operators)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as error:  # the package still works on its reference backend
    EXTENSION_ERROR = str(error)
    warnings.warn(
        f"loca_kernels: the compiled extension could not be loaded ({error}); "
        "the 'cpu' and 'cuda' backends are unavailable, 'torch' and 'triton' still work.",
        RuntimeWarning,
        stacklevel=2,
    )

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


# Fixed once the extension is imported; torch.compile cannot trace the registry query.
@torch.compiler.assume_constant_result
def extension_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when loca_kernels::<op_name> has a compiled kernel for `dispatch_key`."""
    if EXTENSION_ERROR is not None:
        return False
    packet = getattr(torch.ops.loca_kernels, op_name, None)
    return packet is not None and packet.default.has_kernel_for_dispatch_key(dispatch_key)


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or on the CPU under TRITON_INTERPRET=1."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET)


def backends() -> dict:
    """Report what was built and what can run on this machine."""
    return {
        "extension": EXTENSION_ERROR is None,
        "extension_error": EXTENSION_ERROR,
        "cpu_kernels": extension_has_kernel("attention_forward", "CPU"),
        "cuda_kernels": extension_has_kernel("attention_forward", "CUDA"),
        # the instruction set of the C++ CPU kernels (LOCA_KERNELS_CPU_ISA=baseline|avx2 narrows it)
        "cpu_isa": torch.ops.loca_kernels.cpu_isa() if EXTENSION_ERROR is None else None,
        "cuda_device": torch.cuda.is_available(),
        "triton": TRITON_AVAILABLE,
        "triton_interpreter": TRITON_INTERPRET,
        "torch": torch.__version__,
        "forced_backend": os.environ.get("LOCA_KERNELS_BACKEND") or None,
    }


# A support check returns None when the backend can run the call, else the reason it cannot.
SupportCheck = Callable[[], Optional[str]]


def extension_support(operator: str, dispatch_key: str, device: torch.device) -> SupportCheck:
    """The check of the "cpu" or "cuda" backend (dispatch_key "CPU" or "CUDA") for a call on
    `device` of the compiled operator loca_kernels::<operator>."""
    backend = dispatch_key.lower()

    def check() -> Optional[str]:
        if device.type != backend:
            return f"tensors are on {device}, the {backend!r} backend needs {backend} tensors"
        if not extension_has_kernel(operator, dispatch_key):
            return f"the extension was built without a {dispatch_key} kernel of {operator}"
        return None
    return check


def triton_support(device: torch.device) -> SupportCheck:
    """The check of the "triton" backend for a call on `device`."""
    def check() -> Optional[str]:
        if not TRITON_AVAILABLE:
            return "triton is not installed"
        if not triton_can_run(device):
            return f"Triton cannot run on {device} here (CPU tensors need TRITON_INTERPRET=1)"
        return None
    return check


def support(operator: str, device: torch.device) -> dict:
    """The checks of every fused backend of an op whose C++ operator is loca_kernels::<operator>
    (its Triton twin is <operator>_triton): the map `choose_backend` takes."""
    return {"cpu": extension_support(operator, "CPU", device), "cuda": extension_support(operator, "CUDA", device),
            "triton": triton_support(device)}


def fused_operators(register: Callable[[str], object], triton_module: str) -> dict:
    """The one map from a backend name to the operator an op's public function calls.

    Every fused op has C++ operators (one schema in csrc/ops.cpp, kernels for the "cpu" and
    "cuda" dispatch keys) and Triton twins named with the suffix "_triton", defined by
    importing `triton_module` (Triton modules are imported eagerly, when Triton is installed).
    `register(suffix)` registers the fake functions and autograd of the operators of one twin
    and returns the operator the public function calls.
    """
    operators = {}
    if EXTENSION_ERROR is None:
        operators["cpu"] = operators["cuda"] = register("")
    if TRITON_AVAILABLE:
        importlib.import_module(triton_module)
        operators["triton"] = register("_triton")
    return operators


def choose_backend(op: str, requested: Optional[str], device: torch.device,
                   support: Mapping[str, SupportCheck]) -> str:
    """Resolve `requested` (None, or a name in BACKENDS) for one call of `op` on `device`.

    `support` maps each backend the op implements (besides "torch") to its check.
    """
    if requested is None:
        requested = os.environ.get("LOCA_KERNELS_BACKEND") or None
    if requested is None:
        for name in PREFERENCE.get(device.type, ("torch",)):
            if name == "torch" or (name in support and support[name]() is None):
                return name
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return requested
    if requested not in support:
        raise ValueError(f"{op}: backend {requested!r} is not implemented for this operation")
    reason = support[requested]()
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} cannot run this call: {reason}")
    return requested
