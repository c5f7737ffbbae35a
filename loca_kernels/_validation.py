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
