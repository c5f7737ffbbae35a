"""`python -m loca_train.export --run-dir R [--output F] [--format plain|timm] [--image-size N]`:
the teacher's encoder of a run (the network LOCA keeps for downstream tasks) as a state_dict.

plain: this package's Encoder keys (load into loca_train.networks.Encoder). timm: timm's
VisionTransformer keys (vit_small_patch16_224 for the vit_s16 preset, vit_base_patch16_224 for
vit_b16), loadable with `timm.create_model(name, num_classes=0).load_state_dict(state)`.
LOCA's ViT has no class token: the exported cls_token and its positional embedding are
zeros, so timm's class token joins the attention and the patch tokens are close to, not
equal to, those of the LOCA encoder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import PRESETS, Config, Parser, UsageError, config_from_dict, usage_error
from .networks import resize_pos_embed

FORMATS = ("plain", "timm")
# timm models of the presets (the architecture fields must match the preset's).
TIMM_NAMES = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224"}
_ARCHITECTURE = ("patch_size", "image_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Encoder block key -> timm block key.
_TIMM_BLOCK_KEYS = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2",
                    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def teacher_encoder(state: dict) -> dict:
    """The teacher's Encoder state_dict from a training checkpoint."""
    prefix = "encoder."
    return {key[len(prefix):]: value for key, value in state["teacher"].items() if key.startswith(prefix)}


def to_timm(encoder: dict, cfg: Config, image_size: int) -> dict:
    """An Encoder state_dict in timm's VisionTransformer layout (class token included, no
    head), its positional embeddings resized to image_size when that differs from the run's."""
    pos = encoder["pos_embed"]                                   # (1, dim, h, w)
    grid = image_size // cfg.patch_size
    pos = resize_pos_embed(pos, (grid, grid)).flatten(2).transpose(1, 2)     # (1, N, dim), raster order
    dim = pos.shape[-1]
    out = {"cls_token": pos.new_zeros(1, 1, dim),
           "pos_embed": torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1).contiguous(),
           "patch_embed.proj.weight": encoder["patch_embed.weight"],
           "patch_embed.proj.bias": encoder["patch_embed.bias"]}
    for block in range(cfg.depth):
        for ours, theirs in _TIMM_BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{block}.{theirs}.{kind}"] = encoder[f"blocks.{block}.{ours}.{kind}"]
    out["norm.weight"], out["norm.bias"] = encoder["norm.weight"], encoder["norm.bias"]
    return out


def timm_model(cfg: Config, image_size: int) -> str:
    """How to build the timm model that takes the export, as Python."""
    arch = {name: getattr(cfg, name) for name in _ARCHITECTURE}
    for name, timm_name in TIMM_NAMES.items():
        if image_size == 224 and all(PRESETS[name][key] == value for key, value in arch.items()):
            return f"timm.create_model({timm_name!r}, num_classes=0)"
    return (f"timm.models.vision_transformer.VisionTransformer(img_size={image_size}, "
            f"patch_size={cfg.patch_size}, embed_dim={cfg.embed_dim}, depth={cfg.depth}, "
            f"num_heads={cfg.num_heads}, mlp_ratio={cfg.mlp_ratio}, num_classes=0)")


def main(argv=None) -> int:
    parser = Parser(prog="python -m loca_train.export",
                    description="Write the teacher encoder of a loca_train run as a state_dict.")
    parser.add_argument("--run-dir", required=True, help="output folder of the run (holds checkpoint.pt)")
    parser.add_argument("--output", help="file to write (default: <run-dir>/teacher_encoder[_timm].pt)")
    parser.add_argument("--format", choices=FORMATS, default="plain",
                        help="plain: loca_train's Encoder keys; timm: timm's VisionTransformer keys")
    parser.add_argument("--image-size", type=int,
                        help="timm: input size of the target model (default: the run's image_size); "
                             "the positional embeddings are resized to it")
    args = parser.parse_args(argv)
    output = Path(args.output or Path(args.run_dir) / f"teacher_encoder{'_timm' if args.format == 'timm' else ''}.pt")
    if output.is_dir() or not output.parent.is_dir():
        parser.error(f"--output {output}: {'a directory' if output.is_dir() else 'its folder does not exist'}; "
                     f"expected a file path in an existing folder")
    try:
        state, _ = checkpoint.read_for_command(args.run_dir)
    except UsageError as error:
        parser.error(str(error))
    cfg = config_from_dict(state["config"])
    encoder = teacher_encoder(state)
    if not encoder:
        parser.error(f"--run-dir {args.run_dir}: its checkpoint's teacher has no encoder weights (encoder.*)")
    how = "loca_train.networks.Encoder(config)"
    if args.format == "timm":
        image_size = args.image_size or cfg.image_size
        if image_size <= 0 or image_size % cfg.patch_size:
            parser.error(f"--image-size {image_size} must be a positive multiple of patch_size={cfg.patch_size}")
        try:
            encoder, how = to_timm(encoder, cfg, image_size), timm_model(cfg, image_size)
        except KeyError as error:
            parser.error(f"--run-dir {args.run_dir}: its checkpoint's teacher encoder has no {error} (not this "
                         f"package's ViT layout)")
    try:
        checkpoint.atomic_write(output, lambda f: torch.save(encoder, f))
    except UsageError as error:
        parser.error(str(error))
    print(f"loca_train.export: teacher encoder of {args.run_dir} (step {state['step']}) written to {output}; "
          f"load with {how}.load_state_dict(torch.load(path))")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as error:    # an unwritable --output, an unreadable checkpoint
        usage_error(str(error))
