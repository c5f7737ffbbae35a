"""What a person reads beside the printed table (scores.scores_table): the figure eval.png."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..config import Config

SOURCES = {"teacher": "teacher", "student": "student", "random_init": "random init",
           "raw_pixels": "raw pixels", "noise": "noise", "position": "position", "colour": "colour", "ideal": "ideal"}


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
