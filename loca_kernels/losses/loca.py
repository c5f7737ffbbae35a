"""The LOCA loss: patch localisation + patch cluster prediction + mean-entropy regulariser;
DenseCL's loss head (DenseContrastiveLoss); GTSA's patch-correspondence loss
(PatchCorrespondenceLoss).

As in LOCA's official trainer (google-research/scenic, projects/loca); mean_entropy_over="valid"
(the default) leaves the patches outside the reference out of the mean-entropy term as well,
"all" averages it over every query patch as the official trainer's me-max block does.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str, values_checkable
from .contrastive import queue_contrastive_loss
from .matching import patch_matching
from .sinkhorn.distributed import sum_over_ranks
from .targets import gather_at_targets

__all__ = ["LocaLoss", "DenseContrastiveLoss", "PatchCorrespondenceLoss"]

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
        if self.group is not None:
            totals = _SumOverRanks.apply(totals, self.group)
        mean_prediction = totals[:k] / totals[k].clamp_min(1)
        # Clamped log: an empty mean (or an underflowed prototype) contributes 0, never NaN.
        mean_entropy = (mean_prediction * mean_prediction.clamp_min(torch.finfo(torch.float32).tiny).log()).sum()
        return cluster, mean_entropy


def _gather_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """The rows of `local` of every rank of `group`, rank-major (DenseCL's concat_all_gather;
    no gradient); None: itself."""
    if group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def random_key_queue(dim: int, size: int) -> torch.Tensor:
    """A (dim, size) queue of random unit keys, columns normalised: MoCo's initial queue."""
    return F.normalize(torch.randn(dim, size), dim=0)


@torch.no_grad()
def enqueue_keys(queues, queue_ptr: torch.Tensor, keys, group=None) -> None:
    """MoCo's ring buffer: each (N, D) tensor of `keys`, gathered over `group` (rank-major), is
    written into columns queue_ptr .. queue_ptr + N - 1 of its (D, K) queue of `queues`, and
    queue_ptr advances by N modulo K. K must be a multiple of the gathered N (callers check).
    The pointer stays a tensor: no host synchronisation, traceable."""
    keys = [_gather_over_ranks(k, group) for k in keys]
    n = keys[0].shape[0]
    slots = queue_ptr + torch.arange(n, device=keys[0].device)
    for queue, k in zip(queues, keys):
        queue.index_copy_(1, slots, k.t().to(queue.dtype))
    queue_ptr.copy_((queue_ptr + n) % queues[0].shape[1])


