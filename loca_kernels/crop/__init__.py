"""crop_features (SPEC.md section 7): checks and dispatch.

Home of the op: reference.py (the oracle and its exact arithmetic), operators.py (its operators, fake
functions and autograd), triton.py (Triton kernels), csrc/crop/cpu.cpp (C++ kernels). The view
geometry (boxes in source coordinates, flip then quarter turn) is that of targets/.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import choose_backend, support
from .._validation import (FLOAT_DTYPES, check_boxes, check_grid, check_same_device, check_tensor, per_view, shape_str,
                           values_checkable)
from . import reference
from .operators import OPERATORS

__all__ = ["crop_features"]

OP = "crop_features"
# float64 runs on the reference and the C++ kernel (for gradcheck); Triton takes FLOAT_DTYPES.
DTYPES = FLOAT_DTYPES + (torch.float64,)
# Samples per bin along one axis, sampling_ratio or the adaptive ceil(region size / out size):
# beyond it a kernel would loop (and the reference allocate) without bound.
MAX_SAMPLES = 256


def _check_adaptive_samples(features, view_boxes, regions, out_size, view_rot90) -> None:
    """With sampling_ratio -1, each finite region's samples per bin, computed in float32 as the
    kernels do (reference.py), must be at most MAX_SAMPLES (one host sync; regions with a NaN
    or infinite coordinate pool to NaN and have no samples)."""
    if not values_checkable(regions) or regions.numel() == 0:
        return
    odd = (view_rot90 % 2 == 1)[:, None]
    h, w = features.shape[2:]
    one = torch.ones((), dtype=torch.float32, device=regions.device)
    sides = [torch.where(odd, w * one, h * one), torch.where(odd, h * one, w * one)]  # u's height, width
    boxes, views = regions.float(), view_boxes.float()[:, None]
    too_many = torch.zeros(regions.shape[:2], dtype=torch.bool, device=regions.device)
    for axis, (length, bins) in enumerate(zip(sides, out_size)):
        v0, v1 = views[..., axis], views[..., axis + 2]
        start = (boxes[..., axis] - v0) / (v1 - v0) * length - 0.5
        end = (boxes[..., axis + 2] - v0) / (v1 - v0) * length - 0.5
        too_many |= ~(torch.ceil((end - start) / bins) <= MAX_SAMPLES)  # NaN or inf counts too
    too_many &= torch.isfinite(boxes).all(-1)
    if bool(too_many.any()):
        m, r = (int(i) for i in too_many.nonzero()[0])
        raise ValueError(f"{OP}: regions[{m}, {r}] = {regions[m, r].tolist()} is too large for its view with "
                         f"sampling_ratio=-1: it would take more than {MAX_SAMPLES} samples per bin along an axis "
                         f"(region size / out_size {out_size} in the map's pixels); pass a sampling_ratio "
                         f"in [1, {MAX_SAMPLES}] or a smaller region")


def _support(features: torch.Tensor, out_size: tuple) -> dict:
    """The generic checks of the fused backends, then what the Triton kernels hold in registers."""
    checks = support(OP, features.device)

    def triton() -> Optional[str]:
        reason = checks["triton"]()
        if reason is not None:
            return reason
        from .triton import MAX_SIDE  # importable once the generic check passes (Triton is installed)
        if features.dtype not in FLOAT_DTYPES:
            return f"dtype {features.dtype} is not one of {FLOAT_DTYPES}"
        if max(*features.shape[2:], *out_size) > MAX_SIDE:
            return f"map {tuple(features.shape[2:])} or out_size {out_size} has a side above {MAX_SIDE}"
        return None

    return {"cpu": checks["cpu"], "triton": triton}


def crop_features(features: torch.Tensor, view_boxes: torch.Tensor, regions: torch.Tensor, out_size, *,
                  view_flip: Optional[torch.Tensor] = None, view_rot90: Optional[torch.Tensor] = None,
                  sampling_ratio: int = -1, backend: Optional[str] = None) -> torch.Tensor:
    """Features of source-image regions, pooled from each view in the source's orientation.

    Args:
        features: (M, C, h, w) one map per view, as the network saw the view (after its flip and
            turn). float32, float16, bfloat16 (or float64 on the "torch" and "cpu" backends).
        view_boxes: (M, 4) float crop (x0, y0, x1, y1) of each view in source coordinates
            (x1 > x0, y1 > y0).
        regions: (M, R, 4) float boxes in source coordinates, R per view. A region may stick out
            of its view (that part samples zeros) or have zero or negative size, as in roi_align:
            with sampling_ratio -1 it has no samples and pools to zeros, with a fixed
            sampling_ratio it pools the bilinear values at its collapsed or reversed samples.
            With sampling_ratio -1 the work grows with region size / out size, as in roi_align.
        out_size: (oh, ow), positive.
        view_flip: (M,) bool, the view was flipped left-right after cropping.
        view_rot90: (M,) int in 0..3: after the flip the view was turned by
            torch.rot90(view, k, dims=(-2, -1)).
        sampling_ratio: samples per bin along each axis, or -1 for ceil(region size / out size)
            as roi_align (0 and other negative values are rejected). At most MAX_SAMPLES (256)
            either way: a larger value, or with -1 a finite region that would take more, is a
            ValueError.
        backend: None, "torch", "cpu" or "triton".

    Returns:
        (M, R, C, oh, ow) in features' dtype: entry [m, r] is torchvision's
        roi_align(u, [box], (oh, ow), spatial_scale=1, sampling_ratio, aligned=True) with u the map
        turned back and unflipped (rows down and columns right as in the source image) and box the
        region in u's pixels. Box arithmetic in float32 (reference.py). Differentiable in features;
        the fused backward passes are deterministic. NaN (SPEC.md section 7): in all of [m, r] for
        a region with a NaN or infinite coordinate; for a NaN or infinite feature value, in the
        bins that give its pixel a nonzero weight.
    """
    check_tensor(OP, "features", features, ndim=4, layout="(M, C, h, w)", dtypes=DTYPES)
    check_tensor(OP, "view_boxes", view_boxes, ndim=2, layout="(M, 4)")
    check_tensor(OP, "regions", regions, ndim=3, layout="(M, R, 4)")
    check_boxes(OP, "view_boxes", view_boxes)
    if not regions.dtype.is_floating_point:
        raise TypeError(f"{OP}: regions must be a floating tensor, got {regions.dtype}")
    if regions.shape[-1] != 4:
        raise ValueError(f"{OP}: regions must be (M, R, 4) boxes (x0, y0, x1, y1), got shape {shape_str(regions)}")
    views = features.shape[0]
    if features.shape[1] == 0:
        raise ValueError(f"{OP}: features must have a feature dim C >= 1, got shape {shape_str(features)}")
    if min(features.shape[2:]) == 0:
        raise ValueError(f"{OP}: features must have positive h and w, got shape {shape_str(features)}")
    for name, t in (("view_boxes", view_boxes), ("regions", regions)):
        if t.shape[0] != views:
            raise ValueError(f"{OP}: {name} must have M={views} rows like features, got shape {shape_str(t)}")
    out_size = check_grid(OP, "out_size", out_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"{OP}: sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    if sampling_ratio == 0 or sampling_ratio < -1 or sampling_ratio > MAX_SAMPLES:
        raise ValueError(f"{OP}: sampling_ratio must be -1 (adaptive) or in [1, {MAX_SAMPLES}], got {sampling_ratio}")
    check_same_device(OP, [("features", features), ("view_boxes", view_boxes), ("regions", regions),
                           ("view_flip", view_flip), ("view_rot90", view_rot90)])
    device = features.device
    view_flip = per_view(OP, "view_flip", view_flip, (views,), device, "bool")
    view_rot90 = per_view(OP, "view_rot90", view_rot90, (views,), device, "int")
    if sampling_ratio == -1:
        _check_adaptive_samples(features, view_boxes, regions, out_size, view_rot90)
    name = choose_backend(OP, backend, device, _support(features, out_size))
    if name == "torch":
        return reference.crop_features(features, view_boxes, regions, out_size, view_flip, view_rot90,
                                       sampling_ratio)
    return OPERATORS[name](features, view_boxes.float(), regions.float(), list(out_size), view_flip, view_rot90,
                           sampling_ratio)
