"""The evaluation's scores with their controls, a validation split and bootstrap intervals
(docs/EVALUATION.md, "Scores with controls and intervals").

Per feature source (the encoders and the controls of controls.py), on a split with probe,
validation and test images:

- prompt segmentation, for two targets: the prompted object ("object") and every instance
  of its class in the image ("class"). Per object: the similarity map's Jaccard at the
  threshold chosen on the validation images over THRESHOLD_GRID (the whole cosine range),
  its ROC AUC over the pixels (threshold-free), the same AUC at matched distances (target
  pixels compared only with other pixels as far from the prompt: what a code of position
  alone cannot tell), and its best Jaccard over every threshold (MMC's threshold given with
  the prompt);
- intra/inter-region similarity of the patch pairs of one image: mean cosines and the
  probability that a same-region pair is more similar than a two-region pair (AUC),
  with the background as a region, without it (object patches only), and at matched
  distances (only pairs the same grid distance apart are compared);
- the linear probe's mIoU (probe.py) trained on the probe images.

Every score is kept per test image as additive rows so that stats.Bootstrap gives its interval;
`combine` pools the rows of several runs' eval.json (`python -m loca_train.evaluate --combine`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..config import UsageError
from ..images import IGNORE_LABEL
from .controls import control_sources
from .data import encoder_features, random_init_encoder, raw_pixel_features
from .metrics import confusion_matrix, cosine_matrix, patch_centres, patch_majority, prompt_patch, upsample
from .runner import Progress, scenes_and_features, torch_threads, train_probes
from .stats import Bootstrap, summarise

# Thresholds searched on the validation images: the whole cosine range in steps of 0.025.
THRESHOLD_GRID = torch.linspace(-1, 1, 81)
TARGETS = ("object", "class")
# Sources the networks are compared with (paired differences).
REFERENCES = ("random_init", "raw_pixels", "noise", "position", "colour", "ideal")
KINDS = {**{f"prompt_{t}_{m}": "ratio" for t in TARGETS
            for m in ("jaccard", "auroc", "auroc_matched_distance", "best_jaccard")},
         **{f"similarity_{m}": "ratio" for m in ("same", "different", "auc", "same_objects", "different_objects",
                                                  "auc_objects", "auc_matched_distance")},
         "probe_miou": "mean_iou"}
# Mean cosines: higher is not better, so they are not normalised between noise and ideal.
RAW = tuple(f"similarity_{m}" for m in ("same", "different", "same_objects", "different_objects"))


# ------------------------------------------------------------------ ranks

def grouped_mann_whitney(values: torch.Tensor, positive: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Within each group, U = the number of (positive, negative) pairs whose positive is larger
    (ties count one half), and the number of such pairs: two (num_groups,) float64 tensors."""
    values, groups = values.double().flatten(), groups.long().flatten()
    positive = positive.flatten()
    # One sort by group, then value: the values scaled into [0, 1) ride on 2 * group (equal values
    # stay equal, and float64 keeps values float32 can tell apart distinct at these magnitudes).
    low, span = (values.min(), values.max() - values.min()) if len(values) else (0.0, 0.0)
    order = torch.sort(groups * 2.0 + (values - low) / (span * 1.0001 + 1e-30)).indices
    v, g, p = values[order], groups[order], positive[order]
    change = torch.ones(len(v), dtype=torch.bool)
    change[1:] = (v[1:] != v[:-1]) | (g[1:] != g[:-1])
    run = change.cumsum(0) - 1
    position = torch.arange(len(v), dtype=torch.float64)
    first = torch.zeros(int(run[-1]) + 1 if len(v) else 0, dtype=torch.float64).scatter_reduce_(
        0, run, position, "amin", include_self=False)
    last = torch.zeros_like(first).scatter_reduce_(0, run, position, "amax", include_self=False)
    rank = (first[run] + last[run]) / 2                                             # 0-based mid-rank
    group_start = torch.zeros(num_groups, dtype=torch.float64).scatter_reduce_(
        0, g, position, "amin", include_self=False)
    rank = rank - group_start[g] + 1                                                # 1-based within group
    n_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, p.double())
    n_all = torch.bincount(g, minlength=num_groups).double()
    rank_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, rank * p)
    return rank_sum - n_pos * (n_pos + 1) / 2, n_pos * (n_all - n_pos)


# ------------------------------------------------------------------ per image

