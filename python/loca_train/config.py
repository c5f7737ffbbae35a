"""Training settings: one dataclass, three presets (with per-objective overrides), and a command line
that can override every field."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple


class UsageError(ValueError):
    """A setting or input that the user has to fix; the command line reports it in one line and
    exits with status 2, as argparse does."""


OBJECTIVES = ("loca", "densecl", "gtsa", "mmc")
# Settings that change what a run computes but that --resume-changes lets a resume change.
RESUME_CHANGEABLE = ("amp", "data")


def setting(default, help_text: str, choices: Optional[Tuple[str, ...]] = None):
    """A Config field with its command-line help (and, for a string, its allowed values)."""
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class Config:
    """Every setting of a run. Presets fill it in; each field is also a command-line flag."""

    preset: str = setting("tiny", "preset name")
    objective: str = setting("loca", "dense objective (docs/OBJECTIVES.md): loca, densecl (two views, global and "
                                     "dense InfoNCE with queues), gtsa (turned multi-crop, crop, correspondence "
                                     "and rotation terms), mmc (masked image modelling, self-distillation, global "
                                     "contrast)", choices=OBJECTIVES)
    # Data: None = a built-in image set (--scenes); else an ImageFolder-style directory.
    data: Optional[str] = setting(None, "ImageFolder-style directory of images (class sub-folders); "
                                        "default: the built-in set --scenes names")
    scenes: str = setting("photos", "built-in set when --data is not given: photos (textures cut from "
                                    "scikit-image's photographs, their train split; the set python -m "
                                    "loca_train.evaluate measures, on its test split; docs/EVALUATION.md) or "
                                    "shapes (procedural rectangles and ellipses)", choices=("shapes", "photos"))
    num_images: int = setting(2048, "size of the built-in set")
    source_size: int = setting(64, "longest side of a source image before cropping (pixels); 0: full "
                                   "resolution, crops cut from the original image and resized after "
                                   "cropping (official; procedural images render at 320 px)")
    num_workers: int = setting(2, "host processes decoding images and sampling views")
    # Views (official recipe: 224 reference, 224 query keeping 70 tokens, nine 96 focal queries).
    patch_size: int = setting(4, "ViT patch side (pixels)")
    image_size: int = setting(32, "side of the global views (pixels): LOCA's reference and first query view")
    focal_size: int = setting(16, "side of the local views (pixels): LOCA's focal query views")
    num_focal: int = setting(9, "local views per image: LOCA's focal query views")
    query_tokens_kept: int = setting(23, "tokens of the first query kept before the encoder")
    reference_visible: float = setting(0.2, "fraction of reference tokens visible, one consecutive run")
    reference_area: Tuple[float, float] = setting((0.32, 1.0),
                                                  "area range of the global views' crops (fraction of the image); "
                                                  "LOCA: of the reference view")
    query_area: Tuple[float, float] = setting((0.32, 1.0), "area range of the first query view's crop (a global view)")
    focal_area: Tuple[float, float] = setting((0.05, 0.32), "area range of the local views' crops; LOCA: of the "
                                                            "focal query views")
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
    init: str = setting("trunc_normal", "loca's dense-layer initialisation (the other objectives use trunc_normal, "
                                        "as DenseCL-, GTSA- and DINO-style ViTs): xavier = official (xavier_uniform "
                                        "attention and MLP weights, per q/k/v matrix; MLP biases N(0, 1e-6); "
                                        "other dense layers lecun_normal); trunc_normal = N(0, 0.02) "
                                        "truncated, zero biases", choices=("xavier", "trunc_normal"))
    head_hidden_dim: int = setting(256, "clustering head hidden width (gtsa: rotation predictor; mmc: "
                                           "distillation and contrast heads)")
    head_bottleneck_dim: int = setting(64, "clustering head bottleneck width (gtsa: rotation predictor; "
                                               "mmc: distillation head)")
    num_prototypes: int = setting(256, "clustering prototypes (mmc: distillation head outputs)")
    # LOCA objective.
    sharpening: float = setting(0.05, "teacher softmax temperature before Sinkhorn")
    sinkhorn_iterations: int = setting(3, "Sinkhorn normalisation rounds")
    student_temperature: float = setting(0.1, "temperature of the student's prototype logits (loca, mmc)")
    # The official 0.996 leaves a 200-step teacher close to its initialisation (its dense
    # features measure as random init's; docs/EVALUATION.md): tiny's teacher follows faster.
    teacher_momentum: float = setting(0.98, "EMA momentum at step 0, raised to 1 on a cosine")
    teacher_momentum_schedule: str = setting("cosine", "cosine = the momentum rises to 1 on a cosine (LOCA, DINO, "
                                                       "GTSA); constant = teacher_momentum throughout (MoCo, "
                                                       "DenseCL)", choices=("cosine", "constant"))
    teacher_mode: str = setting("eval", "train = official: the EMA teacher encodes the reference in "
                                        "training mode (its stochastic depth active); eval = deterministic "
                                        "teacher", choices=("train", "eval"))
    mean_entropy_over: str = setting("valid", "all = official: the mean-entropy (me-max) term averages the student's "
                                              "predictions over every query patch; valid = only over the patches "
                                              "inside the reference", choices=("valid", "all"))
    # DenseCL, GTSA and MMC (each objective's values: OBJECTIVE_PRESETS).
    projection_dim: int = setting(128, "output width of the projection heads (densecl, gtsa, mmc)")
    queue_size: int = setting(65536, "negatives per queue (densecl, mmc), a multiple of the global batch "
                                     "(mmc: of twice the global batch)")
    contrast_temperature: float = setting(0.2, "InfoNCE temperature (densecl, mmc)")
    dense_weight: float = setting(0.5, "densecl: weight lambda of the dense term, (1 - lambda) of the global one")
    num_matches_global: int = setting(98, "gtsa: patch pairs kept per direction for a global student view")
    num_matches_local: int = setting(18, "gtsa: patch pairs kept per direction for a local student view")
    pool_global: int = setting(10, "gtsa: side of the crop term's pooled intersection for a global student view")
    pool_local: int = setting(4, "gtsa: side of the pooled intersection for a local student view")
    min_overlap: float = setting(0.01, "gtsa: least intersection of a local crop with each global crop "
                                       "(fraction of the image; twice that between the global crops)")
    correspondence_weight: float = setting(0.5, "gtsa: weight of the patch-correspondence term (0 during the "
                                                "warmup_steps)")
    rotation_weight: float = setting(0.5, "gtsa: weight of the quarter-turn prediction term")
    mask_ratio: float = setting(0.6, "mmc: fraction of each global view's patches masked for the student")
    teacher_temperature: float = setting(0.04, "mmc: temperature of the teacher's distillation targets")
    center_momentum: float = setting(0.9, "mmc: EMA momentum of the teacher's distillation centre")
    mim_weight: float = setting(1.0, "mmc: weight of the masked-patch reconstruction term")
    distill_weight: float = setting(1.0, "mmc: weight of the global-to-local self-distillation term")
    contrast_weight: float = setting(1.0, "mmc: weight of the global contrast term")
    # Optimisation.
    batch_size: int = setting(32, "images per process and step")
    # tiny: the comparison of docs/RESULTS.md (8000 images seen), and the main job within 10
    # minutes on 2 CPU cores with its evaluation.
    steps: int = setting(250, "optimiser steps")
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
    resume_changes: Optional[str] = setting(None, "with --resume: settings that may differ from the run's "
                                                  "(comma-separated, of " + ", ".join(RESUME_CHANGEABLE) + "); "
                                                  "the run continues with the new values")
    overwrite: bool = setting(False, "replace the run already in output_dir (its log and checkpoint)")
    skip_bad_images: bool = setting(False, "skip --data images that cannot be decoded (counted in "
                                           "summary.json) instead of stopping")
    log_every: int = setting(10, "period of the progress line and of the step whose kernel time is measured")
    eval_every: int = setting(0, "steps between evaluations of the teacher's dense features (the metrics of "
                                 "python -m loca_train.evaluate on a built-in scene set: --scenes photos, its "
                                 "validation scenes; shapes, the procedural evaluation scenes) logged in "
                                 "log.jsonl; 0: off")
    eval_images: int = setting(128, "--eval-every: evaluation scenes measured (the probe trains on twice as many)")
    progress: bool = setting(True, "show a progress bar")


# The command line's groups in --help: (title, description, fields). Objective-specific flags
# are in their objective's group, or say in their help which objectives they apply to.
_VIEWS = ("Every objective draws global views (--global-size pixels, area --global-area) and, all but "
          "densecl, --num-local local views (--local-size pixels, area --local-area). LOCA calls its global "
          "views the reference view (the teacher's) and the first query view (area --query-area), its local "
          "views the focal query views; LOCA's names (--image-size, --reference-area, --focal-size, "
          "--num-focal, --focal-area) stay as aliases for one release.")
FLAG_GROUPS = (
    ("objective", None, ("objective",)),
    ("data", "the images", ("data", "scenes", "num_images", "source_size", "num_workers")),
    ("views", _VIEWS, ("image_size", "focal_size", "num_focal", "reference_area", "focal_area", "crop_sampler",
                       "color_jitter", "jitter_style", "grayscale")),
    ("model", "the ViT encoder and the heads", ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                                "stochastic_depth", "head_hidden_dim", "head_bottleneck_dim",
                                                "num_prototypes", "projection_dim")),
    ("teacher", "the EMA teacher (every objective)", ("teacher_momentum", "teacher_momentum_schedule",
                                                       "teacher_mode")),
    ("loca", "--objective loca", ("query_tokens_kept", "reference_visible", "query_area", "label_rule", "solarize",
                                  "init", "sharpening", "sinkhorn_iterations", "student_temperature",
                                  "mean_entropy_over")),
    ("densecl", "--objective densecl", ("queue_size", "contrast_temperature", "dense_weight")),
    ("gtsa", "--objective gtsa", ("num_matches_global", "num_matches_local", "pool_global", "pool_local",
                                  "min_overlap", "correspondence_weight", "rotation_weight")),
    ("mmc", "--objective mmc", ("mask_ratio", "teacher_temperature", "center_momentum", "mim_weight",
                                "distill_weight", "contrast_weight")),
    ("optimisation", "AdamW and its schedule", ("batch_size", "steps", "warmup_steps", "lr", "lr_reference_batch",
                                                "min_lr_ratio", "weight_decay", "clip_grad")),
    ("running", "devices, output, checkpoints, logging", (
        "seed", "device", "amp", "compile", "backend", "output_dir", "checkpoint_every", "resume", "resume_changes",
        "overwrite",
        "skip_bad_images", "log_every", "eval_every", "eval_images", "progress")),
)
# The objectives a flag applies to, for the flags that not every objective reads; giving one
# for another objective on the command line is an error.
_LOCAL_VIEWS = ("loca", "gtsa", "mmc")
# Flag names that say which views a setting is of, the same for every objective; the field's own
# flag (LOCA's word) stays as an alias.
VIEW_FLAGS = {"image_size": "--global-size", "focal_size": "--local-size", "num_focal": "--num-local",
              "reference_area": "--global-area", "focal_area": "--local-area"}
APPLIES_TO = {
    **{name: (group,) for group, _, names in FLAG_GROUPS if group in OBJECTIVES for name in names},
    "focal_size": _LOCAL_VIEWS, "num_focal": _LOCAL_VIEWS, "focal_area": _LOCAL_VIEWS,
    "head_hidden_dim": _LOCAL_VIEWS, "head_bottleneck_dim": _LOCAL_VIEWS, "num_prototypes": ("loca", "mmc"),
    "projection_dim": ("densecl", "gtsa", "mmc"), "student_temperature": ("loca", "mmc"),
    "queue_size": ("densecl", "mmc"), "contrast_temperature": ("densecl", "mmc"),
}


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


# Each objective's settings on top of a preset: "tiny" for the tiny preset, "official" for
# vit_s16/vit_b16 (whose LOCA recipe values the objective does not set stay as they are).
# Sources: DenseCL configs/selfsup/densecl/densecl_imagenet_200ep.py (WXinlong/DenseCL);
# GTSA main_pretrain.py, util/gtsa_transforms.py (bok3948/GTSA); MMC: docs/OBJECTIVES.md.
_DENSECL = dict(
    reference_area=(0.2, 1.0),          # RandomResizedCrop(224, scale=(0.2, 1.))
    crop_sampler="rrc", teacher_mode="eval", solarize=0.0,
    teacher_momentum_schedule="constant",   # MoCo's key encoder: a constant momentum
)
_GTSA = dict(
    reference_area=(0.3, 1.0), focal_area=(0.1, 0.3),   # min/max_scale_crops [0.3, 0.1], [1., 0.3]
    crop_sampler="rrc", solarize=0.0,
    teacher_mode="eval",                # momentum_encoder drop_path_rate=0.
    min_overlap=0.01,                   # GTSATransforms min_intersection (doubled between the globals)
    correspondence_weight=0.5,          # --pc_loss_coef
    rotation_weight=0.5,                # --rot_pre_coef
    weight_decay=0.04,                  # --weight_decay (GTSA raises it to 0.4 on a cosine; constant here)
    clip_grad=3.0,                      # --clip_grad
)
_MMC = dict(
    reference_area=(0.4, 1.0), focal_area=(0.05, 0.4),  # DINO's global/local crop scales
    crop_sampler="rrc", solarize=0.0, teacher_mode="eval",
)
OBJECTIVE_PRESETS = {
    "loca": {"tiny": {}, "official": {}},
    "densecl": {
        "tiny": dict(_DENSECL, projection_dim=64, queue_size=1024,
                     # 0.999 leaves a 200-step teacher at its initialisation (as 0.996 does for LOCA)
                     teacher_momentum=0.99),
        "official": dict(_DENSECL, projection_dim=128,   # feat_dim=128
                         queue_size=65536,              # queue_len=65536
                         contrast_temperature=0.2,      # ContrastiveHead temperature=0.2
                         dense_weight=0.5,              # loss_lambda=0.5
                         teacher_momentum=0.999),       # momentum=0.999
    },
    "gtsa": {
        "tiny": dict(_GTSA, num_focal=4, focal_size=16, projection_dim=64, num_matches_global=32,
                     num_matches_local=8, pool_global=6, pool_local=3),
        "official": dict(_GTSA, focal_size=96, num_focal=8,  # --size-crops 224 96, --num-crops 2 8
                         projection_dim=768,                 # --out_dim (projector and predictor output)
                         head_hidden_dim=768, head_bottleneck_dim=128,  # rot_predictor 384-768-768-128-4
                         num_matches_global=98, num_matches_local=18,   # --num_matches (98, 18)
                         pool_global=10, pool_local=4,                   # --roi_out_size 10 4
                         teacher_momentum=0.996,                         # --momentum_teacher
                         lr=5e-4, lr_reference_batch=256,                # --blr 0.0005 x batch / 256
                         stochastic_depth=0.1),                          # base_encoder drop_path_rate=0.1
    },
    "mmc": {
        "tiny": dict(_MMC, num_focal=4, focal_size=16, projection_dim=64, queue_size=1024),
        "official": dict(_MMC, focal_size=96, num_focal=8,   # DINO's 96-pixel local crops, 8 of them
                         projection_dim=256, queue_size=65536, teacher_momentum=0.996),
    },
}


def _preset_values(name: str, objective: str) -> dict:
    """The settings preset `name` gives for `objective` (before the user's overrides)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    if objective not in OBJECTIVE_PRESETS:
        raise UsageError(f"unknown objective {objective!r}, expected one of {', '.join(OBJECTIVES)}")
    return {**PRESETS[name], **OBJECTIVE_PRESETS[objective]["tiny" if name == "tiny" else "official"]}


def preset(name: str, **overrides) -> Config:
    """The Config of preset `name` for overrides["objective"] (default loca), with `overrides`
    applied (field name -> value)."""
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        raise UsageError(f"unknown settings {sorted(unknown)}")
    values = _preset_values(name, overrides.get("objective", "loca"))
    cfg = dataclasses.replace(Config(), **{**values, **overrides}, preset=name)
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
    _validate_objective(cfg)
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
        raise UsageError("--eval-every needs a built-in scene set's ground truth (--scenes); evaluate runs on "
                         "--data with python -m loca_train.evaluate --data DIR --masks DIR")
    if cfg.eval_images < 2:
        raise UsageError(f"eval_images must be >= 2, got {cfg.eval_images}")
    for name in resume_changes(cfg):
        if name not in RESUME_CHANGEABLE:
            raise UsageError(f"--resume-changes: {name!r} cannot change in a resume (it may be one of "
                             f"{', '.join(RESUME_CHANGEABLE)})")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in output_dir, --overwrite replaces it: give one")


def resume_changes(cfg: Config) -> Tuple[str, ...]:
    """The setting names of cfg.resume_changes."""
    return tuple(name.strip().replace("-", "_") for name in (cfg.resume_changes or "").split(",") if name.strip())


def _validate_objective(cfg: Config) -> None:
    """The settings of cfg.objective that the objective's modules cannot take."""
    if cfg.objective == "loca" and cfg.label_rule == "scenic" and cfg.crop_sampler != "tf":
        raise UsageError(f"label_rule=scenic needs integer crop boxes (crop_sampler=tf), got crop_sampler="
                         f"{cfg.crop_sampler}; use label_rule=centre with rrc boxes")
    if cfg.objective == "gtsa":
        patches = {"num_matches_global": (cfg.image_size // cfg.patch_size) ** 2,
                   "num_matches_local": (cfg.focal_size // cfg.patch_size) ** 2}
        for name, most in patches.items():
            if not 1 <= getattr(cfg, name) <= most:
                raise UsageError(f"{name} must be in [1, {most}] (the patches of its views), got {getattr(cfg, name)}")
        for name in ("pool_global", "pool_local"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not 0 <= cfg.min_overlap < 0.5:
            raise UsageError(f"min_overlap must be in [0, 0.5), got {cfg.min_overlap}")
    if cfg.objective == "mmc" and not 0 < cfg.mask_ratio < 1:
        raise UsageError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.objective in ("densecl", "mmc"):
        if cfg.queue_size < 1 or cfg.contrast_temperature <= 0:
            raise UsageError(f"queue_size must be >= 1 and contrast_temperature > 0, got {cfg.queue_size} and "
                             f"{cfg.contrast_temperature}")


def _flag_type(field_type: str):
    base = field_type.replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "str": str}[base]


def warn(message: str) -> None:
    """One warning line on stderr, in the command line's voice."""
    print(f"loca_train: warning: {message}", file=sys.stderr, flush=True)


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
    chooser.add_argument("--objective", default="loca", choices=OBJECTIVES)
    known = chooser.parse_known_args(argv)[0]
    chosen = known.preset
    parser = Parser(
        prog="python -m loca_train",
        description="Dense self-supervised ViT pretraining (LOCA, DenseCL, GTSA, MMC) using loca_kernels. "
                    "Pick a preset and an objective, then override any setting; defaults shown are the "
                    f"{chosen} preset's for --objective {known.objective} (python -m loca_train --preset NAME "
                    "--objective NAME --help shows another's).",
        epilog="Presets other than tiny set: " + ", ".join(
            f"{name}={values}" for name, values in _OFFICIAL.items())
            + "; vit_s16: embed_dim=384, num_heads=6; vit_b16: embed_dim=768, num_heads=12.")
    defaults = dataclasses.replace(Config(), **_preset_values(chosen, known.objective))
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="tiny: small ViT on small images, minutes on a CPU, keeping the project's "
                             "cheaper or deterministic choices (rrc crops at source_size 64, centre labels, "
                             "fixed jitter, no solarisation, eval-mode teacher, truncated-normal init); "
                             "vit_s16/vit_b16: the official LOCA ImageNet recipe in every point")
    _add_flags(parser, chosen, defaults)
    args = vars(parser.parse_args(argv))
    name = args.pop("preset")
    overrides = {key: (tuple(value) if isinstance(value, list) else value)
                 for key, value in args.items() if value is not None}
    objective = overrides.get("objective", "loca")
    for key in overrides:
        if objective not in APPLIES_TO.get(key, (objective,)):
            flag = VIEW_FLAGS.get(key, "--" + key.replace("_", "-"))
            parser.error(f"{flag} is a setting of --objective {', '.join(APPLIES_TO[key])}, "
                         f"not of {objective}")
    try:
        return preset(name, **overrides)
    except UsageError as error:
        parser.error(str(error))


def _add_flags(parser: Parser, chosen: str, defaults: Config) -> None:
    """One flag per Config field, in FLAG_GROUPS' groups, each help ending in the preset's value."""
    by_name = {f.name: f for f in fields(Config)}
    for title, description, names in FLAG_GROUPS:
        group = parser.add_argument_group(title, description)
        for name in names:
            f = by_name[name]
            flags = [VIEW_FLAGS[name], "--" + f.name.replace("_", "-")] if name in VIEW_FLAGS else \
                ["--" + f.name.replace("_", "-")]
            applies = f"; --objective {', '.join(APPLIES_TO[name])}" if name in APPLIES_TO and title not in OBJECTIVES \
                else ""
            help_text = f"{f.metadata['help']} ({chosen}: {getattr(defaults, f.name)}{applies})"
            if f.type == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif f.type.startswith("Tuple"):
                group.add_argument(*flags, type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), dest=name,
                                   help=help_text)
            else:
                group.add_argument(*flags, type=_flag_type(f.type), default=None, help=help_text,
                                   choices=f.metadata["choices"], dest=name)
