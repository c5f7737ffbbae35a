"""The LOCA loss: patch localisation + patch cluster prediction + mean-entropy regulariser.

As in LOCA's official trainer (google-research/scenic, projects/loca); mean_entropy_over="valid"
(the default) leaves the patches outside the reference out of the mean-entropy term as well,
"all" averages it over every query patch as the official trainer's me-max block does.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str, values_checkable
from ..distributed import differentiable_sum_over_ranks
from ..targets import gather_at_targets

__all__ = ["LocaLoss"]

NAME = "LocaLoss"
MEAN_ENTROPY_OVER = ("valid", "all")


def _per_patch(logits: torch.Tensor, targets: torch.Tensor, name: str) -> torch.Tensor:
    """`logits` as (B, V, Nq, C): accepts targets.shape + (C,) or the flattened (B*V*Nq, C)."""
    check_tensor(NAME, name, logits, dtypes=FLOAT_DTYPES + (torch.float64,))
    if logits.dim() == 2 and logits.shape[0] == targets.numel():
        return logits.unflatten(0, targets.shape)
    if logits.dim() != 4 or logits.shape[:3] != targets.shape:
        raise ValueError(f"{NAME}: {name} must have shape (B, V, Nq, C) = {tuple(targets.shape)} + (C,) "
                         f"or (B*V*Nq, C) = ({targets.numel()}, C), got {shape_str(logits)}")
    return logits


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # where(), not multiplication: an ignored patch adds exactly 0, even where its value overflowed.
    return torch.where(valid, values, 0.0).sum() / count.clamp_min(1)


class LocaLoss(nn.Module):
    """LOCA's training loss on the query patches of V query views of B reference images.

        total = w_loc * localisation + w_cluster * cluster + w_entropy * mean_entropy

    - localisation: cross-entropy of the position logits against the reference patch each
      query patch lies on, averaged over the patches that are not ignored.
    - cluster: cross-entropy of softmax(cluster_logits / student_temperature) against the
      teacher's Sinkhorn assignment of that reference patch, averaged likewise.
    - mean_entropy: sum_k p_k log p_k = minus the entropy of the mean student prediction p
      (softmax(cluster_logits / student_temperature), averaged over the patches that are not
      ignored, or over every patch with mean_entropy_over="all", of all ranks of `group` when
      given): minimising it spreads the predictions over all prototypes (LOCA's me-max term).
      With a group the all-reduce is differentiable and its backward sums over ranks, so
      under DDP's gradient averaging every rank gets the exact gradient of the global term.

    Ignored patches (target == ignore_index) are left out of every term (of the two
    cross-entropies only, with mean_entropy_over="all"); a batch in which
    every patch is ignored gives 0 for every term (and zero gradients), not NaN. The two
    cross-entropies are means over this rank's patches (DDP averages them over ranks).

    Args:
        student_temperature: divides the student cluster logits (LOCA: 0.1).
        ignore_index: target value of a query patch outside the reference.
        localisation_weight, cluster_weight, entropy_weight: weights of the terms (LOCA: 1).
        group: a torch.distributed process group for the mean-entropy term, or None.
        mean_entropy_over: "valid" (patches inside the reference) or "all" (every query patch,
            as the official trainer).

    forward(position_logits, targets, cluster_logits=None, teacher_assignments=None):
        position_logits: (B, V, Nq, Nr), or flattened (B*V*Nq, Nr) in that order.
        targets: int64 (B, V, Nq), a reference patch in [0, Nr) or ignore_index (the output
            of `relative_position_targets`).
        cluster_logits: student logits of the query patches (B, V, Nq, K) or (B*V*Nq, K);
            None for the localisation term only (the cluster terms are then 0).
        teacher_assignments: (B, Nr, K) Sinkhorn assignments of the reference patches (rows
            sum to 1), gathered at `targets` with `gather_at_targets`; no gradient flows
            into them. Required with cluster_logits.
        Returns (total, {"localisation": ..., "cluster": ..., "mean_entropy": ...}), float32
        scalars.

    Query views computed view-major ((V*B, Nq, C), as `masked_cross_attention` orders
    them) are passed without a copy as `logits.unflatten(0, (V, B)).transpose(0, 1)`.
    """

    def __init__(self, *, student_temperature: float = 0.1, ignore_index: int = -1,
                 localisation_weight: float = 1.0, cluster_weight: float = 1.0,
                 entropy_weight: float = 1.0, group=None, mean_entropy_over: str = "valid"):
        super().__init__()
        if student_temperature <= 0:
            raise ValueError(f"{NAME}: student_temperature must be > 0, got {student_temperature}")
        if mean_entropy_over not in MEAN_ENTROPY_OVER:
            raise ValueError(f"{NAME}: mean_entropy_over must be one of {MEAN_ENTROPY_OVER}, "
                             f"got {mean_entropy_over!r}")
        self.mean_entropy_over = mean_entropy_over
        self.student_temperature = student_temperature
        self.ignore_index = ignore_index
        self.localisation_weight = localisation_weight
        self.cluster_weight = cluster_weight
        self.entropy_weight = entropy_weight
        self.group = group

    def forward(self, position_logits: torch.Tensor, targets: torch.Tensor,
                cluster_logits: Optional[torch.Tensor] = None,
                teacher_assignments: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_tensor(NAME, "targets", targets, ndim=3, layout="(B, V, Nq)", dtypes=(torch.int64,))
        position_logits = _per_patch(position_logits, targets, "position_logits")
        check_same_device(NAME, [("targets", targets), ("position_logits", position_logits)])
        valid = targets != self.ignore_index                                    # (B, V, Nq)
        num_positions = position_logits.shape[-1]
        if values_checkable(targets) and (valid & ((targets < 0) | (targets >= num_positions))).any():
            raise ValueError(f"{NAME}: targets must be in [0, Nr={num_positions}) or ignore_index="
                             f"{self.ignore_index}, got values in [{int(targets.min())}, {int(targets.max())}]")
        count = valid.sum(dtype=torch.float32)
        safe_targets = torch.where(valid, targets, 0).unsqueeze(-1)
        log_p = F.log_softmax(position_logits, dim=-1, dtype=torch.float32)
        localisation = _masked_mean(-log_p.gather(-1, safe_targets).squeeze(-1), valid, count)

        cluster = mean_entropy = localisation.new_zeros(())
        if cluster_logits is not None:
            cluster, mean_entropy = self._cluster_terms(cluster_logits, targets, teacher_assignments,
                                                        num_positions, valid, count)
        elif teacher_assignments is not None:
            raise ValueError(f"{NAME}: teacher_assignments were given without cluster_logits")
        total = (self.localisation_weight * localisation + self.cluster_weight * cluster
                 + self.entropy_weight * mean_entropy)
        return total, {"localisation": localisation, "cluster": cluster, "mean_entropy": mean_entropy}

    def _cluster_terms(self, cluster_logits, targets, teacher_assignments, num_positions, valid, count):
        cluster_logits = _per_patch(cluster_logits, targets, "cluster_logits")
        if teacher_assignments is None:
            raise ValueError(f"{NAME}: cluster_logits need teacher_assignments (B, Nr, K)")
        check_tensor(NAME, "teacher_assignments", teacher_assignments, ndim=3, layout="(B, Nr, K)",
                     dtypes=FLOAT_DTYPES + (torch.float64,))
        b, k = targets.shape[0], cluster_logits.shape[-1]
        if teacher_assignments.shape != (b, num_positions, k):
            raise ValueError(f"{NAME}: teacher_assignments must have shape (B={b}, Nr={num_positions}, K={k}), "
                             f"got {shape_str(teacher_assignments)}")
        check_same_device(NAME, [("targets", targets), ("cluster_logits", cluster_logits),
                                 ("teacher_assignments", teacher_assignments)])
        teacher = gather_at_targets(teacher_assignments.detach(), targets, ignore_index=self.ignore_index,
                                    fill=0.0)                                   # (B, V, Nq, K)
        log_q = F.log_softmax(cluster_logits / self.student_temperature, dim=-1, dtype=torch.float32)
        cluster = _masked_mean(-(teacher * log_q).sum(-1), valid, count)

        if self.mean_entropy_over == "all":
            summed, patches = log_q.exp().sum(dim=(0, 1, 2)), count.new_full((1,), valid.numel())
        else:
            summed, patches = torch.where(valid.unsqueeze(-1), log_q.exp(), 0.0).sum(dim=(0, 1, 2)), count.reshape(1)
        totals = torch.cat([summed, patches])                                   # (K + 1,)
        totals = differentiable_sum_over_ranks(totals, self.group)
        mean_prediction = totals[:k] / totals[k].clamp_min(1)
        # Clamped log: an empty mean (or an underflowed prototype) contributes 0, never NaN.
        mean_entropy = (mean_prediction * mean_prediction.clamp_min(torch.finfo(torch.float32).tiny).log()).sum()
        return cluster, mean_entropy
