"""loca_train: a small, faithful dense self-supervised pretraining application built on
loca_kernels: LOCA, and with --objective DenseCL, GTSA or MMC (objectives/, docs/OBJECTIVES.md).

Run `python -m loca_train --help`. `train(config)` runs training from Python; `preset(name,
**overrides)` builds a Config; settings or inputs to fix raise UsageError (a ValueError).
`python -m loca_train.export --run-dir R` writes the teacher encoder of a run.
"""
from .config import PRESETS, Config, UsageError, parse_args, preset
from .train import train

__all__ = ["Config", "PRESETS", "UsageError", "preset", "parse_args", "train"]
