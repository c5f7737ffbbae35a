"""MMC (Wu et al., "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding",
arXiv 2308.11448, 2023), built from the three terms its abstract names: "Masked image modelling
for encouraging similarity of local features, Momentum based self-distillation for transferring
semantics from global to local features, and global Contrast for promoting semantics of global
features". The paper's method section was not found with the project's search tools, so the
choices below are ours, each from the method the term is usually built on:

- views: 2 global crops (image_size, area reference_area) and num_focal local crops (focal_size,
  area focal_area), flips, colour jitter and grey (DINO's multi-crop; DINO's crop scales and
  96-pixel locals in the official preset).
- masked image modelling (SimMIM): mask_ratio of each global view's patches are replaced by a
  learnt mask token before the student's encoder; a linear decoder predicts each patch's
  (normalised) pixels and the loss is their L1 error over the masked patches. The paper leaves
  open whether pixels or teacher tokens are reconstructed, and the masking scheme (random
  patches here, SimMIM's 0.6).
- momentum self-distillation (DINO): the EMA teacher (encoder and heads) sees the unmasked
  global views; a DINO-style head (ClusteringHead: MLP, normalised bottleneck, normalised
  prototypes) on the mean patch token (the ViT has no class token) gives the teacher's centred,
  sharpened targets softmax((t - c) / teacher_temperature), which the student's
  log-softmax(s / student_temperature) of every other view (the masked globals and all locals)
  predicts (cross-entropy averaged over the (teacher global, other view) pairs). The centre c
  follows the teacher's mean output with center_momentum (DINO: 0.9, teacher 0.04, student 0.1).
- global contrast (MoCo v2): a projection MLP on the mean token; each masked global view's query
  against the teacher's key of the other global view, with a queue of earlier keys as negatives
  (queue_contrastive_loss, contrast_temperature 0.2); both views' keys are enqueued.
- total = mim_weight * mim + distill_weight * distill + contrast_weight * contrast (1 each: the
  abstract gives no weights). The centre and the queue are buffers of the criterion, saved in the
  checkpoint.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from loca_kernels import MMCLoss
from loca_kernels.geometry import sample_boxes, sample_flips

from ..config import Config, UsageError
from ..networks import MMCNet
from ..sampling import crop_options, sample_jitter, to_device
from ..views import make_views
from .objective import Objective


class Batch(NamedTuple):
    """One process's MMC batch of one step. V = 2 + num_focal views: the two globals first."""

    images: torch.Tensor        # uint8 (B, 3, H, W) canvas
    boxes: torch.Tensor         # float (B, V, 4) x0, y0, x1, y1 in source pixels
    flips: torch.Tensor         # bool (B, V)
    jitter: torch.Tensor        # float (V, B, 4)
    jitter_order: torch.Tensor  # int64 (V, B, 4) tf-style order; empty for "fixed"
    grayscale: torch.Tensor     # bool (V, B)
    masks: torch.Tensor         # bool (2, B, N): the global views' patches the student sees masked
    bad_images: torch.Tensor    # int64 (n,)

    to = to_device


def masked_count(cfg: Config) -> int:
    """Patches masked in each global view: round(mask_ratio * patches), at least 1."""
    return max(1, round(cfg.mask_ratio * (cfg.image_size // cfg.patch_size) ** 2))


def sample_batch(cfg: Config, canvas: torch.Tensor, sizes: torch.Tensor, bad_images: torch.Tensor,
                 g: torch.Generator) -> Batch:
    batch, crops = canvas.shape[0], crop_options(cfg, g)
    views, patches = 2 + cfg.num_focal, (cfg.image_size // cfg.patch_size) ** 2
    boxes = torch.cat([sample_boxes(batch, 2, sizes, cfg.reference_area, **crops),
                       sample_boxes(batch, cfg.num_focal, sizes, cfg.focal_area, **crops)], dim=1)
    chosen = torch.rand(2, batch, patches, generator=g).argsort(dim=-1)[..., :masked_count(cfg)]
    return Batch(images=canvas, boxes=boxes, flips=sample_flips(batch, views, generator=g),
                 **sample_jitter(views, batch, cfg, g),
                 grayscale=torch.rand(views, batch, generator=g) < cfg.grayscale,
                 masks=torch.zeros(2, batch, patches, dtype=torch.bool).scatter_(-1, chosen, True),
                 bad_images=bad_images)


def patch_pixels(views: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, (S / p)^2, 3 p^2): each patch's values, patches in raster order."""
    return views.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def make_criterion(cfg: Config, group, world_size: int) -> MMCLoss:
    keys = 2 * cfg.batch_size * world_size
    if cfg.queue_size % keys:
        raise UsageError(f"queue_size={cfg.queue_size} must be a multiple of the keys of a step, {keys} (2 global "
                         f"views x batch_size {cfg.batch_size} x {world_size} processes)")
    return MMCLoss(cfg.num_prototypes, cfg.projection_dim, cfg.queue_size,
                   student_temperature=cfg.student_temperature, teacher_temperature=cfg.teacher_temperature,
                   contrast_temperature=cfg.contrast_temperature, center_momentum=cfg.center_momentum,
                   mim_weight=cfg.mim_weight, distill_weight=cfg.distill_weight,
                   contrast_weight=cfg.contrast_weight, group=group, backend=cfg.backend)


def mmc_forward(student, teacher_fn, criterion: MMCLoss, batch: Batch, cfg: Config, step: int, group=None):
    """Loss and metrics of one MMC step (module docstring)."""
    order = batch.jitter_order if cfg.jitter_style == "tf" else None

    def render(start, stop, size):
        return make_views(batch.images, batch.boxes[:, start:stop], size, batch.flips[:, start:stop],
                          batch.jitter[start:stop], batch.grayscale[start:stop],
                          None if order is None else order[start:stop])

    global_views, local_views = render(0, 2, cfg.image_size), render(2, None, cfg.focal_size)
    masks = batch.masks.flatten(0, 1)                                           # (2B, N) view-major
    pixels, student_logits, queries = student(global_views, masks, local_views)
    with torch.no_grad():
        teacher_logits, keys = teacher_fn(global_views)
    loss, terms = criterion(pixels, patch_pixels(global_views, cfg.patch_size), masks, student_logits,
                            teacher_logits, queries, keys)
    return loss, {f"loss_{name}": value.detach() for name, value in terms.items()}


OBJECTIVE = Objective(
    name="mmc", build_student=MMCNet,
    teacher_parts=("encoder", "distill_head", "contrast_head"),
    teacher_method="targets", sample_batch=sample_batch, make_criterion=make_criterion, forward=mmc_forward)
