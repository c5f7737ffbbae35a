"""Every operator of sinkhorn: the fake function of the pass operator, registered once for the
C++ operator (csrc/ops.cpp; "cpu" and "cuda") and its Triton twin (triton.py). Not differentiable."""
from __future__ import annotations

import torch

from .._backends import fused_operators


def _pass_fake(scores, col_scale, inv_epsilon, normalize_rows, write):
    result = scores.new_empty(scores.shape if write else scores.shape[1:], dtype=torch.float32)
    return result, scores.new_empty((), dtype=torch.float32)


def _register(suffix: str):
    name = "sinkhorn_pass" + suffix
    torch.library.register_fake(f"loca_kernels::{name}", _pass_fake)
    return getattr(torch.ops.loca_kernels, name)


# backend name -> pass operator (driven by fused.py)
OPERATORS = fused_operators(_register, "loca_kernels.sinkhorn.triton")
