"""`python -m loca_train.plot RUN_DIR [--output F]`: curves.png, the losses, the accuracies the
objective logs (LOCA's localisation, GTSA's quarter turn) and the dense-feature metrics
(--eval-every) of a run's log.jsonl against the step.

Needs matplotlib (not a dependency of training): `pip install matplotlib`, or the package's
`plot` extra (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import run_folder
from .config import Parser, UsageError, usage_error
from .evaluation.metrics import HEADLINE
from .monitor import ACCURACIES

LOG_NAME, FIGURE_NAME = "log.jsonl", "curves.png"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("python -m loca_train.plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")                 # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def read_log(run_dir: Path) -> list:
    """The records of <run_dir>/log.jsonl; UsageError when there is none."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {LOG_NAME} in it")
    records = run_folder.read_log(path)[0]      # a torn last line dropped with a warning
    if not records:
        raise UsageError(f"{path} is empty")
    return records


def plot(records: list, output: Path) -> None:
    """Draw the curves of `records` (log.jsonl lines) to `output`."""
    plt = _pyplot()
    evals = [key for key in (f"eval_{name}" for name in HEADLINE if name != "prompt_threshold")
             if any(key in r for r in records)]
    panels = [("loss", sorted(key for key in records[-1] if key == "loss" or key.startswith("loss_")))]
    accuracies = [key for key in ACCURACIES if key in records[-1]]
    if accuracies:
        panels.append(("accuracy", accuracies))
    if evals:
        panels.append(("dense-feature metrics (teacher)", evals))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"] + 1, r[key]) for r in records if key in r]
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval_") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = Parser(prog="python -m loca_train.plot",
                    description="Plot a loca_train run's losses, localisation accuracy and eval metrics.")
    parser.add_argument("run_dir", help="output folder of the run (holds log.jsonl)")
    parser.add_argument("--output", help=f"image to write (default: RUN_DIR/{FIGURE_NAME})")
    args = parser.parse_args(argv)
    try:
        _pyplot()                         # an optional dependency: checked before any work
        output = Path(args.output or Path(args.run_dir) / FIGURE_NAME)
        plot(read_log(Path(args.run_dir)), output)
    except UsageError as error:
        parser.error(str(error))
    print(f"loca_train.plot: {output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as error:   # an unwritable --output
        usage_error(str(error))
