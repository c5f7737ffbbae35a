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
    """A keep of consecutive tokens: keep row r sees tokens start[r], ..., start[r] + length - 1
    (raster order), LOCA's scheme. Fused kernels read it as one offset per row, with no index
    list.

    Fields:
        start: integer tensor (R,), each in [0, Nk - length]; R is 1, Bk or Bq as for any keep,
            on the device of the attention's inputs.
        length: int, the visible tokens per row, in [1, Nk].

    Example: `KeepRun(torch.tensor([3]), 4)` shows tokens 3, 4, 5 and 6 to every query row.
    """

    start: torch.Tensor
    length: int


def _start_generator_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def consecutive_keep(rows: int, num_tokens: int, num_visible: int, *,
                     generator: Optional[torch.Generator] = None, device=None,
                     as_run: bool = False):
    """LOCA's keep: per row, `num_visible` consecutive tokens (raster order) at a uniform
    random offset in [0, num_tokens - num_visible].

    Args:
        rows: R, the keep rows: 1 (one run shared by every query row, as LOCA draws it once per
            device batch), Bk (one per reference) or Bq (one per query row).
        num_tokens: Nk, the reference tokens. num_visible: the run's length, in [1, num_tokens].
        generator: the torch.Generator the offsets are drawn with (reproducible runs); its
            device is where they are drawn. device: where the result lives (default: the
            generator's device, else the CPU).
        as_run: return a KeepRun instead of the positions.

    Returns int64 positions (rows, num_visible), or a KeepRun when `as_run`, which fused
    kernels read as an offset without any index list. Both mean the same keep.
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
    """Per row, a uniform random subset of `num_visible` of `num_tokens` positions.

    Args:
        rows: R, the keep rows (1, Bk or Bq, as for any keep).
        num_tokens: Nk, the reference tokens. num_visible: the positions per row, in
            [1, num_tokens].
        generator: the torch.Generator they are drawn with; its device is where they are
            drawn. device: where the result lives.

    Returns int64 (rows, num_visible): distinct positions, ascending in each row, an index
    keep for `masked_cross_attention`.
    """
    if not 1 <= num_visible <= num_tokens:
        raise ValueError(f"random_keep: num_visible must be in [1, {num_tokens}], got {num_visible}")
    noise = torch.rand(rows, num_tokens, generator=generator, device=_start_generator_device(generator))
    return noise.argsort(dim=1)[:, :num_visible].sort(dim=1).values.to(device)


def keep_to_mask(keep, rows: int, num_tokens: int, device) -> torch.Tensor:
    """The dense bool mask of any keep form, one row per query row: True = visible.

    Use it to compare with a masked attention written another way, e.g. as
    `nn.MultiheadAttention(..., key_padding_mask=~mask)` or `F.scaled_dot_product_attention(...,
    attn_mask=mask[:, None, None, :])`, or to see which tokens a keep shows. Kernels never build
    it: they read the compact forms.

    Args:
        keep: None (every token visible), a bool mask (R, Nk), an integer index tensor
            (R, Nkeep) or a KeepRun, as `masked_cross_attention` takes them.
        rows: the query rows Bq to expand to; query row i gets keep row i % R (R = 1, Bk or Bq).
        num_tokens: Nk, the reference tokens.
        device: the device of the mask.

    Returns bool (rows, num_tokens). The keep is taken as valid (the op checks it; this
    helper does not).
    """
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
