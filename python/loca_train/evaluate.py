"""`python -m loca_train.evaluate --run-dir R | --checkpoint C`: does a run's encoder give dense
features that segment?

Three evaluations of the encoder's final patch tokens, none of which finetunes the encoder
(the protocol, fixed here, is written out in docs/EVALUATION.md):

- zero-shot prompt segmentation (MMC, Wu et al. 2023): the cosine similarity of one prompt
  patch inside an object with every patch, upsampled and thresholded, against the object's
  mask (Jaccard); the threshold is chosen on one half of the test images, reported on the other;
- intra- versus inter-object similarity: the mean cosine of patch pairs within one region and
  across two, and the ROC AUC of telling them apart;
- a linear probe: a linear classifier of the patch tokens trained on per-patch majority
  labels, its logits upsampled, mIoU on held-out images.

Every report holds two baselines computed in the same run: the same network at its random
initialisation and raw pixels (each patch's RGB values as its feature). Results go to
eval.json and eval.png (examples); the command prints a table.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import checkpoint
from .config import Config, Parser, UsageError, config_from_dict, usage_error
from .images import IGNORE_LABEL, SCENE_CLASSES, ProceduralImages, SegmentationFolder
from .objectives import objective_of
from .monitor import format_duration, versions
from .views import normalize

# Thresholds of the prompt protocol: a pixel is in the predicted mask when its similarity to
# the prompt is above t.
THRESHOLDS = tuple(i / 10 for i in range(10))
# The procedural evaluation split: the probe learns on the first images, every metric is
# measured on the next ones.
PROBE_IMAGES, TEST_IMAGES = 256, 128
# The linear probe's recipe: standardised features, zero-initialised weights, full-batch L-BFGS
# on the class-balanced cross-entropy plus this L2 penalty on the weights.
PROBE_ITERATIONS, PROBE_WEIGHT_DECAY = 100, 1e-3
# The folder split: a fixed permutation (this seed) puts half the images in the probe's set.
FOLDER_SPLIT_SEED = 0
SOURCES = {"pretrained": "pretrained", "teacher": "teacher", "student": "student", "random_init": "random init",
           "raw_pixels": "raw pixels", "noise": "noise", "position": "position", "colour": "colour", "ideal": "ideal"}
EVAL_NAME, FIGURE_NAME = "eval.json", "eval.png"


# ------------------------------------------------------------------ data

@dataclass
class EvalSplit:
    """The images of an evaluation: `dataset.scene(i)` gives (image, instances or None,
    classes); the probe trains on `probe`, every metric is measured on `test`."""

    dataset: object
    probe: List[int]
    test: List[int]
    description: str
    class_names: Optional[tuple] = None     # None: class k is called "k"
    validation: List[int] = field(default_factory=list)   # tuning (thresholds); empty: the probe's images


def procedural_split(cfg: Config, probe_images: int = PROBE_IMAGES, test_images: int = TEST_IMAGES) -> EvalSplit:
    """The procedural evaluation split at the run's source size: scenes of the "eval" stream
    (no training run draws them), the same for every run seed."""
    dataset = ProceduralImages(probe_images + test_images, cfg.source_size, seed=0, split="eval")
    return EvalSplit(dataset, list(range(probe_images)), list(range(probe_images, probe_images + test_images)),
                     f"{test_images} procedural evaluation scenes ({cfg.source_size} px), the probe "
                     f"trained on {probe_images} others", SCENE_CLASSES)


def folder_split(cfg: Config, data: str, masks: str, instances: Optional[str] = None) -> EvalSplit:
    """The images under `data` with their masks, split in two by a fixed permutation: the
    probe trains on the first half, the metrics are measured on the second."""
    dataset = SegmentationFolder(data, cfg.source_size, masks, instances)
    if len(dataset) < 2:
        raise UsageError(f"--data {data}: {len(dataset)} image; the evaluation needs at least 2")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(FOLDER_SPLIT_SEED)).tolist()
    half = len(dataset) // 2
    return EvalSplit(dataset, sorted(order[:half]), sorted(order[half:]),
                     f"{len(dataset) - half} images of {data}, the probe trained on {half} others")


# ------------------------------------------------------------------ features

def network_input(image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """uint8 (3, h, w) -> the whole image resized to image_size x image_size, normalised (3, S, S)."""
    x = F.interpolate(image[None].float() / 255, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                      align_corners=False, antialias=True)
    return normalize(x)[0]


def encoder_features(encoder: torch.nn.Module, cfg: Config) -> Callable:
    """Features of `encoder`: its final patch tokens (after the last LayerNorm) as (B, g, g, dim)."""
    grid = cfg.image_size // cfg.patch_size

    def features(x: torch.Tensor) -> torch.Tensor:
        return encoder(x).unflatten(1, (grid, grid))
    return features


def raw_pixel_features(cfg: Config) -> Callable:
    """The raw-pixel baseline: each patch's normalised RGB values, flattened, (B, g, g, 3 p^2)."""
    p = cfg.patch_size

    def features(x: torch.Tensor) -> torch.Tensor:
        return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3)
    return features


