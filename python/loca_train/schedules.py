"""Learning-rate and teacher-momentum schedules, both functions of the step alone (so a resumed
run follows them exactly), and the EMA update of the teacher."""
from __future__ import annotations

import math

import torch

from .config import Config


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def teacher_momentum(cfg: Config, step: int) -> float:
    """EMA momentum: cfg.teacher_momentum at step 0, rising to 1 on a cosine at the last step
    (teacher_momentum_schedule "cosine", as LOCA, DINO and GTSA), or cfg.teacher_momentum
    throughout ("constant", as MoCo and DenseCL)."""
    if cfg.teacher_momentum_schedule == "constant":
        return cfg.teacher_momentum
    return 1 - (1 - cfg.teacher_momentum) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


@torch.no_grad()
def update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter; the
    teacher may hold only some of the student's parts (paired by name)."""
    source = dict(student.named_parameters())
    targets = list(teacher.named_parameters())
    torch._foreach_lerp_([p for _, p in targets], [source[name] for name, _ in targets], 1 - momentum)
