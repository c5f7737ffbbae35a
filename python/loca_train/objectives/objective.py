"""What the training loop (train.py) needs to know of an objective."""
from __future__ import annotations

from typing import Callable, NamedTuple, Tuple


class Objective(NamedTuple):
    """One objective's parts.

    build_student(cfg) -> nn.Module: the student, encoder + the objective's heads; its
        `encoder` attribute is the ViT (model.Encoder) that evaluate and export read.
    teacher_parts: names of the student's child modules the EMA teacher copies (the momentum
        encoder and heads); the teacher's state_dict keys are the student's for those parts.
    teacher_method: the teacher's method forward() is given (compiled with --compile).
    sample_batch(cfg, canvas, sizes, bad_images, generator) -> NamedTuple of tensors with
        fields images and bad_images and a `to(device)` method: every random view parameter
        of one step, drawn in the DataLoader from the step's generator only.
    make_criterion(cfg, group, world_size) -> nn.Module: the loss; its state_dict (e.g.
        DenseCL's queues) is saved in the checkpoint and restored on resume.
    forward(student, teacher_fn, criterion, batch, cfg, step, group) -> (loss, metrics):
        one step's loss and detached scalar metrics; `student` is the (DDP/compiled) student,
        called once per step.
    """

    name: str
    build_student: Callable
    teacher_parts: Tuple[str, ...]
    teacher_method: str
    sample_batch: Callable
    make_criterion: Callable
    forward: Callable
