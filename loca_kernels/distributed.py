"""Sums and maxima over the samples of every rank, for the reference and the fused driver."""
from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """Elementwise sum of `local` over the ranks of `group` (one all-reduce); None: itself."""
    if group is None:
        return local
    total = local.clone()
    dist.all_reduce(total, group=group)
    return total


def max_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """Elementwise max of `local` over the ranks of `group` (one all-reduce); None: itself."""
    if group is None:
        return local
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return peak


def logsumexp_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """log of the sum over the ranks of `group` of exp(local), elementwise: two all-reduces
    (the max, then the sum of exp(local - max)), so that no entry under- or overflows."""
    if group is None:
        return local
    peak = max_over_ranks(local, group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return peak + torch.log(sum_over_ranks(torch.exp(local - peak), group))


def rows_over_ranks(n: int, device, group) -> int:
    """The number of samples of all ranks."""
    if group is None:
        return n
    return int(sum_over_ranks(torch.tensor([n], device=device), group))