def jaccard_curves(maps: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor = THRESHOLD_GRID):
    """maps (n, P), truth (n, P) bool over the counted pixels -> (Jaccard at each threshold
    (n, T): the mask is map > t; the best Jaccard over every threshold (n,))."""
    ordered, order = maps.double().sort(1, descending=True)
    hits = truth.gather(1, order).double().cumsum(1)                                   # TP of the top k
    size = torch.arange(1, maps.shape[1] + 1, dtype=torch.float64)
    total = truth.sum(1, keepdim=True).double()
    jaccard = hits / (size + total - hits)
    cut = torch.ones_like(truth)
    cut[:, :-1] = ordered[:, :-1] != ordered[:, 1:]                                     # no cut inside ties
    best = torch.where(cut, jaccard, 0).amax(1)
    ascending = ordered.flip(1).contiguous()
    levels = thresholds.double()[None].expand(len(maps), -1).contiguous()
    above = maps.shape[1] - torch.searchsorted(ascending, levels, right=True)           # (n, T) pixels > t
    tp = torch.where(above > 0, hits.gather(1, (above - 1).clamp_min(0)), 0)
    curves = tp / (above + total - tp)
    return curves, best


def prompt_distances(prompts: list, grid, size) -> torch.Tensor:
    """(n, h, w) the distance in pixels from each pixel's centre to the centre of each prompt
    patch (prompts: [(object id, raster index of its prompt patch)])."""
    centre = patch_centres(grid, size)[[p for _, p in prompts]][:, :, None, None]        # (n, 2, 1, 1)
    h, w = size
    y, x = torch.arange(h, dtype=torch.float64)[:, None] + 0.5, torch.arange(w, dtype=torch.float64) + 0.5
    return ((y - centre[:, 0]) ** 2 + (x - centre[:, 1]) ** 2).sqrt()


def prompt_scores(features: torch.Tensor, instances: torch.Tensor, classes: torch.Tensor,
                  thresholds: torch.Tensor = THRESHOLD_GRID) -> dict:
    """Per target: (curves (n, T), auroc (n,), (U, pairs) at matched distances (n, 2), best
    (n,), maps (n, h, w), prompts [(id, patch)]) of every object of one image with a patch
    centre inside. Matched distances: a target pixel is only compared with the other pixels
    in its one-pixel-wide ring of distance from the prompt patch's centre."""
    grid = features.shape[:2]
    instances, classes = instances.long(), classes.long()
    cosine = cosine_matrix(features)
    prompts = [(i, p) for i in instances.unique().tolist() if i not in (0, IGNORE_LABEL)
               for p in [prompt_patch(instances == i, grid)] if p is not None]
    out = {}
    if not prompts:
        return out
    maps = upsample(cosine[[p for _, p in prompts]].view(-1, *grid), instances.shape)    # (n, h, w)
    rings = prompt_distances(prompts, grid, instances.shape).long()                     # (n, h, w)
    for target in TARGETS:
        if target == "object":
            truth = torch.stack([instances == i for i, _ in prompts])
            counted = instances != IGNORE_LABEL
        else:
            truth = torch.stack([classes == classes[instances == i].mode().values for i, _ in prompts])
            counted = (classes != IGNORE_LABEL) & (instances != IGNORE_LABEL)
        m, t = maps[:, counted], truth[:, counted]
        curves, best = jaccard_curves(m, t, thresholds)
        rows = torch.arange(len(prompts))[:, None].expand_as(m)
        u, pairs = grouped_mann_whitney(m, t, rows, len(prompts))
        ring = rings[:, counted]
        ring_count = int(ring.max()) + 1
        u_ring, pairs_ring = grouped_mann_whitney(m, t, rows * ring_count + ring, len(prompts) * ring_count)
        matched = torch.stack([u_ring.view(-1, ring_count).sum(1), pairs_ring.view(-1, ring_count).sum(1)], 1)
        out[target] = (curves, u / pairs, matched, best, maps, prompts)
    return out


