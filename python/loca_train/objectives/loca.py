"""LOCA (Caron et al. 2022): views from a batch, teacher targets, student predictions, the loss.

Library calls: relative_position_targets (which reference patch each query patch lies on),
masked_cross_attention (inside the student's CrossAttentionBlock, one visible run of
reference tokens shared by the batch), sinkhorn (teacher assignments over the whole group's
reference patches), gather_at_targets and LocaLoss (the three loss terms).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch

from loca_kernels import KeepRun, consecutive_keep, random_keep, relative_position_targets, sinkhorn
from loca_kernels.losses import LocaLoss
from loca_kernels.geometry import sample_boxes, sample_flips

from ..config import Config
from ..networks import LocaNet
from ..sampling import crop_options, sample_jitter, to_device
from ..views import make_views
from .objective import Objective


class Batch(NamedTuple):
    """One process's LOCA batch of one step. V = 1 + num_focal query views, in that order."""

    images: torch.Tensor        # uint8 (B, 3, H, W), each image top-left in the canvas (S x S, or
                                # the batch's largest height and width at full resolution)
    ref_boxes: torch.Tensor     # float (B, 4) x0, y0, x1, y1 in source pixels
    query_boxes: torch.Tensor   # float (B, V, 4)
    query_flips: torch.Tensor   # bool (B, V)
    query_kept: torch.Tensor    # int64 (B, query_tokens_kept): tokens of query 0 the encoder sees
    ref_visible_start: torch.Tensor  # int64 (1,): first visible reference token, shared by the batch
    jitter: torch.Tensor        # float (1 + V, B, 4): brightness, contrast, saturation, hue shift
    jitter_order: torch.Tensor  # int64 (1 + V, B, 4) order of the tf-style jitter (-1: none); empty for "fixed"
    grayscale: torch.Tensor     # bool (1 + V, B); row 0 is the reference view
    solarized: torch.Tensor     # bool (B,): first query views solarised
    bad_images: torch.Tensor    # int64 (n,): images that could not be decoded, replaced by others

    to = to_device


