"""What was built and how a backend is chosen (loca_kernels/_backends.py)."""
import pytest
import torch

import loca_kernels
from loca_kernels._backends import choose_backend

CPU = torch.device("cpu")


def test_backends_reports_the_compiled_extension():
    info = loca_kernels.backends()
    assert info["extension"], info["extension_error"]
    assert set(info) >= {"cpu_kernels", "cuda_kernels", "cuda_device", "triton", "triton_interpreter"}


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
