"""LOCA view geometry: crop boxes sampled like the official recipe (RandomResizedCrop-style),
flip flags, and token dropping for the large query, all with a torch.Generator."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def sample_boxes(batch: int, num_views: int, image_size, area_range: Sequence[float],
                 aspect_range: Sequence[float] = (3 / 4, 4 / 3), *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Crop boxes (batch, num_views, 4) float32 (x0, y0, x1, y1) in pixels, RandomResizedCrop-style.

    image_size: (height, width) of every image, or a (batch, 2) tensor of per-image sizes.
    Area fraction uniform in area_range, aspect ratio (w / h) log-uniform in aspect_range,
    position uniform; a view none of whose 10 tries fits in its image gets the largest central
    crop with an aspect ratio in aspect_range (as torchvision's RandomResizedCrop). Random
    numbers come from `generator` (CPU); the boxes are CPU tensors.
    """
    op = "sample_boxes"
    if not 0 < area_range[0] <= area_range[1] <= 1:
        raise ValueError(f"{op}: area_range must satisfy 0 < low <= high <= 1, got {tuple(area_range)}")
    if not 0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"{op}: aspect_range must satisfy 0 < low <= high, got {tuple(aspect_range)}")
    sizes = torch.as_tensor(image_size, dtype=torch.float64).cpu()
    if sizes.shape not in ((2,), (batch, 2)):
        raise ValueError(f"{op}: image_size must be (height, width) or a ({batch}, 2) tensor, "
                         f"got shape {tuple(sizes.shape)}")
    if not bool((sizes > 0).all()):
        raise ValueError(f"{op}: image sizes must be positive, got min {float(sizes.min())}")
    height, width = sizes.reshape(-1, 2).unbind(-1)
    height, width = height[:, None], width[:, None]              # (batch or 1, 1)
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
    # Central crop fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    w = torch.minimum(width, height * aspect_range[1])
    h = torch.minimum(height, width / aspect_range[0])
    x0, y0 = (width - w) / 2, (height - h) / 2
    central = torch.stack(torch.broadcast_tensors(x0, y0, x0 + w, y0 + h), dim=-1).expand(*shape, 4)
    box = torch.where(done[..., None], box, central)
    return box.float()


def sample_flips(batch: int, num_views: int, p: float = 0.5, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Left-right flip flags (batch, num_views) bool, each True with probability p."""
    return torch.rand(batch, num_views, generator=generator) < p
