"""GTSA (bok3948/GTSA, model_pretrain/gtsa.py, engine_pretrain.py, util/gtsa_transforms.py):
geometric-transformation-sensitive dense targets from turned multi-crops.

Views: 2 global crops (image_size, area reference_area) and num_focal local crops (focal_size,
area focal_area), each resampled until it overlaps the global crops before it by more than
min_overlap of the image (twice that between the two globals), as GTSATransforms; colour
jitter of GTSA's strength, grey, then a random quarter turn per view (sample_rotations). No
flips (GTSA has none).

Networks: the student is encoder -> projector -> predictor (GTSA's conv Projector: two 3x3
conv + channel LayerNorm + GELU blocks with residuals, a 1x1 conv to projection_dim; Predictor:
one such block without residual and a 1x1 conv) plus the RotationPredictor on the encoder's
tokens; the EMA teacher copies encoder and projector and sees the two global views.

Loss, for every (teacher global t, student view v != t) pair, averaged over the pairs:
  crop: minus the channel cosine of both maps pooled over the two crops' intersection
        (crop_features: every map pooled in the source orientation, so GTSA's rotation of the
        teacher's pooled map is built in; pool_global or pool_local bins by the student's view);
  correspondence: PatchCorrespondenceLoss on the student's predicted and the teacher's projected
        patches (num_matches_global / num_matches_local pairs per direction);
plus the cross-entropy of the quarter turn of every view. total = crop + w_c * correspondence +
w_r * rotation, with w_c = correspondence_weight (GTSA: 0.5) once the warm-up is over and 0
during it (GTSA: `pc_loss_coef = 0 unless warmup_epochs < epoch`; here the warmup_steps of the
learning rate) and w_r = rotation_weight (0.5).

Left out: Gaussian blur (views.py has none), GTSA's weight-decay schedule (0.04 to 0.4; constant
here) and its fp16 loss scaling.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loca_kernels import PatchCorrespondenceLoss, crop_features
from loca_kernels.geometry import intersection_boxes, sample_boxes, sample_rotations

from ..config import Config
from ..networks import GTSANet
from ..sampling import crop_options, sample_jitter, to_device
from ..views import make_views, rotate_views
from .objective import Objective

# GTSATransforms: ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with jitter_strength s = 1, p = 0.8.
JITTER_STRENGTH = (0.8, 0.8, 0.8, 0.2)
# Candidate crops drawn per view at once; GTSA redraws until one overlaps (sample_boxes' note).
OVERLAP_TRIES = 50


class Batch(NamedTuple):
    """One process's GTSA batch of one step. V = 2 + num_focal views: the two globals first."""

    images: torch.Tensor        # uint8 (B, 3, H, W) canvas
    boxes: torch.Tensor         # float (B, V, 4) x0, y0, x1, y1 in source pixels
    turns: torch.Tensor         # int64 (B, V) quarter turns (torch.rot90's k)
    jitter: torch.Tensor        # float (V, B, 4)
    jitter_order: torch.Tensor  # int64 (V, B, 4) tf-style order; empty for "fixed"
    grayscale: torch.Tensor     # bool (V, B)
    bad_images: torch.Tensor    # int64 (n,)

    to = to_device


def sample_batch(cfg: Config, canvas: torch.Tensor, sizes: torch.Tensor, bad_images: torch.Tensor,
                 g: torch.Generator) -> Batch:
    batch, crops = canvas.shape[0], crop_options(cfg, g)
    views = 2 + cfg.num_focal
    first = sample_boxes(batch, 1, sizes, cfg.reference_area, **crops)
    second = sample_boxes(batch, 1, sizes, cfg.reference_area, overlap_with=first[:, 0],
                          min_overlap=2 * cfg.min_overlap, tries=OVERLAP_TRIES, **crops)
    globals_ = torch.cat([first, second], dim=1)
    local = sample_boxes(batch, cfg.num_focal, sizes, cfg.focal_area, overlap_with=globals_,
                         min_overlap=cfg.min_overlap, tries=OVERLAP_TRIES, **crops)
    return Batch(images=canvas, boxes=torch.cat([globals_, local], dim=1),
                 turns=sample_rotations(batch, views, generator=g),
                 **sample_jitter(views, batch, cfg, g, JITTER_STRENGTH),
                 grayscale=torch.rand(views, batch, generator=g) < cfg.grayscale,
                 bad_images=bad_images)


def _tokens(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).transpose(1, 2)


def make_criterion(cfg: Config, group, world_size: int) -> nn.ModuleDict:
    """The correspondence terms of global and local students (no state to checkpoint)."""
    return nn.ModuleDict({"global_pairs": PatchCorrespondenceLoss(cfg.num_matches_global, backend=cfg.backend),
                          "local_pairs": PatchCorrespondenceLoss(cfg.num_matches_local, backend=cfg.backend)})


