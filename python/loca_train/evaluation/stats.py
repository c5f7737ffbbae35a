"""Bootstrap intervals of the evaluation's scores, over test images and over runs (seeds).

A score is a function of totals over test images: every metric keeps, per test image, a row
of additive statistics (a sum and a count, or a confusion matrix), and its value is a
`statistic` of their sum over the images. A bootstrap sample draws the images with
replacement (and, when several runs are given, the runs, each run measured on the same test
images); one set of draws serves every source and metric, so differences between sources are
paired. Intervals are the 2.5 and 97.5 percentiles of BOOTSTRAP_SAMPLES samples.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, LEVEL = 2000, 0, 0.95


def ratio(totals: torch.Tensor) -> torch.Tensor:
    """(..., 2) totals (sum, count) -> the mean, nan where the count is 0."""
    return totals[..., 0] / totals[..., 1]


def mean_iou(totals: torch.Tensor) -> torch.Tensor:
    """(..., C * C) summed confusion matrices [truth, predicted] -> the mean IoU over the classes
    in the truth or predicted."""
    c = int(round(totals.shape[-1] ** 0.5))
    confusion = totals.unflatten(-1, (c, c))
    tp = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - tp
    present = union > 0
    return torch.where(present, tp / union.clamp_min(1e-12), 0).sum(-1) / present.sum(-1)


STATISTICS: Dict[str, Callable] = {"ratio": ratio, "mean_iou": mean_iou}


class Bootstrap:
    """The draws of one evaluation: `images` test images, `runs` runs."""

    def __init__(self, images: int, runs: int = 1, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED):
        if images < 1 or runs < 1:
            raise ValueError(f"Bootstrap: needs at least one image and one run, got images={images}, runs={runs}")
        g = torch.Generator().manual_seed(seed)
        draws = torch.randint(images, (samples, images), generator=g)
        self.weights = torch.zeros(samples, images, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(samples, images, dtype=torch.float64))                  # (B, n) counts
        self.runs = torch.randint(runs, (samples, runs), generator=g)                    # (B, R) run indices
        self.images, self.num_runs = images, runs

    def samples(self, per_image: torch.Tensor, statistic: Callable) -> torch.Tensor:
        """per_image (runs, images, k) or (images, k) -> (B,) bootstrap samples of the score:
        the mean over the drawn runs of statistic(the drawn images' totals)."""
        x = _runs(per_image, self.num_runs, self.images)
        totals = (self.weights @ x).transpose(0, 1)                                       # (B, R, k)
        per_run = statistic(totals)                                                       # (B, R)
        return per_run.gather(1, self.runs).nanmean(1)

    @staticmethod
    def value(per_image: torch.Tensor, statistic: Callable) -> float:
        """The score on the data as measured: the mean over runs of statistic(every image's totals)."""
        x = _runs(per_image, None, None)
        return float(statistic(x.sum(1)).nanmean())


def _runs(per_image: torch.Tensor, runs: Optional[int], images: Optional[int]) -> torch.Tensor:
    x = per_image.double()
    x = x[None] if x.dim() == 2 else x
    if x.dim() != 3 or (runs is not None and x.shape[:2] != (runs, images)):
        raise ValueError(f"Bootstrap: per_image must be (runs={runs}, images={images}, k) or (images, k), "
                         f"got {tuple(per_image.shape)}")
    return x


def interval(samples: torch.Tensor) -> tuple:
    """The LEVEL percentile interval of bootstrap samples (nan samples left out)."""
    kept = samples[~samples.isnan()]
    if not len(kept):
        return float("nan"), float("nan")
    q = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=kept.dtype)
    low, high = torch.quantile(kept, q).tolist()
    return low, high


def summarise(per_image: Dict[str, Dict[str, torch.Tensor]], kinds: Dict[str, str], bootstrap: Bootstrap,
              floor: Optional[str] = "noise", ceiling: Optional[str] = "ideal",
              references: tuple = (), raw: tuple = ()) -> dict:
    """Scores with intervals. per_image: {source: {metric: (runs, images, k) or (images, k)}};
    kinds: {metric: a STATISTICS name}. Returns {"scores": {source: {metric: {value, low, high,
    normalised: {value, low, high}}}}, "differences": {"a - b": {metric: {value, low, high}}}}:
    normalised = (score - floor's) / (ceiling's - floor's), paired draw by draw; differences
    of every source that is not a reference against each reference source present. Metrics in
    `raw` (where higher is not better) are not normalised."""
    samples, values = {}, {}
    for source, metrics in per_image.items():
        for metric, x in metrics.items():
            statistic = STATISTICS[kinds[metric]]
            samples[source, metric] = bootstrap.samples(x, statistic)
            values[source, metric] = bootstrap.value(x, statistic)

    def entry(value, draws):
        low, high = interval(draws)
        return {"value": value, "low": low, "high": high}

    scores = {}
    for (source, metric), draws in samples.items():
        e = entry(values[source, metric], draws)
        if metric not in raw and (floor, metric) in values and (ceiling, metric) in values:
            span = values[ceiling, metric] - values[floor, metric]
            draws_span = samples[ceiling, metric] - samples[floor, metric]
            e["normalised"] = entry((values[source, metric] - values[floor, metric]) / span if span else float("nan"),
                                    (draws - samples[floor, metric]) / draws_span)
        scores.setdefault(source, {})[metric] = e
    differences = {}
    for source in per_image:
        for reference in references:
            if reference == source or reference not in per_image or source in references:
                continue
            differences[f"{source} - {reference}"] = {
                metric: entry(values[source, metric] - values[reference, metric],
                              samples[source, metric] - samples[reference, metric])
                for metric in per_image[source] if (reference, metric) in values}
    return {"scores": scores, "differences": differences}
