"""DenseCL (Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training",
CVPR 2021; code WXinlong/DenseCL, openselfsup/models/densecl.py and necks.py DenseCLNeck) on the
ViT: the patch tokens take the place of the ResNet C5 grid.

Two views of each image (RandomResizedCrop at image_size, area reference_area, flip, colour
jitter, grey); the student encodes the first (the query), the EMA teacher (DenseCL's momentum
encoder, a copy of encoder and both heads) the second (the key). A global head (an MLP on the
mean of the patch tokens: DenseCL's average-pooled fc-ReLU-fc) and a dense head (the same MLP
on every token: DenseCL's 1x1 conv-ReLU-1x1 conv) project to projection_dim. DenseContrastiveLoss
matches each query patch to its most similar key patch on the encoders' patch tokens (as
DenseCL on backbone features) and holds the two queues, which the checkpoint saves.

Left out: DenseCL's Gaussian blur (views.py has none) and its SGD optimiser (the trainer's
AdamW serves every objective).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from loca_kernels.losses import DenseContrastiveLoss
from loca_kernels.geometry import sample_boxes, sample_flips

from ..config import Config, UsageError
from ..networks import DenseCLNet
from ..sampling import crop_options, sample_jitter, to_device
from ..views import make_views
from .objective import Objective

# DenseCL's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1), applied with p=0.8.
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)


class Batch(NamedTuple):
    """One process's DenseCL batch of one step: view 0 is the query, view 1 the key."""

    images: torch.Tensor        # uint8 (B, 3, H, W) canvas
    boxes: torch.Tensor         # float (B, 2, 4) x0, y0, x1, y1 in source pixels
    flips: torch.Tensor         # bool (B, 2)
    jitter: torch.Tensor        # float (2, B, 4)
    jitter_order: torch.Tensor  # int64 (2, B, 4) tf-style order; empty for "fixed"
    grayscale: torch.Tensor     # bool (2, B)
    bad_images: torch.Tensor    # int64 (n,)

    to = to_device


def sample_batch(cfg: Config, canvas: torch.Tensor, sizes: torch.Tensor, bad_images: torch.Tensor,
                 g: torch.Generator) -> Batch:
    batch = canvas.shape[0]
    return Batch(images=canvas,
                 boxes=sample_boxes(batch, 2, sizes, cfg.reference_area, **crop_options(cfg, g)),
                 flips=sample_flips(batch, 2, generator=g),
                 **sample_jitter(2, batch, cfg, g, JITTER_STRENGTH),
                 grayscale=torch.rand(2, batch, generator=g) < cfg.grayscale,
                 bad_images=bad_images)


def make_criterion(cfg: Config, group, world_size: int) -> DenseContrastiveLoss:
    global_batch = cfg.batch_size * world_size
    if cfg.queue_size % global_batch:
        raise UsageError(f"queue_size={cfg.queue_size} must be a multiple of the global batch "
                         f"{global_batch} (batch_size {cfg.batch_size} x {world_size} processes)")
    return DenseContrastiveLoss(cfg.projection_dim, cfg.queue_size, temperature=cfg.contrast_temperature,
                                dense_weight=cfg.dense_weight, group=group, backend=cfg.backend)


def densecl_forward(student, teacher_fn, criterion: DenseContrastiveLoss, batch: Batch, cfg: Config,
                    step: int, group=None):
    """Loss and metrics of one DenseCL step: the query view through the student, the key view
    through the momentum encoder, DenseContrastiveLoss (which enqueues the keys)."""
    b = batch.images.shape[0]
    order = batch.jitter_order if cfg.jitter_style == "tf" else None
    views = make_views(batch.images, batch.boxes, cfg.image_size, batch.flips, batch.jitter, batch.grayscale, order)
    query_tokens, query_global, query_dense = student(views[:b])
    with torch.no_grad():
        key_tokens, key_global, key_dense = teacher_fn(views[b:])
    loss, terms = criterion(query_global, query_dense, key_global, key_dense, query_tokens, key_tokens)
    return loss, {f"loss_{name}": value.detach() for name, value in terms.items()}


OBJECTIVE = Objective(
    name="densecl", build_student=DenseCLNet,
    teacher_parts=("encoder", "global_head", "dense_head"),       # DenseCL's momentum encoder
    teacher_method="forward", sample_batch=sample_batch, make_criterion=make_criterion, forward=densecl_forward)
