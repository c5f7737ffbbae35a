"""LOCA and GTSA view geometry: crop boxes sampled like the official recipes (RandomResizedCrop-style
or as TensorFlow's sample_distorted_bounding_box, optionally overlapping given boxes as GTSA
requires), flip flags, quarter turns, and box intersections, all with a torch.Generator."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def sample_boxes(batch: int, num_views: int, image_size, area_range: Sequence[float],
                 aspect_range: Sequence[float] = (3 / 4, 4 / 3), *,
                 generator: Optional[torch.Generator] = None, overlap_with: Optional[torch.Tensor] = None,
                 min_overlap: float = 0.0, tries: Optional[int] = None, sampler: str = "rrc") -> torch.Tensor:
    """Crop boxes (batch, num_views, 4) float32 (x0, y0, x1, y1) in pixels.

    image_size: (height, width) of every image, or a (batch, 2) tensor of per-image sizes.
    Random numbers come from `generator` (CPU); the boxes are CPU tensors.

    sampler="rrc" (default, tries=10 unless given): float boxes as torchvision's RandomResizedCrop.
    Area fraction uniform in area_range, aspect ratio (w / h) log-uniform in aspect_range,
    position uniform; a view none of whose tries is accepted gets the largest central crop with
    an aspect ratio in aspect_range.

    sampler="tf" (tries=100 unless given): integer boxes as TensorFlow's
    sample_distorted_bounding_box (no object boxes, min_object_covered=0, as the official LOCA
    crops; its default aspect_range is (0.75, 1.33)). Per try: aspect ratio uniform (not
    log-uniform) in aspect_range; height an integer uniform between round(sqrt(min_area / ratio))
    and round(sqrt(max_area / ratio)) (capped so that the width round(height * ratio) fits the
    image, and at the image height), one step up or down where rounding leaves the area outside
    area_range * image area; width = round(height * ratio) (half to even, float32 arithmetic);
    the try fails where the area is still out of range. Offsets are integers uniform in
    [0, image side - crop side) (a crop smaller than the image never touches its bottom or
    right edge). A view with no accepted try gets the whole image.

    overlap_with: optional (batch, 4) or (batch, K, 4) boxes (e.g. GTSA's global crops). A try is
    then accepted only when it fits in its image and its intersection with each of the K boxes
    has an area above min_overlap * the image's area (GTSA: 0.01 for the local crops against
    the global ones, 0.02 between the two global crops). GTSA redraws until a crop overlaps;
    here every view draws `tries` candidates at once (vectorised rejection) and keeps its first
    accepted one, so pass more tries (e.g. 50) when overlaps are rare. The central-crop fallback
    contains every box that lies in the central crop, so it meets the requirement unless
    overlap_with reaches outside it (the "tf" fallback, the whole image, contains every box).
    """
    if sampler not in ("rrc", "tf"):
        raise ValueError(f"{_SAMPLE}: sampler must be 'rrc' or 'tf', got {sampler!r}")
    if tries is None:
        tries = 100 if sampler == "tf" else 10
    height, width = _image_sides(batch, image_size, area_range, aspect_range)
    shape = (batch, num_views)
    box = torch.zeros(*shape, 4, dtype=torch.float64)
    done = torch.zeros(shape, dtype=torch.bool)
    if overlap_with is not None:
        others = _overlap_boxes(batch, overlap_with)
        needed = (min_overlap * height * width)[..., None]        # (batch or 1, 1, 1)
    for _ in range(tries):
        if sampler == "tf" and bool(done.all()):      # TF stops at a view's first accepted try
            break
        if sampler == "tf":
            candidate, fits = _tf_try(height, width, area_range, aspect_range, shape, generator)
        else:
            candidate, fits = _rrc_try(height, width, area_range, aspect_range, shape, generator)
        fits &= ~done
        if overlap_with is not None:
            common, _ = intersection_boxes(candidate[:, :, None], others[:, None])   # (batch, views, K, 4)
            area = (common[..., 2] - common[..., 0]).clamp_min(0) * (common[..., 3] - common[..., 1]).clamp_min(0)
            fits &= (area > needed).all(dim=-1)
        box[fits] = candidate[fits]
        done |= fits
    return torch.where(done[..., None], box, _fallback(height, width, aspect_range, shape, sampler)).float()


_SAMPLE = "sample_boxes"


def _image_sides(batch: int, image_size, area_range, aspect_range):
    """sample_boxes' checked ranges and image sides: (height, width) float64 (batch or 1, 1)."""
    if not 0 < area_range[0] <= area_range[1] <= 1:
        raise ValueError(f"{_SAMPLE}: area_range must satisfy 0 < low <= high <= 1, got {tuple(area_range)}")
    if not 0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"{_SAMPLE}: aspect_range must satisfy 0 < low <= high, got {tuple(aspect_range)}")
    sizes = torch.as_tensor(image_size, dtype=torch.float64).cpu()
    if sizes.shape not in ((2,), (batch, 2)):
        raise ValueError(f"{_SAMPLE}: image_size must be (height, width) or a ({batch}, 2) tensor, "
                         f"got shape {tuple(sizes.shape)}")
    if not bool((sizes > 0).all()):
        raise ValueError(f"{_SAMPLE}: image sizes must be positive, got min {float(sizes.min())}")
    height, width = sizes.reshape(-1, 2).unbind(-1)
    return height[:, None], width[:, None]


