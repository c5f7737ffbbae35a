"""Argument checks shared by the ops: each error names the op, the argument, what came
and what was expected (SPEC.md "Errors")."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shape_str(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_tensor(op: str, name: str, x, *, ndim: Optional[int] = None, layout: str = "",
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    """Check that `x` is a tensor of rank `ndim` (described as `layout`) and one of `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must have {ndim} dimensions {layout}, got shape {shape_str(x)}")
    if dtypes is not None and x.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({expected}), got {x.dtype}")


def check_features(op: str, name: str, x, leading: str, width: int, width_name: str = "dim") -> None:
    """Check that `x` is a floating-point tensor (leading..., width), on shapes only (no device
    synchronisation). `leading` names the dimensions before the last, e.g. "B, N"; a "..."
    among them allows any number of further ones."""
    check_tensor(op, name, x)
    names = [d.strip() for d in leading.split(",")]
    rank = len(names) + 1 - ("..." in names)
    if (x.dim() < rank if "..." in names else x.dim() != rank) or x.shape[-1] != width:
        raise ValueError(f"{op}: {name} must be ({leading}, {width}) ({width_name}={width}), got shape {shape_str(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def check_same_device(op: str, tensors: Iterable[tuple]) -> None:
    """`tensors`: (name, tensor) pairs that must live on one device."""
    pairs = [(n, t) for n, t in tensors if isinstance(t, torch.Tensor)]
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; all tensors must be on one device")


def check_grid(op: str, name: str, grid) -> tuple:
    """A patch grid (rows, cols) of positive ints."""
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a pair of ints (rows, cols), got {grid!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{op}: {name} must have positive sides, got {(rows, cols)}")
    return rows, cols


def values_checkable(x: torch.Tensor) -> bool:
    """Checks that read tensor values synchronise the device; skip them while tracing."""
    return not torch.compiler.is_compiling() and x.device.type != "meta"


def check_boxes(op: str, name: str, boxes: torch.Tensor) -> None:
    """Floating boxes (..., 4) (x0, y0, x1, y1), each finite with x1 > x0 and y1 > y0."""
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating tensor, got {boxes.dtype}")
    if boxes.shape[-1] != 4:
        raise ValueError(f"{op}: {name} must end in 4 coordinates (x0, y0, x1, y1), got shape {shape_str(boxes)}")
    if values_checkable(boxes) and boxes.numel():
        x0, y0, x1, y1 = boxes.unbind(-1)
        finite, ordered = torch.stack([torch.isfinite(boxes).all(), ((x1 > x0) & (y1 > y0)).all()]).tolist()
        if not finite:
            raise ValueError(f"{op}: every coordinate of {name} must be finite, got a NaN or infinite one")
        if not ordered:
            raise ValueError(f"{op}: every box of {name} must have x1 > x0 and y1 > y0")


def per_view(op: str, name: str, x, shape: tuple, device, kind: str) -> torch.Tensor:
    """A per-view flip flag (kind "bool") or quarter-turn count (kind "int", values 0..3) tensor
    of `shape`, zeros when None."""
    dtype = torch.bool if kind == "bool" else torch.int64
    if x is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    check_tensor(op, name, x, ndim=len(shape), layout=str(shape))
    if tuple(x.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {shape_str(x)}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor, got {x.dtype}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must be an integer tensor with values in 0..3, got {x.dtype}")
    if kind == "int" and values_checkable(x) and x.numel() and (x.min() < 0 or x.max() > 3):
        raise ValueError(f"{op}: {name} values must be in 0..3, got min {int(x.min())} and max {int(x.max())}")
    return x.to(dtype)
