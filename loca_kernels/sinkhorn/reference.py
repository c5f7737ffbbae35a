"""Plain-PyTorch Sinkhorn-Knopp (SPEC.md section 4) in the log domain: the oracle.

The SPEC's formulas, with every normalisation a subtraction of a log-sum-exp, so that
|scores| / epsilon in the thousands stays finite. Sums over samples span all ranks of `group`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _logsumexp_over_samples(x: torch.Tensor, group) -> torch.Tensor:
    """log sum_i exp(x[i, j]) over the rows of every rank: a (K,) tensor."""
    if group is None:
        return torch.logsumexp(x, dim=0)
    peak = x.max(dim=0).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak).sum(dim=0)
    dist.all_reduce(total, group=group)
    return peak + torch.log(total)


def _total_rows(n: int, device, group) -> int:
    if group is None:
        return n
    count = torch.tensor([n], device=device)
    dist.all_reduce(count, group=group)
    return int(count)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float, iterations: int, mode: str, group=None) -> torch.Tensor:
    """On checked inputs. Returns float32 (N, K)."""
    logits = scores.double() / epsilon
    n, k = logits.shape
    if mode == "loca":
        log_q = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        for _ in range(iterations):
            log_q = log_q - _logsumexp_over_samples(log_q, group)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        return log_q.exp().float()
    n_total = _total_rows(n, logits.device, group)
    log_mass = torch.logsumexp(_logsumexp_over_samples(logits, group), dim=0)
    log_q = logits - log_mass
    for _ in range(iterations):
        log_q = log_q - (_logsumexp_over_samples(log_q, group) + math.log(k))
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(n_total))
    return (log_q.exp() * n_total).float()