def random_init_encoder(cfg: Config) -> torch.nn.Module:
    """The encoder a run with `cfg` starts from (train() seeds with cfg.seed, then builds the
    objective's student), built without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return objective_of(cfg).build_student(cfg).encoder.eval()


# ------------------------------------------------------------------ metrics on one image

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


def prompt_patch(inside: torch.Tensor, grid) -> Optional[int]:
    """The prompt of an object (inside: bool (h, w)): the raster index of the patch whose centre
    lies in the object (in a pixel of it) and is farthest from its border (the Euclidean
    distance to the nearest pixel centre outside it, beyond the image counting as outside).
    Ties: the lowest raster index. None when no patch centre lies in the object."""
    h, w = inside.shape
    gh, gw = grid
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) * h / gh
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) * w / gw
    centres = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).view(-1, 2)       # raster order
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


# ------------------------------------------------------------------ linear probe

@dataclass
class LinearProbe:
    """A linear classifier of standardised patch features."""

    mean: torch.Tensor
    std: torch.Tensor
    linear: torch.nn.Linear

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., classes)."""
        with torch.no_grad():
            return self.linear((features.float() - self.mean) / self.std)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> LinearProbe:
    """The fixed recipe: standardise each feature (train mean and std), zero weights, then
    PROBE_ITERATIONS of full-batch L-BFGS (strong Wolfe line search) on the class-balanced
    cross-entropy (class weights n / (classes * count), so that the background, most patches,
    does not make predicting it everywhere the optimum) + PROBE_WEIGHT_DECAY * |W|^2.
    Deterministic; no random draw. features (n, dim), labels (n,)."""
    features = features.float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp_min(1)), 0.0)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    linear = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], num_classes)   # no random draw
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERATIONS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels, weight=weights) + PROBE_WEIGHT_DECAY * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, linear.requires_grad_(False))


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


# ------------------------------------------------------------------ the evaluation

