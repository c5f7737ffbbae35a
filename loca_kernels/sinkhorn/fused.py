"""The streaming Sinkhorn driver: `iterations + 1` passes over `scores` (one more for "swav"
with no iteration), each a call of a fused pass operator, with the scalings kept as two
float32 vectors: Q[i, j] = exp(scores[i, j] / epsilon - row_scale[i] - col_scale[j]).

  pass 0            loca: normalise rows (the softmax); swav: rows as they are.
                    Column log-sums -> col_scale (the first column normalisation).
  pass t < T        normalise rows, column log-sums -> col_scale += them.
  pass T            normalise rows and write Q.

Column log-sums over several ranks are combined with two all-reduces of a K-vector (their
max, then the sum of exp(log-sum - max)), which keeps every prototype finite however far it
lies from every sample.
"""
from __future__ import annotations

import math

import torch

from .distributed import logsumexp_over_ranks, rows_over_ranks


@torch.no_grad()
def sinkhorn(sinkhorn_pass, scores: torch.Tensor, *, epsilon: float, iterations: int, mode: str,
             group=None) -> torch.Tensor:
    """On checked inputs; `sinkhorn_pass` is the fused pass operator of one backend."""
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    n, k = scores.shape
    inv_epsilon = 1.0 / epsilon
    rows = torch.zeros(n, dtype=torch.float32, device=scores.device)
    cols = torch.zeros(k, dtype=torch.float32, device=scores.device)
    swav = mode == "swav"
    log_n = math.log(rows_over_ranks(n, scores.device, group)) if swav else 0.0
    col_offset = math.log(k) if swav else 0.0
    if iterations == 0:
        if not swav:
            return sinkhorn_pass(scores, rows, cols, inv_epsilon, True, 0.0, True, 0.0)[1]
        # Q = exp(x) / total mass * N: the total mass comes from the row log-sums.
        rows = sinkhorn_pass(scores, rows, cols, inv_epsilon, True, 0.0, False, 0.0)[0]
        mass = logsumexp_over_ranks(torch.logsumexp(rows, 0, keepdim=True), group)
        return sinkhorn_pass(scores, mass.expand(n).contiguous(), cols, inv_epsilon, False, 0.0, True, log_n)[1]
    rows, col_lse = sinkhorn_pass(scores, rows, cols, inv_epsilon, not swav, 0.0, False, 0.0)
    cols = logsumexp_over_ranks(col_lse, group) + col_offset
    for _ in range(iterations - 1):
        rows, col_lse = sinkhorn_pass(scores, rows, cols, inv_epsilon, True, log_n, False, 0.0)
        cols = cols + logsumexp_over_ranks(col_lse, group) + col_offset
    return sinkhorn_pass(scores, rows, cols, inv_epsilon, True, log_n, True, log_n)[1]
