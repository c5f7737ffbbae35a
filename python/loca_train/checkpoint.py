"""Checkpoints that lose nothing: model, teacher, optimiser, scheduler, every RNG, step and data
position, written atomically (a temporary file renamed over the old one).

Everything in a checkpoint is tensors or plain Python data, so it loads with
`torch.load(path, weights_only=True)`: no code runs when a checkpoint is read.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import UsageError

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Every RNG's state as tensors and numbers (numpy's and Python's states are converted)."""
    version, mt_state, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        # int64: the uint32 keys do not all fit an int32 tensor.
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, **state) -> None:
    """torch.save `state` to `path` atomically: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> Optional[dict]:
    """The checkpoint at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path} holds more than tensors and plain data (written by an older "
                         f"loca_train?); it is not loaded") from None
