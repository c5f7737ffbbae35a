"""Triton kernel of relative_position_targets, defined as the operator
loca_kernels::relative_position_targets_triton (fake function in operators.py): one program per
query view, one lane per patch, the reference's float64 arithmetic in the same order (FMA
fusion off; float64 division lowers to the correctly rounded div.rn.f64), so that the result
is identical element for element. Rule "scenic" (SCENIC) rounds TF's float32 nearest-neighbour
arithmetic by computing each operation in float64 and rounding it to float32: exact for the
sums and products of float32 values, and for the division of integers below 2**24 (double
rounding is harmless when 53 >= 2 * 24 + 2)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _nearest(o, n_in, n_out):
    """TF's nearest-neighbour input index of output index o (integers), float32 arithmetic."""
    scale = (n_in.to(tl.float64) / n_out.to(tl.float64)).to(tl.float32)
    index = ((o.to(tl.float64) + 0.5) * scale.to(tl.float64)).to(tl.float32)
    return tl.minimum(tl.floor(index).to(tl.int64), n_in - 1)


# Integer arguments equal to 1 would otherwise become constexprs (a grid side of 1, V = 1),
# which have no .to(): they stay runtime integers.
@triton.jit(do_not_specialize=["views", "hq", "wq", "hr", "wr", "ignore_index", "ph", "pw"])
def _targets_kernel(query_boxes, ref_boxes, query_flip, ref_flip, query_rot90, out, views, hq, wq, hr, wr,
                    ignore_index, ph, pw, SCENIC: tl.constexpr, BLOCK: tl.constexpr):
    view = tl.program_id(0).to(tl.int64)    # it multiplies hq * wq
    b = view // views
    lane = tl.arange(0, BLOCK)
    ok = lane < hq * wq
    i, j = lane // wq, lane % wq
    turns = tl.load(query_rot90 + view)
    odd = (turns % 2) == 1
    gh = tl.where(odd, wq, hq)
    gw = tl.where(odd, hq, wq)
    # Output (i, j) of torch.rot90(grid, turns) reads grid[r][c] of the flipped grid.
    r = tl.where(turns == 0, i, tl.where(turns == 1, j, tl.where(turns == 2, gh - 1 - i, gh - 1 - j)))
    c = tl.where(turns == 0, j, tl.where(turns == 1, gw - 1 - i, tl.where(turns == 2, gw - 1 - j, i)))
    c = tl.where(tl.load(query_flip + view) != 0, gw - 1 - c, c)
    x0 = tl.load(query_boxes + view * 4 + 0)
    y0 = tl.load(query_boxes + view * 4 + 1)
    x1 = tl.load(query_boxes + view * 4 + 2)
    y1 = tl.load(query_boxes + view * 4 + 3)
    rx0 = tl.load(ref_boxes + b * 4 + 0)
    ry0 = tl.load(ref_boxes + b * 4 + 1)
    rx1 = tl.load(ref_boxes + b * 4 + 2)
    ry1 = tl.load(ref_boxes + b * 4 + 3)
    if SCENIC:
        # Source pixel of the patch through the view's un-turned pixel size (ph, pw).
        vh = tl.where(odd, pw, ph)
        vw = tl.where(odd, ph, pw)
        x0, y0, x1, y1 = tl.floor(x0), tl.floor(y0), tl.floor(x1), tl.floor(y1)
        rx0, ry0, rx1, ry1 = tl.floor(rx0), tl.floor(ry0), tl.floor(rx1), tl.floor(ry1)
        x = x0 + _nearest(_nearest(c, vw, gw), (x1 - x0).to(tl.int64), vw).to(tl.float64)
        y = y0 + _nearest(_nearest(r, vh, gh), (y1 - y0).to(tl.int64), vh).to(tl.float64)
        col = _nearest((x - rx0).to(tl.int64), wr, (rx1 - rx0).to(tl.int64))
        row = _nearest((y - ry0).to(tl.int64), hr, (ry1 - ry0).to(tl.int64))
    else:
        x = x0 + (c.to(tl.float64) + 0.5) * ((x1 - x0) / gw.to(tl.float64))
        y = y0 + (r.to(tl.float64) + 0.5) * ((y1 - y0) / gh.to(tl.float64))
        col = tl.floor((x - rx0) * (wr.to(tl.float64) / (rx1 - rx0))).to(tl.int64)
        row = tl.floor((y - ry0) * (hr.to(tl.float64) / (ry1 - ry0))).to(tl.int64)
    inside = (x >= rx0) & (x < rx1) & (y >= ry0) & (y < ry1)
    col = tl.minimum(tl.maximum(col, 0), wr - 1)
    row = tl.minimum(tl.maximum(row, 0), hr - 1)
    col = tl.where(tl.load(ref_flip + b) != 0, wr - 1 - col, col)
    target = tl.where(inside, row * wr + col, ignore_index)
    tl.store(out + view * hq * wq + lane, target, mask=ok)


# No fused multiply-add: the reference rounds every product and sum separately.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@torch.library.custom_op("loca_kernels::relative_position_targets_triton", mutates_args=())
def relative_position_targets_triton(query_boxes: torch.Tensor, ref_boxes: torch.Tensor, query_grid: list[int],
                                     ref_grid: list[int], query_flip: torch.Tensor, ref_flip: torch.Tensor,
                                     query_rot90: torch.Tensor, ignore_index: int,
                                     query_size: Optional[list[int]] = None) -> torch.Tensor:
    b, v = query_boxes.shape[:2]
    (hq, wq), (hr, wr) = query_grid, ref_grid
    ph, pw = query_size if query_size is not None else (0, 0)
    out = torch.empty(b, v, hq * wq, dtype=torch.int64, device=query_boxes.device)
    _targets_kernel[(b * v,)](query_boxes.double().contiguous(), ref_boxes.double().contiguous(),
                              query_flip.to(torch.int8).contiguous(), ref_flip.to(torch.int8).contiguous(),
                              query_rot90.to(torch.int32).contiguous(), out, v, hq, wq, hr, wr, ignore_index, ph, pw,
                              SCENIC=query_size is not None, BLOCK=triton.next_power_of_2(hq * wq),
                              **COMPILE_OPTIONS)
    return out