def reference_visible_tokens(cfg: Config) -> int:
    """Visible reference tokens: int(fraction * tokens) as in the official code (39 of 196)."""
    return max(1, int(cfg.reference_visible * (cfg.image_size // cfg.patch_size) ** 2))


def sample_batch(cfg: Config, canvas: torch.Tensor, sizes: torch.Tensor, bad_images: torch.Tensor,
                 g: torch.Generator) -> Batch:
    """Every random draw of a LOCA step: reference and query boxes, flips, the kept query
    tokens, the visible reference run, colour jitter, grey and solarisation."""
    batch, crops = canvas.shape[0], crop_options(cfg, g)
    ref_boxes = sample_boxes(batch, 1, sizes, cfg.reference_area, **crops)[:, 0]
    query_boxes = torch.cat([sample_boxes(batch, 1, sizes, cfg.query_area, **crops),
                             sample_boxes(batch, cfg.num_focal, sizes, cfg.focal_area, **crops)], dim=1)
    num_views = 1 + cfg.num_focal
    query_tokens = (cfg.image_size // cfg.patch_size) ** 2
    return Batch(
        images=canvas,
        ref_boxes=ref_boxes,
        query_boxes=query_boxes,
        query_flips=sample_flips(batch, num_views, generator=g),
        query_kept=random_keep(batch, query_tokens, cfg.query_tokens_kept, generator=g),
        ref_visible_start=consecutive_keep(1, query_tokens, reference_visible_tokens(cfg),
                                           generator=g, as_run=True).start,
        **sample_jitter(1 + num_views, batch, cfg, g),
        grayscale=torch.rand(1 + num_views, batch, generator=g) < cfg.grayscale,
        solarized=torch.rand(batch, generator=g) < cfg.solarize,
        bad_images=bad_images,
    )


def _patches_per_image(view_major: torch.Tensor, batch: int) -> torch.Tensor:
    """(V * B, N, ...) in view-major order -> (B, V * N, ...): the patches of each image together."""
    per_view = view_major.unflatten(0, (-1, batch)).transpose(0, 1)
    return per_view.flatten(1, 2)


def loca_forward(student, teacher_reference, loss_fn: LocaLoss, batch: Batch, cfg: Config,
                 group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss and metrics (detached scalars) of one step on `batch` (already on the device).

    student: LocaNet (or its DDP/compiled wrapper) called on the query views; teacher_reference:
    the teacher's LocaNet.reference. Run under autocast for mixed precision.
    """
    b = batch.images.shape[0]
    ref_grid, focal_grid = cfg.image_size // cfg.patch_size, cfg.focal_size // cfg.patch_size
    visible = reference_visible_tokens(cfg)
    jitter, gray = batch.jitter, batch.grayscale
    order = batch.jitter_order if cfg.jitter_style == "tf" else None

    def rows(start, stop):          # the tf-style jitter order of some views, None for "fixed"
        return None if order is None else order[start:stop]

    reference = make_views(batch.images, batch.ref_boxes[:, None], cfg.image_size, None, jitter[:1], gray[:1],
                           rows(0, 1))
    query = make_views(batch.images, batch.query_boxes[:, :1], cfg.image_size, batch.query_flips[:, :1],
                       jitter[1:2], gray[1:2], rows(1, 2), batch.solarized[None])
    focal = make_views(batch.images, batch.query_boxes[:, 1:], cfg.focal_size, batch.query_flips[:, 1:],
                       jitter[2:], gray[2:], rows(2, None))

    # Targets: which reference patch each query patch lies on (-1: outside the reference); the
    # scenic rule follows the pixels of views of image_size and focal_size.
    def pixels(size):
        return (size, size) if cfg.label_rule == "scenic" else None

    query_targets = relative_position_targets(
        batch.query_boxes[:, :1], batch.ref_boxes, (ref_grid, ref_grid), (ref_grid, ref_grid),
        query_flip=batch.query_flips[:, :1], rule=cfg.label_rule, query_size=pixels(cfg.image_size),
        backend=cfg.backend)
    query_targets = query_targets[:, 0].gather(1, batch.query_kept)                 # (B, n0)
    focal_targets = relative_position_targets(
        batch.query_boxes[:, 1:], batch.ref_boxes, (focal_grid, focal_grid), (ref_grid, ref_grid),
        query_flip=batch.query_flips[:, 1:], rule=cfg.label_rule, query_size=pixels(cfg.focal_size),
        backend=cfg.backend)                                                        # (B, Vf, nf)
    targets = torch.cat([query_targets, focal_targets.flatten(1)], dim=1)[:, None]   # (B, 1, n)

    with torch.no_grad():
        ref_tokens, ref_scores = teacher_reference(reference)                        # (B, R, dim), (B, R, K)
        assignments = sinkhorn(ref_scores.flatten(0, 1), epsilon=cfg.sharpening,
                               iterations=cfg.sinkhorn_iterations, group=group,
                               backend=cfg.backend).view_as(ref_scores)
    keep = KeepRun(batch.ref_visible_start, visible)
    out = student(query, batch.query_kept, focal, ref_tokens, keep)
    position_logits = torch.cat([out.position_logits,
                                 _patches_per_image(out.focal_position_logits, b)], dim=1)
    cluster_logits = torch.cat([out.cluster_logits,
                                _patches_per_image(out.focal_cluster_logits, b)], dim=1)
    loss, terms = loss_fn(position_logits[:, None], targets, cluster_logits[:, None], assignments)

    with torch.no_grad():
        valid = targets != loss_fn.ignore_index
        start = batch.ref_visible_start
        seen = valid & (targets >= start) & (targets < start + visible)
        correct = position_logits[:, None].argmax(-1) == targets
        metrics = {f"loss_{name}": value.detach() for name, value in terms.items()}
        metrics["loc_acc"] = (correct & valid).sum() / valid.sum().clamp_min(1)
        metrics["loc_acc_visible"] = (correct & seen).sum() / seen.sum().clamp_min(1)
        metrics["valid_patch_fraction"] = valid.float().mean()
    return loss, metrics


def make_criterion(cfg: Config, group, world_size: int) -> LocaLoss:
    return LocaLoss(student_temperature=cfg.student_temperature, group=group,
                    mean_entropy_over=cfg.mean_entropy_over)


def _forward(student, teacher_reference, loss_fn, batch, cfg, step, group):
    return loca_forward(student, teacher_reference, loss_fn, batch, cfg, group)


OBJECTIVE = Objective(
    name="loca", build_student=LocaNet,
    teacher_parts=("encoder", "cluster_head", "cross_block", "position_head"),   # the whole network
    teacher_method="reference", sample_batch=sample_batch, make_criterion=make_criterion, forward=_forward)
