"""`python -m loca_train.evaluate --run-dir R | --checkpoint C`: does a run's encoder give dense
features that segment? (`--combine EVAL_JSON...`: the scores of several runs pooled.)

The run's teacher and student encoders' final patch tokens are measured, without finetuning,
beside the same network at random initialisation, raw pixels and four controls (noise, a fixed
position code, the mean colour, the true labels), on the same images (the protocol, fixed
here, is written out in docs/EVALUATION.md; evaluation/scores.py):

- zero-shot prompt segmentation (MMC, Wu et al. 2023) of the prompted object and of its class:
  the cosine similarity of one prompt patch with every patch, upsampled; its Jaccard at the
  threshold chosen on validation images, its AUROC and its best Jaccard over thresholds;
- intra- versus inter-region similarity: mean cosines and ROC AUCs, with and without the
  background and at matched distances;
- a linear probe's mIoU.

Every score has a 95% bootstrap interval over the test images and is normalised between noise
(0) and the true labels (1); differences with random init and the controls are paired. By
default the images are photo scenes (photos.py) measured on a 14 x 14 patch grid. Results go
to eval.json and eval.png (examples); the command prints the table.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import Parser, UsageError, config_from_dict, usage_error
from .monitor import format_duration, versions
from .objectives import objective_of
from .evaluation import scores
from .evaluation.data import (PROBE_IMAGES, TEST_IMAGES, folder_split, photo_eval_config, photo_split,
                              procedural_split)
from .evaluation.probe import PROBE_ITERATIONS, PROBE_WEIGHT_DECAY
from .evaluation.report import SOURCES, draw_examples
from .evaluation.voc import is_voc_root, voc_split
from .images import IGNORE_LABEL

EVAL_NAME, FIGURE_NAME = "eval.json", "eval.png"


def _load(args, parser):
    """(checkpoint state, path, output folder) of --run-dir or --checkpoint."""
    try:
        state, path = checkpoint.read_for_command(args.run_dir, args.checkpoint)
    except UsageError as error:
        parser.error(str(error))
    out = Path(args.output_dir) if args.output_dir else path.parent
    try:        # before the evaluation, not after it
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as error:
        parser.error(f"--output-dir {out}: cannot write there ({error.strerror})")
    return state, path, out


def _parser() -> Parser:
    parser = Parser(prog="python -m loca_train.evaluate",
                    description="Dense-feature evaluation of a loca_train run's teacher and student: zero-shot "
                                "prompt segmentation, intra/inter-region similarity and a linear segmentation "
                                "probe, beside the same network at random init, raw pixels and controls, with "
                                "bootstrap intervals (docs/EVALUATION.md).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="output folder of the run (holds checkpoint.pt)")
    which.add_argument("--checkpoint", help="a training checkpoint file")
    which.add_argument("--combine", nargs="+", metavar="EVAL_JSON",
                       help="no evaluation: the scores of several runs (seeds) measured on one split, from their "
                            "eval.json, with bootstrap intervals over the runs and the test images")
    parser.add_argument("--output", help="with --combine: write the combined scores here (JSON)")
    parser.add_argument("--data", help="your images (any depth), or a PASCAL VOC folder (VOCdevkit/VOC2012: its "
                                       "segmentation train and val lists); default: --scenes")
    parser.add_argument("--masks", help="with --data: PNGs of class indices at each image's relative path "
                                        "(VOC SegmentationClass, 255 = ignore)")
    parser.add_argument("--instances", help="with --data: PNGs of instance ids (VOC SegmentationObject), "
                                            "needed by the prompt and similarity metrics")
    parser.add_argument("--scenes", choices=("photos", "shapes"), default="photos",
                        help="without --data: photos (textures of real photographs, 14 x 14 patches; "
                             "docs/EVALUATION.md) or shapes (the procedural scenes)")
    parser.add_argument("--probe-images", type=int, default=PROBE_IMAGES,
                        help=f"built-in scenes the probe trains on (default {PROBE_IMAGES})")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES,
                        help=f"built-in scenes measured (default {TEST_IMAGES}); photos: half as many "
                             f"validation scenes choose the thresholds")
    parser.add_argument("--output-dir", help="where eval.json and eval.png go (default: the checkpoint's folder)")
    parser.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--examples", type=int, default=4, help="test images shown in eval.png")
    parser.add_argument("--progress", action="store_true", default=None, help="show a progress bar")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _arguments(parser: Parser, argv):
    """The parsed arguments; a combination that cannot work is a one-line error before any work."""
    args = parser.parse_args(argv)
    if args.output and not args.combine:
        parser.error("--output goes with --combine (an evaluation writes to --output-dir)")
    if (args.masks or args.instances) and not args.data:
        parser.error("--masks and --instances go with --data")
    args.voc = bool(args.data) and not args.masks and is_voc_root(args.data)
    if args.data and not args.masks and not args.voc:
        parser.error("--data needs --masks (PNGs of class indices) or a VOC folder (JPEGImages, "
                     "SegmentationClass, ImageSets/Segmentation)")
    if args.probe_images < 1 or args.test_images < 2:
        parser.error("--probe-images must be >= 1 and --test-images >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def _split(args, cfg):
    """(the evaluation split, the config the networks see): photo scenes are measured on an
    EVAL_GRID x EVAL_GRID patch grid whatever the network's training size. Raises UsageError."""
    if args.voc:
        return voc_split(cfg, args.data), cfg
    if args.data:
        return folder_split(cfg, args.data, args.masks, args.instances), cfg
    if args.scenes == "photos":
        split = photo_split(args.probe_images, args.test_images // 2, args.test_images)
        return split, photo_eval_config(cfg)
    return procedural_split(cfg, args.probe_images, args.test_images), cfg


def _encoders(state: dict, cfg, device, path: Path, parser: Parser) -> dict:
    """The run's teacher and student encoders, on `device`, in eval mode."""
    encoders = {}
    prefix = "encoder."
    for which in ("teacher", "student"):
        encoders[which] = objective_of(cfg).build_student(cfg).encoder
        try:
            encoders[which].load_state_dict({k[len(prefix):]: v for k, v in state[which].items()
                                             if k.startswith(prefix)})
        except RuntimeError:
            parser.error(f"{path}: its {which}'s encoder weights do not fit the network its config describes")
        encoders[which].to(device).eval()
    return encoders


def _combine(args, parser: Parser) -> int:
    """--combine: the pooled scores printed and, with --output, written."""
    try:
        result = scores.combine(args.combine)
        print(f"{len(args.combine)} runs; 95% intervals over runs and test images")
        print(scores.scores_table(result, SOURCES))
        if args.output:
            checkpoint.write_text(Path(args.output), json.dumps(result, indent=1))
    except UsageError as error:
        parser.error(str(error))
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = _arguments(parser, argv)
    if args.combine:
        return _combine(args, parser)
    t_start = time.perf_counter()
    state, path, out = _load(args, parser)
    cfg = config_from_dict(state["config"])
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        split, eval_cfg = _split(args, cfg)
    except UsageError as error:
        parser.error(str(error))

    encoders = _encoders(state, cfg, device, path, parser)
    print(f"loca_train.evaluate: teacher and student of {path} (step {state['step']}) on {split.description}",
          flush=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        num_classes = len(split.class_names) if split.class_names else IGNORE_LABEL
        measured = scores.measure(scores.sources_with_controls(encoders, cfg, eval_cfg, device, num_classes), split,
                                  eval_cfg, device, args.batch_size, progress, args.examples)
        _write_results(args, state, path, out, split, measured, eval_cfg, t_start)
    except UsageError as error:     # masks met during the evaluation, an eval.json that cannot be written
        parser.error(str(error))
    return 0


def _write_results(args, state, path, out, split, measured, cfg, t_start) -> None:
    """eval.json, eval.png (the examples with the thresholds chosen on validation) and the
    table and closing line on stdout."""
    scored = scores.summary([measured])
    run_config = path.parent / "config.json"
    run_versions = json.loads(run_config.read_text()).get("versions") if run_config.is_file() else None
    result = {"checkpoint": str(path.resolve()), "step": state["step"], "data": split.description,
              "protocol": "docs/EVALUATION.md", "scores": scored["scores"], "differences": scored["differences"],
              "validation_thresholds": scored["thresholds"], "scores_split": measured.counts,
              "per_image": scores.per_image_lists(measured),
              "probe_recipe": {"optimizer": "L-BFGS", "iterations": PROBE_ITERATIONS,
                               "weight_decay": PROBE_WEIGHT_DECAY, "loss": "class-balanced cross-entropy"},
              "versions": versions(), "run_versions": run_versions,
              "wall_time_s": time.perf_counter() - t_start}
    checkpoint.write_text(out / EVAL_NAME, json.dumps(result, indent=1))
    chosen = {name: {"prompt_threshold": t["object"]} for name, t in measured.thresholds.items()}
    draw_examples(measured.examples, chosen, cfg, out / FIGURE_NAME)
    print("scores with 95% bootstrap intervals over the test images (docs/EVALUATION.md):")
    print(scores.scores_table(scored, SOURCES))
    prompted = measured.counts["test_objects_prompted"]
    objects = (f"; {prompted} objects prompted" if "prompt_object_jaccard" in scored["scores"]["teacher"]
               else "; no --instances: prompt and similarity scores skipped")
    written = ", ".join(name for name in (EVAL_NAME, FIGURE_NAME) if (out / name).exists())
    print(f"loca_train.evaluate: done in {format_duration(result['wall_time_s'])}{objects}; results in {out}/ "
          f"({written})", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, OSError) as error:    # a mask met during the run, an unwritable --output-dir
        usage_error(str(error))
