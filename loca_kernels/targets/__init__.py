"""relative_position_targets (SPEC.md section 3) and gather_at_targets (section 3.1): checks and
dispatch.

Home of the op: reference.py (the oracle and its exact arithmetic, and gather_at_targets, whose
plain PyTorch is its only backend), operators.py (its operators and fake functions), triton.py
(Triton kernel), csrc/targets/ (C++ and CUDA kernels). The view sampling that makes the boxes is
loca_kernels/geometry.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import choose_backend, support
from .._validation import (check_boxes, check_grid, check_same_device, check_tensor, per_view, shape_str,
                           values_checkable)
from . import reference
from .operators import OPERATORS

__all__ = ["relative_position_targets", "gather_at_targets"]

OP = "relative_position_targets"
RULES = ("centre", "scenic")

def relative_position_targets(query_boxes: torch.Tensor, ref_boxes: torch.Tensor, query_grid, ref_grid, *,
                              query_flip: Optional[torch.Tensor] = None, ref_flip: Optional[torch.Tensor] = None,
                              query_rot90: Optional[torch.Tensor] = None, ignore_index: int = -1,
                              rule: str = "centre", query_size=None, backend: Optional[str] = None) -> torch.Tensor:
    """For every patch of every query view, the reference patch under its centre.

    Args:
        query_boxes: (B, V, 4) float crops (x0, y0, x1, y1) of the query views in source-image
            coordinates (any consistent unit, x right, y down).
        ref_boxes: (B, 4) float crop of the reference view.
        query_grid, ref_grid: (rows, cols) patch grids of the views as the network sees them.
        query_flip: (B, V) bool, the query view was flipped left-right after cropping.
        ref_flip: (B,) bool, likewise for the reference.
        query_rot90: (B, V) int in 0..3: after the flip the view was turned by
            torch.rot90(view, k, dims=(-2, -1)).
        ignore_index: the target of a patch whose centre lies outside the reference box.
        rule: "centre" (default): the reference patch under the query patch's centre.
            "scenic": the official LOCA labels bit for bit (docs/SPEC.md section 3): TF's
            nearest-neighbour resizes of the reference's index grid to its crop, of the query
            crop to query_size, then to query_grid; each patch reads the reference patch of one
            source pixel. Needs integer boxes (source pixels) and query_size.
        query_size: (rows, cols) pixel size of the query views as the network sees them (the
            official 224 x 224 and 96 x 96), for rule="scenic" only.
        backend: None, "torch", "cpu", "triton" or "cuda".

    Returns:
        int64 (B, V, rows * cols) in raster order of the query view: row * ref_cols + col of the
        reference patch (mirrored when ref_flip), or ignore_index.
    """
    if rule not in RULES:
        raise ValueError(f"{OP}: rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    check_tensor(OP, "query_boxes", query_boxes, ndim=3, layout="(B, V, 4)")
    check_tensor(OP, "ref_boxes", ref_boxes, ndim=2, layout="(B, 4)")
    check_boxes(OP, "query_boxes", query_boxes)
    check_boxes(OP, "ref_boxes", ref_boxes)
    b, v = query_boxes.shape[:2]
    if ref_boxes.shape[0] != b:
        raise ValueError(f"{OP}: ref_boxes must have B={b} rows like query_boxes, got shape {shape_str(ref_boxes)}")
    query_grid, ref_grid = check_grid(OP, "query_grid", query_grid), check_grid(OP, "ref_grid", ref_grid)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    device = query_boxes.device
    check_same_device(OP, [("query_boxes", query_boxes), ("ref_boxes", ref_boxes), ("query_flip", query_flip),
                           ("ref_flip", ref_flip), ("query_rot90", query_rot90)])
    query_flip = per_view(OP, "query_flip", query_flip, (b, v), device, "bool")
    ref_flip = per_view(OP, "ref_flip", ref_flip, (b,), device, "bool")
    query_rot90 = per_view(OP, "query_rot90", query_rot90, (b, v), device, "int")
    if rule == "scenic":
        if query_size is None:
            raise ValueError(f"{OP}: rule='scenic' needs query_size, the (rows, cols) pixel size of the query views")
        query_size = list(check_grid(OP, "query_size", query_size))
        for arg, boxes in (("query_boxes", query_boxes), ("ref_boxes", ref_boxes)):
            if values_checkable(boxes) and not bool((boxes == boxes.floor()).all()):
                raise ValueError(f"{OP}: rule='scenic' needs integer boxes (source pixels), but {arg} has "
                                 f"fractional coordinates")
    elif query_size is not None:
        raise ValueError(f"{OP}: query_size is only used by rule='scenic', got {query_size!r} with rule='centre'")
    name = choose_backend(OP, backend, device, support(OP, device))
    if name == "torch":
        return reference.relative_position_targets(query_boxes, ref_boxes, query_grid, ref_grid, query_flip,
                                                   ref_flip, query_rot90, ignore_index, query_size)
    return OPERATORS[name](query_boxes, ref_boxes, list(query_grid), list(ref_grid), query_flip, ref_flip,
                           query_rot90, ignore_index, query_size)


def gather_at_targets(values: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
                      fill: float = 0.0) -> torch.Tensor:
    """Per-reference-patch values taken at the targets, without a (B, V, Nq, Nr) tensor.

    Args:
        values: (B, Nr) or (B, Nr, K), e.g. the Sinkhorn assignments of the reference patches.
        targets: (B, Nq) or (B, V, Nq) int64 reference-patch indices or ignore_index.
    Returns:
        targets.shape (+ (K,)): values[b, targets[b, ...]], `fill` where ignored. Differentiable
        in values (ignored entries pass no gradient); no host synchronisation.
    """
    op = "gather_at_targets"
    check_tensor(op, "targets", targets)
    check_tensor(op, "values", values)
    if values.dim() not in (2, 3):
        raise ValueError(f"{op}: values must be (B, Nr) or (B, Nr, K), got shape {shape_str(values)}")
    if targets.dim() not in (2, 3) or targets.shape[0] != values.shape[0]:
        raise ValueError(f"{op}: targets must be (B, Nq) or (B, V, Nq) with B={values.shape[0]}, "
                         f"got shape {shape_str(targets)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    check_same_device(op, [("values", values), ("targets", targets)])
    return reference.gather_at_targets(values, targets, ignore_index, fill)
