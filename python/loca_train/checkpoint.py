"""Checkpoints that lose nothing: model, teacher, optimiser, scheduler, every RNG, step and data
position.

Crash safety: a file is written to a temporary name, fsynced, then renamed over the old one
(atomic_write), so a reader sees the old file or the new, never half of one; the checkpoint
it replaces is kept as checkpoint.previous.pt. Each checkpoint holds a SHA-256 of its content
(every tensor's bytes and every plain value), checked when it is read: a file whose bytes were
changed is reported, and load_latest falls back to the previous one.

Everything in a checkpoint is tensors or plain Python data, so it loads with
`torch.load(path, weights_only=True)`: no code runs when a checkpoint is read.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .config import UsageError, warn

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.previous.pt"
# What a training checkpoint holds at least (export and evaluate read the first three).
REQUIRED_KEYS = ("config", "teacher", "student", "step")
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


class UnreadableCheckpoint(UsageError):
    """A checkpoint file that is truncated, corrupt or not a loca_train training checkpoint."""


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


# ------------------------------------------------------------------ writing files safely

class _File:
    """A file written with one os.write loop per call (unbuffered), which remembers the OSError
    of a failed write: torch.save turns it into a RuntimeError that does not say why."""

    def __init__(self, fd: int):
        self.fd, self.error = fd, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as error:
            self.error = error
            raise
        return len(data)

    def flush(self) -> None:
        pass


def temp_path(path: Path) -> Path:
    """Where atomic_write writes `path` before renaming it (a hidden file in the same folder)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_SUFFIX}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_as(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path` while `path` stays in place (a hard link renamed over
    `previous`); where the filesystem has no hard links, `path` is renamed to `previous`."""
    link = temp_path(previous)
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(path, previous)
        return
    os.replace(link, previous)


def atomic_write(path: Path, write: Callable, previous: Optional[Path] = None, hint: str = "") -> None:
    """Write `path` with write(file) (file.write(bytes)) to a temporary file, fsync it, then
    rename it over `path`: `path` is the old file or the new one, never a part. With `previous`,
    the old file is renamed to `previous` first. On any error the temporary file is removed and
    a one-line UsageError names `path` and says what was kept (then `hint`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        file = _File(fd)
        try:
            write(file)
            os.fsync(fd)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None
        finally:
            os.close(fd)
        if previous is not None and path.exists():
            _keep_as(path, previous)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as error:
        _remove_temporary(path, previous)
        kept = f"{path.name} is as it was" if path.exists() else f"{path.name} was not written"
        if previous is not None and not path.exists() and previous.exists():
            kept = f"the last good checkpoint is {previous}"
        raise UsageError(f"cannot write {path}: {error.strerror or error}; {kept}{hint}") from None
    except BaseException:
        _remove_temporary(path, previous)
        raise


def _remove_temporary(path: Path, previous: Optional[Path]) -> None:
    for file in (path, previous):
        if file is not None:
            temp_path(file).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """atomic_write of a text file (config.json, summary.json)."""
    atomic_write(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------ checksums

def _digest(value, h) -> None:
    """Feed `value` (tensors, dicts, lists, tuples, numbers, strings, None) to hash `h`, its
    structure included."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)};".encode())
        for item in value:
            _digest(item, h)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def checksum(state: dict) -> str:
    """SHA-256 of everything in `state` but its "checksum" entry."""
    h = hashlib.sha256()
    _digest({key: value for key, value in state.items() if key != "checksum"}, h)
    return h.hexdigest()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


# ------------------------------------------------------------------ checkpoints

def save(path: Path, **state) -> None:
    """torch.save `state` (with its checksum) to `path` atomically, the checkpoint it replaces
    kept as checkpoint.previous.pt in the same folder. A failed write (a full disk) is a
    one-line UsageError; the checkpoints already there are kept."""
    path = Path(path)
    state = _to_cpu(state)          # one copy off the device, hashed and written
    state["checksum"] = checksum(state)
    atomic_write(path, lambda f: torch.save(state, f), previous=path.with_name(PREVIOUS_NAME),
                 hint="; once it can be written (free space?), continue with --resume")


def load(path: Path) -> Optional[dict]:
    """The checkpoint at `path`, checked (structure and checksum), or None when there is none.
    A file that cannot be read as a loca_train training checkpoint raises UnreadableCheckpoint
    in one line."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, "rb"):
            pass
    except IsADirectoryError:
        raise UnreadableCheckpoint(f"{path} is a directory, not a checkpoint file") from None
    except OSError as error:
        raise UnreadableCheckpoint(f"cannot read {path}: {error.strerror}") from None
    try:
        with warnings.catch_warnings():         # torch warns about the odd bytes it is reading
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():
            raise UnreadableCheckpoint(f"{path} holds more than tensors and plain data (written by an older "
                                       f"loca_train?); it is not loaded") from None
        raise UnreadableCheckpoint(f"{path} is corrupt (it does not unpickle)") from None
    except Exception as error:  # any bytes can come: each error means a file that cannot be read
        size = path.stat().st_size
        what = "is empty" if size == 0 else f"is truncated or corrupt ({size} bytes; {type(error).__name__})"
        raise UnreadableCheckpoint(f"{path} {what}: not a readable checkpoint") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise UnreadableCheckpoint(f"{path} is not a loca_train training checkpoint (it lacks "
                                   f"{', '.join(REQUIRED_KEYS)})")
    if "checksum" in state and state["checksum"] != checksum(state):
        raise UnreadableCheckpoint(f"{path} is corrupt: its content does not match its checksum")
    return state


def load_latest(folder: Path, hint: str = "") -> Optional[Tuple[dict, Path]]:
    """(state, path) of the newest readable checkpoint in `folder` (checkpoint.pt, else
    checkpoint.previous.pt, with a warning saying why), or None when there is none. When none
    is readable, one UnreadableCheckpoint naming each file (then `hint`)."""
    folder = Path(folder)
    errors = []
    for path in (folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME):
        try:
            state = load(path)
        except UnreadableCheckpoint as error:
            errors.append(str(error))
            continue
        if state is None:
            continue
        if errors:
            warn(f"{errors[0]}; using {path} (step {state['step']})")
        return state, path
    if errors:
        raise UnreadableCheckpoint(f"{'; '.join(errors)}; no readable checkpoint in {folder}{hint}")
    return None


def exists(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint (the latest or the previous one)."""
    return any((Path(folder) / name).exists() for name in (CHECKPOINT_NAME, PREVIOUS_NAME))


def read_for_command(run_dir: Optional[str] = None, file: Optional[str] = None) -> Tuple[dict, Path]:
    """(state, path) of the training checkpoint that `--checkpoint FILE` or `--run-dir DIR`
    names (python -m loca_train.export, .evaluate); a one-line UsageError naming the flag."""
    if file is not None:
        path = Path(file)
        if not path.exists():
            raise UsageError(f"--checkpoint {file}: no such file")
        return load(path), path
    found = load_latest(Path(run_dir), hint="; resume the run (python -m loca_train --resume) to write a new one")
    if found is None:
        raise UsageError(f"--run-dir {run_dir}: no checkpoint ({CHECKPOINT_NAME}) in it")
    return found
