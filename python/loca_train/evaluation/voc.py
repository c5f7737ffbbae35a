"""PASCAL VOC as users have it: `--data VOCdevkit/VOC2012` (a folder holding JPEGImages/,
SegmentationClass/, SegmentationObject/ and ImageSets/Segmentation/{train,val}.txt). Only the
images of the segmentation lists are read (most of JPEGImages has no mask); the probe trains
on train.txt and every score is measured on val.txt."""
from __future__ import annotations

from pathlib import Path

from ..config import UsageError
from ..images import SegmentationFolder
from .data import EvalSplit

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
LISTS = Path("ImageSets") / "Segmentation"


def is_voc_root(folder: str) -> bool:
    root = Path(folder)
    return (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir() and (root / LISTS).is_dir()


def voc_split(cfg, folder: str) -> EvalSplit:
    """The evaluation split of a VOC folder at cfg.source_size."""
    root = Path(folder)
    names = {}
    for part in ("train", "val"):
        listing = root / LISTS / f"{part}.txt"
        if not listing.is_file():
            raise UsageError(f"--data {folder}: no {LISTS / (part + '.txt')} (the VOC segmentation list)")
        names[part] = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        missing = [n for n in names[part] if not (root / "JPEGImages" / f"{n}.jpg").is_file()]
        if missing or not names[part]:
            raise UsageError(f"--data {folder}: {LISTS / (part + '.txt')} lists {len(names[part])} images, "
                             f"{len(missing)} of them missing from JPEGImages (e.g. {missing[:1]})")
    instances = root / "SegmentationObject"
    files = [root / "JPEGImages" / f"{n}.jpg" for n in names["train"] + names["val"]]
    dataset = SegmentationFolder(str(root / "JPEGImages"), cfg.source_size, str(root / "SegmentationClass"),
                                 str(instances) if instances.is_dir() else None, files=files)
    position = {path: k for k, path in enumerate(dataset.files)}
    probe = sorted(position[str(root / "JPEGImages" / f"{n}.jpg")] for n in names["train"])
    test = sorted(position[str(root / "JPEGImages" / f"{n}.jpg")] for n in names["val"])
    return EvalSplit(dataset, probe, test, f"{len(test)} VOC val images of {folder}, the probe trained on "
                     f"{len(probe)} train images", VOC_CLASSES)
