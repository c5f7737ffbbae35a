"""Training settings: one dataclass, three presets, and a command line that can override every field."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple


class UsageError(ValueError):
    """A setting or input that the user has to fix; the command line reports it in one line and
    exits with status 2, as argparse does."""


def setting(default, help_text: str, choices: Optional[Tuple[str, ...]] = None):
    """A Config field with its command-line help (and, for a string, its allowed values)."""
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class Config:
    """Every setting of a run. Presets fill it in; each field is also a command-line flag."""

    preset: str = setting("tiny", "preset name")
    # Data: None = the built-in procedural image set; else an ImageFolder-style directory.
    data: Optional[str] = setting(None, "ImageFolder-style directory of images (class sub-folders); "
                                        "default: the built-in procedural set")
    num_images: int = setting(2048, "size of the procedural set")
    source_size: int = setting(64, "longest side of a source image before cropping (pixels); 0: full "
                                   "resolution, crops cut from the original image and resized after "
                                   "cropping (official; procedural images render at 320 px)")
    num_workers: int = setting(2, "host processes decoding images and sampling views")
    # Views (official recipe: 224 reference, 224 query keeping 70 tokens, nine 96 focal queries).
    patch_size: int = setting(4, "ViT patch side (pixels)")
    image_size: int = setting(32, "reference view and first query view (pixels)")
    focal_size: int = setting(16, "focal query views (pixels)")
    num_focal: int = setting(9, "number of focal query views per image")
    query_tokens_kept: int = setting(23, "tokens of the first query kept before the encoder")
    reference_visible: float = setting(0.2, "fraction of reference tokens visible, one consecutive run")
    reference_area: Tuple[float, float] = setting((0.32, 1.0),
                                                  "area range of the reference crop (fraction of the image)")
    query_area: Tuple[float, float] = setting((0.32, 1.0), "area range of the first query crop")
    focal_area: Tuple[float, float] = setting((0.05, 0.32), "area range of the focal query crops")
    crop_sampler: str = setting("rrc", "crop boxes: tf = integer boxes as TF's sample_distorted_bounding_box "
                                       "(official: aspect 0.75-1.33 uniform, 100 tries, whole image as "
                                       "fallback); rrc = float RandomResizedCrop-style boxes (log-uniform "
                                       "aspect 3/4-4/3, 10 tries, central crop as fallback)",
                                choices=("tf", "rrc"))
    label_rule: str = setting("centre", "query patch labels (relative_position_targets' rule): scenic = official: "
                                        "the reference patch of the one source pixel that TF's nearest-neighbour "
                                        "resizes give each query patch, about half a view pixel off its centre "
                                        "(needs integer boxes: --crop-sampler tf); centre = the reference patch "
                                        "under the patch's centre", choices=("scenic", "centre"))
    color_jitter: float = setting(0.8, "probability of brightness/contrast/saturation/hue jitter")
    jitter_style: str = setting("fixed", "tf = official: the four in a random order per view, additive "
                                         "brightness, per-channel contrast, HSV saturation and hue; fixed = "
                                         "fixed order, multiplicative brightness, grey-mean contrast, YIQ "
                                         "hue rotation", choices=("tf", "fixed"))
    grayscale: float = setting(0.2, "probability of turning a view grey")
    solarize: float = setting(0.0, "probability of solarising the first query view (x >= 0.5 -> 1 - x); "
                                   "official 0.2")
    # Model (a ViT without class token, as in LOCA).
    embed_dim: int = setting(96, "ViT width")
    depth: int = setting(4, "ViT encoder blocks")
    num_heads: int = setting(3, "attention heads (encoder and cross-attention)")
    mlp_ratio: float = setting(4.0, "MLP hidden width / embed_dim")
    stochastic_depth: float = setting(0.0, "drop-path rate of the last encoder block (linear from 0)")
    init: str = setting("trunc_normal", "dense-layer initialisation: xavier = official (xavier_uniform "
                                        "attention and MLP weights, per q/k/v matrix; MLP biases N(0, 1e-6); "
                                        "other dense layers lecun_normal); trunc_normal = N(0, 0.02) "
                                        "truncated, zero biases", choices=("xavier", "trunc_normal"))
    head_hidden_dim: int = setting(256, "clustering head hidden width")
    head_bottleneck_dim: int = setting(64, "clustering head bottleneck width")
    num_prototypes: int = setting(256, "clustering prototypes")
    # LOCA objective.
    sharpening: float = setting(0.05, "teacher softmax temperature before Sinkhorn")
    sinkhorn_iterations: int = setting(3, "Sinkhorn normalisation rounds")
    student_temperature: float = setting(0.1, "temperature of the student's prototype logits")
    # The official 0.996 leaves a 200-step teacher close to its initialisation (its dense
    # features measure as random init's; docs/EVALUATION.md): tiny's teacher follows faster.
    teacher_momentum: float = setting(0.98, "EMA momentum at step 0, raised to 1 on a cosine")
    teacher_mode: str = setting("eval", "train = official: the EMA teacher encodes the reference in "
                                        "training mode (its stochastic depth active); eval = deterministic "
                                        "teacher", choices=("train", "eval"))
    mean_entropy_over: str = setting("valid", "all = official: the mean-entropy (me-max) term averages the student's "
                                              "predictions over every query patch; valid = only over the patches "
                                              "inside the reference", choices=("valid", "all"))
    # Optimisation.
    batch_size: int = setting(32, "images per process and step")
    steps: int = setting(200, "optimiser steps")
    warmup_steps: int = setting(20, "linear learning-rate warm-up steps, then cosine decay")
    lr: float = setting(2e-3, "peak learning rate (AdamW)")
    lr_reference_batch: int = setting(0, "if > 0, the peak rate is lr * global batch / lr_reference_batch")
    min_lr_ratio: float = setting(0.01, "final learning rate = lr * min_lr_ratio")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on biases and norms)")
    clip_grad: float = setting(1.0, "gradient norm clipping threshold (0: off)")
    # Running.
    seed: int = setting(0, "seed of the model and of every random draw of the data")
    device: str = setting("auto", "auto = cuda when available, else cpu")
    amp: bool = setting(True, "bf16 autocast on GPU (ignored on CPU)")
    compile: bool = setting(False, "torch.compile the student and teacher")
    backend: Optional[str] = setting(None, "force a loca_kernels backend (torch, cpu, triton, cuda)")
    output_dir: Optional[str] = setting(None, "default ./runs/<preset>")
    checkpoint_every: int = setting(100, "steps between checkpoints (also written on SIGINT/SIGTERM "
                                         "and at the end)")
    resume: bool = setting(False, "continue from the checkpoint in output_dir")
    overwrite: bool = setting(False, "replace the run already in output_dir (its log and checkpoint)")
    skip_bad_images: bool = setting(False, "skip --data images that cannot be decoded (counted in "
                                           "summary.json) instead of stopping")
    log_every: int = setting(10, "period of the progress line and of the step whose kernel time is measured")
    eval_every: int = setting(0, "steps between evaluations of the teacher's dense features (the metrics of "
                                 "python -m loca_train.evaluate, procedural set only) logged in log.jsonl; 0: off")
    eval_images: int = setting(128, "--eval-every: evaluation scenes measured (the probe trains on twice as many)")
    progress: bool = setting(True, "show a progress bar")


# The official LOCA ImageNet-1k recipe (scenic/projects/loca, 100 epochs at a global batch of
# 1024 = 16 processes x 64); ViT-S/16 and ViT-B/16 differ only in width. The tiny preset keeps
# the project's cheaper or deterministic choices (small source images, rrc crops, centre labels,
# fixed jitter, no solarisation, eval-mode teacher, me-max over the valid patches,
# truncated-normal init, a faster EMA teacher).
_OFFICIAL = dict(
    source_size=0, crop_sampler="tf", label_rule="scenic", jitter_style="tf", solarize=0.2, teacher_mode="train",
    mean_entropy_over="all", init="xavier", num_workers=8, patch_size=16, image_size=224, focal_size=96,
    num_focal=9, query_tokens_kept=70, color_jitter=0.8, grayscale=0.2, depth=12, mlp_ratio=4.0,
    stochastic_depth=0.1, head_hidden_dim=2048, head_bottleneck_dim=256, num_prototypes=4096,
    teacher_momentum=0.996, batch_size=64, steps=125_000, warmup_steps=18_750, lr=1e-3,
    lr_reference_batch=1024, checkpoint_every=2000, log_every=50,
)

PRESETS = {
    "tiny": {},
    "vit_s16": dict(_OFFICIAL, embed_dim=384, num_heads=6),
    "vit_b16": dict(_OFFICIAL, embed_dim=768, num_heads=12),
}


def preset(name: str, **overrides) -> Config:
    """The Config of preset `name` with `overrides` applied (field name -> value)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        raise UsageError(f"unknown settings {sorted(unknown)}")
    cfg = dataclasses.replace(Config(), **{**PRESETS[name], **overrides}, preset=name)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject settings that cannot describe a LOCA run, naming the setting."""
    for name in ("image_size", "focal_size"):
        if getattr(cfg, name) % cfg.patch_size:
            raise UsageError(f"{name}={getattr(cfg, name)} must be a multiple of "
                             f"patch_size={cfg.patch_size}")
    query_tokens = (cfg.image_size // cfg.patch_size) ** 2
    if not 1 <= cfg.query_tokens_kept <= query_tokens:
        raise UsageError(f"query_tokens_kept must be in [1, {query_tokens}], "
                         f"got {cfg.query_tokens_kept}")
    if not 0 < cfg.reference_visible <= 1:
        raise UsageError(f"reference_visible must be in (0, 1], got {cfg.reference_visible}")
    if cfg.embed_dim % cfg.num_heads:
        raise UsageError(f"embed_dim={cfg.embed_dim} must be divisible by "
                         f"num_heads={cfg.num_heads}")
    for f in fields(Config):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise UsageError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")
    if cfg.label_rule == "scenic" and cfg.crop_sampler != "tf":
        raise UsageError(f"label_rule=scenic needs integer crop boxes (crop_sampler=tf), got crop_sampler="
                         f"{cfg.crop_sampler}; use label_rule=centre with rrc boxes")
    if cfg.source_size and cfg.source_size < cfg.image_size // 2:
        raise UsageError(f"source_size={cfg.source_size} is far below image_size="
                         f"{cfg.image_size}; crops would be blown-up blurs")
    if cfg.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.steps < 0:
        raise UsageError(f"steps must be >= 0, got {cfg.steps}")
    if cfg.lr <= 0:
        raise UsageError(f"lr must be > 0, got {cfg.lr}")
    if cfg.eval_every < 0:
        raise UsageError(f"eval_every must be >= 0, got {cfg.eval_every}")
    if cfg.eval_every and cfg.data is not None:
        raise UsageError("--eval-every needs the procedural set's ground truth; evaluate runs on --data with "
                         "python -m loca_train.evaluate --data DIR --masks DIR")
    if cfg.eval_images < 2:
        raise UsageError(f"eval_images must be >= 2, got {cfg.eval_images}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in output_dir, --overwrite replaces it: give one")


def _flag_type(field_type: str):
    base = field_type.replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "str": str}[base]


def usage_error(message: str):
    """Report a user error as argparse does (one line on stderr, exit status 2)."""
    sys.stderr.write(f"loca_train: error: {message}\n")
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one usage_error line, without the long usage text."""

    def error(self, message: str):
        usage_error(message)


