"""Which reference tokens a query row may see (`keep`), and the compact form kernels read.

A keep is None (all visible), a bool mask (R, Nk), an integer index list (R, Nkeep), or a
KeepRun (a consecutive run of tokens per row, LOCA's scheme, read by kernels as an offset).
R is 1 (shared by every row), Bk (shared by the views of a reference) or Bq (per row);
query row i uses keep row i % R.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class KeepRun(NamedTuple):
    """Rows see tokens start[r], ..., start[r] + length - 1 (start: int tensor (R,))."""

    start: torch.Tensor
    length: int


def _start_generator_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def consecutive_keep(rows: int, num_tokens: int, num_visible: int, *,
                     generator: Optional[torch.Generator] = None, device=None,
                     as_run: bool = False):
    """LOCA's keep: per row, `num_visible` consecutive tokens (raster order) at a uniform
    random offset in [0, num_tokens - num_visible].

    Returns int64 positions (rows, num_visible), or a KeepRun when `as_run`, which fused
    kernels read as an offset without any index list.
    """
    if not 1 <= num_visible <= num_tokens:
        raise ValueError(f"consecutive_keep: num_visible must be in [1, {num_tokens}], got {num_visible}")
    start = torch.randint(0, num_tokens - num_visible + 1, (rows,), generator=generator,
                          device=_start_generator_device(generator)).to(device)
    if as_run:
        return KeepRun(start, num_visible)
    return start[:, None] + torch.arange(num_visible, device=start.device)


def random_keep(rows: int, num_tokens: int, num_visible: int, *,
                generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Per row, a uniform random subset of `num_visible` of `num_tokens` positions, sorted:
    int64 (rows, num_visible)."""
    if not 1 <= num_visible <= num_tokens:
        raise ValueError(f"random_keep: num_visible must be in [1, {num_tokens}], got {num_visible}")
    noise = torch.rand(rows, num_tokens, generator=generator, device=_start_generator_device(generator))
    return noise.argsort(dim=1)[:, :num_visible].sort(dim=1).values.to(device)


def keep_to_mask(keep, rows: int, num_tokens: int, device) -> torch.Tensor:
    """Dense bool mask (rows, num_tokens) for query rows 0..rows-1, True = visible."""
    if keep is None:
        return torch.ones(rows, num_tokens, dtype=torch.bool, device=device)
    if isinstance(keep, KeepRun):
        positions = torch.arange(num_tokens, device=device)
        start = keep.start.to(device)[:, None]
        mask = (positions >= start) & (positions < start + keep.length)
    elif keep.dtype == torch.bool:
        mask = keep
    else:
        mask = torch.zeros(keep.shape[0], num_tokens, dtype=torch.bool, device=device)
        mask.scatter_(1, keep.long(), True)
    row_of_query = torch.arange(rows, device=device) % mask.shape[0]
    return mask[row_of_query]


def compact_keep(keep, num_tokens: int, device):
    """The kernels' form: (keep_index int32 (R, L), keep_count int32 (R,), keep_is_run).

    No device synchronisation: a bool mask becomes its visible positions first (stable
    order) and a count per row.
    """
    if keep is None:
        return (torch.zeros(1, 1, dtype=torch.int32, device=device),
                torch.full((1,), num_tokens, dtype=torch.int32, device=device), True)
    if isinstance(keep, KeepRun):
        start = keep.start.to(device=device, dtype=torch.int32).reshape(-1, 1)
        return start, torch.full((start.shape[0],), keep.length, dtype=torch.int32, device=device), True
    if keep.dtype == torch.bool:
        index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True).to(torch.int32)
        return index, keep.sum(dim=1, dtype=torch.int32), False
    count = torch.full((keep.shape[0],), keep.shape[1], dtype=torch.int32, device=device)
    return keep.to(torch.int32).contiguous(), count, False