class Progress:
    """A progress line on stderr for long evaluations: redrawn in place on a terminal, printed
    every tenth of the way otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.tty, self.start, self._printed = sys.stderr.isatty(), time.perf_counter(), -1

    def advance(self, count: int, what: str) -> None:
        self.done += count
        decile = 10 * self.done // max(self.total, 1)
        if not self.enabled or not (self.tty or decile > self._printed):
            return
        self._printed = decile
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (self.total - self.done) / self.done
        filled = 24 * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} images ({what}) "
                f"eta {format_duration(eta)}")
        end = "\n" if self.done >= self.total else ""
        sys.stderr.write(f"\r{line}{end}" if self.tty else line + "\n")
        sys.stderr.flush()


@dataclass
class _Accumulator:
    """Per-source sums over the test images."""

    jaccard: List[torch.Tensor] = field(default_factory=list)     # per image (objects, thresholds)
    same: List[torch.Tensor] = field(default_factory=list)
    different: List[torch.Tensor] = field(default_factory=list)
    confusion: Optional[torch.Tensor] = None


def _batches(indices: List[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


@contextmanager
def _threads(count: int):
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scenes_and_features(split: EvalSplit, indices, sources, cfg, device, batch_size, bar, what, threads):
    """Yield (scene, {source: features (g, g, dim) on the CPU}) for each index, in batches; the
    networks run on `threads` threads."""
    for chunk in _batches(indices, batch_size):
        scenes = [split.dataset.scene(i) for i in chunk]
        x = torch.stack([network_input(scene[0], cfg) for scene in scenes]).to(device)
        with torch.no_grad(), _threads(threads):
            # The ideal control (controls.TruthFeatures) is made from the scenes' ground truth.
            features = {name: (fn(scenes, (cfg.image_size // cfg.patch_size,) * 2) if getattr(fn, "needs_truth", False)
                               else fn(x)).float().cpu() for name, fn in sources.items()}
        bar.advance(len(chunk), what)
        for k, scene in enumerate(scenes):
            yield scene, {name: f[k] for name, f in features.items()}


def evaluate(sources: Dict[str, Callable], split: EvalSplit, cfg: Config, device="cpu", batch_size: int = 64,
             progress: bool = False, examples: int = 0):
    """Every metric of every feature source (name -> function of normalised images (B, 3, S, S)
    on `device` -> features (B, g, g, dim)) on `split`. Returns (metrics {source: {...}},
    counts {...}, example data for the figure: the first `examples` test images)."""
    # The metrics work on small tensors, where more threads only add synchronisation (and,
    # on a busy machine, waits of many milliseconds): they run on one thread, the networks on all.
    threads = torch.get_num_threads()
    with _threads(1):
        bar = Progress(len(split.probe) + len(split.test), progress)
        return _evaluate(sources, split, cfg, device, batch_size, bar, examples, threads)


def _evaluate(sources, split, cfg, device, batch_size, bar, examples, threads):
    grid = (cfg.image_size // cfg.patch_size,) * 2

    # 1. The probes learn per-patch majority classes on the probe images.
    train_features = {name: [] for name in sources}
    train_labels = []
    for scene, features in _scenes_and_features(split, split.probe, sources, cfg, device, batch_size, bar,
                                                "probe", threads):
        labels = patch_majority(scene[2], grid).flatten()
        kept = labels != IGNORE_LABEL
        train_labels.append(labels[kept])
        for name, f in features.items():
            train_features[name].append(f.flatten(0, 1)[kept])
    labels = torch.cat(train_labels)
    num_classes = int(labels.max()) + 1
    probes = {name: train_probe(torch.cat(f), labels, num_classes) for name, f in train_features.items()}
    del train_features

    # 2. Every metric on the test images.
    acc = {name: _Accumulator() for name in sources}
    counts = {"probe_images": len(split.probe), "probe_patches": len(labels), "test_images": len(split.test),
              "objects_prompted": 0, "objects_skipped": 0, "objects_per_image": []}
    shown = []
    for done, (scene, features) in enumerate(_scenes_and_features(split, split.test, sources, cfg, device,
                                                                  batch_size, bar, "metrics", threads)):
        image, instances, classes = scene
        example = {"image": image, "instances": instances, "maps": {}}
        for name, f in features.items():
            a = acc[name]
            logits = upsample(probes[name].logits(f).permute(2, 0, 1), classes.shape)
            confusion = confusion_matrix(logits.argmax(0), classes)
            a.confusion = confusion if a.confusion is None else a.confusion + confusion
            if instances is None:
                continue
            prompt = prompt_segmentation(f, instances)
            a.jaccard.append(prompt.jaccard)
            same, different = region_pair_similarities(f, instances)
            a.same.append(same)
            a.different.append(different)
            if done < examples and prompt.prompts:
                largest = max(range(len(prompt.prompts)),
                              key=lambda k: (int((instances == prompt.prompts[k][0]).sum()), -k))
                example["object"], example["patch"] = prompt.prompts[largest]
                example["maps"][name] = prompt.maps[largest]
        if instances is not None:
            counts["objects_prompted"] += len(prompt.prompts)
            counts["objects_skipped"] += prompt.skipped
            counts["objects_per_image"].append(len(prompt.prompts))
        if done < examples and example["maps"]:
            shown.append(example)

    selection = len(split.test) // 2      # the threshold is chosen on the first half, reported on the rest
    counts["threshold_selection_images"], counts["threshold_report_images"] = selection, len(split.test) - selection
    names = split.class_names or tuple(str(c) for c in range(num_classes))
    metrics = {}
    for name, a in acc.items():
        ious = iou_per_class(a.confusion)
        m = {"probe_miou": sum(ious.values()) / len(ious),
             "probe_iou_per_class": {(names[c] if c < len(names) else str(c)): v for c, v in ious.items()},
             "probe_pixel_accuracy": float(a.confusion.diag().sum() / a.confusion.sum())}
        if a.jaccard:
            m.update(_threshold_choice(a.jaccard[:selection], a.jaccard[selection:]))
            same, different = torch.cat(a.same), torch.cat(a.different)
            m.update(similarity_same=float(same.double().mean()), similarity_different=float(different.double().mean()),
                     similarity_auc=roc_auc(same, different))
        metrics[name] = m
    counts.pop("objects_per_image")
    return metrics, counts, shown


def _threshold_choice(selection: List[torch.Tensor], report: List[torch.Tensor]) -> dict:
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


def training_metrics(encoder: torch.nn.Module, cfg: Config, device, split: Optional[EvalSplit] = None) -> dict:
    """The headline metrics of `encoder` alone (no baselines, no figure), as log.jsonl fields
    eval_*; used by training's --eval-every. Draws no random number."""
    split = split or procedural_split(cfg)
    was_training = encoder.training
    encoder.eval()
    try:
        metrics, _, _ = evaluate({"pretrained": encoder_features(encoder, cfg)}, split, cfg, device)
    finally:
        encoder.train(was_training)
    m = metrics["pretrained"]
    return {f"eval_{key}": m[key] for key in HEADLINE if key in m}


