"""GTSA's patch-correspondence loss: matched patches of student and teacher, both ways."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validation import FLOAT_DTYPES, check_tensor, shape_str
from ..matching import patch_matching

__all__ = ["PatchCorrespondenceLoss"]


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
