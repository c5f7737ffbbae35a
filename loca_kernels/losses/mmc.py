"""MMC's loss: masked image modelling, momentum self-distillation and global contrast."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..contrastive import queue_contrastive_loss
from ..distributed import sum_over_ranks
from .queue import enqueue_keys, random_key_queue

__all__ = ["MMCLoss"]


class MMCLoss(nn.Module):
    """MMC's three terms (python/loca_train/objectives/mmc.py says where each comes from):

        total = mim_weight * mim + distill_weight * distill + contrast_weight * contrast

    - mim: L1 error of the predicted pixels of the masked patches (SimMIM), averaged over them.
    - distill: cross-entropy of the student's log_softmax(logits / student_temperature) of
      every view against the teacher's softmax((logits - center) / teacher_temperature) of
      each global view other than itself (DINO), averaged over the pairs.
    - contrast: each global view's query against the teacher's key of the other global view,
      with the queue of earlier keys as negatives (MoCo v2; `queue_contrastive_loss`).
    After the loss the centre follows the teacher's mean logits (of all ranks of `group`) with
    center_momentum and both views' keys are enqueued. Buffers `center` (K,), `queue`
    (D, queue_size) and `queue_ptr` are the state a resumed run continues from.

    Args:
        num_prototypes: K, the distillation head's outputs.
        dim: D, the contrast projection's width.
        queue_size: negatives in the queue, a multiple of the keys of a step (2 x global batch).
        student_temperature, teacher_temperature, contrast_temperature: as above (DINO 0.1 and
            0.04, MoCo v2 0.2).
        center_momentum: of the centre's EMA (DINO: 0.9).
        mim_weight, distill_weight, contrast_weight: weights of the terms.
        group: the torch.distributed process group, or None.
        backend: of queue_contrastive_loss (None: the default).

    forward(pixels, target_pixels, masks, student_logits, teacher_logits, queries, keys) with
    pixels, target_pixels (2B, N, 3 p^2), masks (2B, N) bool, student_logits ((2 + L) B, K),
    teacher_logits (2B, K), queries and keys (2B, D), views major. Returns (total, terms)."""

    def __init__(self, num_prototypes: int, dim: int, queue_size: int, *, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.04, contrast_temperature: float = 0.2,
                 center_momentum: float = 0.9, mim_weight: float = 1.0, distill_weight: float = 1.0,
                 contrast_weight: float = 1.0, group=None, backend: Optional[str] = None):
        super().__init__()
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.contrast_temperature, self.center_momentum = contrast_temperature, center_momentum
        self.weights = {"mim": mim_weight, "distill": distill_weight, "contrast": contrast_weight}
        self.group, self.backend = group, backend
        self.register_buffer("center", torch.zeros(num_prototypes))
        self.register_buffer("queue", random_key_queue(dim, queue_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def forward(self, pixels, target_pixels, masks, student_logits, teacher_logits, queries, keys):
        b = queries.shape[0] // 2
        error = (pixels.float() - target_pixels.float()).abs().mean(dim=-1)
        mim = torch.where(masks, error, 0.0).sum() / masks.sum().clamp_min(1)

        targets = F.softmax((teacher_logits.float() - self.center) / self.teacher_temperature, dim=-1)
        log_p = F.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        cross = -torch.einsum("tbk,vbk->tvb", targets.unflatten(0, (2, b)), log_p.unflatten(0, (-1, b))).mean(-1)
        same_view = torch.eye(2, log_p.shape[0] // b, dtype=torch.bool, device=cross.device)
        distill = torch.where(same_view, 0.0, cross).sum() / (cross.numel() - 2)

        queries = F.normalize(queries.float(), dim=-1)
        with torch.no_grad():
            keys = F.normalize(keys.float(), dim=-1)
            queue = self.queue.clone()
        positives = keys.unflatten(0, (2, b)).flip(0).flatten(0, 1)            # the other global view's key
        contrast = queue_contrastive_loss(queries, positives, queue.t(), temperature=self.contrast_temperature,
                                          backend=self.backend)
        self._update(teacher_logits.detach().float(), keys)
        terms = {"mim": mim, "distill": distill, "contrast": contrast}
        return sum(self.weights[name] * value for name, value in terms.items()), terms

    @torch.no_grad()
    def _update(self, teacher_logits: torch.Tensor, keys: torch.Tensor) -> None:
        totals = torch.cat([teacher_logits.sum(dim=0), teacher_logits.new_full((1,), teacher_logits.shape[0])])
        totals = sum_over_ranks(totals, self.group)
        self.center.lerp_(totals[:-1] / totals[-1], 1 - self.center_momentum)
        enqueue_keys((self.queue,), self.queue_ptr, (keys,), self.group)
