"""Scenes cut from real photographs (scikit-image's bundled data, no download) in which neither
a patch's position nor its colour tells its class.

A class is a texture: the grey-level content of one of scikit-image's texture photographs
(OBJECT_TEXTURES). Each object is an irregular blob (a thresholded smooth random field, its
largest connected part) at a random scale, aspect and place, filled with a crop of its class's
texture at a random zoom; the background and the distractors (blobs of class 0, no instance)
are crops of other photographs (BACKGROUND_PHOTOS). Every crop is standardised in brightness
and contrast, then coloured with two of the scene's three colours (drawn from one small
palette), which its background, distractors and objects of every class share: colour says
nothing of the class and little of the instance. A scene holds
two classes with two or three instances each, so an instance's class-mates are elsewhere in
the image.

The evaluation's split of these scenes (probe, validation, test) is evaluation/data.py's
photo_split; training with --scenes photos reads the train split (images.open_images).

Splits: every source photograph is cut into three vertical bands (SPLIT_BANDS: train, the
left half; validation; test) and a scene of a split crops only its split's bands, from its
own stream of seeds, so no pixel of a source is seen by two splits.
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data as skimage_data
from skimage.measure import label as connected_parts

# Classes 1..5 (0: background and distractors): the textures of scikit-image's data module.
OBJECT_TEXTURES = ("brick", "grass", "gravel", "text", "coins")
PHOTO_CLASSES = ("background",) + OBJECT_TEXTURES
# Backgrounds and distractors: photographs of other content.
BACKGROUND_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                     "immunohistochemistry", "retina", "cell", "clock", "moon")
# Fractions of each source's width given to the train, validation and test splits.
SPLIT_BANDS = {"train": (0.0, 0.5), "validation": (0.5, 0.75), "test": (0.75, 1.0)}
# Generator seed offsets of the splits: train streams use seed * 1_000_003 + index (as the
# procedural set), the two evaluation streams start above every training seed.
SPLIT_OFFSETS = {"train": 0, "validation": 1 << 31, "test": 3 << 30}
# Colours shared by every texture (RGB in [0, 1]). A scene draws SCENE_COLOURS of them and
# each of its crops (background, distractors, objects) is a blend of two of those: the
# colours of a scene are shared by its classes and its background.
PALETTE = torch.tensor([[0.85, 0.2, 0.2], [0.2, 0.6, 0.25], [0.2, 0.35, 0.85], [0.9, 0.8, 0.2],
                        [0.6, 0.3, 0.7], [0.1, 0.1, 0.1], [0.95, 0.95, 0.9], [0.3, 0.75, 0.8]])
# Scene layout, in fractions of the scene's side: object boxes, and the zoom range (source
# pixels per scene pixel at REFERENCE_SIZE) at which textures are cut.
OBJECT_BOX, ZOOM, REFERENCE_SIZE = (0.22, 0.5), (1.0, 2.0), 112
CLASSES_PER_SCENE, INSTANCES_PER_CLASS, DISTRACTORS, SCENE_COLOURS = 2, (2, 3), (1, 3), 3


@functools.lru_cache(maxsize=None)
def _grey(name: str) -> torch.Tensor:
    """The photograph `name` of skimage.data as float grey levels (h, w) in [0, 1]."""
    image = np.asarray(getattr(skimage_data, name)(), dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
    return torch.from_numpy(image / max(image.max(), 1.0)).float()


def _crop(name: str, split: str, side: Tuple[int, int], zoom: float, g: torch.Generator) -> torch.Tensor:
    """A crop of `name`'s band for `split`, resized to side (h, w), standardised: (h, w) in [0, 1]."""
    grey = _grey(name)
    h, w = grey.shape
    left, right = (int(f * w) for f in SPLIT_BANDS[split])
    ch = min(h, max(2, round(side[0] * zoom)))
    cw = min(right - left, max(2, round(side[1] * zoom)))
    y = int(torch.randint(0, h - ch + 1, (), generator=g))
    x = left + int(torch.randint(0, right - left - cw + 1, (), generator=g))
    crop = F.interpolate(grey[None, None, y:y + ch, x:x + cw], size=side, mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]
    return ((crop - crop.mean()) / crop.std().clamp_min(1e-3) * 0.2 + 0.5).clamp(0, 1)


