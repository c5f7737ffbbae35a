"""Plain-PyTorch masked cross-attention: the oracle every backend is tested against.

Short and obviously correct rather than fast: K and V are repeated per view and the
mask is dense.
"""
from __future__ import annotations

import torch

from .keep import keep_to_mask


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep=None, *,
                           scale: float) -> torch.Tensor:
    """SPEC.md section 1 on checked inputs: q (Bq, Nq, H, D), k and v (Bk, Nk, H, D)."""
    bq, bk, nk = q.shape[0], k.shape[0], k.shape[1]
    ref_row = torch.arange(bq, device=q.device) % bk            # query row i -> reference i % Bk
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(compute) for t in (q, k[ref_row], v[ref_row]))
    mask = keep_to_mask(keep, bq, nk, q.device)                    # (Bq, Nk), True = visible
    # Hidden tokens count for nothing, not even a NaN or infinity (SPEC.md section 1).
    kf, vf = (t.masked_fill(~mask[:, :, None, None], 0) for t in (kf, vf))
    scores = torch.einsum("bnhd,bjhd->bhnj", qf, kf) * scale
    any_visible = mask.any(dim=1)
    # Rows with no visible token attend to everything, then are zeroed: no NaN anywhere.
    attend = (mask | ~any_visible[:, None])[:, None, None, :]
    scores = scores.masked_fill(~attend, float("-inf"))
    # A NaN or infinite visible score makes its whole row NaN (a -inf is not read as a zero
    # probability): the row's sum of score * 0 over visible tokens, 0 or NaN.
    scores = scores + torch.where(attend, scores * 0, 0).sum(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(any_visible[:, None, None, None], probs, 0)
    out = torch.einsum("bhnj,bjhd->bnhd", probs, vf)
    return out.to(q.dtype)
