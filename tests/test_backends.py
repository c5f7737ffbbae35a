"""What was built and how a backend is chosen (loca_kernels/_backends.py), and every
instruction-set variant of the C++ CPU kernels."""
import os
import subprocess
import sys

import pytest
import torch

import loca_kernels
from helpers import assert_close
from loca_kernels._backends import choose_backend, extension_has_kernel

CPU = torch.device("cpu")


def test_backends_reports_the_compiled_extension():
    info = loca_kernels.backends()
    assert info["extension"], info["extension_error"]
    assert set(info) >= {"cpu_kernels", "cuda_kernels", "cuda_device", "triton", "triton_interpreter", "cpu_isa"}
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")


def test_none_picks_the_first_supported_backend_for_the_device():
    support = {"cpu": lambda: None}
    assert choose_backend("op", None, CPU, support) == "cpu"
    assert choose_backend("op", None, CPU, {"cpu": lambda: "not built"}) == "torch"
    # The interpreter is for tests only: never chosen automatically on CPU tensors.
    assert choose_backend("op", None, CPU, {"triton": lambda: None}) == "torch"


def test_named_backend_that_cannot_run_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run this call: not built"):
        choose_backend("op", "cpu", CPU, {"cpu": lambda: "not built"})
    with pytest.raises(ValueError, match="not implemented for this operation"):
        choose_backend("op", "cuda", CPU, {"cpu": lambda: None})


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be None or one of .*got 'fast'"):
        choose_backend("op", "fast", CPU, {})


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("LOCA_KERNELS_BACKEND", "torch")
    assert choose_backend("op", None, CPU, {"cpu": lambda: None}) == "torch"
    monkeypatch.setenv("LOCA_KERNELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="not built"):
        choose_backend("op", None, CPU, {"cpu": lambda: "not built"})


# Run in a process with LOCA_KERNELS_CPU_ISA set: the C++ attention (forward and backward)
# and one Sinkhorn in both modes, on fixed inputs, saved for the parent to check.
CPU_KERNELS_SCRIPT = """
import sys, torch, loca_kernels as lk
g = torch.Generator().manual_seed(0)
q = torch.randn(6, 19, 3, 40, generator=g, requires_grad=True)
k = torch.randn(2, 37, 3, 40, generator=g, requires_grad=True)
v = torch.randn(2, 37, 3, 40, generator=g, requires_grad=True)
keep = lk.random_keep(2, 37, 11, generator=g)
out = lk.masked_cross_attention(q, k, v, keep, backend="cpu")
grad_out = torch.randn(out.shape, generator=g)
grads = torch.autograd.grad(out, (q, k, v), grad_out)
scores = torch.randn(300, 70, generator=g)
assignments = [lk.sinkhorn(scores, mode=mode, backend="cpu") for mode in ("loca", "swav")]
torch.save(dict(isa=torch.ops.loca_kernels.cpu_isa(), q=q, k=k, v=v, keep=keep, out=out, grad_out=grad_out, grads=grads,
                scores=scores, assignments=assignments), sys.argv[1])
"""


@pytest.mark.skipif(not extension_has_kernel("attention_forward", "CPU"), reason="extension built without CPU kernels")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_instruction_set_variant_matches_the_reference(isa, tmp_path):
    env = dict(os.environ, LOCA_KERNELS_CPU_ISA=isa)
    saved = tmp_path / "results.pt"
    subprocess.run([sys.executable, "-c", CPU_KERNELS_SCRIPT, str(saved)], env=env, check=True, timeout=300)
    r = torch.load(saved)
    order = ("baseline", "avx2", "avx512")
    widest = loca_kernels.backends()["cpu_isa"]  # this process: the widest this CPU has
    if order.index(isa) > order.index(widest):
        pytest.skip(f"this CPU has no {isa}")
    assert r["isa"] == isa
    q, k, v = (t.detach().double().requires_grad_() for t in (r["q"], r["k"], r["v"]))
    out = loca_kernels.masked_cross_attention(q, k, v, r["keep"], backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), r["grad_out"].double())
    assert_close(r["out"], out, torch.float32, f"{isa} out")
    for name, got, expected in zip(("grad_q", "grad_k", "grad_v"), r["grads"], grads):
        assert_close(got, expected, torch.float32, f"{isa} {name}")
    for mode, got in zip(("loca", "swav"), r["assignments"]):
        assert_close(got, loca_kernels.sinkhorn(r["scores"], mode=mode, backend="torch").double(), torch.float32,
                     f"{isa} sinkhorn {mode}")


def test_cuda_head_dims_are_the_extensions_list():
    # One list (csrc/include/loca_kernels/attention.h), read through an operator; Python holds
    # it only where the extension has the CUDA kernels, so "cuda" refuses before asking it.
    from loca_kernels.attention import CUDA_HEAD_DIMS
    dims = tuple(torch.ops.loca_kernels.attention_cuda_head_dims())
    assert dims and all(d > 0 and d % 16 == 0 for d in dims), dims  # the mma tiles need multiples of 16
    assert CUDA_HEAD_DIMS == (dims if loca_kernels.backends()["cuda_kernels"] else ())
