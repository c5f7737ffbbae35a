"""The images of an evaluation (splits: procedural scenes, photo scenes, image folders with
masks) and the feature sources measured on them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..config import Config, UsageError
from ..images import SCENE_CLASSES, ProceduralImages, SegmentationFolder
from ..objectives import objective_of
from ..photos import EVAL_SIZE, PHOTO_CLASSES, PhotoScenes
from ..views import normalize

# The procedural evaluation split: the probe learns on the first images, every metric is
# measured on the next ones.
PROBE_IMAGES, TEST_IMAGES = 256, 128
# The folder split: a fixed permutation (this seed) puts half the images in the probe's set.
FOLDER_SPLIT_SEED = 0
# The evaluation on photo scenes: patch grid (14 x 14 as a ViT/16 at 224) and the number of
# scenes of each split.
EVAL_GRID = 14
PROBE_SCENES, VALIDATION_SCENES, TEST_SCENES = 256, 64, 128


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


class SplitScenes:
    """Several scene sets one after another: index i of the whole is index i - start of its part.
    Each scene is built once and kept (the evaluation reads every scene twice; 448 scenes of
    112 px take 28 MB)."""

    def __init__(self, *parts):
        self.parts = parts
        self.starts = [sum(len(p) for p in parts[:k]) for k in range(len(parts))]
        self.built = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def scene(self, index: int):
        if index not in self.built:
            k = max(k for k, start in enumerate(self.starts) if start <= index)
            self.built[index] = self.parts[k].scene(index - self.starts[k])
        return self.built[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.scene(index)[0]


def photo_split(probe: int = PROBE_SCENES, validation: int = VALIDATION_SCENES, test: int = TEST_SCENES,
                size: int = EVAL_SIZE) -> EvalSplit:
    """The evaluation on photo scenes (photos.py): the probe trains on train-split scenes,
    thresholds are chosen on validation scenes, every score is measured on test scenes; the
    same for every run seed."""
    dataset = SplitScenes(PhotoScenes(probe, size, split="train"), PhotoScenes(validation, size, split="validation"),
                          PhotoScenes(test, size, split="test"))
    return EvalSplit(dataset, list(range(probe)), list(range(probe + validation, probe + validation + test)),
                     f"{test} photo test scenes ({size} px), thresholds chosen on {validation} validation scenes, "
                     f"the probe trained on {probe} train scenes", PHOTO_CLASSES,
                     validation=list(range(probe, probe + validation)))


def photo_eval_config(cfg: Config) -> Config:
    """The config the networks see on the photo scenes: an EVAL_GRID x EVAL_GRID patch grid,
    whatever the network's training size."""
    return dataclasses.replace(cfg, image_size=EVAL_GRID * cfg.patch_size)


def monitoring_split(cfg: Config, images: int):
    """(the split, the config the networks see) of training's --eval-every, which reads no test
    image: on the photo scenes (--scenes photos) the probe trains on 2 x `images` train scenes and
    the metrics are measured on `images` validation scenes, on evaluate's patch grid
    (photo_eval_config); otherwise the procedural evaluation split."""
    if cfg.scenes != "photos":
        return procedural_split(cfg, 2 * images, images), cfg
    probe = 2 * images
    dataset = SplitScenes(PhotoScenes(probe, EVAL_SIZE, split="train"),
                          PhotoScenes(images, EVAL_SIZE, split="validation"))
    split = EvalSplit(dataset, list(range(probe)), list(range(probe, probe + images)),
                      f"{images} photo validation scenes ({EVAL_SIZE} px), the probe trained on {probe} train "
                      f"scenes", PHOTO_CLASSES)
    return split, photo_eval_config(cfg)


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
