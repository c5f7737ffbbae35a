"""Source images: a procedural set built into the package (no download) or an ImageFolder on disk.

Both give uint8 (3, h, w) tensors whose longer side is `source_size` (source_size 0: image files
at their own resolution, procedural images at PROCEDURAL_NATIVE_SIZE); view crops are cut from
these on the device (views.py), so every box is in these pixel coordinates.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import UsageError

# Side of the procedural images at full resolution (source_size 0).
PROCEDURAL_NATIVE_SIZE = 320
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# Classes of the procedural scenes' semantic maps (index = class).
SCENE_CLASSES = ("background", "plain rectangle", "striped rectangle", "plain ellipse", "striped ellipse")
# Label of pixels that no metric counts (PASCAL VOC's convention).
IGNORE_LABEL = 255
# Generator seeds of the evaluation split start here. torch's CPU generator keeps a seed's
# low 32 bits; a training run with seed s < 2147 draws s * 1_000_003 + index < 2^31 (index
# below 1_000_003), so no such run sees an evaluation image.
EVAL_SEED_OFFSET = 1 << 31


class ProceduralImages:
    """`num_images` synthetic scenes, each a pure function of (seed, index) and of the split:
    "train" (what training draws from) or "eval" (images no training run sees).

    A scene is a two-colour gradient background with smooth noise, overlaid with a few
    striped or plain rectangles and ellipses: enough layout and texture that where a patch
    lies in an image can be learnt, at any size. `scene(index)` also gives its ground truth.
    """

    def __init__(self, num_images: int, size: int, seed: int = 0, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.num_images, self.size, self.seed, self.split = num_images, size, seed, split

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.scene(index)[0]

    def scene(self, index: int):
        """(image, instances, semantic), all uint8: the image (3, s, s) and two (s, s) maps of scene
        `index`: instances is 0 on the background and k on the k-th shape drawn (later shapes
        occlude earlier ones); semantic is the SCENE_CLASSES index of each pixel."""
        offset = EVAL_SEED_OFFSET if self.split == "eval" else 0
        g = torch.Generator().manual_seed(offset + self.seed * 1_000_003 + index)
        s = self.size
        y, x = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        angle = torch.rand((), generator=g) * 2 * math.pi
        ramp = (x * torch.cos(angle) + y * torch.sin(angle) + 1.5) / 3
        colours = torch.rand(2, 3, 1, 1, generator=g)
        image = colours[0] * ramp + colours[1] * (1 - ramp)
        noise = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(s, s), mode="bicubic",
                              align_corners=False)[0]
        image = image + 0.3 * (noise - 0.5)
        instances = torch.zeros(s, s, dtype=torch.uint8)
        semantic = torch.zeros(s, s, dtype=torch.uint8)
        for shape in range(int(torch.randint(3, 7, (), generator=g))):
            centre, radius = torch.rand(2, generator=g), 0.08 + 0.25 * torch.rand(2, generator=g)
            dx, dy = (x - centre[0]) / radius[0], (y - centre[1]) / radius[1]
            rectangle = bool(torch.rand((), generator=g) < 0.5)
            inside = (dx.abs() < 1) & (dy.abs() < 1) if rectangle else dx ** 2 + dy ** 2 < 1
            colour = torch.rand(3, 1, 1, generator=g)
            period = 0.03 + 0.1 * torch.rand((), generator=g)
            stripes = torch.sin((x + y * torch.rand((), generator=g)) / period) > 0
            striped = bool(torch.rand((), generator=g) < 0.5)
            if striped:
                colour = torch.where(stripes, colour, 1 - colour)
            image = torch.where(inside, colour, image)
            instances[inside] = shape + 1
            semantic[inside] = (1 if rectangle else 3) + striped
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), instances, semantic


class ImageFolder:
    """Images under `root/<class>/<file>` (any depth), decoded with PIL to RGB and resized so
    that the longer side is `size` (0: kept at full resolution). Classes are ignored: LOCA
    needs no labels."""

    def __init__(self, root: str, size: int, files: Optional[list] = None):
        self.size = size
        # files: the images to use (paths under root), e.g. those of a dataset's split list.
        self.files = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) \
            if files is None else sorted(str(p) for p in files)
        if not self.files:
            raise UsageError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image `index`; BadImage when its file cannot be decoded."""
        from PIL import Image  # only needed for image folders

        try:
            with Image.open(self.files[index]) as img:
                img = img.convert("RGB")
                width, height = img.size
                if self.size:
                    scale = self.size / max(img.size)
                    width, height = (max(1, round(side * scale)) for side in img.size)
                    img = img.resize((width, height), Image.BICUBIC)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        # What PIL raises for unreadable, truncated, unknown or oversized files.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise BadImage(f"cannot decode image {self.files[index]} ({error}); "
                           f"--skip-bad-images skips such images") from None
        return data.view(height, width, 3).permute(2, 0, 1).contiguous()

    def decode_error(self, index: int) -> BadImage:
        """The error of image `index`, decoded again here: loader processes report only indices."""
        try:
            self[index]
        except BadImage as error:
            return error
        return BadImage(f"cannot decode image {self.files[index]} in a loader process; "
                        f"--skip-bad-images skips such images")