def config_from_dict(values: dict) -> Config:
    """The Config whose fields `values` holds (as written by dataclasses.asdict, to JSON or to a
    checkpoint); other keys are ignored."""
    names = {f.name for f in fields(Config)}
    return Config(**{key: tuple(value) if isinstance(value, list) else value
                     for key, value in values.items() if key in names})


def parse_args(argv=None) -> Config:
    """Parse `python -m loca_train` arguments: --preset, then any Config field as --field-name.
    Invalid settings exit with status 2 and a one-line `loca_train: error: ...`."""
    # The preset comes first: --help shows the defaults of the preset given with it.
    chooser = Parser(add_help=False)
    chooser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    chosen = chooser.parse_known_args(argv)[0].preset
    parser = Parser(
        prog="python -m loca_train",
        description="LOCA pretraining (location-aware self-supervised ViT) using loca_kernels. "
                    f"Pick a preset, then override any setting; defaults shown are the {chosen} preset's "
                    "(python -m loca_train --preset NAME --help shows another's).",
        epilog="Presets other than tiny set: " + ", ".join(
            f"{name}={values}" for name, values in _OFFICIAL.items())
            + "; vit_s16: embed_dim=384, num_heads=6; vit_b16: embed_dim=768, num_heads=12.")
    defaults = dataclasses.replace(Config(), **PRESETS[chosen])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="tiny: small ViT on small images, minutes on a CPU, keeping the project's "
                             "cheaper or deterministic choices (rrc crops at source_size 64, centre labels, "
                             "fixed jitter, no solarisation, eval-mode teacher, truncated-normal init); "
                             "vit_s16/vit_b16: the official LOCA ImageNet recipe in every point")
    for f in fields(Config):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} ({chosen}: {getattr(defaults, f.name)})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type.startswith("Tuple"):
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                                help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(f.type), default=None, help=help_text,
                                choices=f.metadata["choices"])
    args = vars(parser.parse_args(argv))
    name = args.pop("preset")
    overrides = {key: (tuple(value) if isinstance(value, list) else value)
                 for key, value in args.items() if value is not None}
    try:
        return preset(name, **overrides)
    except UsageError as error:
        parser.error(str(error))
