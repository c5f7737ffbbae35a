"""Device side of the data: cut, resize, flip and colour-jitter all views of a batch at once.

Crops are sampled with grid_sample at the exact (fractional) boxes the host drew, so the
patch geometry relative_position_targets computes from those boxes is the geometry the
network sees: output pixel j of a crop [x0, x1) of width w samples x0 + (j + 0.5) * (x1 - x0) / w.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# Luma weights (ITU-R 601), as torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)


def crop_views(images: torch.Tensor, boxes: torch.Tensor, size: int, flips=None) -> torch.Tensor:
    """Crops of images (B, 3, S, S) float at boxes (B, V, 4) (x0, y0, x1, y1 in pixels of the
    S x S canvas), resized to size x size, mirrored left-right where flips (B, V) is True.

    Returns (V * B, 3, size, size) in view-major order (row v * B + b is view v of image b),
    the order masked_cross_attention pairs with the B reference rows. No image is copied
    per view: the V sampling grids of an image are stacked into one.
    """
    b, v = boxes.shape[:2]
    canvas = images.shape[-1]
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size
    fx = steps.expand(b, v, size)
    if flips is not None:
        fx = torch.where(flips[..., None], fx.flip(-1), fx)
    boxes = boxes.float()
    x = boxes[..., 0:1] + fx * (boxes[..., 2:3] - boxes[..., 0:1])          # (B, V, size)
    y = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])       # (B, V, size)
    grid = torch.stack(torch.broadcast_tensors(x[:, :, None, :], y[:, :, :, None]), dim=-1)
    grid = grid * (2.0 / canvas) - 1.0                                       # align_corners=False
    out = F.grid_sample(images, grid.reshape(b, v * size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.view(b, 3, v, size, size).permute(2, 0, 1, 3, 4).reshape(v * b, 3, size, size)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, grayscale: torch.Tensor) -> torch.Tensor:
    """Per-view brightness, contrast, saturation (factors[:, :3]) and hue shift (factors[:, 3],
    in turns, applied as a rotation of the YIQ chroma plane), then grey where grayscale.

    x: (N, 3, h, w) in [0, 1]; factors (N, 4); grayscale (N,) bool.
    """
    f = factors.to(x.dtype).view(-1, 4, 1, 1)
    x = (x * f[:, 0:1]).clamp(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1:2] + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * f[:, 2:3] + gray).clamp(0, 1)
    x = _rotate_hue(x, f[:, 3:4] * 2 * math.pi).clamp(0, 1)
    return torch.where(grayscale.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
    cos, sin = torch.cos(angle), torch.sin(angle)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, 0:1], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STDDEV_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def make_views(images: torch.Tensor, boxes: torch.Tensor, size: int, flips, jitter: torch.Tensor,
               grayscale: torch.Tensor) -> torch.Tensor:
    """Network input for V views per image: crop_views, then color_jitter and normalize.
    images uint8 (B, 3, S, S); jitter (V, B, 4); grayscale (V, B). Returns (V * B, 3, size, size)."""
    views = crop_views(images.float() / 255, boxes, size, flips)
    views = color_jitter(views, jitter.reshape(-1, 4), grayscale.reshape(-1))
    return normalize(views)
