"""LOCA view geometry: crop boxes sampled like the official recipe (RandomResizedCrop-style),
flip flags, and token dropping for the large query, all with a torch.Generator."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def sample_boxes(batch: int, num_views: int, image_size: Sequence[int], area_range: Sequence[float],
                 aspect_range: Sequence[float] = (3 / 4, 4 / 3), *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Crop boxes (batch, num_views, 4) float32 (x0, y0, x1, y1) in pixels of an image of
    image_size = (height, width): area fraction uniform in area_range, aspect ratio (w / h)
    log-uniform in aspect_range, position uniform; after 10 tries that do not fit, the
    largest central crop within aspect_range (as torchvision's RandomResizedCrop)."""
    height, width = (float(s) for s in image_size)
    shape = (batch, num_views)
    box = torch.zeros(*shape, 4, dtype=torch.float64)
    done = torch.zeros(shape, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(10):
        area = height * width * (area_range[0] + (area_range[1] - area_range[0]) *
                                 torch.rand(shape, generator=generator, dtype=torch.float64))
        ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, dtype=torch.float64))
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        x0 = (width - w) * torch.rand(shape, generator=generator, dtype=torch.float64)
        y0 = (height - h) * torch.rand(shape, generator=generator, dtype=torch.float64)
        fits = (w <= width) & (h <= height) & ~done
        box[fits] = torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)[fits]
        done |= fits
    if not bool(done.all()):  # central crop fallback
        ratio = width / height
        if ratio < aspect_range[0]:
            w, h = width, width / aspect_range[0]
        elif ratio > aspect_range[1]:
            w, h = height * aspect_range[1], height
        else:
            w, h = width, height
        x0, y0 = (width - w) / 2, (height - h) / 2
        box[~done] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float64)
    return box.float()


def sample_flips(batch: int, num_views: int, p: float = 0.5, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Left-right flip flags (batch, num_views) bool, each True with probability p."""
    return torch.rand(batch, num_views, generator=generator) < p


def drop_tokens(targets: torch.Tensor, num_keep: int, *, generator: Optional[torch.Generator] = None):
    """Keep a uniform random subset of num_keep tokens per row of targets (B, N).

    Returns (kept_index int64 (B, num_keep) sorted ascending, kept_targets (B, num_keep))."""
    b, n = targets.shape
    if not 1 <= num_keep <= n:
        raise ValueError(f"drop_tokens: num_keep must be in [1, {n}], got {num_keep}")
    noise = torch.rand(b, n, generator=generator)
    kept = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values.to(targets.device)
    return kept, targets.gather(1, kept)