def _overlap_boxes(batch: int, overlap_with) -> torch.Tensor:
    """overlap_with as checked (batch, K, 4) float64 CPU boxes."""
    others = torch.as_tensor(overlap_with, dtype=torch.float64).cpu()
    others = others[:, None] if others.dim() == 2 else others
    if others.dim() != 3 or others.shape[0] != batch or others.shape[2] != 4:
        raise ValueError(f"{_SAMPLE}: overlap_with must be ({batch}, 4) or ({batch}, K, 4) boxes, "
                         f"got shape {tuple(torch.as_tensor(overlap_with).shape)}")
    return others


def _rrc_try(height, width, area_range, aspect_range, shape, generator):
    """One RandomResizedCrop try for every view: candidate float64 boxes (batch, views, 4) and
    whether each fits in its image."""
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    area = height * width * (area_range[0] + (area_range[1] - area_range[0]) *
                             torch.rand(shape, generator=generator, dtype=torch.float64))
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, dtype=torch.float64))
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    x0 = (width - w) * torch.rand(shape, generator=generator, dtype=torch.float64)
    y0 = (height - h) * torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1), (w <= width) & (h <= height)


def _fallback(height, width, aspect_range, shape, sampler: str) -> torch.Tensor:
    """The box of a view with no accepted try: the whole image ("tf"), or the largest central
    crop with an aspect ratio in aspect_range ("rrc")."""
    w, h = width, height
    if sampler == "rrc":
        w = torch.minimum(width, height * aspect_range[1])
        h = torch.minimum(height, width / aspect_range[0])
    x0, y0 = (width - w) / 2, (height - h) / 2
    return torch.stack(torch.broadcast_tensors(x0, y0, x0 + w, y0 + h), dim=-1).expand(*shape, 4)


def _tf_try(height, width, area_range, aspect_range, shape, generator):
    """One try of sample_distorted_bounding_box for every view: candidate integer boxes
    (batch, views, 4) float64 and whether each is valid. float32 as TF computes it."""
    f32 = torch.float32
    rand = [torch.rand(shape, generator=generator) for _ in range(4)]
    H, W = height.to(f32).expand(shape), width.to(f32).expand(shape)
    ratio = rand[0] * (aspect_range[1] - aspect_range[0]) + aspect_range[0]
    min_area, max_area = area_range[0] * W * H, area_range[1] * W * H
    h = torch.round(torch.sqrt(min_area / ratio))
    max_h = torch.round(torch.sqrt(max_area / ratio))
    # Largest height whose rounded width fits (TF subtracts 1e-7 in double precision).
    narrow = torch.floor((W.double() + 0.5 - 1e-7) / ratio.double()).to(f32)
    narrow = torch.where(torch.round(narrow * ratio) > W, narrow - 1, narrow)
    max_h = torch.where(torch.round(max_h * ratio) > W, narrow, max_h)
    max_h = torch.minimum(max_h, H)
    h = torch.minimum(h, max_h)
    h = h + torch.floor(rand[1] * (max_h - h + 1)).clamp_max(max_h - h)   # uniform in [h, max_h]
    w = torch.round(h * ratio)
    small = w * h < min_area
    h = torch.where(small, h + 1, h)
    w = torch.round(h * ratio)
    large = w * h > max_area
    h = torch.where(large, h - 1, h)
    w = torch.round(h * ratio)
    area = w * h
    fits = (area >= min_area) & (area <= max_area) & (w <= W) & (h <= H) & (w > 0) & (h > 0)
    # Offsets uniform in [0, side - crop side), 0 for a crop as high (wide) as the image.
    y0 = torch.floor(rand[2] * (H - h).clamp_min(0)).clamp_max((H - h - 1).clamp_min(0))
    x0 = torch.floor(rand[3] * (W - w).clamp_min(0)).clamp_max((W - w - 1).clamp_min(0))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1).double(), fits


def sample_flips(batch: int, num_views: int, p: float = 0.5, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Left-right flip flags (batch, num_views) bool, each True with probability p."""
    return torch.rand(batch, num_views, generator=generator) < p


def sample_rotations(batch: int, num_views: int, *, generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
    """Quarter turns (batch, num_views) int64, uniform in 0..3 (GTSA's 0, 90, 180, 270 degrees,
    counter-clockwise as torch.rot90's k): the view_rot90 / query_rot90 of the ops."""
    return torch.randint(0, 4, (batch, num_views), generator=generator).to(device)


def intersection_boxes(a: torch.Tensor, b: torch.Tensor):
    """Elementwise intersection of boxes a and b (..., 4) (x0, y0, x1, y1), broadcast together.

    Returns (boxes, overlaps): boxes (..., 4) (max of the starts, min of the ends), and overlaps
    (...) bool, True where the intersection has a positive area. Where it is False the box is
    empty (x1 <= x0 or y1 <= y0): crop_features pools such a region to zeros.
    """
    start = torch.maximum(a[..., :2], b[..., :2])
    end = torch.minimum(a[..., 2:], b[..., 2:])
    return torch.cat([start, end], dim=-1), (end > start).all(dim=-1)
