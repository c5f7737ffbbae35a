"""Source images: a procedural set built into the package (no download) or an ImageFolder on disk.

Both give uint8 (3, h, w) tensors whose longer side is `source_size` (source_size 0: image files
at their own resolution, procedural images at PROCEDURAL_NATIVE_SIZE); view crops are cut from
these on the device (views.py), so every box is in these pixel coordinates.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import UsageError

# Side of the procedural images at full resolution (source_size 0).
PROCEDURAL_NATIVE_SIZE = 320
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ProceduralImages:
    """`num_images` synthetic scenes, each a pure function of (seed, index).

    A scene is a two-colour gradient background with smooth noise, overlaid with a few
    striped or plain rectangles and ellipses: enough layout and texture that where a patch
    lies in an image can be learnt, at any size.
    """

    def __init__(self, num_images: int, size: int, seed: int = 0):
        self.num_images, self.size, self.seed = num_images, size, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.size
        y, x = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        angle = torch.rand((), generator=g) * 2 * math.pi
        ramp = (x * torch.cos(angle) + y * torch.sin(angle) + 1.5) / 3
        colours = torch.rand(2, 3, 1, 1, generator=g)
        image = colours[0] * ramp + colours[1] * (1 - ramp)
        noise = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(s, s), mode="bicubic",
                              align_corners=False)[0]
        image = image + 0.3 * (noise - 0.5)
        for _ in range(int(torch.randint(3, 7, (), generator=g))):
            centre, radius = torch.rand(2, generator=g), 0.08 + 0.25 * torch.rand(2, generator=g)
            dx, dy = (x - centre[0]) / radius[0], (y - centre[1]) / radius[1]
            inside = (dx.abs() < 1) & (dy.abs() < 1) if torch.rand((), generator=g) < 0.5 \
                else dx ** 2 + dy ** 2 < 1
            colour = torch.rand(3, 1, 1, generator=g)
            period = 0.03 + 0.1 * torch.rand((), generator=g)
            stripes = torch.sin((x + y * torch.rand((), generator=g)) / period) > 0
            if torch.rand((), generator=g) < 0.5:
                colour = torch.where(stripes, colour, 1 - colour)
            image = torch.where(inside, colour, image)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8)


class ImageFolder:
    """Images under `root/<class>/<file>` (any depth), decoded with PIL to RGB and resized so
    that the longer side is `size` (0: kept at full resolution). Classes are ignored: LOCA
    needs no labels."""

    def __init__(self, root: str, size: int):
        self.size = size
        self.files = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
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


def open_images(data, num_images: int, size: int, seed: int):
    """The image set a run trains on: ImageFolder(data) or the procedural set when data is None."""
    if data is None:
        return ProceduralImages(num_images, size or PROCEDURAL_NATIVE_SIZE, seed)
    if not os.path.isdir(data):
        raise UsageError(f"--data {data}: {'not a directory' if os.path.exists(data) else 'no such directory'}")
    return ImageFolder(data, size)
