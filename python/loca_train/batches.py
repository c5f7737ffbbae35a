"""Host side of the data: which images a step uses and every random draw of its views.

A batch is a pure function of (seed, step, rank): the images come from a per-epoch
permutation and the view boxes, flips, kept tokens, visible reference run and colour jitter
from a generator seeded with (seed, step, rank). So any number of loader workers gives the
same batches, and resuming at a step gives exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from loca_kernels import consecutive_keep, random_keep
from loca_kernels.targets.geometry import sample_boxes, sample_flips

from .config import Config
from .images import BadImage

# Official LOCA jitter strengths: brightness, contrast, saturation, hue.
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
# TF's default aspect_ratio_range of sample_distorted_bounding_box, which the official crops use.
TF_ASPECT_RANGE = (0.75, 1.33)


class Batch(NamedTuple):
    """One process's batch of one step. V = 1 + num_focal query views, in that order."""

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

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class StepBatches(torch.utils.data.Dataset):
    """Dataset indexed by step: item `step` is this rank's whole batch of that step."""

    def __init__(self, images, cfg: Config, rank: int = 0, world_size: int = 1):
        self.images, self.cfg, self.rank, self.world_size = images, cfg, rank, world_size
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.cfg.steps

    def _image_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.images))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.images), generator=g)
        return int(self._order[offset])

    def __getitem__(self, step: int) -> Batch:
        cfg, batch = self.cfg, self.cfg.batch_size
        first = (step * self.world_size + self.rank) * batch
        bad = []
        images = [self._decodable_image(self._image_index(first + i), bad) for i in range(batch)]
        g = step_generator(cfg.seed, step, self.rank)
        crops = dict(generator=g, sampler=cfg.crop_sampler)
        if cfg.crop_sampler == "tf":
            crops["aspect_range"] = TF_ASPECT_RANGE
        sizes = torch.tensor([tuple(image.shape[1:]) for image in images])      # (B, 2) height, width
        ref_boxes = sample_boxes(batch, 1, sizes, cfg.reference_area, **crops)[:, 0]
        query_boxes = torch.cat([sample_boxes(batch, 1, sizes, cfg.query_area, **crops),
                                 sample_boxes(batch, cfg.num_focal, sizes, cfg.focal_area, **crops)], dim=1)
        num_views = 1 + cfg.num_focal
        query_tokens = (cfg.image_size // cfg.patch_size) ** 2
        ref_tokens = query_tokens
        canvas = torch.zeros(batch, 3, *canvas_size(images, cfg.source_size), dtype=torch.uint8)
        for i, image in enumerate(images):
            canvas[i, :, :image.shape[1], :image.shape[2]] = image
        return Batch(
            images=canvas,
            ref_boxes=ref_boxes,
            query_boxes=query_boxes,
            query_flips=sample_flips(batch, num_views, generator=g),
            query_kept=random_keep(batch, query_tokens, cfg.query_tokens_kept, generator=g),
            ref_visible_start=consecutive_keep(1, ref_tokens, reference_visible_tokens(cfg),
                                               generator=g, as_run=True).start,
            **_jitter(1 + num_views, batch, cfg.color_jitter, cfg.jitter_style, g),
            grayscale=torch.rand(1 + num_views, batch, generator=g) < cfg.grayscale,
            solarized=torch.rand(batch, generator=g) < cfg.solarize,
            bad_images=torch.tensor(bad, dtype=torch.int64),
        )

    def _decodable_image(self, index: int, bad: list) -> torch.Tensor:
        """Image `index`, or when it cannot be decoded the next one (in file order) that can,
        with the skipped indices appended to `bad`: the batch stays a function of the step.
        The training loop decides whether skipping is allowed."""
        for _ in range(len(self.images)):
            try:
                return self.images[index]
            except BadImage:
                bad.append(index)
                index = (index + 1) % len(self.images)
        raise BadImage("no image of the data set can be decoded")


def reference_visible_tokens(cfg: Config) -> int:
    """Visible reference tokens: int(fraction * tokens) as in the official code (39 of 196)."""
    return max(1, int(cfg.reference_visible * (cfg.image_size // cfg.patch_size) ** 2))


def canvas_size(images, source_size: int):
    """(height, width) of a batch's canvas: S x S, or at full resolution (source_size 0) the
    largest height and width of the batch's images."""
    if source_size:
        return source_size, source_size
    return max(image.shape[1] for image in images), max(image.shape[2] for image in images)


def _jitter(views: int, batch: int, probability: float, style: str, g: torch.Generator) -> dict:
    """Batch fields jitter and jitter_order. Both styles draw each strength uniformly in
    [-s, s] around the identity; "fixed": factors (brightness, contrast and saturation around 1);
    "tf": brightness delta, contrast and saturation factors, hue delta, and an order per view."""
    strength = torch.tensor(JITTER_STRENGTH)
    factors = (torch.rand(views, batch, 4, generator=g) * 2 - 1) * strength
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    applied = torch.rand(views, batch, 1, generator=g) < probability
    if style == "fixed":
        factors[..., :3] += 1                  # multiplicative factors around 1, hue shift around 0
        return dict(jitter=torch.where(applied, factors, identity),
                    jitter_order=torch.zeros(0, dtype=torch.int64))
    factors[..., 1:3] += 1                     # additive brightness and hue, contrast/saturation factors
    identity[0] = 0.0
    order = torch.rand(views, batch, 4, generator=g).argsort(dim=-1)     # a uniform permutation
    return dict(jitter=torch.where(applied, factors, identity),
                jitter_order=torch.where(applied, order, torch.full_like(order, -1)))


def batch_loader(images, cfg: Config, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Batches of steps start_step, ..., cfg.steps - 1, decoded by cfg.num_workers processes."""
    dataset = StepBatches(images, cfg, rank, world_size)
    # Its own generator: creating the loader must not consume the global RNG (resumed runs
    # create it at another step than uninterrupted ones).
    return DataLoader(dataset, batch_size=None, sampler=range(start_step, cfg.steps),
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())
