"""The streaming Sinkhorn driver over one backend's fused pass operator (csrc/ops.cpp says what
a pass computes). The scaling is kept as one float32 vector per prototype, `col`, so that
log Q[i, j] = x[i, j] - col[j] - (the row's normaliser), x = scores / epsilon.

Passes over `scores` (T = iterations):
  pass 0        loca: softmax the rows; swav: exp(x) as it is. Column sums -> col.
  passes 1..T-1 normalise the rows, column sums -> col += log(sums) (+ SwAV's constants).
  pass T        normalise the rows and write Q.
That is T + 1 reads of `scores` and one float32 write of Q for T >= 1; with T = 0, "loca" is
one pass (the softmax) and "swav" two (the total mass, then Q).

Column sums are plain float32 sums, one exp per entry and one all-reduce of a K-vector per
pass over ranks (plus, for "swav", the all-reduce of the max that keeps exp(x - max)
finite). After pass 0 they cannot underflow: a column normalised to 1 keeps, after its rows
are normalised, a sum >= 1 / (N K). In pass 0 a prototype whose sum falls below N * 2^-100
(x more than ~69 below the row maxima (loca) or the global max (swav) for every sample;
cosine scores at epsilon = 0.05 span 40) could lose precision to terms flushed to zero:
then, and only then, pass 0's column normaliser is recomputed in the log domain by a
chunked PyTorch pass (one more read of `scores`, two all-reduces).

NaN and infinite scores (SPEC.md section 4): a pass makes a row with a non-finite x all NaN
(the row's sum of x * 0, added to its normaliser in the same sweep), so the column sums are
NaN, `col` becomes NaN, and the next pass makes every row NaN. No extra pass, no host sync.
"""
from __future__ import annotations

import math

import torch

from ..distributed import logsumexp_over_ranks, max_over_ranks, sum_over_ranks

# A column sum at least N * 2^-100 is exact to ~2e-8 relative although terms below 2^-125
# were flushed to zero; below that, pass 0 is redone in the log domain.
SMALLEST_EXACT_SUM_PER_ROW = 2.0 ** -100
FALLBACK_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def sinkhorn(sinkhorn_pass, scores: torch.Tensor, *, epsilon: float, iterations: int, mode: str,
             group=None) -> torch.Tensor:
    """On checked inputs; `sinkhorn_pass` is the fused pass operator of one backend."""
    # Kernels read rows with any stride, but contiguous along K (K = 1: any stride).
    scores = scores if scores.stride(1) == 1 or scores.shape[1] == 1 else scores.contiguous()
    n, k = scores.shape
    inv_epsilon = 1.0 / epsilon
    swav = mode == "swav"
    col = torch.zeros(k, dtype=torch.float32, device=scores.device)
    if iterations == 0 and not swav:
        return sinkhorn_pass(scores, col, inv_epsilon, True, True)[0]

    sums, shift = sinkhorn_pass(scores, col, inv_epsilon, not swav, False)
    if swav:  # a common shift for all ranks
        peak = max_over_ranks(shift.reshape(1), group)
        sums = sums * torch.exp(shift - peak)
        shift = peak[0]
    # The local row count rides along with the column sums: still one all-reduce.
    counted = sum_over_ranks(torch.cat([sums.double(), sums.new_tensor([n], dtype=torch.float64)]), group)
    sums, n_total = counted[:k].float(), counted[k]
    if iterations == 0:  # swav: Q = N exp(x) / total mass, the mass from the column sums
        log_mass = shift + torch.log(sums.sum())
        return sinkhorn_pass(scores, col + (log_mass - torch.log(n_total)).float(), inv_epsilon, False, True)[0]
    # NaN sums (a non-finite score poisons its row, so every column) fail the comparison and
    # go on into col, and from there into every entry of Q, as in the reference.
    if bool(sums.min() < n_total * SMALLEST_EXACT_SUM_PER_ROW):
        col = _column_logsumexp(scores, inv_epsilon, not swav, group)
    else:
        col = shift + torch.log(sums)
    # SwAV's constants: columns to 1/K, rows to 1/N_total (LOCA: both to 1).
    if swav:
        col = col + math.log(k)
    col_offset = float(math.log(k) - torch.log(n_total)) if swav else 0.0
    for _ in range(iterations - 1):
        sums = sum_over_ranks(sinkhorn_pass(scores, col, inv_epsilon, True, False)[0], group)
        col = col + torch.log(sums) + col_offset
    return sinkhorn_pass(scores, col, inv_epsilon, True, True)[0]


def _column_logsumexp(scores: torch.Tensor, inv_epsilon: float, normalize_rows: bool, group) -> torch.Tensor:
    """log sum_i p[i, j] over all ranks, p the softmax of the rows of x (or exp(x)), in float32
    row chunks: the log-domain pass 0 for scores whose column sums underflow."""
    total = torch.full((scores.shape[1],), float("-inf"), dtype=torch.float32, device=scores.device)
    for chunk in scores.split(max(1, FALLBACK_CHUNK_ELEMENTS // scores.shape[1])):
        x = chunk.float() * inv_epsilon
        if normalize_rows:
            x = x - torch.logsumexp(x, dim=1, keepdim=True)
        total = torch.logaddexp(total, torch.logsumexp(x, dim=0))
    return logsumexp_over_ranks(total, group)
