"""Plain-PyTorch Sinkhorn-Knopp (SPEC.md section 4) in the log domain: the oracle.

The SPEC's formulas, with every normalisation a subtraction of a log-sum-exp, so that
|scores| / epsilon in the thousands stays finite. Sums over samples span all ranks of `group`.
A non-finite score makes its row NaN, and NaN spreads as the formulas carry it.
"""
from __future__ import annotations

import math

import torch

from ..distributed import logsumexp_over_ranks, rows_over_ranks


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float, iterations: int, mode: str, group=None) -> torch.Tensor:
    """On checked inputs. Returns float32 (N, K)."""
    logits = scores.double() / epsilon
    # A row holding a NaN or infinite score becomes all NaN (x * 0 is NaN exactly there); the
    # normalisations then carry NaN into every entry that sums over that row (SPEC.md section 4).
    logits = logits + (logits * 0).sum(dim=1, keepdim=True)
    n, k = logits.shape
    if mode == "loca":
        log_q = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        for _ in range(iterations):
            log_q = log_q - logsumexp_over_ranks(torch.logsumexp(log_q, dim=0), group)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        return log_q.exp().float()
    n_total = rows_over_ranks(n, logits.device, group)
    log_mass = torch.logsumexp(logsumexp_over_ranks(torch.logsumexp(logits, dim=0), group), dim=0)
    log_q = logits - log_mass
    for _ in range(iterations):
        log_q = log_q - (logsumexp_over_ranks(torch.logsumexp(log_q, dim=0), group) + math.log(k))
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(n_total))
    return (log_q.exp() * n_total).float()
