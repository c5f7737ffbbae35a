"""Every operator of relative_position_targets: fake functions, registered once for the C++
operator (csrc/ops.cpp; "cpu" and "cuda") and its Triton twin (triton.py). Not differentiable."""
from __future__ import annotations

import torch

from .._backends import fused_operators


def _targets_fake(query_boxes, ref_boxes, query_grid, ref_grid, query_flip, ref_flip, query_rot90, ignore_index,
                  query_size=None):
    b, v = query_boxes.shape[:2]
    return query_boxes.new_empty((b, v, query_grid[0] * query_grid[1]), dtype=torch.int64)


def _register(suffix: str):
    name = "relative_position_targets" + suffix
    torch.library.register_fake(f"loca_kernels::{name}", _targets_fake)
    return getattr(torch.ops.loca_kernels, name)


# backend name -> operator
OPERATORS = fused_operators(_register, "loca_kernels.targets.triton")
