"""Source images: a procedural set built into the package (no download) or an ImageFolder on disk.

Both give uint8 (3, h, w) tensors whose longer side is `source_size` (source_size 0: image files
at their own resolution, procedural images at PROCEDURAL_NATIVE_SIZE); view crops are cut from
these on the device (views.py), so every box is in these pixel coordinates.
"""
from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import UsageError
from .photos import EVAL_SIZE, PhotoScenes

# Side of the procedural images at full resolution (source_size 0).
PROCEDURAL_NATIVE_SIZE = 320
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Most pixels an image file may hold as decoded (after a JPEG's reduced-size decoding): 8192 x 8192.
# At --source-size 0 a batch holds its images at full size, uint8 on the host and float32 on
# the device, so memory grows with batch x this; PIL's own check would only warn below ~179 MP.
MAX_IMAGE_PIXELS = 1 << 26
# What transparent pixels show (alpha, palette or tRNS transparency): white, as a viewer shows them.
TRANSPARENT_BACKGROUND = (255, 255, 255)


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
        self.bad_entries = {}   # as ImageFolder's: nothing here is unreadable

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
    """Images under `root/<class>/<file>` (any depth, symlinked folders followed), decoded with
    PIL to 8-bit RGB (decode_image) and resized so that the longer side is `size` (0: kept at
    full resolution). Classes are ignored: LOCA needs no labels.

    Entries that cannot be read are found while listing (list_images): without `skip_bad` they
    stop here with one BadImage naming them, with it they are left out and kept in
    `bad_entries` (path: reason). Files that fail to decode, or hold more than `max_pixels`
    pixels (None: MAX_IMAGE_PIXELS), raise BadImage when indexed. `files`: the images to use
    instead of every image under root (paths under root, e.g. those of a dataset's split list)."""

    def __init__(self, root: str, size: int, skip_bad: bool = False, max_pixels: Optional[int] = None,
                 files: Optional[list] = None):
        self.size, self.max_pixels = size, max_pixels
        self.files, self.bad_entries = list_images(root) if files is None else (sorted(str(p) for p in files), {})
        if self.bad_entries and not skip_bad:
            raise BadImage(f"--data {root}: {entries_in_words(self.bad_entries)}; "
                           f"--skip-bad-images skips them")
        if not self.files:
            unreadable = f" that can be read ({entries_in_words(self.bad_entries)})" if self.bad_entries else ""
            raise UsageError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it{unreadable}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image `index` as uint8 (3, h, w); BadImage when its file cannot be decoded."""
        path = self.files[index]
        try:
            pixels = decode_image(path, self.size, self.max_pixels)
        except BadImage as error:
            raise BadImage(f"{error}; --skip-bad-images skips such images") from None
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))   # one copy, writable

    def decode_error(self, index: int) -> BadImage:
        """The error of image `index`, decoded again here: loader processes report only indices."""
        try:
            self[index]
        except BadImage as error:
            return error
        return BadImage(f"cannot decode image {self.files[index]} in a loader process; "
                        f"--skip-bad-images skips such images")


class BadImage(UsageError):
    """An image file or folder of an ImageFolder that cannot be read or decoded."""


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def list_images(root: str):
    """(files, bad_entries): the sorted paths of the image files under `root` (by suffix,
    IMAGE_EXTENSIONS), and {path: reason} of what could not be listed or is no file: folders
    that cannot be read, image names that are broken links or not regular files (a FIFO would
    block the reader forever). Symlinked folders are followed; a folder met again (a link
    loop, or two links to one folder) is listed once. Only the directory entries are read:
    no file is opened."""
    files, bad, seen, folders = [], {}, set(), [str(Path(root))]     # paths as pathlib writes them
    while folders:
        folder = folders.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            bad[folder] = f"cannot read folder: {error.strerror}"
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir():      # follows links; False for a dangling one
                    subfolders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    if entry.is_file():
                        files.append(entry.path)
                    else:
                        bad[entry.path] = _kind(os.stat(entry.path).st_mode)
            except OSError as error:    # a dangling link, a link loop, an entry gone meanwhile
                link = "link: " if entry.is_symlink() else ""
                bad[entry.path] = f"{link}{error.strerror or error}"
        folders.extend(reversed(subfolders))    # depth first, in name order
    return sorted(files), bad


def entries_in_words(bad: dict, shown: int = 3) -> str:
    """"N entries cannot be read: path (reason), ... and K more" in one line."""
    items = sorted(bad.items())
    listed = ", ".join(f"{path} ({reason})" for path, reason in items[:shown])
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {'entry' if len(items) == 1 else 'entries'} cannot be read: {listed}{more}"


def _to_rgb(img):
    """`img` as an 8-bit RGB PIL image: 16-bit and 32-bit integer greyscale scaled (65535 -> 255),
    transparency (alpha, premultiplied alpha, a palette's or a colour's tRNS) composited over
    TRANSPARENT_BACKGROUND, CMYK by PIL's formula; BadImage for float pixels (no fixed range)."""
    from PIL import Image

    if img.mode.startswith("I"):
        # PIL's own conversion clips 16-bit values at 255 (a 16-bit PNG turns almost white).
        # Mode I (32-bit) is what several formats give 16-bit data as: the same range is read.
        grey = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((grey + 128) // 257).astype(np.uint8), "L")
    elif img.mode == "F":
        raise BadImage("32-bit float pixels (mode F) have no fixed range to map to 8 bits")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
        img.paste(rgba, mask=rgba.getchannel("A"))
        return img
    return img if img.mode == "RGB" else img.convert("RGB")     # convert would copy an RGB image


def decode_image(path: str, size: int = 0, max_pixels: Optional[int] = None) -> np.ndarray:
    """The image file `path` as uint8 (h, w, 3) RGB (_to_rgb), its longer side resized (bicubic)
    to `size` (0: full resolution). JPEGs are decoded at the smallest of 1/8, 1/4, 1/2 or full
    scale that keeps that size (PIL's draft). BadImage, naming the file, when it is no regular
    file (checked before it is opened: a FIFO would block), cannot be read or decoded, or
    holds more than `max_pixels` pixels as decoded (None: MAX_IMAGE_PIXELS)."""
    from PIL import Image

    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(_kind(info.st_mode))
        with warnings.catch_warnings():     # PIL warns of large images; max_pixels is the limit here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if size:
                scale = size / max(img.size)
                width, height = (max(1, round(side * scale)) for side in img.size)
                img.draft(img.mode, (width, height))
            if img.width * img.height > max_pixels:
                raise BadImage(f"{img.width}x{img.height} pixels, more than the limit of {max_pixels} "
                               f"(MAX_IMAGE_PIXELS); shrink it, or give --source-size to decode JPEGs smaller")
            img.load()
            rgb = _to_rgb(img)
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.BICUBIC)
            return np.asarray(rgb)
    # What PIL raises for unreadable, truncated, unknown or oversized files (and BadImage, a ValueError).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise BadImage(f"cannot decode image {path} ({reason})") from None


class SegmentationFolder(ImageFolder):
    """An ImageFolder whose images have ground truth: under `masks` a PNG of class indices per
    image at the image's relative path (suffix .png; PASCAL VOC's SegmentationClass, 255 =
    ignore) and, when `instances` is given, a PNG of instance ids there (VOC's
    SegmentationObject: 0 background, 1..n objects, 255 ignore). Every mask must exist and
    have its image's size: both are checked here, before any work, from the file headers."""

    def __init__(self, root: str, size: int, masks: str, instances: Optional[str] = None,
                 files: Optional[list] = None):
        super().__init__(root, size, files=files)
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
                try:
                    with Image.open(file) as img, Image.open(mask) as label:
                        sizes = img.size, label.size
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                    raise UsageError(f"{flag}: cannot read the size of {file} or of its mask {mask} "
                                     f"({error})") from None
                if sizes[0] != sizes[1]:
                    raise UsageError(f"{flag}: mask {mask} is {sizes[1][0]}x{sizes[1][1]} pixels, "
                                     f"its image {file} {sizes[0][0]}x{sizes[0][1]}")

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


def open_images(data, num_images: int, size: int, seed: int, skip_bad: bool = False, scenes: str = "shapes"):
    """The image set a run trains on: ImageFolder(data, size, skip_bad), or when data is None the
    built-in `scenes`: the procedural set or the photo scenes' train split (photos.py)."""
    if data is None and scenes == "photos":
        return PhotoScenes(num_images, size or EVAL_SIZE, seed, split="train")
    if data is None:
        return ProceduralImages(num_images, size or PROCEDURAL_NATIVE_SIZE, seed)
    if not os.path.isdir(data):
        raise UsageError(f"--data {data}: {'not a directory' if os.path.exists(data) else 'no such directory'}")
    return ImageFolder(data, size, skip_bad)