def gtsa_forward(student, teacher_fn, criterion: nn.ModuleDict, batch: Batch, cfg: Config, step: int, group=None):
    """Loss and metrics of one GTSA step (module docstring)."""
    b, locals_ = batch.images.shape[0], cfg.num_focal
    order = batch.jitter_order if cfg.jitter_style == "tf" else None
    turns = batch.turns.t()                                        # (V, B) view-major
    boxes = batch.boxes.transpose(0, 1)                            # (V, B, 4)

    def render(start, stop, size):
        views = make_views(batch.images, batch.boxes[:, start:stop], size, None, batch.jitter[start:stop],
                           batch.grayscale[start:stop], None if order is None else order[start:stop])
        return rotate_views(views, turns[start:stop].reshape(-1))

    global_views, local_views = render(0, 2, cfg.image_size), render(2, None, cfg.focal_size)
    student_global, student_local, rotation_logits = student(global_views, local_views)
    with torch.no_grad():
        teacher = teacher_fn(global_views)                         # (2B, D, g, g)
    global_boxes, local_boxes = boxes[:2].flatten(0, 1), boxes[2:].flatten(0, 1)
    global_turns, local_turns = turns[:2].reshape(-1), turns[2:].reshape(-1)

    def pool(maps, view_boxes, regions, side, view_turns):
        return crop_features(maps, view_boxes, regions, (side, side), view_rot90=view_turns, backend=cfg.backend)

    # Global pairs (t, 1 - t): both maps pooled over the globals' intersection.
    between, _ = intersection_boxes(boxes[0], boxes[1])
    between = between.repeat(2, 1)[:, None]                       # (2B, 1, 4)
    teacher_pooled = pool(teacher, global_boxes, between, cfg.pool_global, global_turns)
    student_pooled = pool(student_global, global_boxes, between, cfg.pool_global, global_turns)
    swap = lambda x: x.unflatten(0, (2, b)).flip(0).flatten(0, 1)  # noqa: E731  (view t <-> view 1 - t)
    crop_global = -F.cosine_similarity(swap(student_pooled), teacher_pooled, dim=2).mean()
    # Local pairs (t, v): teacher t over its intersection with local v, local v over the same region.
    regions, _ = intersection_boxes(boxes[:2, :, None], batch.boxes[None, :, 2:])      # (2, B, L, 4)
    teacher_pooled = pool(teacher, global_boxes, regions.flatten(0, 1), cfg.pool_local, global_turns)
    student_pooled = pool(student_local, local_boxes, regions.permute(2, 1, 0, 3).flatten(0, 1), cfg.pool_local,
                          local_turns)                              # (L B, 2, D, p, p)
    student_pooled = student_pooled.unflatten(0, (locals_, b)).permute(2, 1, 0, 3, 4, 5)   # (2, B, L, D, p, p)
    crop_local = -F.cosine_similarity(student_pooled, teacher_pooled.unflatten(0, (2, b)), dim=3).mean()

    teacher_tokens, local_tokens = _tokens(teacher), _tokens(student_local)
    correspondence_global = criterion["global_pairs"](_tokens(swap(student_global)), teacher_tokens)
    # Every (t, v) pair along the batch: local v's tokens beside teacher t's, (2 L B, n, D).
    correspondence_local = criterion["local_pairs"](
        local_tokens.unflatten(0, (locals_, b))[None].expand(2, -1, -1, -1, -1).flatten(0, 2),
        teacher_tokens.unflatten(0, (2, b))[:, None].expand(-1, locals_, -1, -1, -1).flatten(0, 2))
    # Each term is a mean over its pairs; GTSA averages over all 2 (1 + L) pairs alike.
    pairs = 2 * (1 + locals_)
    crop = (2 * crop_global + 2 * locals_ * crop_local) / pairs
    correspondence = (2 * correspondence_global + 2 * locals_ * correspondence_local) / pairs
    rotation_targets = turns.reshape(-1)
    rotation = F.cross_entropy(rotation_logits.float(), rotation_targets)
    weight = cfg.correspondence_weight if step >= cfg.warmup_steps else 0.0
    loss = crop + weight * correspondence + cfg.rotation_weight * rotation
    with torch.no_grad():
        metrics = {"loss_crop": crop.detach(), "loss_correspondence": correspondence.detach(),
                   "loss_rotation": rotation.detach(),
                   "rotation_acc": (rotation_logits.argmax(-1) == rotation_targets).float().mean()}
    return loss, metrics


OBJECTIVE = Objective(
    name="gtsa", build_student=GTSANet,
    teacher_parts=("encoder", "projector"),                       # GTSA's momentum encoder and projector
    teacher_method="target_maps", sample_batch=sample_batch, make_criterion=make_criterion, forward=gtsa_forward)