def _colour(grey: torch.Tensor, colours: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(h, w) grey levels -> (3, h, w): a blend of two distinct colours of the scene's `colours`."""
    a, b = colours[torch.randperm(len(colours), generator=g)[:2]]
    return a.view(3, 1, 1) * grey + b.view(3, 1, 1) * (1 - grey)


def _blob(height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """An irregular connected shape in a (height, width) box: bool (height, width)."""
    field = F.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(height, width), mode="bicubic",
                          align_corners=False)[0, 0]
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    inside = 0.7 * (1 - (x ** 2 + y ** 2).sqrt()) + 0.9 * (field - 0.5) > 0.2
    parts = torch.from_numpy(connected_parts(inside.numpy(), connectivity=1))
    if parts.max() == 0:
        inside = (x ** 2 + y ** 2) < 0.5
        return inside
    sizes = torch.bincount(parts.flatten())[1:]
    return parts == int(sizes.argmax()) + 1


class PhotoScenes:
    """`num_images` scenes of one split ("train", "validation" or "test") at `size` pixels,
    each a pure function of (seed, index, split). `scene(index)` gives (image (3, s, s),
    instances (s, s), classes (s, s)), all uint8 (PHOTO_CLASSES indices; instances 0 on the
    background and the distractors, 1..n on the objects, later objects occluding earlier ones)."""

    def __init__(self, num_images: int, size: int, seed: int = 0, split: str = "train"):
        if split not in SPLIT_BANDS:
            raise ValueError(f"PhotoScenes: split must be one of {', '.join(SPLIT_BANDS)}, got {split!r}")
        if size < 16:
            raise ValueError(f"PhotoScenes: size must be >= 16 pixels, got {size}")
        self.num_images, self.size, self.seed, self.split = num_images, size, seed, split
        self.bad_entries = {}   # as ImageFolder's: nothing here is unreadable

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.scene(index)[0]

    def _patch(self, g: torch.Generator, colours: torch.Tensor, source: str, box: Tuple[int, int]):
        zoom = float(ZOOM[0] + (ZOOM[1] - ZOOM[0]) * torch.rand((), generator=g)) * REFERENCE_SIZE / self.size
        return _colour(_crop(source, self.split, box, zoom, g), colours, g)

    def _place(self, g: torch.Generator, colours: torch.Tensor, occupied: torch.Tensor, source: str):
        """(texture (3, bh, bw), blob (bh, bw), (y, x)): a blob filled with `source`, placed where
        it overlaps occupied pixels least (of a few random tries), its box's corner at (y, x)."""
        s = self.size
        side = OBJECT_BOX[0] + (OBJECT_BOX[1] - OBJECT_BOX[0]) * torch.rand((), generator=g)
        aspect = float(0.6 + 0.8 * torch.rand((), generator=g))
        bh, bw = (max(4, min(s, round(float(side) * s * f))) for f in (aspect ** 0.5, aspect ** -0.5))
        blob = _blob(bh, bw, g)
        best = None
        for _ in range(8):
            y = int(torch.randint(0, s - bh + 1, (), generator=g))
            x = int(torch.randint(0, s - bw + 1, (), generator=g))
            overlap = int((occupied[y:y + bh, x:x + bw] & blob).sum())
            if best is None or overlap < best[0]:
                best = (overlap, y, x)
        return self._patch(g, colours, source, (bh, bw)), blob, best[1:]

    def scene(self, index: int):
        g = torch.Generator().manual_seed(SPLIT_OFFSETS[self.split] + self.seed * 1_000_003 + index)
        s = self.size
        colours = PALETTE[torch.randperm(len(PALETTE), generator=g)[:SCENE_COLOURS]]
        photos = torch.randperm(len(BACKGROUND_PHOTOS), generator=g).tolist()
        image = self._patch(g, colours, BACKGROUND_PHOTOS[photos[0]], (s, s))
        instances = torch.zeros(s, s, dtype=torch.uint8)
        classes = torch.zeros(s, s, dtype=torch.uint8)
        occupied = torch.zeros(s, s, dtype=torch.bool)

        def paste(source: str):
            texture, blob, (y, x) = self._place(g, colours, occupied, source)
            box = (slice(y, y + blob.shape[0]), slice(x, x + blob.shape[1]))
            image[(slice(None),) + box] = torch.where(blob, texture, image[(slice(None),) + box])
            return box, blob

        for k in range(int(torch.randint(DISTRACTORS[0], DISTRACTORS[1] + 1, (), generator=g))):
            paste(BACKGROUND_PHOTOS[photos[1 + k]])
        chosen = torch.randperm(len(OBJECT_TEXTURES), generator=g)[:CLASSES_PER_SCENE].tolist()
        objects = [c for c in chosen
                   for _ in range(int(torch.randint(INSTANCES_PER_CLASS[0], INSTANCES_PER_CLASS[1] + 1, (),
                                                    generator=g)))]
        for number, k in enumerate(torch.randperm(len(objects), generator=g).tolist()):
            box, blob = paste(OBJECT_TEXTURES[objects[k]])
            occupied[box] |= blob
            instances[box][blob] = number + 1
            classes[box][blob] = objects[k] + 1
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), instances, classes


# The side of the scenes the evaluation measures (evaluation/data.py) and training's default.
EVAL_SIZE = 112
