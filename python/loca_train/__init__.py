"""loca_train: a small, faithful LOCA pretraining application built on loca_kernels.

Run `python -m loca_train --help`. `train(config)` runs training from Python; `preset(name,
**overrides)` builds a Config.
"""
from .config import PRESETS, Config, parse_args, preset
from .train import train

__all__ = ["Config", "PRESETS", "preset", "parse_args", "train"]