# The metrics of the printed table, training logs and curves.
HEADLINE = ("prompt_jaccard", "prompt_threshold", "similarity_same", "similarity_different", "similarity_auc",
            "probe_miou")
_ROWS = {"prompt_jaccard": "prompt Jaccard", "prompt_threshold": "  threshold chosen",
         "similarity_same": "same-object cosine", "similarity_different": "other-object cosine",
         "similarity_auc": "similarity AUC", "probe_miou": "probe mIoU"}


def table(metrics: dict) -> str:
    """The metrics of every source as a plain-text table."""
    names = [name for name in SOURCES if name in metrics]
    lines = [f"{'':22}" + "".join(f"{SOURCES[name]:>13}" for name in names)]
    for key, label in _ROWS.items():
        if all(key in metrics[name] for name in names):
            lines.append(f"{label:22}" + "".join(f"{metrics[name][key]:>13.3f}" for name in names))
    return "\n".join(lines)


# ------------------------------------------------------------------ the figure

def _colour_map(values: torch.Tensor) -> torch.Tensor:
    """(h, w) in [-1, 1] -> uint8 (3, h, w): blue (-1) through black (0) to yellow (1)."""
    v = values.clamp(-1, 1)
    pos, neg = v.clamp_min(0), (-v).clamp_min(0)
    rgb = torch.stack([pos, pos * 0.85, neg])
    return (rgb * 255).round().to(torch.uint8)


