"""Every metric of every feature source over an evaluation split, and the headline metrics
training logs (--eval-every)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..config import Config, UsageError
from ..images import IGNORE_LABEL
from ..monitor import format_duration
from .data import EvalSplit, encoder_features, network_input
from .metrics import (HEADLINE, confusion_matrix, iou_per_class, patch_majority, prompt_segmentation,
                      region_pair_similarities, roc_auc, threshold_choice, upsample)
from .probe import train_probe


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
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def scenes_and_features(split: EvalSplit, indices, sources, cfg, device, batch_size, bar, what, threads):
    """Yield (scene, {source: features (g, g, dim) on the CPU}) for each index, in batches; the
    networks run on `threads` threads."""
    grid = (cfg.image_size // cfg.patch_size,) * 2
    for chunk in _batches(indices, batch_size):
        scenes = [split.dataset.scene(i) for i in chunk]
        x = torch.stack([network_input(scene[0], cfg) for scene in scenes]).to(device)
        with torch.no_grad(), torch_threads(threads):
            # The ideal control (controls.TruthFeatures) is made from the scenes' ground truth.
            features = {name: (fn(scenes, grid) if getattr(fn, "needs_truth", False) else fn(x)).float().cpu()
                        for name, fn in sources.items()}
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
    with torch_threads(1):
        bar = Progress(len(split.probe) + len(split.test), progress)
        return _evaluate(sources, split, cfg, device, batch_size, bar, examples, threads)


def _evaluate(sources, split, cfg, device, batch_size, bar, examples, threads):
    def scenes(indices, what):
        return scenes_and_features(split, indices, sources, cfg, device, batch_size, bar, what, threads)

    probes, probe_patches, num_classes = train_probes(scenes(split.probe, "probe"), cfg, split.description)
    counts = {"probe_images": len(split.probe), "probe_patches": probe_patches, "test_images": len(split.test),
              "objects_prompted": 0, "objects_skipped": 0, "objects_per_image": []}
    acc, shown = _measure(scenes(split.test, "metrics"), probes, counts, examples)
    selection = len(split.test) // 2      # the threshold is chosen on the first half, reported on the rest
    counts["threshold_selection_images"], counts["threshold_report_images"] = selection, len(split.test) - selection
    names = split.class_names or tuple(str(c) for c in range(num_classes))
    if not int(next(iter(acc.values())).confusion.sum()):
        raise UsageError(f"every pixel of the test images is ignored (label {IGNORE_LABEL}) in the masks of "
                         f"{split.description}: nothing to measure")
    metrics = {name: _summary(a, selection, names) for name, a in acc.items()}
    counts.pop("objects_per_image")
    return metrics, counts, shown


def train_probes(scenes, cfg: Config, description: str):
    """Step 1: each source's probe learns per-patch majority classes on the probe images.
    Returns (probes {source: LinearProbe}, the number of labelled patches, the number of classes)."""
    grid = (cfg.image_size // cfg.patch_size,) * 2
    train_features, train_labels = {}, []
    for scene, features in scenes:
        labels = patch_majority(scene[2], grid).flatten()
        kept = labels != IGNORE_LABEL
        train_labels.append(labels[kept])
        for name, f in features.items():
            train_features.setdefault(name, []).append(f.flatten(0, 1)[kept])
    labels = torch.cat(train_labels)
    if not len(labels):
        raise UsageError(f"every patch of the probe's images is ignored (label {IGNORE_LABEL}) in the masks of "
                         f"{description}: nothing to train the probe on")
    num_classes = int(labels.max()) + 1
    probes = {name: train_probe(torch.cat(f), labels, num_classes) for name, f in train_features.items()}
    return probes, len(labels), num_classes


def _measure(scenes, probes, counts: dict, examples: int):
    """Step 2: every metric on the test images, summed per source; the first `examples` test
    images with a prompted object are kept for the figure."""
    acc = {name: _Accumulator() for name in probes}
    shown = []
    for done, (scene, features) in enumerate(scenes):
        image, instances, classes = scene
        example = {"image": image, "instances": instances, "maps": {}}
        for name, f in features.items():
            prompt = _measure_one(acc[name], probes[name], f, instances, classes)
            if prompt is not None and done < examples and prompt.prompts:
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
    return acc, shown


def _measure_one(a: "_Accumulator", probe, f: torch.Tensor, instances, classes):
    """The metrics of one source on one test image, added to `a`; the prompt result, or None
    without instances."""
    logits = upsample(probe.logits(f).permute(2, 0, 1), classes.shape)
    confusion = confusion_matrix(logits.argmax(0), classes)
    a.confusion = confusion if a.confusion is None else a.confusion + confusion
    if instances is None:
        return None
    prompt = prompt_segmentation(f, instances)
    a.jaccard.append(prompt.jaccard)
    same, different = region_pair_similarities(f, instances)
    a.same.append(same)
    a.different.append(different)
    return prompt


def _summary(a: "_Accumulator", selection: int, names) -> dict:
    """Step 3: one source's metrics from its sums (the threshold chosen on the first `selection`
    test images)."""
    ious = iou_per_class(a.confusion)
    m = {"probe_miou": sum(ious.values()) / len(ious),
         "probe_iou_per_class": {(names[c] if c < len(names) else str(c)): v for c, v in ious.items()},
         "probe_pixel_accuracy": float(a.confusion.diag().sum() / a.confusion.sum())}
    if a.jaccard:
        m.update(threshold_choice(a.jaccard[:selection], a.jaccard[selection:]))
        same, different = torch.cat(a.same), torch.cat(a.different)
        m.update(similarity_same=float(same.double().mean()), similarity_different=float(different.double().mean()),
                 similarity_auc=roc_auc(same, different))
    return m


def training_metrics(encoder: torch.nn.Module, cfg: Config, device, split: EvalSplit) -> dict:
    """The headline metrics of `encoder` alone (no baselines, no figure) on `split` (its networks
    seeing cfg's image_size), as log.jsonl fields eval_*; used by training's --eval-every (on
    data.monitoring_split). Draws no random number."""
    was_training = encoder.training
    encoder.eval()
    try:
        metrics, _, _ = evaluate({"pretrained": encoder_features(encoder, cfg)}, split, cfg, device)
    finally:
        encoder.train(was_training)
    m = metrics["pretrained"]
    return {f"eval_{key}": m[key] for key in HEADLINE if key in m}
