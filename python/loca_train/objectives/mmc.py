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
import torch.nn.functional as F
from torch import nn

from loca_kernels import ClusteringHead, queue_contrastive_loss
from loca_kernels.losses import enqueue_keys, random_key_queue
from loca_kernels.sinkhorn.distributed import sum_over_ranks
from loca_kernels.targets.geometry import sample_boxes, sample_flips

from ..config import Config, UsageError
from ..model import Encoder, init_weights
from ..sampling import crop_options, sample_jitter, to_device
from ..views import make_views
from . import Objective


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


class MMCNet(nn.Module):
    """Encoder, mask token, pixel decoder, distillation head and contrast head.

    forward(global_views (2B, 3, S, S), masks (2B, N), local_views (L B, 3, s, s)) ->
    (predicted pixels (2B, N, 3 p^2), distillation logits ((2 + L) B, K), contrast queries (2B, D)).
    targets(global_views) -> (distillation logits (2B, K), contrast keys (2B, D)): the teacher's side.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        dim = cfg.embed_dim
        self.encoder = Encoder(cfg)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.decoder = nn.Linear(dim, 3 * cfg.patch_size ** 2)    # SimMIM's one-layer prediction head
        self.distill_head = ClusteringHead(dim, cfg.num_prototypes, hidden_dim=cfg.head_hidden_dim,
                                           bottleneck_dim=cfg.head_bottleneck_dim)
        # MoCo v2's projection: fc-ReLU-fc.
        self.contrast_head = nn.Sequential(nn.Linear(dim, cfg.head_hidden_dim), nn.ReLU(),
                                           nn.Linear(cfg.head_hidden_dim, cfg.projection_dim))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, global_views: torch.Tensor, masks: torch.Tensor, local_views: torch.Tensor):
        global_tokens = self.encoder(global_views, mask=masks, mask_token=self.mask_token)
        pooled = global_tokens.mean(dim=1)
        logits = self.distill_head(torch.cat([pooled, self.encoder(local_views).mean(dim=1)]))
        return self.decoder(global_tokens), logits, self.contrast_head(pooled)

    def targets(self, global_views: torch.Tensor):
        pooled = self.encoder(global_views).mean(dim=1)
        return self.distill_head(pooled), self.contrast_head(pooled)


def patch_pixels(views: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, (S / p)^2, 3 p^2): each patch's values, patches in raster order."""
    return views.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


class MMCLoss(nn.Module):
    """The three MMC terms (module docstring); buffers `center` (K,), `queue` (D, queue_size)
    and `queue_ptr` are the state a resumed run continues from.

    forward(pixels, target_pixels, masks, student_logits, teacher_logits, queries, keys) with
    pixels, target_pixels (2B, N, 3 p^2), masks (2B, N) bool, student_logits ((2 + L) B, K),
    teacher_logits (2B, K), queries and keys (2B, D), views major. Returns (total, terms)."""

    def __init__(self, cfg: Config, group=None):
        super().__init__()
        self.cfg, self.group = cfg, group
        self.register_buffer("center", torch.zeros(cfg.num_prototypes))
        self.register_buffer("queue", random_key_queue(cfg.projection_dim, cfg.queue_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def forward(self, pixels, target_pixels, masks, student_logits, teacher_logits, queries, keys):
        cfg, b = self.cfg, queries.shape[0] // 2
        error = (pixels.float() - target_pixels.float()).abs().mean(dim=-1)
        mim = torch.where(masks, error, 0.0).sum() / masks.sum().clamp_min(1)

        targets = F.softmax((teacher_logits.float() - self.center) / cfg.teacher_temperature, dim=-1)
        log_p = F.log_softmax(student_logits.float() / cfg.student_temperature, dim=-1)
        cross = -torch.einsum("tbk,vbk->tvb", targets.unflatten(0, (2, b)), log_p.unflatten(0, (-1, b))).mean(-1)
        same_view = torch.eye(2, log_p.shape[0] // b, dtype=torch.bool, device=cross.device)
        distill = torch.where(same_view, 0.0, cross).sum() / (cross.numel() - 2)

        queries = F.normalize(queries.float(), dim=-1)
        with torch.no_grad():
            keys = F.normalize(keys.float(), dim=-1)
            queue = self.queue.clone()
        positives = keys.unflatten(0, (2, b)).flip(0).flatten(0, 1)            # the other global view's key
        contrast = queue_contrastive_loss(queries, positives, queue.t(), temperature=cfg.contrast_temperature,
                                          backend=cfg.backend)
        self._update(teacher_logits.detach().float(), keys)
        total = cfg.mim_weight * mim + cfg.distill_weight * distill + cfg.contrast_weight * contrast
        return total, {"mim": mim, "distill": distill, "contrast": contrast}

    @torch.no_grad()
    def _update(self, teacher_logits: torch.Tensor, keys: torch.Tensor) -> None:
        totals = torch.cat([teacher_logits.sum(dim=0), teacher_logits.new_full((1,), teacher_logits.shape[0])])
        if self.group is not None:
            totals = sum_over_ranks(totals, self.group)
        self.center.lerp_(totals[:-1] / totals[-1], 1 - self.cfg.center_momentum)
        enqueue_keys((self.queue,), self.queue_ptr, (keys,), self.group)


def make_criterion(cfg: Config, group, world_size: int) -> MMCLoss:
    keys = 2 * cfg.batch_size * world_size
    if cfg.queue_size % keys:
        raise UsageError(f"queue_size={cfg.queue_size} must be a multiple of the keys of a step, {keys} (2 global "
                         f"views x batch_size {cfg.batch_size} x {world_size} processes)")
    return MMCLoss(cfg, group)


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
