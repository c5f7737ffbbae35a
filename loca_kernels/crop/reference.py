"""Plain-PyTorch crop_features (SPEC.md section 7): the oracle of every backend.

Per view m and region r: turn and unflip the map back into the crop's own orientation
(u = rot90(features[m], -k), then flip), map the region into u's pixels and run roi_align
(aligned=True, spatial_scale=1) on u, one bilinear sample at a time.

Arithmetic (every kernel computes the sample positions exactly like this): the boxes are
float32 and every operation below is one float32 operation, in this order (no fused
multiply-add), as torchvision's kernel does for float32 maps. Along x (y likewise, with the
view's height, out rows and grid_h):
    start = (rx0 - x0) / (x1 - x0) * w_u - 0.5,   end = (rx1 - x0) / (x1 - x0) * w_u - 0.5
    size = end - start,   bin = size / ow,   grid_w = sampling_ratio if > 0 else ceil(size / ow)
    x = start + pw * bin + (ix + 0.5) * bin / grid_w          (pw < ow, ix < grid_w)
A sample with x < -1 or x > w_u (or y outside [-1, h_u]) is 0; otherwise x is clamped at 0,
x_low = floor(x), x_high = x_low + 1, and from x_low >= w_u - 1 on both are the last column
with x = x_low; lx = x - x_low and hx = 1 - lx (float32). The four corner weights hy * hx,
hy * lx, ly * hx, ly * lx and the sums are in the accumulation dtype: float64 for float64
maps, float32 otherwise. A bin averages its grid_h * grid_w samples (divided by
max(grid_h * grid_w, 1): a region of zero or negative size gives zeros).
"""
from __future__ import annotations

import torch


def _f32(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _samples(r0, r1, v0, v1, length: int, bins: int, sampling_ratio: int):
    """float32 sample positions (bins, grid) along one axis of u, and grid."""
    start = (r0 - v0) / (v1 - v0) * _f32(length) - _f32(0.5)
    end = (r1 - v0) / (v1 - v0) * _f32(length) - _f32(0.5)
    size = end - start
    step = size / _f32(bins)
    cells = torch.ceil(size / _f32(bins))
    # A region with a NaN or infinite coordinate has no samples (crop_features makes it NaN).
    grid = sampling_ratio if sampling_ratio > 0 else max(int(cells), 0) if torch.isfinite(cells) else 0
    bin_index = torch.arange(bins, dtype=torch.float32)[:, None]
    sample_index = torch.arange(grid, dtype=torch.float32)[None, :]
    return start + bin_index * step + (sample_index + _f32(0.5)) * step / _f32(max(grid, 1)), grid


def _corners(pos: torch.Tensor, length: int):
    """Validity, low and high pixel and their float32 weights of float32 positions `pos`."""
    valid = (pos >= -1) & (pos <= length)
    # clamping at 0 is roi_align's; at length (and NaN to 0) only keeps far samples indexable
    pos = torch.where(valid, pos, 0).clamp(0, length)
    low = pos.floor().long()
    edge = low >= length - 1
    low = torch.where(edge, length - 1, low)
    high = torch.where(edge, length - 1, low + 1)
    pos = torch.where(edge, low.float(), pos)
    frac = pos - low.float()
    return valid, low, high, frac, _f32(1) - frac


def _roi_align(u: torch.Tensor, region: torch.Tensor, view: torch.Tensor, out_size, sampling_ratio: int):
    """roi_align (aligned, spatial scale 1) of u (C, H, W) over `region` mapped from the
    source coordinates of `view` (both float32 (4,)) into u's pixels. Returns (C, oh, ow)."""
    (oh, ow), (height, width) = out_size, u.shape[-2:]
    ys, grid_h = _samples(region[1], region[3], view[1], view[3], height, oh, sampling_ratio)  # (oh, gh)
    xs, grid_w = _samples(region[0], region[2], view[0], view[2], width, ow, sampling_ratio)   # (ow, gw)
    # Positions are computed on the CPU (float32, as above), then moved to u's device.
    vy, y_lo, y_hi, ly, hy = (t[:, :, None, None].to(u.device) for t in _corners(ys, height))  # (oh, gh, 1, 1)
    vx, x_lo, x_hi, lx, hx = (t[None, None].to(u.device) for t in _corners(xs, width))          # (1, 1, ow, gw)
    ly, hy, lx, hx = (t.to(u.dtype) for t in (ly, hy, lx, hx))

    def term(weight, x):  # a pixel of zero weight counts for nothing; a NaN or infinite one of nonzero weight gives NaN
        return torch.where(weight != 0, weight * x + x * 0, 0)

    value = (term(hy * hx, u[:, y_lo, x_lo]) + term(hy * lx, u[:, y_lo, x_hi])
             + term(ly * hx, u[:, y_hi, x_lo]) + term(ly * lx, u[:, y_hi, x_hi]))  # (C, oh, gh, ow, gw)
    value = torch.where(vy & vx, value, torch.zeros((), dtype=u.dtype))
    # A NaN or infinite region coordinate makes the whole result NaN (SPEC.md section 7).
    return value.sum(dim=(2, 4)) / max(grid_h * grid_w, 1) + (region.sum() * 0).to(u.device, u.dtype)


def crop_features(features, view_boxes, regions, out_size, view_flip, view_rot90, sampling_ratio: int):
    """On checked inputs (flips and turns as tensors). Returns (M, R, C, oh, ow), features' dtype."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    views, boxes = view_boxes.float().cpu(), regions.float().cpu()
    channels, nreg = features.shape[1], regions.shape[1]
    empty = features.new_zeros((1, 0, channels, *out_size), dtype=acc)              # a view without regions
    out = [features.new_zeros((0, nreg, channels, *out_size), dtype=acc)]           # so that M = 0 works
    for m in range(features.shape[0]):
        u = torch.rot90(features[m].to(acc), -int(view_rot90[m]), dims=(-2, -1))
        if bool(view_flip[m]):
            u = u.flip(-1)
        pooled = [_roi_align(u, boxes[m, r], views[m], out_size, sampling_ratio) for r in range(nreg)]
        out.append(torch.stack(pooled)[None] if pooled else empty)
    return torch.cat(out).to(features.dtype)