def pair_scores(features: torch.Tensor, instances: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The similarity rows (sum, count) of one image: mean cosine of same- and two-region pairs
    and the within-image AUC (U, pairs), with the background, over objects only, and at matched
    distances (pairs compared only with pairs as far apart on the grid)."""
    gh, gw = features.shape[:2]
    regions = patch_majority(instances, (gh, gw)).flatten()
    cosine = cosine_matrix(features)
    i, j = torch.triu_indices(len(regions), len(regions), offset=1)
    counted = (regions[i] != IGNORE_LABEL) & (regions[j] != IGNORE_LABEL)
    i, j = i[counted], j[counted]
    same, values = regions[i] == regions[j], cosine[i, j].double()
    objects = (regions[i] != 0) & (regions[j] != 0)
    distance = (i // gw - j // gw) ** 2 + (i % gw - j % gw) ** 2
    rows = {}
    for suffix, kept in (("", torch.ones_like(same)), ("_objects", objects)):
        s, v = same[kept], values[kept]
        rows[f"similarity_same{suffix}"] = torch.stack([v[s].sum(), s.sum().double()])
        rows[f"similarity_different{suffix}"] = torch.stack([v[~s].sum(), (~s).sum().double()])
        u, pairs = grouped_mann_whitney(v, s, torch.zeros_like(v, dtype=torch.long), 1)
        rows[f"similarity_auc{suffix}"] = torch.stack([u[0], pairs[0]])
    u, pairs = grouped_mann_whitney(values, same, distance, int(distance.max()) + 1 if len(distance) else 1)
    rows["similarity_auc_matched_distance"] = torch.stack([u.sum(), pairs.sum()])
    return rows


# ------------------------------------------------------------------ the evaluation

@dataclass
class Measurement:
    """Per source: per-test-image rows of every metric, the thresholds chosen on validation,
    and the data of the figure's examples."""

    per_image: Dict[str, Dict[str, torch.Tensor]]
    thresholds: Dict[str, Dict[str, float]]
    examples: List[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def measure(sources: dict, split, cfg, device="cpu", batch_size: int = 64, progress: bool = False,
            examples: int = 0) -> Measurement:
    """Every score of every source on `split` (data.EvalSplit; its `validation` images, or the
    probe's when it has none, choose the thresholds)."""
    threads = torch.get_num_threads()
    validation = split.validation or split.probe
    with torch_threads(1):
        bar = Progress(len(split.probe) + len(validation) + len(split.test), progress)

        def scenes(indices, what):
            return scenes_and_features(split, indices, sources, cfg, device, batch_size, bar, what, threads)

        probes, _, num_classes = train_probes(scenes(split.probe, "probe"), cfg, split.description)
        chosen, objects = _choose_thresholds(scenes(validation, "validation"), sources)
        # Test classes the probe never saw are counted in one extra row (as misses).
        size = max(num_classes, len(split.class_names or ()))
        per_image, shown, prompted = _score_test(scenes(split.test, "test"), probes, chosen, size, examples)
    thresholds = {name: {t: round(float(THRESHOLD_GRID[k]), 4) for t, k in c.items()} for name, c in chosen.items()}
    counts = {"probe_images": len(split.probe), "validation_images": len(validation),
              "test_images": len(split.test), "validation_objects": objects, "test_objects_prompted": prompted,
              "num_classes": num_classes}
    return Measurement(per_image, thresholds, shown, counts)


def _choose_thresholds(scenes, names):
    """Per source (`names`) and target, the index in THRESHOLD_GRID of the best mean Jaccard
    over the validation objects (ties: the lowest); and the number of validation objects."""
    sums = {(name, t): torch.zeros(len(THRESHOLD_GRID), dtype=torch.float64) for name in names for t in TARGETS}
    objects = 0
    for scene, features in scenes:
        if scene[1] is None:
            continue
        for k, (name, f) in enumerate(features.items()):
            for target, (curves, *_) in prompt_scores(f, scene[1], scene[2]).items():
                sums[name, target] += curves.sum(0)
                objects += len(curves) if k == 0 and target == "object" else 0
    return {name: {t: int(sums[name, t].argmax()) for t in TARGETS} for name in names}, objects


def _score_test(scenes, probes: dict, chosen: dict, size: int, examples: int):
    """Every score on the test images: (per_image {source: {metric: rows (images, k)}}, the
    figure's examples, the number of objects prompted)."""
    rows = {name: {metric: [] for metric in KINDS} for name in probes}
    shown, prompted = [], 0
    for done, (scene, features) in enumerate(scenes):
        image, instances, classes = scene
        example = {"image": image, "instances": instances, "maps": {}}
        for k, (name, f) in enumerate(features.items()):
            objects = _score_one(rows[name], probes[name], f, scene, chosen[name], size,
                                 example if done < examples else None, name)
            prompted += objects if k == 0 else 0
        if done < examples and example["maps"]:
            shown.append(example)
    per_image = {name: {metric: torch.stack(r) for metric, r in metrics.items() if r}
                 for name, metrics in rows.items()}
    return per_image, shown, prompted


def _score_one(r: dict, probe, f: torch.Tensor, scene, chosen: dict, size: int, example: Optional[dict],
               name: str) -> int:
    """One source's scores on one test image appended to its rows `r`; its map of the largest
    prompted object kept in `example` (when given). Returns the number of objects prompted."""
    _, instances, classes = scene
    logits = upsample(probe.logits(f).permute(2, 0, 1), classes.shape)
    truth = torch.where(classes == IGNORE_LABEL, IGNORE_LABEL, classes.long().clamp(max=size))
    r["probe_miou"].append(confusion_matrix(logits.argmax(0), truth, size + 1).flatten().double())
    if instances is None:
        return 0
    prompts = prompt_scores(f, instances, classes)
    empty = (torch.zeros(0, len(THRESHOLD_GRID)), torch.zeros(0), torch.zeros(0, 2), torch.zeros(0), None, [])
    for target in TARGETS:
        curves, auroc, matched, best, maps, points = prompts.get(target, empty)
        n = float(len(curves))
        r[f"prompt_{target}_jaccard"].append(torch.tensor([float(curves[:, chosen[target]].sum()), n]))
        r[f"prompt_{target}_auroc"].append(torch.tensor([float(auroc.sum()), n]))
        # The mean over objects of their AUROC at matched distances (objects without a ring
        # holding both target and other pixels are not counted).
        has_pairs = matched[:, 1] > 0
        r[f"prompt_{target}_auroc_matched_distance"].append(torch.tensor(
            [float((matched[has_pairs, 0] / matched[has_pairs, 1]).sum()), float(has_pairs.sum())]))
        r[f"prompt_{target}_best_jaccard"].append(torch.tensor([float(best.sum()), n]))
        if target == "object" and example is not None and points:
            largest = max(range(len(points)), key=lambda k: (int((instances == points[k][0]).sum()), -k))
            example["object"], example["patch"] = points[largest]
            example["maps"][name] = maps[largest]
    for metric, row in pair_scores(f, instances).items():
        r[metric].append(row)
    return len(prompts["object"][0]) if "object" in prompts else 0


def summary(measurements: List[Measurement]) -> dict:
    """Scores with bootstrap intervals over the test images and, with several measurements
    (runs of several seeds on the same split), over the runs; see stats.summarise."""
    first = measurements[0]
    per_image = {name: {metric: torch.stack([m.per_image[name][metric] for m in measurements])
                        for metric in metrics} for name, metrics in first.per_image.items()}
    images = next(iter(next(iter(per_image.values())).values())).shape[1]
    result = summarise(per_image, KINDS, Bootstrap(images, len(measurements)), references=REFERENCES,
                       raw=RAW)
    result["thresholds"] = first.thresholds if len(measurements) == 1 else [m.thresholds for m in measurements]
    return result


def scores_table(result: dict, names: Optional[Dict[str, str]] = None) -> str:
    """The scores as text: per metric a row, per source a column "value [low, high]", then the
    same normalised between noise (0) and ideal (1)."""
    scores = result["scores"]
    sources = list(scores)
    names = names or {}
    # Columns wide enough for the longest metric name and "-0.000 [-0.000, -0.000]", two spaces apart.
    first, width = max(len(metric) for metric in KINDS) + 1, 25
    head = f"{'':{first}}" + "".join(f"{names.get(s, s):>{width}}" for s in sources)
    lines = [head]
    for normalised in (False, True):
        if normalised:
            lines.append("normalised: noise = 0, ideal = 1")
        for metric in KINDS:
            cells = []
            for s in sources:
                e = scores[s].get(metric)
                e = e and (e.get("normalised") if normalised else e)
                cells.append(f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if e else "-")
            if any(c != "-" for c in cells):
                lines.append(f"{metric:{first}}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def sources_with_controls(encoders: Dict[str, torch.nn.Module], cfg, eval_cfg, device, num_classes: int) -> dict:
    """The feature sources of the scores: the `encoders` (name -> encoder on `device`), the
    same network at random init, raw pixels and the controls, on eval_cfg's input grid."""
    sources = {name: encoder_features(encoder.eval(), eval_cfg) for name, encoder in encoders.items()}
    sources["random_init"] = encoder_features(random_init_encoder(cfg).to(device), eval_cfg)
    sources["raw_pixels"] = raw_pixel_features(eval_cfg)
    return {**sources, **control_sources(cfg.patch_size, num_classes)}


def per_image_lists(measurement: Measurement) -> dict:
    """The per-image rows as lists (eval.json's "per_image"), so that runs can be combined later."""
    return {name: {metric: rows.tolist() for metric, rows in metrics.items()}
            for name, metrics in measurement.per_image.items()}


def combine(paths: List[str]) -> dict:
    """The scores of several runs (seeds) measured on the same split, from their eval.json, with
    intervals over the runs and the test images (summary). Raises UsageError on a file that
    cannot be read, has no per-image rows, or was measured on another split."""
    measurements = []
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as error:
            raise UsageError(f"--combine {path}: cannot read it as an evaluation's JSON ({error})") from None
        if "per_image" not in result:
            raise UsageError(f"--combine {path}: no per_image rows (written by an older python -m "
                             f"loca_train.evaluate)")
        per_image = {name: {metric: torch.tensor(rows, dtype=torch.float64) for metric, rows in metrics.items()}
                     for name, metrics in result["per_image"].items()}
        measurements.append(Measurement(per_image, result["validation_thresholds"]))
    shapes = {tuple(next(iter(m.per_image.values()))["probe_miou"].shape) for m in measurements}
    if len(shapes) != 1 or len({frozenset(m.per_image) for m in measurements}) != 1:
        raise UsageError("--combine: the evaluations differ in their sources or test images; combine runs "
                         "measured on one split")
    return summary(measurements)
