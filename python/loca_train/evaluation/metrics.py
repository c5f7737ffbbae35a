"""The metrics of one image (prompt segmentation, region similarities, confusion) and the
threshold protocol that turns per-image Jaccards into the reported one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..images import IGNORE_LABEL

# Thresholds of the prompt protocol: a pixel is in the predicted mask when its similarity to
# the prompt is above t.
THRESHOLDS = tuple(i / 10 for i in range(10))
# The metrics of the printed table (report.py), training logs and curves.
HEADLINE = ("prompt_jaccard", "prompt_threshold", "similarity_same", "similarity_different", "similarity_auc",
            "probe_miou")


def patch_majority(labels: torch.Tensor, grid) -> torch.Tensor:
    """The label covering most pixels of each patch of a (gh, gw) grid laid over labels (h, w);
    IGNORE_LABEL pixels are not counted, patches with no other pixel are IGNORE_LABEL. Ties:
    the lowest label."""
    labels = labels.long()
    valid = labels != IGNORE_LABEL
    labels = torch.where(valid, labels, 0)
    one_hot = F.one_hot(labels, int(labels.max()) + 1).float() * valid[..., None]
    counts = F.adaptive_avg_pool2d(one_hot.permute(2, 0, 1)[None], tuple(grid))[0]   # (L, gh, gw)
    majority = counts.argmax(0)
    return torch.where(counts.sum(0) > 0, majority, IGNORE_LABEL)


def patch_centres(grid, size) -> torch.Tensor:
    """(gh * gw, 2) float64 (y, x) pixel coordinates of the centres of a (gh, gw) patch grid over
    an image of `size` (h, w), in raster order: ((i + 0.5) h / gh, (j + 0.5) w / gw)."""
    (gh, gw), (h, w) = grid, size
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) * h / gh
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) * w / gw
    return torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).view(-1, 2)


def prompt_patch(inside: torch.Tensor, grid) -> Optional[int]:
    """The prompt of an object (inside: bool (h, w)): the raster index of the patch whose centre
    lies in the object (in a pixel of it) and is farthest from its border (the Euclidean
    distance to the nearest pixel centre outside it, beyond the image counting as outside).
    Ties: the lowest raster index. None when no patch centre lies in the object."""
    centres = patch_centres(grid, inside.shape)
    pixels = centres.floor().long()
    candidates = inside[pixels[:, 0], pixels[:, 1]]
    if not candidates.any():
        return None
    # Only outside pixels touching the object can be nearest to a point inside it.
    padded = F.pad(inside[None, None].float(), (1, 1, 1, 1))
    border = (F.max_pool2d(padded, 3, stride=1, padding=1) > 0) & (padded == 0)
    outside = border[0, 0].nonzero().double() - 1 + 0.5                                # pixel centres
    distance = torch.cdist(centres, outside).amin(1)
    distance[~candidates] = -1
    return int(distance.argmax())                  # argmax returns the first maximum


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """(C, gh, gw) patch maps -> (C, h, w) pixel maps, bilinear."""
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """(g, g, dim) -> (N, N) cosine similarities of the N = g * g patches (raster order)."""
    f = F.normalize(features.flatten(0, 1).float(), dim=-1)
    return f @ f.T


@dataclass
class PromptResult:
    jaccard: torch.Tensor        # (objects, thresholds)
    prompts: List[tuple]         # (object id, prompt patch) per object evaluated
    maps: torch.Tensor           # (objects, h, w) similarity maps
    skipped: int                 # objects without a patch centre inside


def prompt_segmentation(features: torch.Tensor, instances: torch.Tensor,
                        thresholds=THRESHOLDS) -> PromptResult:
    """Zero-shot prompt segmentation of every object of one image: features (g, g, dim),
    instances (h, w) (0 background, IGNORE_LABEL not counted)."""
    grid = features.shape[:2]
    instances = instances.long()
    valid = instances != IGNORE_LABEL
    cosine = cosine_matrix(features)
    ids = [int(i) for i in instances.unique() if i not in (0, IGNORE_LABEL)]
    prompts, skipped = [], 0
    for object_id in ids:
        patch = prompt_patch(instances == object_id, grid)
        if patch is None:
            skipped += 1
        else:
            prompts.append((object_id, patch))
    if not prompts:
        return PromptResult(torch.zeros(0, len(thresholds)), [], torch.zeros(0, *instances.shape), skipped)
    patches = torch.tensor([patch for _, patch in prompts])
    maps = upsample(cosine[patches].view(-1, *grid), instances.shape)                  # (n, h, w)
    truth = torch.stack([instances == object_id for object_id, _ in prompts])[:, None] & valid
    predicted = (maps[:, None] > torch.tensor(thresholds)[:, None, None]) & valid       # (n, T, h, w)
    intersection = (predicted & truth).sum((-2, -1))
    union = (predicted | truth).sum((-2, -1))
    return PromptResult(intersection / union, prompts, maps, skipped)


def region_pair_similarities(features: torch.Tensor, instances: torch.Tensor):
    """(same, different): cosines of the patch pairs of one image (no self-pairs) whose patches
    lie in one region (an object or the background, by patch_majority) and in two."""
    regions = patch_majority(instances, features.shape[:2]).flatten()
    cosine = cosine_matrix(features)
    i, j = torch.triu_indices(len(regions), len(regions), offset=1)
    counted = (regions[i] != IGNORE_LABEL) & (regions[j] != IGNORE_LABEL)
    same = regions[i] == regions[j]
    values = cosine[i, j]
    return values[counted & same], values[counted & ~same]


def roc_auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(positive > negative) + P(equal) / 2 (the Mann-Whitney statistic); nan when a side is empty."""
    n_pos, n_neg = len(positives), len(negatives)
    if not n_pos or not n_neg:
        return float("nan")
    values = torch.cat([positives, negatives]).double()
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    mean_rank = last_rank - (counts.double() - 1) / 2                # ties share their mean rank
    rank_sum = mean_rank[inverse[:n_pos]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, size: int = IGNORE_LABEL) -> torch.Tensor:
    """(size, size) counts [true class, predicted class] over the pixels whose truth is not IGNORE_LABEL."""
    truth, predicted = truth.long().flatten(), predicted.long().flatten()
    valid = truth != IGNORE_LABEL
    return torch.bincount(truth[valid] * size + predicted[valid], minlength=size * size).view(size, size)


def iou_per_class(confusion: torch.Tensor) -> Dict[int, float]:
    """IoU of every class that is in the truth or predicted somewhere."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    return {int(c): float(tp[c] / union[c]) for c in union.nonzero().flatten()}




def threshold_choice(selection: List[torch.Tensor], report: List[torch.Tensor]) -> dict:
    """The threshold of best mean Jaccard (over objects) on the selection images (ties: the
    lowest), and the mean Jaccard at it on the report images."""
    def means(jaccards):
        per_object = torch.cat(jaccards) if jaccards else torch.zeros(0, len(THRESHOLDS))
        return per_object.double().mean(0) if len(per_object) else torch.full((len(THRESHOLDS),), float("nan"))
    chosen, reported = means(selection), means(report)
    best = int(torch.nan_to_num(chosen, nan=-1).argmax())
    return {"prompt_jaccard": float(reported[best]), "prompt_threshold": THRESHOLDS[best],
            "prompt_jaccard_per_threshold": {f"{t:.1f}": float(v) for t, v in zip(THRESHOLDS, reported)},
            "prompt_jaccard_per_threshold_selection": {f"{t:.1f}": float(v) for t, v in zip(THRESHOLDS, chosen)}}
