"""Plain-PyTorch InfoNCE against a queue of negatives (SPEC.md section 5): the oracle.

Exactly MoCo's and DenseCL's head: logits [q.p, q.queue_1, ..., q.queue_K] / T, cross-entropy
against class 0, computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def queue_contrastive_loss(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, *,
                           temperature: float, reduction: str) -> torch.Tensor:
    """On checked inputs. Returns float32 (float64 for float64 inputs): a scalar, or (N,) for "none"."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, p, negatives = query.to(dtype), positive.to(dtype), queue.detach().to(dtype)
    logits = torch.cat([(q * p).sum(1, keepdim=True), q @ negatives.t()], dim=1) / temperature
    # A NaN or infinite logit makes its row's loss NaN (SPEC.md section 5), a -inf one included:
    # the row's sum of logit * 0, 0 or NaN.
    logits = logits + (logits * 0).sum(1, keepdim=True)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction)