def _labels_image(labels: torch.Tensor) -> torch.Tensor:
    """(h, w) ids -> uint8 (3, h, w), a fixed colour per id (0: black)."""
    g = torch.Generator().manual_seed(1)
    palette = torch.randint(60, 256, (256, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    palette[0] = 0
    return palette[labels.long()].permute(2, 0, 1)


def draw_examples(shown: list, metrics: dict, cfg: Config, path: Path, scale: int = 0) -> None:
    """eval.png: per example image a row of the image with the prompt point, the object's mask,
    then for each source its similarity map and predicted mask (at its chosen threshold)."""
    from PIL import Image, ImageDraw

    if not shown:
        return
    names = [name for name in SOURCES if name in shown[0]["maps"]]
    h, w = shown[0]["image"].shape[1:]
    scale = scale or max(1, 128 // max(h, w))
    cell_w, cell_h, pad, header = w * scale, h * scale, 4, 30
    columns = ["image + prompt", "object"]
    for name in names:
        t = metrics[name]["prompt_threshold"]
        columns += [f"{SOURCES[name]}: similarity", f"mask (> {t:.2f})"]
    sheet = Image.new("RGB", (len(columns) * (cell_w + pad) + pad, header + len(shown) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(columns):
        draw.text((pad + c * (cell_w + pad), 4 + 12 * (c % 2)), title, fill="black")
    grid = cfg.image_size // cfg.patch_size
    for r, example in enumerate(shown):
        obj = example["instances"] == example["object"]
        panels = [example["image"], _labels_image(obj.long())]
        for name in names:
            sim = example["maps"][name]
            panels += [_colour_map(sim), _labels_image((sim > metrics[name]["prompt_threshold"]).long())]
        py, px = divmod(example["patch"], grid)
        point = ((px + 0.5) * w / grid * scale, (py + 0.5) * h / grid * scale)
        for c, panel in enumerate(panels):
            tile = Image.fromarray(panel.permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.NEAREST)
            x0, y0 = pad + c * (cell_w + pad), header + r * (cell_h + pad)
            sheet.paste(tile, (x0, y0))
            if c != 1:
                cx, cy = x0 + point[0], y0 + point[1]
                draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), outline="red", width=2)
    sheet.save(path)


# ------------------------------------------------------------------ command line

def _load(args, parser):
    """(checkpoint state, path, output folder) of --run-dir or --checkpoint."""
    path = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / checkpoint.CHECKPOINT_NAME
    if not path.is_file():
        where = f"--checkpoint {args.checkpoint}: no such file" if args.checkpoint else \
            f"--run-dir {args.run_dir}: no checkpoint ({checkpoint.CHECKPOINT_NAME}) in it"
        parser.error(where)
    state = checkpoint.load(path)
    if not isinstance(state, dict) or "config" not in state or "teacher" not in state:
        parser.error(f"{path} is not a loca_train training checkpoint")
    return state, path, Path(args.output_dir) if args.output_dir else path.parent


def main(argv=None) -> int:
    parser = Parser(prog="python -m loca_train.evaluate",
                    description="Dense-feature evaluation of a loca_train run: zero-shot prompt segmentation, "
                                "intra/inter-object similarity and a linear segmentation probe, beside the "
                                "same network at random init and raw pixels (docs/EVALUATION.md).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="output folder of the run (holds checkpoint.pt)")
    which.add_argument("--checkpoint", help="a training checkpoint file")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the encoder evaluated (default: the teacher, the network LOCA keeps)")
    parser.add_argument("--data", help="your images (any depth), or a PASCAL VOC folder (VOCdevkit/VOC2012: its "
                                       "segmentation train and val lists); default: --scenes")
    parser.add_argument("--masks", help="with --data: PNGs of class indices at each image's relative path "
                                        "(VOC SegmentationClass, 255 = ignore)")
    parser.add_argument("--instances", help="with --data: PNGs of instance ids (VOC SegmentationObject), "
                                            "needed by the prompt and similarity metrics")
    parser.add_argument("--scenes", choices=("photos", "shapes"), default="photos",
                        help="without --data: photos (textures of real photographs, 14 x 14 patches; "
                             "docs/EVALUATION.md) or shapes (the procedural scenes)")
    parser.add_argument("--probe-images", type=int, default=PROBE_IMAGES,
                        help=f"built-in scenes the probe trains on (default {PROBE_IMAGES})")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES,
                        help=f"built-in scenes measured (default {TEST_IMAGES}); photos: half as many "
                             f"validation scenes choose the thresholds")
    parser.add_argument("--output-dir", help="where eval.json and eval.png go (default: the checkpoint's folder)")
    parser.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--examples", type=int, default=4, help="test images shown in eval.png")
    parser.add_argument("--progress", action="store_true", default=None, help="show a progress bar")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if (args.masks or args.instances) and not args.data:
        parser.error("--masks and --instances go with --data")
    from .voc import is_voc_root, voc_split
    voc = bool(args.data) and not args.masks and is_voc_root(args.data)
    if args.data and not args.masks and not voc:
        parser.error("--data needs --masks (PNGs of class indices) or a VOC folder (JPEGImages, "
                     "SegmentationClass, ImageSets/Segmentation)")
    if args.probe_images < 1 or args.test_images < 2:
        parser.error("--probe-images must be >= 1 and --test-images >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    t_start = time.perf_counter()
    state, path, out = _load(args, parser)
    cfg = config_from_dict(state["config"])
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    # Photo scenes are measured on a 14 x 14 patch grid whatever the network's training size.
    eval_cfg = cfg
    try:
        if voc:
            split = voc_split(cfg, args.data)
        elif args.data:
            split = folder_split(cfg, args.data, args.masks, args.instances)
        elif args.scenes == "photos":
            from .photos import EVAL_GRID, photo_split
            split = photo_split(args.probe_images, args.test_images // 2, args.test_images)
            eval_cfg = dataclasses.replace(cfg, image_size=EVAL_GRID * cfg.patch_size)
        else:
            split = procedural_split(cfg, args.probe_images, args.test_images)
    except UsageError as error:
        parser.error(str(error))

    encoders = {}
    for which in ("teacher", "student"):
        encoders[which] = objective_of(cfg).build_student(cfg).encoder
        prefix = "encoder."
        encoders[which].load_state_dict({k[len(prefix):]: v for k, v in state[which].items() if k.startswith(prefix)})
        encoders[which].to(device).eval()
    sources = {"pretrained": encoder_features(encoders[args.which], eval_cfg),
               "random_init": encoder_features(random_init_encoder(cfg).to(device), eval_cfg),
               "raw_pixels": raw_pixel_features(eval_cfg)}
    print(f"loca_train.evaluate: {args.which} of {path} (step {state['step']}) on {split.description}", flush=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    metrics, counts, shown = evaluate(sources, split, eval_cfg, device, args.batch_size, progress, args.examples)
    # The scores with their controls, validation thresholds and bootstrap intervals (scores.py).
    from . import scores as sc
    num_classes = len(split.class_names) if split.class_names else IGNORE_LABEL
    measured = sc.measure(sc.sources_with_controls(encoders, cfg, eval_cfg, device, num_classes), split, eval_cfg,
                          device, args.batch_size, progress, args.examples)
    scored = sc.summary([measured])

    out.mkdir(parents=True, exist_ok=True)
    run_config = path.parent / "config.json"
    run_versions = json.loads(run_config.read_text()).get("versions") if run_config.is_file() else None
    result = {"checkpoint": str(path.resolve()), "step": state["step"], "which": args.which,
              "data": split.description, "split": counts, "thresholds": list(THRESHOLDS),
              "metrics": metrics, "protocol": "docs/EVALUATION.md",
              "scores": scored["scores"], "differences": scored["differences"],
              "validation_thresholds": scored["thresholds"], "scores_split": measured.counts,
              "per_image": sc.per_image_lists(measured),
              "probe_recipe": {"optimizer": "L-BFGS", "iterations": PROBE_ITERATIONS,
                               "weight_decay": PROBE_WEIGHT_DECAY, "loss": "class-balanced cross-entropy"},
              "versions": versions(), "run_versions": run_versions,
              "wall_time_s": time.perf_counter() - t_start}
    (out / EVAL_NAME).write_text(json.dumps(result, indent=1))
    chosen = {name: {"prompt_threshold": t["object"]} for name, t in measured.thresholds.items()}
    draw_examples(measured.examples, chosen, eval_cfg, out / FIGURE_NAME)
    print(table(metrics))
    print("scores with 95% bootstrap intervals over the test images (docs/EVALUATION.md):")
    print(sc.scores_table(scored, SOURCES))
    skipped = f", {counts['objects_skipped']} skipped (no patch centre inside)" if counts["objects_skipped"] else ""
    objects = (f"; {counts['objects_prompted']} objects prompted{skipped}" if "prompt_jaccard" in metrics["pretrained"]
               else "; no --instances: prompt and similarity metrics skipped")
    written = ", ".join(name for name in (EVAL_NAME, FIGURE_NAME) if (out / name).exists())
    print(f"loca_train.evaluate: done in {format_duration(result['wall_time_s'])}{objects}; results in {out}/ "
          f"({written})", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, OSError) as error:    # a mask met during the run, an unwritable --output-dir
        usage_error(str(error))
