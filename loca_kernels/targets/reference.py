"""Plain-PyTorch relative-position targets (SPEC.md section 3): the oracle of every backend.

Arithmetic (every kernel does exactly these float64 operations, in this order):
  query patch centre on the un-turned grid (gh, gw) of the crop (x0, y0, x1, y1):
      x = x0 + (c + 0.5) * ((x1 - x0) / gw),   y = y0 + (r + 0.5) * ((y1 - y0) / gh)
  reference column and row of a centre inside the half-open reference box:
      col = floor((x - rx0) * (wr / (rx1 - rx0))),  row = floor((y - ry0) * (hr / (ry1 - ry0)))
  clamped to the grid, mirrored (col -> wr - 1 - col) when the reference was flipped.
Each operation is rounded once (no fused multiply-add), and each division is a true division
of two float64 tensors on the boxes' device: `number / tensor` (Tensor.__rtruediv__ is
reciprocal() * number) and, on CUDA, `tensor / python_number` (a multiplication by the
reciprocal) round differently and would move centres that lie exactly on a patch edge.

rule "scenic" (query_size given; integer boxes, read floored): TF's nearest-neighbour index
  nn(o, n_in, n_out) = min(floor(float32(float32(o + 0.5) * float32(n_in / n_out))), n_in - 1)
  gives each patch a source pixel instead of a centre, on the un-turned pixel size (ph, pw):
      x = x0 + nn(nn(c, pw, gw), x1 - x0, pw),   y = y0 + nn(nn(r, ph, gh), y1 - y0, ph)
  and, inside the half-open reference box, col = nn(x - rx0, wr, rx1 - rx0), row likewise.
"""
from __future__ import annotations

import torch


def _grid(x: torch.Tensor, y: torch.Tensor):
    """Per-column x (..., cols) and per-row y (..., rows) as two (..., rows, cols) maps."""
    rows, cols = y.shape[-1], x.shape[-1]
    return x[..., None, :].expand(*x.shape[:-1], rows, cols), y[..., :, None].expand(*y.shape[:-1], rows, cols)


def _centres(boxes: torch.Tensor, rows: int, cols: int):
    """Patch-centre coordinates (..., rows, cols) of crops `boxes` (..., 4) split rows x cols."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    c = torch.arange(cols, dtype=torch.float64, device=boxes.device) + 0.5
    r = torch.arange(rows, dtype=torch.float64, device=boxes.device) + 0.5
    x = x0[..., None] + c * ((x1 - x0) / torch.full_like(x1, cols))[..., None]
    y = y0[..., None] + r * ((y1 - y0) / torch.full_like(y1, rows))[..., None]
    return _grid(x, y)


def _nearest(o: torch.Tensor, n_in, n_out) -> torch.Tensor:
    """TF's nearest-neighbour input index (half-pixel centres, float32) of output index o
    (float64 integers) for a side of n_in resized to n_out (tensors or ints broadcast with o)."""
    n_in, n_out = (torch.as_tensor(n, dtype=torch.float32, device=o.device) for n in (n_in, n_out))
    scale = n_in / n_out
    return torch.minimum(torch.floor((o.float() + 0.5) * scale), n_in - 1).double()


def _pixels(boxes: torch.Tensor, rows: int, cols: int, size):
    """Source pixels (..., rows, cols) (float64 integers) that the patches of integer crops
    `boxes` (..., 4) split rows x cols read through views of `size` = (h, w) pixels."""
    x0, y0, x1, y1 = boxes.floor().unbind(-1)
    u = _nearest(torch.arange(cols, dtype=torch.float64, device=boxes.device), size[1], cols)
    t = _nearest(torch.arange(rows, dtype=torch.float64, device=boxes.device), size[0], rows)
    x = x0[..., None] + _nearest(u, (x1 - x0)[..., None], size[1])
    y = y0[..., None] + _nearest(t, (y1 - y0)[..., None], size[0])
    return _grid(x, y)


def relative_position_targets(query_boxes, ref_boxes, query_grid, ref_grid, query_flip, ref_flip,
                              query_rot90, ignore_index: int, query_size=None) -> torch.Tensor:
    """On checked inputs; flips and turns given as tensors; query_size (h, w) selects the
    "scenic" rule, None the "centre" one. Returns int64 (B, V, hq * wq)."""
    (hq, wq), (hr, wr) = query_grid, ref_grid
    qb, rb = query_boxes.double(), ref_boxes.double()
    if query_size is not None:
        rb = rb.floor()
    b, v = qb.shape[:2]
    out = torch.empty(b, v, hq, wq, dtype=torch.int64, device=qb.device)
    for turns in range(4):
        sel = query_rot90 == turns
        gh, gw = (hq, wq) if turns % 2 == 0 else (wq, hq)
        if query_size is None:
            x, y = _centres(qb, gh, gw)                              # (B, V, gh, gw)
        else:
            x, y = _pixels(qb, gh, gw, query_size if turns % 2 == 0 else query_size[::-1])
        flip = query_flip[..., None, None]
        x, y = torch.where(flip, x.flip(-1), x), torch.where(flip, y.flip(-1), y)
        x, y = x.rot90(turns, dims=(-2, -1)), y.rot90(turns, dims=(-2, -1))  # (B, V, hq, wq)
        rx0, ry0, rx1, ry1 = (t[:, None, None, None] for t in rb.unbind(-1))
        inside = (x >= rx0) & (x < rx1) & (y >= ry0) & (y < ry1)
        if query_size is None:
            col = torch.floor((x - rx0) * (torch.full_like(rx1, wr) / (rx1 - rx0))).clamp(0, wr - 1).long()
            row = torch.floor((y - ry0) * (torch.full_like(ry1, hr) / (ry1 - ry0))).clamp(0, hr - 1).long()
        else:   # outside pixels give negative indices: clamped, then ignored
            col = _nearest(x - rx0, wr, rx1 - rx0).clamp_min(0).long()
            row = _nearest(y - ry0, hr, ry1 - ry0).clamp_min(0).long()
        col = torch.where(ref_flip[:, None, None, None], wr - 1 - col, col)
        target = torch.where(inside, row * wr + col, torch.full_like(col, ignore_index))
        out = torch.where(sel[..., None, None], target, out)
    return out.reshape(b, v, hq * wq)


def gather_at_targets(values: torch.Tensor, targets: torch.Tensor, ignore_index: int, fill: float) -> torch.Tensor:
    """values[b, targets[b, ...]] (values (B, Nr) or (B, Nr, K), targets (B, Nq) or (B, V, Nq)),
    `fill` where targets == ignore_index: one gather, no (B, V, Nq, Nr) tensor."""
    ignored = targets == ignore_index
    index = torch.where(ignored, torch.zeros_like(targets), targets).long().reshape(targets.shape[0], -1)
    if values.dim() == 2:
        taken = values.gather(1, index).reshape(targets.shape)
        return taken.masked_fill(ignored, fill)
    taken = values.gather(1, index[..., None].expand(-1, -1, values.shape[2]))
    taken = taken.reshape(*targets.shape, values.shape[2])
    return taken.masked_fill(ignored[..., None], fill)