class BadImage(UsageError):
    """An image file of an ImageFolder that cannot be decoded."""


class SegmentationFolder(ImageFolder):
    """An ImageFolder whose images have ground truth: under `masks` a PNG of class indices per
    image at the image's relative path (suffix .png; PASCAL VOC's SegmentationClass, 255 =
    ignore) and, when `instances` is given, a PNG of instance ids there (VOC's
    SegmentationObject: 0 background, 1..n objects, 255 ignore). Every mask must exist and
    have its image's size: both are checked here, before any work, from the file headers."""

    def __init__(self, root: str, size: int, masks: str, instances: Optional[str] = None,
                 files: Optional[list] = None):
        super().__init__(root, size, files)
        from PIL import Image

        self.root = Path(root)
        self.mask_dirs = {"--masks": Path(masks)}
        if instances is not None:
            self.mask_dirs["--instances"] = Path(instances)
        for flag, folder in self.mask_dirs.items():
            if not folder.is_dir():
                raise UsageError(f"{flag} {folder}: {'not a directory' if folder.exists() else 'no such directory'}")
            missing = [file for file in self.files if not self._mask_path(flag, file).is_file()]
            if missing:
                raise UsageError(f"{flag} {folder}: no mask for {len(missing)} of {len(self.files)} images, "
                                 f"e.g. {missing[0]} (expected {self._mask_path(flag, missing[0])})")
            for file in self.files:
                mask = self._mask_path(flag, file)
                with Image.open(file) as img, Image.open(mask) as label:
                    if img.size != label.size:
                        raise UsageError(f"{flag}: mask {mask} is {label.size[0]}x{label.size[1]} pixels, "
                                         f"its image {file} {img.size[0]}x{img.size[1]}")

    def _mask_path(self, flag: str, file: str) -> Path:
        return (self.mask_dirs[flag] / Path(file).relative_to(self.root)).with_suffix(".png")

    def _read_mask(self, flag: str, index: int, size) -> torch.Tensor:
        """The mask of image `index` for `flag` as uint8 (h, w), resized (nearest) to `size`."""
        from PIL import Image

        path = self._mask_path(flag, self.files[index])
        with Image.open(path) as label:
            # Palette PNGs (VOC) hold the indices themselves; RGB colours would need a palette.
            if label.mode not in ("P", "L", "I", "I;16"):
                raise UsageError(f"{flag}: {path} is a {label.mode} image, not a PNG of class indices "
                                 f"(palette or greyscale, as VOC's SegmentationClass)")
            label = label.resize(size, Image.NEAREST)
            labels = np.array(label)
        if labels.max(initial=0) > IGNORE_LABEL:
            raise UsageError(f"{flag}: {path} holds labels above {IGNORE_LABEL}")
        return torch.from_numpy(labels.astype(np.uint8))

    def scene(self, index: int):
        """(image (3, h, w), instances (h, w) or None, classes (h, w)), all uint8,
        the masks resized (nearest) to the image's size here."""
        image = self[index]
        size = (image.shape[2], image.shape[1])
        instances = self._read_mask("--instances", index, size) if "--instances" in self.mask_dirs else None
        return image, instances, self._read_mask("--masks", index, size)


def open_images(data, num_images: int, size: int, seed: int, scenes: str = "shapes"):
    """The image set a run trains on: ImageFolder(data), or when data is None the built-in
    `scenes`: the procedural set or the photo scenes' train split (photos.py)."""
    if data is None and scenes == "photos":
        from .photos import EVAL_SIZE, PhotoScenes
        return PhotoScenes(num_images, size or EVAL_SIZE, seed, split="train")
    if data is None:
        return ProceduralImages(num_images, size or PROCEDURAL_NATIVE_SIZE, seed)
    if not os.path.isdir(data):
        raise UsageError(f"--data {data}: {'not a directory' if os.path.exists(data) else 'no such directory'}")
    return ImageFolder(data, size)