class DenseContrastiveLoss(nn.Module):
    """DenseCL's loss head (Wang et al., CVPR 2021; official code WXinlong/DenseCL,
    openselfsup/models/densecl.py) with its two queues of negatives:

        total = (1 - dense_weight) * global + dense_weight * dense

    - global: InfoNCE of each image's query vector against its key vector (the positive) and
      the `queue_size` keys of earlier batches (`queue_global`), as MoCo v2.
    - dense: InfoNCE of each query patch against one key patch (the positive) and the pooled
      dense keys of earlier batches (`queue_dense`). The positive of query patch i is the key
      patch whose backbone feature is most similar (cosine) to query patch i's backbone
      feature (`patch_matching`, first index on ties).
    - Both are `queue_contrastive_loss` with `temperature`, averaged over images and over
      query patches respectively: the (N, K) logits are never built.
    - After the loss, the key vectors and the pooled dense keys (the mean of each image's
      un-normalised dense keys, normalised: DenseCL's `k2`) of all ranks of `group` are
      written into the queues, replacing the oldest (a ring buffer). The queues and their
      pointer are buffers: they are saved in `state_dict`, and a resumed run goes on with the
      same negatives.

    Every input is L2-normalised here (DenseCL normalises in its forward); keys get no gradient.
    The loss reads a snapshot of each queue, as DenseCL's `queue.clone().detach()`, so that
    writing the new keys cannot change what the backward pass recomputes (2 x dim x queue_size
    floats, 64 MB at DenseCL's size).

    Args:
        dim: the projection dim D of the global and dense heads (DenseCL: 128).
        queue_size: negatives per queue (DenseCL: 65536); a multiple of the global batch
            (the images of all ranks of a step).
        temperature: of both InfoNCE terms (DenseCL: 0.2).
        dense_weight: lambda (DenseCL: 0.5).
        group: the torch.distributed process group whose keys are enqueued, or None.
        backend: the backend of queue_contrastive_loss and patch_matching (None: the default).

    forward(query_global, query_dense, key_global, key_dense, query_backbone, key_backbone):
        query_global, key_global: (B, D) global projections of the two views (student, momentum).
        query_dense: (B, Sq, D) dense projections of the query view's Sq patches, token-major
            (a CNN grid (B, D, H, W) is `x.flatten(2).transpose(1, 2)`); key_dense: (B, Sk, D).
        query_backbone: (B, Sq, C), key_backbone: (B, Sk, C): the backbone features the
            patches are matched on (DenseCL: ResNet C5; ViT patch tokens).
        Returns (total, {"global": ..., "dense": ...}), float32 scalars.
    """

    def __init__(self, dim: int = 128, queue_size: int = 65536, *, temperature: float = 0.2,
                 dense_weight: float = 0.5, group=None, backend: Optional[str] = None):
        super().__init__()
        name = "DenseContrastiveLoss"
        if dim <= 0 or queue_size <= 0:
            raise ValueError(f"{name}: dim and queue_size must be positive, got dim={dim}, queue_size={queue_size}")
        if not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        if not 0 <= dense_weight <= 1:
            raise ValueError(f"{name}: dense_weight must be in [0, 1], got {dense_weight}")
        self.dim, self.queue_size, self.temperature = dim, queue_size, temperature
        self.dense_weight, self.group, self.backend = dense_weight, group, backend
        # (D, K) like DenseCL's buffers, read transposed in place by queue_contrastive_loss.
        self.register_buffer("queue_global", random_key_queue(dim, queue_size))
        self.register_buffer("queue_dense", random_key_queue(dim, queue_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, queue_size={self.queue_size}, temperature={self.temperature}, "
                f"dense_weight={self.dense_weight}")

    def _check(self, inputs: Dict[str, torch.Tensor]) -> None:
        name = "DenseContrastiveLoss"
        layouts = {"query_global": "(B, D)", "key_global": "(B, D)", "query_dense": "(B, Sq, D)",
                   "key_dense": "(B, Sk, D)", "query_backbone": "(B, Sq, C)", "key_backbone": "(B, Sk, C)"}
        for arg, layout in layouts.items():
            check_tensor(name, arg, inputs[arg], ndim=layout.count(",") + 1, layout=layout,
                         dtypes=FLOAT_DTYPES + (torch.float64,))
        check_same_device(name, list(inputs.items()))
        q, qd, kd = inputs["query_global"], inputs["query_dense"], inputs["key_dense"]
        b = q.shape[0]
        expected = {"query_global": (b, self.dim), "key_global": (b, self.dim),
                    "query_dense": (b, qd.shape[1], self.dim), "key_dense": (b, kd.shape[1], self.dim),
                    "query_backbone": (b, qd.shape[1], inputs["query_backbone"].shape[2]),
                    "key_backbone": (b, kd.shape[1], inputs["query_backbone"].shape[2])}
        for arg, shape in expected.items():
            if tuple(inputs[arg].shape) != shape:
                raise ValueError(f"{name}: {arg} must have shape {layouts[arg]} = {shape} (B={b}, D={self.dim} "
                                 f"and the patches and channels of the other inputs), got {shape_str(inputs[arg])}")

    def forward(self, query_global: torch.Tensor, query_dense: torch.Tensor, key_global: torch.Tensor,
                key_dense: torch.Tensor, query_backbone: torch.Tensor, key_backbone: torch.Tensor,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        self._check(dict(query_global=query_global, query_dense=query_dense, key_global=key_global,
                         key_dense=key_dense, query_backbone=query_backbone, key_backbone=key_backbone))
        q = F.normalize(query_global, dim=-1)
        q_dense = F.normalize(query_dense, dim=-1)
        with torch.no_grad():
            k = F.normalize(key_global, dim=-1)
            k_dense = F.normalize(key_dense, dim=-1)
            k_pooled = F.normalize(key_dense.mean(dim=1), dim=-1)
            index, _ = patch_matching(query_backbone.detach(), key_backbone.detach(), backend=self.backend)
            positive = k_dense.gather(1, index.unsqueeze(-1).expand(-1, -1, self.dim))   # (B, Sq, D)
            # Snapshots in the queries' dtype (the op takes one dtype); `copy=True` even where it matches.
            queue_global = self.queue_global.to(q.dtype, copy=True)
            queue_dense = self.queue_dense.to(q_dense.dtype, copy=True)
        global_term = queue_contrastive_loss(q, k.to(q.dtype), queue_global.t(), temperature=self.temperature,
                                             backend=self.backend)
        dense_term = queue_contrastive_loss(q_dense.flatten(0, 1), positive.flatten(0, 1).to(q_dense.dtype),
                                            queue_dense.t(), temperature=self.temperature, backend=self.backend)
        self._enqueue(k, k_pooled)
        total = (1 - self.dense_weight) * global_term + self.dense_weight * dense_term
        return total, {"global": global_term, "dense": dense_term}

    def _enqueue(self, keys: torch.Tensor, pooled_keys: torch.Tensor) -> None:
        n = keys.shape[0] * (1 if self.group is None else torch.distributed.get_world_size(self.group))
        if self.queue_size % n:
            raise ValueError(f"DenseContrastiveLoss: queue_size={self.queue_size} must be a multiple of the global "
                             f"batch (the images of all ranks of a step), got {n}")
        enqueue_keys((self.queue_global, self.queue_dense), self.queue_ptr, (keys, pooled_keys), self.group)


class PatchCorrespondenceLoss(nn.Module):
    """GTSA's patch-correspondence term (github bok3948/GTSA, model_pretrain/gtsa.py) on B
    (student, teacher) pairs of patch-feature maps.

    Each student patch is matched to the teacher patch of highest cosine similarity, and each
    teacher patch to the student patch of highest cosine (`patch_matching`, both ways, from the
    features given: GTSA matches the same projected features the loss compares). In each
    direction the `num_matches` best-matched patches of every image are kept (the highest
    similarities) and the loss is minus their cosine, averaged over images and kept patches:

        loss = 0.5 * (-mean topk(sim_student_to_teacher) - mean topk(sim_teacher_to_student))

    As GTSA, the teacher is detached (no gradient flows into it), and the matching (argmax,
    top-k choice) passes no gradient: the student's gradient comes through the kept cosines. The
    kept pairs' cosine is the matched similarity itself (GTSA recomputes it with
    nn.CosineSimilarity, whose eps of 1e-8 differs only for near-zero vectors); which of
    exactly equal similarities top-k keeps is unspecified, as GTSA's sort.

    GTSA averages this term over every (teacher view, other student view) pair: pairs of one
    shape concatenated along B give that average directly. Its defaults: 98 of 196 matches for
    global (14 x 14) students, 18 for local (6 x 6) students against a 14 x 14 teacher.

    Args:
        num_matches: M, the pairs kept per image in each direction; at most the number of
            patches of the student and of the teacher.
        backend: the `patch_matching` backend (None: the fastest available).

    forward(student, teacher): (B, Ns, C) and (B, Nt, C) patch features, one dtype and
    device. Returns the loss, a float32 scalar (float64 for float64 inputs). No host
    synchronisation and no loop over the batch: torch.compile(fullgraph=True) traces it.
    """

    def __init__(self, num_matches: int, *, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        if isinstance(num_matches, bool) or not isinstance(num_matches, int):
            raise TypeError(f"{name}: num_matches must be an int, got {type(num_matches).__name__}")
        if num_matches < 1:
            raise ValueError(f"{name}: num_matches must be >= 1, got {num_matches}")
        self.num_matches = num_matches
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_tensor(name, "student", student, ndim=3, layout="(B, Ns, C)", dtypes=FLOAT_DTYPES + (torch.float64,))
        check_tensor(name, "teacher", teacher, ndim=3, layout="(B, Nt, C)")
        if teacher.dtype != student.dtype:
            raise TypeError(f"{name}: teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
        (b, _, c), (bt, _, ct) = student.shape, teacher.shape
        if (bt, ct) != (b, c):
            raise ValueError(f"{name}: teacher must be (B, Nt, C) with the student's B={b} and C={c}, "
                             f"got shape {shape_str(teacher)}")
        fewest = min(student.shape[1], teacher.shape[1])
        if self.num_matches > fewest:
            raise ValueError(f"{name}: num_matches={self.num_matches} is larger than the patches of the student "
                             f"{shape_str(student)} or the teacher {shape_str(teacher)}; expected at most {fewest}")
        teacher = teacher.detach()
        _, student_to_teacher = patch_matching(student, teacher, backend=self.backend)
        _, teacher_to_student = patch_matching(teacher, student, backend=self.backend)
        kept_student = student_to_teacher.topk(self.num_matches, dim=1, sorted=False).values
        kept_teacher = teacher_to_student.topk(self.num_matches, dim=1, sorted=False).values
        return -0.5 * (kept_student.mean() + kept_teacher.mean())
