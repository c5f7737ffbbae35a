"""`python -m loca_train.evaluate --run-dir R | --checkpoint C`: does a run's encoder give dense
features that segment?

Three evaluations of the encoder's final patch tokens, none of which finetunes the encoder
(the protocol, fixed here, is written out in docs/EVALUATION.md):

- zero-shot prompt segmentation (MMC, Wu et al. 2023): the cosine similarity of one prompt
  patch inside an object with every patch, upsampled and thresholded, against the object's
  mask (Jaccard); the threshold is chosen on one half of the test images, reported on the other;
- intra- versus inter-object similarity: the mean cosine of patch pairs within one region and
  across two, and the ROC AUC of telling them apart;
- a linear probe: a linear classifier of the patch tokens trained on per-patch majority
  labels, its logits upsampled, mIoU on held-out images.

Every report holds two baselines computed in the same run: the same network at its random
initialisation and raw pixels (each patch's RGB values as its feature). Results go to
eval.json and eval.png (examples); the command prints a table.
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
from .evaluation.data import (PROBE_IMAGES, TEST_IMAGES, encoder_features, folder_split, procedural_split,
                              random_init_encoder, raw_pixel_features)
from .evaluation.metrics import THRESHOLDS
from .evaluation.probe import PROBE_ITERATIONS, PROBE_WEIGHT_DECAY
from .evaluation.report import draw_examples, table
from .evaluation.runner import evaluate

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
                    description="Dense-feature evaluation of a loca_train run: zero-shot prompt segmentation, "
                                "intra/inter-object similarity and a linear segmentation probe, beside the "
                                "same network at random init and raw pixels (docs/EVALUATION.md).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="output folder of the run (holds checkpoint.pt)")
    which.add_argument("--checkpoint", help="a training checkpoint file")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the encoder evaluated (default: the teacher, the network LOCA keeps)")
    parser.add_argument("--data", help="your images (any depth); default: the procedural evaluation split")
    parser.add_argument("--masks", help="with --data: PNGs of class indices at each image's relative path "
                                        "(VOC SegmentationClass, 255 = ignore)")
    parser.add_argument("--instances", help="with --data: PNGs of instance ids (VOC SegmentationObject), "
                                            "needed by the prompt and similarity metrics")
    parser.add_argument("--probe-images", type=int, default=PROBE_IMAGES,
                        help=f"procedural scenes the probe trains on (default {PROBE_IMAGES})")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES,
                        help=f"procedural scenes measured (default {TEST_IMAGES})")
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
    if (args.masks or args.instances) and not args.data:
        parser.error("--masks and --instances go with --data")
    if args.data and not args.masks:
        parser.error("--data needs --masks (PNGs of class indices)")
    if args.probe_images < 1 or args.test_images < 2:
        parser.error("--probe-images must be >= 1 and --test-images >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def _sources(state: dict, cfg, which: str, device, path: Path, parser: Parser) -> dict:
    """The feature sources: the run's encoder (`which` of teacher and student), the same network
    at its random initialisation, raw pixels."""
    pretrained = objective_of(cfg).build_student(cfg).encoder
    prefix = "encoder."
    try:
        pretrained.load_state_dict({k[len(prefix):]: v for k, v in state[which].items() if k.startswith(prefix)})
    except RuntimeError:
        parser.error(f"{path}: its {which}'s encoder weights do not fit the network its config describes")
    return {"pretrained": encoder_features(pretrained.to(device).eval(), cfg),
            "random_init": encoder_features(random_init_encoder(cfg).to(device), cfg),
            "raw_pixels": raw_pixel_features(cfg)}


def main(argv=None) -> int:
    parser = _parser()
    args = _arguments(parser, argv)
    t_start = time.perf_counter()
    state, path, out = _load(args, parser)
    cfg = config_from_dict(state["config"])
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        split = folder_split(cfg, args.data, args.masks, args.instances) if args.data else \
            procedural_split(cfg, args.probe_images, args.test_images)
    except UsageError as error:
        parser.error(str(error))

    sources = _sources(state, cfg, args.which, device, path, parser)
    print(f"loca_train.evaluate: {args.which} of {path} (step {state['step']}) on {split.description}", flush=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        metrics, counts, shown = evaluate(sources, split, cfg, device, args.batch_size, progress, args.examples)
        _write_results(args, state, path, out, split, counts, metrics, shown, cfg, t_start)
    except UsageError as error:     # masks met during the evaluation, an eval.json that cannot be written
        parser.error(str(error))
    return 0


def _write_results(args, state, path, out, split, counts, metrics, shown, cfg, t_start) -> None:
    """eval.json, eval.png and the table and closing line on stdout."""
    run_config = path.parent / "config.json"
    run_versions = json.loads(run_config.read_text()).get("versions") if run_config.is_file() else None
    result = {"checkpoint": str(path.resolve()), "step": state["step"], "which": args.which,
              "data": split.description, "split": counts, "thresholds": list(THRESHOLDS),
              "metrics": metrics, "protocol": "docs/EVALUATION.md",
              "probe_recipe": {"optimizer": "L-BFGS", "iterations": PROBE_ITERATIONS,
                               "weight_decay": PROBE_WEIGHT_DECAY, "loss": "class-balanced cross-entropy"},
              "versions": versions(), "run_versions": run_versions,
              "wall_time_s": time.perf_counter() - t_start}
    checkpoint.write_text(out / EVAL_NAME, json.dumps(result, indent=1))
    draw_examples(shown, metrics, cfg, out / FIGURE_NAME)
    print(table(metrics))
    skipped = f", {counts['objects_skipped']} skipped (no patch centre inside)" if counts["objects_skipped"] else ""
    objects = (f"; {counts['objects_prompted']} objects prompted{skipped}" if "prompt_jaccard" in metrics["pretrained"]
               else "; no --instances: prompt and similarity metrics skipped")
    written = ", ".join(name for name in (EVAL_NAME, FIGURE_NAME) if (out / name).exists())
    print(f"loca_train.evaluate: done in {format_duration(result['wall_time_s'])}{objects}; results in {out}/ "
          f"({written})", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, OSError) as error:    # a mask met during the run, an unwritable --output-dir
        usage_error(str(error))
