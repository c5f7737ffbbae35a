"""Control feature sources measured beside every network, so that a score can be read against
what no learning gives (docs/EVALUATION.md):

- noise: i.i.d. Gaussian features, no information (a score's floor);
- position: a fixed smooth code of the patch's grid position, the same for every image;
- colour: the patch's mean colour (3 numbers);
- ideal: the true labels (the metric's ceiling).

Each is a function of normalised images (B, 3, S, S) -> features (B, g, g, dim) at the
encoder's patch grid, as the encoders are; `ideal` needs the scenes' ground truth instead (a
TruthFeatures, called with the scenes and the grid).
"""
from __future__ import annotations

import functools
import zlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..images import IGNORE_LABEL

NOISE_DIM, NOISE_SEED = 64, 0
# The position code: Gaussian bumps of this width (fraction of the image side) centred on a
# POSITION_CENTRES x POSITION_CENTRES grid, so that two patches' cosine falls smoothly with
# their distance.
POSITION_CENTRES, POSITION_WIDTH = 6, 0.15


def noise_features(patch: int, dim: int = NOISE_DIM, seed: int = NOISE_SEED) -> Callable:
    """i.i.d. standard normal features (B, g, g, dim) on the grid of `patch`-pixel patches, drawn
    from a generator seeded with (seed, the image's bytes): the same image always gets the same
    noise, whatever the order of the calls."""
    def features(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = []
        for image in x.cpu():
            g = torch.Generator().manual_seed(zlib.crc32(image.numpy().tobytes(), seed))
            out.append(torch.randn(h // patch, w // patch, dim, generator=g))
        return torch.stack(out).to(x.device)
    return features


def position_code(grid: Sequence[int]) -> torch.Tensor:
    """The fixed code of every patch of a (gh, gw) grid: (gh, gw, POSITION_CENTRES ** 2)."""
    gh, gw = grid
    y = (torch.arange(gh) + 0.5) / gh
    x = (torch.arange(gw) + 0.5) / gw
    centres = (torch.arange(POSITION_CENTRES) + 0.5) / POSITION_CENTRES
    bump_y = torch.exp(-(y[:, None] - centres) ** 2 / (2 * POSITION_WIDTH ** 2))     # (gh, C)
    bump_x = torch.exp(-(x[:, None] - centres) ** 2 / (2 * POSITION_WIDTH ** 2))     # (gw, C)
    return (bump_y[:, None, :, None] * bump_x[None, :, None, :]).flatten(2)


def position_features(x: torch.Tensor, patch: int) -> torch.Tensor:
    b, _, h, w = x.shape
    return position_code((h // patch, w // patch)).to(x.device).expand(b, -1, -1, -1)


def colour_features(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch's mean (normalised) colour: (B, g, g, 3)."""
    return F.avg_pool2d(x, patch).permute(0, 2, 3, 1)


class TruthFeatures:
    """The ideal control: per patch, the fraction of its pixels in each class, then in each
    instance (when the scene has instances): features (B, g, g, classes + instances). Two
    patches of one instance have cosine 1, of two instances of one class 1/2, of two classes 0."""

    needs_truth = True

    def __init__(self, num_classes: int, num_instances: int = IGNORE_LABEL):
        self.num_classes, self.num_instances = num_classes, num_instances

    def __call__(self, scenes, grid: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.one(classes, instances, grid) for _, instances, classes in scenes])

    def one(self, classes: torch.Tensor, instances: Optional[torch.Tensor], grid) -> torch.Tensor:
        parts = [_fractions(classes, self.num_classes, grid)]
        if instances is not None:
            parts.append(_fractions(instances, self.num_instances, grid))
        return torch.cat(parts, -1)


def _fractions(labels: torch.Tensor, count: int, grid) -> torch.Tensor:
    """(h, w) labels -> (gh, gw, count): the fraction of each patch's counted pixels with each
    label (IGNORE_LABEL and labels >= count not counted); pixel (y, x) lies in patch
    (y gh // h, x gw // w)."""
    h, w = labels.shape
    gh, gw = grid
    labels = labels.long()
    kept = labels < count
    patch = (torch.arange(h)[:, None] * gh // h) * gw + torch.arange(w)[None, :] * gw // w
    counts = torch.bincount((patch * count + labels)[kept], minlength=gh * gw * count).view(gh, gw, count).float()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def control_sources(patch: int, num_classes: int, num_instances: int = IGNORE_LABEL) -> dict:
    """The controls, by name, on the grid of `patch`-pixel patches."""
    return {"noise": noise_features(patch), "position": functools.partial(position_features, patch=patch),
            "colour": functools.partial(colour_features, patch=patch),
            "ideal": TruthFeatures(num_classes, num_instances)}
