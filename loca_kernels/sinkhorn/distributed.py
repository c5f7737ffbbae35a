"""Sums over the samples of every rank, for the reference and the fused driver alike."""
from __future__ import annotations

import torch
import torch.distributed as dist


def logsumexp_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """log of the sum over the ranks of `group` of exp(local), elementwise: two all-reduces
    (the max, then the sum of exp(local - max)), so that no entry under- or overflows."""
    if group is None:
        return local
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(local - peak)
    dist.all_reduce(total, group=group)
    return peak + torch.log(total)


def rows_over_ranks(n: int, device, group) -> int:
    """The number of samples of all ranks."""
    if group is None:
        return n
    count = torch.tensor([n], device=device)
    dist.all_reduce(count, group=group)
    return int(count)
