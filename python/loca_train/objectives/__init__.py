"""The dense objectives one trainer runs (`python -m loca_train --objective NAME`).

Each objective is a module of its own that exports OBJECTIVE, an Objective: what the training
loop (train.py) needs to know of it. The loop does the rest the same way for all of them:
encoder, EMA teacher, optimiser, checkpoints, exact resume, logging, torchrun. Settings of each
objective are Config fields; its per-preset values are config.OBJECTIVE_PRESETS.
"""
from __future__ import annotations

from ..config import Config
from . import densecl, gtsa, loca, mmc
from .objective import Objective

__all__ = ["Objective", "OBJECTIVES", "objective_of"]

OBJECTIVES = {module.OBJECTIVE.name: module.OBJECTIVE for module in (loca, densecl, gtsa, mmc)}


def objective_of(cfg: Config) -> Objective:
    """The Objective of cfg.objective (config.validate has checked the name)."""
    return OBJECTIVES[cfg.objective]
