"""Triton kernels of crop_features, defined as the operators loca_kernels::crop_features_triton
and loca_kernels::crop_features_backward_triton (fake functions and autograd in operators.py).

roi_align's bilinear weight of a sample is a product of a weight along y and one along x, and a
bin averages a rectangular grid of samples, so the pooled map of one channel is A F B^T: F the
(h, w) map as the network saw it, A (na, h) the summed weights of each bin along F's rows, B
(nb, w) along its columns (the crop's y axis lands on F's rows for even turns, its x axis for odd
ones, where the result is transposed; a flip or turn reads an axis backwards). So the kernels
never turn or copy the map: they build A and B in registers (sample positions in float32 with
the reference's operations, correctly rounded divisions, no FMA) and run two small dots per
channel block.

Forward: one launch, one program per (view * region, channel block).
Backward: grad F = sum_r A_r^T G_r B_r / count_r, one program per (view, channel block) that sums
the regions of its view in order in registers and writes its block once: each gradient element
has one writer and a fixed summation order, so the result is deterministic (no atomics).

Maps, out sizes up to MAX_SIDE on each side (registers); larger calls use another backend.
The view and box of a program are int64: views x C x h x w passes 2**31 at realistic sizes
(offsets within one map stay int32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_dot import input_precision

# 64 x 64 maps spilled on sm_90 even one channel at a time on 16 warps (gpu-resources.md).
MAX_SIDE = 32
_INTS = ["regions", "channels", "h", "w", "oh", "ow", "sampling_ratio"]


@triton.jit
def _axis_weights(r0, r1, v0, v1, length, bins, sampling_ratio, reverse, BP: tl.constexpr, BL: tl.constexpr):
    """(BP, BL) float32: for bin p < bins along one axis of the crop (length pixels in the crop's
    own orientation), the summed bilinear weights of its samples on each pixel (counted backwards
    when `reverse`); and the number of samples per bin along this axis."""
    len_f = length.to(tl.float32)
    start = tl.div_rn(r0 - v0, v1 - v0) * len_f - 0.5
    end = tl.div_rn(r1 - v0, v1 - v0) * len_f - 0.5
    size = end - start
    step = tl.div_rn(size, bins.to(tl.float32))
    # A region with a NaN or infinite coordinate has no samples (the forward makes it NaN).
    cells = tl.where(step * 0.0 == 0.0, tl.ceil(step), 0.0)
    grid = tl.where(sampling_ratio > 0, sampling_ratio, tl.maximum(cells.to(tl.int32), 0))
    grid_f = tl.maximum(grid, 1).to(tl.float32)
    p = tl.arange(0, BP)
    pixel = tl.arange(0, BL)[None, :]
    weights = tl.zeros((BP, BL), tl.float32)
    for s in range(grid):
        pos = start + p.to(tl.float32) * step + tl.div_rn((s + 0.5) * step, grid_f)
        ok = ((pos >= -1.0) & (pos <= len_f) & (p < bins))[:, None]  # roi_align: else the sample is 0
        pos = tl.maximum(pos, 0.0)
        low = pos.to(tl.int32)
        edge = low >= length - 1
        low = tl.where(edge, length - 1, low)
        high = tl.where(edge, length - 1, low + 1)
        frac = tl.where(edge, 0.0, pos - low.to(tl.float32))
        low = tl.where(reverse, length - 1 - low, low)[:, None]
        high = tl.where(reverse, length - 1 - high, high)[:, None]
        weights += tl.where(ok & (pixel == low), (1.0 - frac)[:, None], 0.0)
        weights += tl.where(ok & (pixel == high), frac[:, None], 0.0)
    return weights, grid


@triton.jit
def _region_weights(view_boxes, regions, view_flip, view_rot90, m, box, h, w, oh, ow, sampling_ratio,
                    BA: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """A (BA, BH) along F's rows, B (BB, BW) along its columns, 1 / count, and whether the turn is
    odd (A then holds the crop's x bins and the pooled map is transposed), for region `box` of view m."""
    turns = tl.load(view_rot90 + m)
    flip = tl.load(view_flip + m) != 0
    odd = (turns % 2) == 1
    # The crop's rows are read backwards for 2 and 3 turns, its (unflipped) columns for 1 and 2.
    reverse_y = turns >= 2
    reverse_x = flip != ((turns == 1) | (turns == 2))
    x0, y0 = tl.load(view_boxes + m * 4 + 0), tl.load(view_boxes + m * 4 + 1)
    x1, y1 = tl.load(view_boxes + m * 4 + 2), tl.load(view_boxes + m * 4 + 3)
    rx0, ry0 = tl.load(regions + box * 4 + 0), tl.load(regions + box * 4 + 1)
    rx1, ry1 = tl.load(regions + box * 4 + 2), tl.load(regions + box * 4 + 3)
    # F's rows are the crop's y axis (even turns) or its x axis (odd turns); columns the other.
    a, grid_a = _axis_weights(tl.where(odd, rx0, ry0), tl.where(odd, rx1, ry1), tl.where(odd, x0, y0),
                              tl.where(odd, x1, y1), h, tl.where(odd, ow, oh), sampling_ratio,
                              tl.where(odd, reverse_x, reverse_y), BA, BH)
    b, grid_b = _axis_weights(tl.where(odd, ry0, rx0), tl.where(odd, ry1, rx1), tl.where(odd, y0, x0),
                              tl.where(odd, y1, x1), w, tl.where(odd, oh, ow), sampling_ratio,
                              tl.where(odd, reverse_y, reverse_x), BB, BW)
    scale = 1.0 / tl.maximum(grid_a * grid_b, 1).to(tl.float32)
    return a, b, scale, odd


@triton.jit(do_not_specialize=_INTS)
def _forward_kernel(features, view_boxes, regions_ptr, view_flip, view_rot90, out, regions, channels, h, w, oh,
                    ow, sampling_ratio, BLOCK_C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    box = tl.program_id(0).to(tl.int64)
    m = box // regions
    c0 = tl.program_id(1) * BLOCK_C
    a, b, scale, odd = _region_weights(view_boxes, regions_ptr, view_flip, view_rot90, m, box, h, w, oh, ow,
                                       sampling_ratio, BA, BB, BH, BW)
    # F as (BH, BLOCK_C * BW): column c * BW + j holds channel c0 + c, pixel column j.
    i = tl.arange(0, BH)[:, None]
    col = tl.arange(0, BLOCK_C * BW)[None, :]
    c, j = c0 + col // BW, col % BW
    f = tl.load(features + m * channels * h * w + c * h * w + i * w + j, mask=(i < h) & (j < w) & (c < channels),
                other=0.0).to(tl.float32)
    bad = f * 0.0 != 0.0                                           # NaN or infinite
    t = tl.dot(a, tl.where(bad, 0.0, f), input_precision=input_precision(a.dtype))  # (BA, BLOCK_C * BW)
    t = tl.reshape(t, (BA * BLOCK_C, BW))                          # row p * BLOCK_C + c
    t = tl.dot(t, tl.trans(b), input_precision=input_precision(t.dtype)) * scale  # (BA * BLOCK_C, BB)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        # NaN exactly at the bins that give a bad pixel a nonzero weight (SPEC.md section 7): a
        # zero weight times NaN inside the dots would spread it to every bin.
        hit = tl.dot((a != 0.0).to(tl.float32), bad.to(tl.float32), input_precision=input_precision(tl.float32))
        hit = tl.reshape(hit, (BA * BLOCK_C, BW))
        hit = tl.dot(hit, tl.trans((b != 0.0).to(tl.float32)), input_precision=input_precision(tl.float32))
        t = tl.where(hit > 0.0, float("nan"), t)
    # A NaN or infinite region coordinate makes the region's result NaN.
    t += (tl.load(regions_ptr + box * 4 + 0) + tl.load(regions_ptr + box * 4 + 1) + tl.load(regions_ptr + box * 4 + 2)
          + tl.load(regions_ptr + box * 4 + 3)) * 0.0
    row = tl.arange(0, BA * BLOCK_C)[:, None]
    p, c = row // BLOCK_C, c0 + row % BLOCK_C
    q = tl.arange(0, BB)[None, :]
    na, nb = tl.where(odd, ow, oh), tl.where(odd, oh, ow)
    pixel = tl.where(odd, q * ow + p, p * ow + q)
    tl.store(out + box * channels * oh * ow + c * oh * ow + pixel, t.to(out.dtype.element_ty),
             mask=(p < na) & (q < nb) & (c < channels))


@triton.jit(do_not_specialize=_INTS)
def _backward_kernel(grad_out, view_boxes, regions_ptr, view_flip, view_rot90, grad, regions, channels, h, w, oh,
                     ow, sampling_ratio, BLOCK_C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                     BH: tl.constexpr, BW: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    row = tl.arange(0, BA * BLOCK_C)[:, None]
    p, c = row // BLOCK_C, c0 + row % BLOCK_C
    q = tl.arange(0, BB)[None, :]
    acc = tl.zeros((BH, BLOCK_C * BW), tl.float32)
    for r in range(regions):
        box = m * regions + r
        a, b, scale, odd = _region_weights(view_boxes, regions_ptr, view_flip, view_rot90, m, box, h, w, oh, ow,
                                           sampling_ratio, BA, BB, BH, BW)
        na, nb = tl.where(odd, ow, oh), tl.where(odd, oh, ow)
        pixel = tl.where(odd, q * ow + p, p * ow + q)
        # g: (BA * BLOCK_C, BB), row p * BLOCK_C + c
        g = tl.load(grad_out + box * channels * oh * ow + c * oh * ow + pixel,
                    mask=(p < na) & (q < nb) & (c < channels), other=0.0).to(tl.float32) * scale
        s = tl.dot(g, b, input_precision=input_precision(g.dtype))  # (BA * BLOCK_C, BW)
        s = tl.reshape(s, (BA, BLOCK_C * BW))
        acc = tl.dot(tl.trans(a), s, acc, input_precision=input_precision(s.dtype))  # (BH, BLOCK_C * BW)
    i = tl.arange(0, BH)[:, None]
    col = tl.arange(0, BLOCK_C * BW)[None, :]
    c, j = c0 + col // BW, col % BW
    tl.store(grad + m * channels * h * w + c * h * w + i * w + j, acc.to(grad.dtype.element_ty),
             mask=(i < h) & (j < w) & (c < channels))


def block_sizes(h: int, w: int, oh: int, ow: int) -> dict:
    """Register tile sides (tl.dot needs at least 16) and the channel block: the map block
    (BH, BLOCK_C * BW) holds at most 4096 elements (8192 at 32 x 32 maps spilled on sm_90:
    benchmarks/results/gpu-resources.md)."""
    bh, bw = max(16, triton.next_power_of_2(h)), max(16, triton.next_power_of_2(w))
    side = max(16, triton.next_power_of_2(max(oh, ow)))
    return {"BA": side, "BB": side, "BH": bh, "BW": bw, "BLOCK_C": max(1, 4096 // (bh * bw))}


def num_warps(blocks: dict) -> int:
    """8 warps from 32 x 32 maps: on 4 warps the backward spilled there (sm_90)."""
    return 8 if blocks["BH"] * blocks["BW"] >= 1024 else 4


# Correctly rounded float32 arithmetic as the reference: no fused multiply-add. No integer
# overflow checks (off on GPUs anyway; under the interpreter they cost most of the time).
COMPILE_OPTIONS = {"enable_fp_fusion": False, "sanitize_overflow": False}


def _small(view_boxes, regions, view_flip, view_rot90):
    return (view_boxes.float().contiguous(), regions.float().contiguous(), view_flip.to(torch.int8).contiguous(),
            view_rot90.to(torch.int32).contiguous())


@torch.library.custom_op("loca_kernels::crop_features_triton", mutates_args=())
def crop_features_triton(features: torch.Tensor, view_boxes: torch.Tensor, regions: torch.Tensor,
                         out_size: list[int], view_flip: torch.Tensor, view_rot90: torch.Tensor,
                         sampling_ratio: int) -> torch.Tensor:
    (views, channels, h, w), (oh, ow), nreg = features.shape, out_size, regions.shape[1]
    out = features.new_empty((views, nreg, channels, oh, ow))
    if out.numel() == 0:
        return out
    blocks = block_sizes(h, w, oh, ow)
    grid = (views * nreg, triton.cdiv(channels, blocks["BLOCK_C"]))
    _forward_kernel[grid](features.contiguous(), *_small(view_boxes, regions, view_flip, view_rot90), out, nreg,
                          channels, h, w, oh, ow, sampling_ratio, **blocks,
                          num_warps=num_warps(blocks), **COMPILE_OPTIONS)
    return out


@torch.library.custom_op("loca_kernels::crop_features_backward_triton", mutates_args=())
def crop_features_backward_triton(grad_out: torch.Tensor, view_boxes: torch.Tensor, regions: torch.Tensor,
                                  feature_size: list[int], view_flip: torch.Tensor, view_rot90: torch.Tensor,
                                  sampling_ratio: int) -> torch.Tensor:
    (views, nreg, channels, oh, ow), (h, w) = grad_out.shape, feature_size
    if nreg == 0:
        return grad_out.new_zeros((views, channels, h, w))
    grad = grad_out.new_empty((views, channels, h, w))
    if grad.numel() == 0:
        return grad
    blocks = block_sizes(h, w, oh, ow)
    grid = (views, triton.cdiv(channels, blocks["BLOCK_C"]))
    _backward_kernel[grid](grad_out.contiguous(), *_small(view_boxes, regions, view_flip, view_rot90), grad, nreg,
                           channels, h, w, oh, ow, sampling_ratio, **blocks,
                           num_warps=num_warps(blocks), **COMPILE_OPTIONS)
    return grad
