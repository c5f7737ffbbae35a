"""Host-side random draws shared by the objectives' views: the per-step generator, crop-box
options and colour jitter. Every draw of a step comes from one generator seeded with
(seed, step, rank) (batches.py), so a batch is a pure function of the step."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import Config

# Official LOCA jitter strengths: brightness, contrast, saturation, hue.
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
# TF's default aspect_ratio_range of sample_distorted_bounding_box, which the official crops use.
TF_ASPECT_RANGE = (0.75, 1.33)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def crop_options(cfg: Config, g: torch.Generator) -> dict:
    """Keyword arguments of sample_boxes for cfg's crop sampler."""
    options = dict(generator=g, sampler=cfg.crop_sampler)
    if cfg.crop_sampler == "tf":
        options["aspect_range"] = TF_ASPECT_RANGE
    return options


def sample_jitter(views: int, batch: int, cfg: Config, g: torch.Generator,
                  strength: Sequence[float] = JITTER_STRENGTH) -> dict:
    """Batch fields jitter (views, batch, 4) and jitter_order of cfg.jitter_style. Both styles
    draw each strength uniformly in [-s, s] around the identity; "fixed": factors (brightness,
    contrast and saturation around 1); "tf": brightness delta, contrast and saturation factors,
    hue delta, and an order per view."""
    factors = (torch.rand(views, batch, 4, generator=g) * 2 - 1) * torch.tensor(strength)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    applied = torch.rand(views, batch, 1, generator=g) < cfg.color_jitter
    if cfg.jitter_style == "fixed":
        factors[..., :3] += 1                  # multiplicative factors around 1, hue shift around 0
        return dict(jitter=torch.where(applied, factors, identity),
                    jitter_order=torch.zeros(0, dtype=torch.int64))
    factors[..., 1:3] += 1                     # additive brightness and hue, contrast/saturation factors
    identity[0] = 0.0
    order = torch.rand(views, batch, 4, generator=g).argsort(dim=-1)     # a uniform permutation
    return dict(jitter=torch.where(applied, factors, identity),
                jitter_order=torch.where(applied, order, torch.full_like(order, -1)))


def to_device(batch, device: torch.device):
    """A batch NamedTuple of tensors with every field moved to `device` (the `to` of each
    objective's batch)."""
    return type(batch)(*(t.to(device, non_blocking=True) for t in batch))
