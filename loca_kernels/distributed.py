"""Collectives over the ranks of a torch.distributed process group, for the ops, the losses and
the trainer: sums, maxima and log-sum-exps (Sinkhorn's reference and fused driver), a sum whose
backward sums too (LocaLoss's mean-entropy term), the rows of every rank (the MoCo queues) and
any picklable value of every rank (the trainer's checkpoints). `group` None means one process:
each helper then returns its input as it is."""
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


class _SumOverRanks(torch.autograd.Function):
    """Sum over the ranks of a group whose backward is the sum over ranks as well: every rank's
    output depends on every rank's input. (torch.distributed.nn.functional.all_reduce does
    the same but is deprecated.)"""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return sum_over_ranks(local, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return sum_over_ranks(grad.contiguous(), ctx.group), None


def differentiable_sum_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """sum_over_ranks with a gradient: the backward sums the incoming gradients over the ranks."""
    if group is None:
        return local
    return _SumOverRanks.apply(local, group)


def rows_of_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """The rows of `local` of every rank of `group`, rank-major (DenseCL's concat_all_gather;
    no gradient)."""
    if group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def objects_of_ranks(value, group) -> list:
    """`value` (any picklable object) of every rank of `group`, in rank order."""
    if group is None:
        return [value]
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values
