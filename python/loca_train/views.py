"""Device side of the data: cut, resize, flip and colour-jitter all views of a batch at once.

Crops are sampled with grid_sample at the exact (fractional) boxes the host drew, so the
patch geometry relative_position_targets computes from those boxes is the geometry the
network sees: output pixel j of a crop [x0, x1) of width w samples x0 + (j + 0.5) * (x1 - x0) / w,
clamped to the centres of the crop's edge pixels. For an integer box that is exactly TF's
bilinear resize of the cropped image (half-pixel centres, edge clamped, no antialiasing), as
the official pipeline slices then resizes.
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
    """Crops of images (B, 3, H, W) float at boxes (B, V, 4) (x0, y0, x1, y1 in pixels of the
    H x W canvas), resized to size x size, mirrored left-right where flips (B, V) is True.

    Returns (V * B, 3, size, size) in view-major order (row v * B + b is view v of image b),
    the order masked_cross_attention pairs with the B reference rows. No image is copied
    per view: the V sampling grids of an image are stacked into one.
    """
    b, v = boxes.shape[:2]
    height, width = images.shape[-2:]
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size
    fx = steps.expand(b, v, size)
    if flips is not None:
        fx = torch.where(flips[..., None], fx.flip(-1), fx)
    boxes = boxes.float()
    x = boxes[..., 0:1] + fx * (boxes[..., 2:3] - boxes[..., 0:1])          # (B, V, size)
    y = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])       # (B, V, size)
    # An enlarged crop must not blend in the pixels just outside it (nor the canvas padding).
    x = torch.minimum(torch.maximum(x, boxes[..., 0:1] + 0.5), boxes[..., 2:3] - 0.5)
    y = torch.minimum(torch.maximum(y, boxes[..., 1:2] + 0.5), boxes[..., 3:4] - 0.5)
    grid = torch.stack(torch.broadcast_tensors(x[:, :, None, :] * (2.0 / width),
                                               y[:, :, :, None] * (2.0 / height)), dim=-1)
    grid = grid - 1.0                                                        # align_corners=False
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


def tf_color_jitter(x: torch.Tensor, params: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The official jitter (scenic loca ops.random_color_jitter on TF's random_* ops): per view
    the four adjustments in the view's order, each followed by a clip to [0, 1]:
    0 brightness x + delta; 1 contrast (x - m) * f + m with m each channel's spatial mean;
    2 saturation s * f clipped to [0, 1] in HSV; 3 hue h + delta (mod 1) in HSV.

    x: (N, 3, h, w) in [0, 1]; params (N, 4): brightness delta, contrast factor, saturation
    factor, hue delta (turns); order (N, 4) int64: a permutation of 0..3, or -1 everywhere for
    a view left unchanged.
    """
    p = params.to(x.dtype).view(-1, 4, 1, 1)
    ops = (lambda v, delta: v + delta, _contrast, _saturation, _hue_shift)
    x = x.clone()
    for step in range(4):
        for op, adjust in enumerate(ops):
            chosen = order[:, step] == op
            if bool(chosen.any()):
                x[chosen] = adjust(x[chosen], p[chosen, op:op + 1]).clamp(0, 1)
    return x


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([h, (s * factor[:, 0]).clamp(0, 1), v], dim=1))


def _hue_shift(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([torch.remainder(h + delta[:, 0], 1.0), s, v], dim=1))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) RGB in [0, 1] -> HSV, hue in turns [0, 1) (0 for greys), as TF's rgb_to_hsv."""
    r, g, b = x.unbind(1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, torch.remainder(hue / 6, 1.0), torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv."""
    h, s, v = x.unbind(1)
    # Each channel n: v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 (n = 5, 3, 1).
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                        + 6 * h[:, None], 6)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def solarize(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Official random_solarize on the views where chosen (N,) is True: x >= 0.5 becomes 1 - x."""
    return torch.where(chosen.view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STDDEV_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def make_views(images: torch.Tensor, boxes: torch.Tensor, size: int, flips, jitter: torch.Tensor,
               grayscale: torch.Tensor, jitter_order=None, solarized=None) -> torch.Tensor:
    """Network input for V views per image: crop_views, colour jitter, grey, solarisation (as the
    official order), normalize. images uint8 (B, 3, H, W); jitter (V, B, 4); grayscale (V, B);
    jitter_order (V, B, 4) selects tf_color_jitter (None: color_jitter); solarized (V, B) bool
    or None. Returns (V * B, 3, size, size)."""
    views = crop_views(images.float() / 255, boxes, size, flips)
    gray = grayscale.reshape(-1)
    if jitter_order is None:
        views = color_jitter(views, jitter.reshape(-1, 4), gray)
    else:
        views = tf_color_jitter(views, jitter.reshape(-1, 4), jitter_order.reshape(-1, 4))
        views = torch.where(gray.view(-1, 1, 1, 1), _gray(views).expand_as(views), views)
    if solarized is not None:
        views = solarize(views, solarized.reshape(-1))
    return normalize(views)


def rotate_views(views: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each square view of (N, C, s, s) turned by torch.rot90(view, k, dims=(-2, -1)) with its
    own k = turns (N,) int64 in 0..3 (the view_rot90 of crop_features)."""
    turned = torch.stack([torch.rot90(views, k, dims=(-2, -1)) for k in range(4)])       # (4, N, C, s, s)
    return turned.gather(0, turns.view(1, -1, 1, 1, 1).expand(1, *views.shape))[0]
