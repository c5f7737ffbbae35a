"""A run's output folder, kept whole under faults: one trainer at a time (RunLock), a step log
that is only ever appended to (StepLog), the checks of what a new run or a --resume finds there
(check_folder, check_resume), and a summary.json that a resume does not wipe (write_summary).
The checkpoints themselves: checkpoint.py."""
from __future__ import annotations

import fcntl
import json
import os
import weakref
from pathlib import Path
from typing import List, Tuple

from . import checkpoint
from .config import RESUME_CHANGEABLE, UsageError, warn

LOG_NAME, SUMMARY_NAME, CONFIG_NAME, LOCK_NAME = "log.jsonl", "summary.json", "config.json", "trainer.lock"
# Settings a --resume may change freely: they decide how a run is watched, checkpointed or
# executed (the same computation up to float rounding), not what it computes; and steps, so
# that a run can be lengthened (its schedules then follow the new length).
FREE_SETTINGS = ("steps", "output_dir", "resume", "overwrite", "resume_changes", "progress", "log_every",
                 "checkpoint_every", "num_workers", "eval_every", "eval_images", "skip_bad_images",
                 "device", "backend", "compile")


# ------------------------------------------------------------------ one trainer per folder

class RunLock:
    """One trainer per output folder: `acquire()` takes an exclusive POSIX lock (lockf) on
    <folder>/trainer.lock and writes the pid there. The kernel drops the lock when the process
    ends, however it ends (a lock file left by a dead process is free again), and a POSIX lock
    is not inherited by forked data-loader workers. Leaving the `with` block closes the files
    given to `closes` and releases it, however the block ends."""

    def __init__(self, folder: Path):
        self.path, self.fd, self._files = Path(folder) / LOCK_NAME, None, []

    def closes(self, file):
        """Close `file` when the lock is released; returns it."""
        self._files.append(file)
        return file

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UsageError(f"--output-dir {self.path.parent}: cannot write there ({error.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.path.parent} is in use by another trainer (pid {holder}, lock {self.path}); "
                             f"wait for it to end or use another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        while self._files:
            self._files.pop().close()
        if self.fd is not None:
            os.close(self.fd)       # closing drops the lock; the file stays (unlinking it would race)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def remove_temporary_files(folder: Path) -> None:
    """Remove the temporary files a writer killed mid-write left (call with the lock held)."""
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME, SUMMARY_NAME, CONFIG_NAME):
        checkpoint.temp_path(Path(folder) / name).unlink(missing_ok=True)


# ------------------------------------------------------------------ what a run finds in its folder

def check_folder(resume: bool, overwrite: bool, folder: Path) -> None:
    """UsageError when the folder does not suit the run: a new run where a run is (unless
    overwrite), a --resume where there is no checkpoint. A run stopped before its first
    checkpoint gets one message whichever was asked."""
    if overwrite:
        return
    has_checkpoint, has_log = checkpoint.exists(folder), (folder / LOG_NAME).exists()
    if has_log and not has_checkpoint:
        raise UsageError(f"{folder} already holds a run ({LOG_NAME}) stopped before its first checkpoint: there "
                         f"is nothing to --resume; start it again with --overwrite")
    if resume and not has_checkpoint:
        raise UsageError(f"--resume: no checkpoint ({checkpoint.CHECKPOINT_NAME}) in {folder}")
    if has_checkpoint and not resume:
        existing = [name for name in (LOG_NAME, checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME)
                    if (folder / name).exists()]
        raise UsageError(f"{folder} already holds a run ({', '.join(existing)}); continue it with --resume "
                         f"or replace it with --overwrite")


def load_for_resume(folder: Path, move_unreadable: bool = True) -> dict:
    """The newest readable checkpoint of `folder`. When checkpoint.pt cannot be read and the
    previous one is used, the unreadable file is renamed to checkpoint.corrupt.pt (by the one
    process that `move_unreadable`), so that the next checkpoint does not push the good previous
    one out."""
    state, path = checkpoint.load_latest(
        folder, hint="; start the run again with --overwrite (or restore a checkpoint from a backup)")
    latest = folder / checkpoint.CHECKPOINT_NAME
    if move_unreadable and path != latest and latest.exists():
        os.replace(latest, folder / "checkpoint.corrupt.pt")
        warn(f"{latest} moved to checkpoint.corrupt.pt")
    return state


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_resume(settings: dict, run_settings: dict, folder: Path, allowed: Tuple[str, ...]) -> None:
    """UsageError listing every setting of `settings` (this session's, as they take effect) that
    differs from `run_settings` (the checkpoint's) and changes what the run computes, unless
    it is in `allowed` (--resume-changes). Settings an older checkpoint lacks are not compared."""
    changed = [name for name, value in settings.items()
               if name in run_settings and name not in FREE_SETTINGS and name not in allowed
               and _plain(value) != _plain(run_settings[name])]
    if not changed:
        return
    listed = ", ".join(f"{name} {settings[name]} (the run's: {run_settings[name]})" for name in changed)
    may = [name for name in changed if name in RESUME_CHANGEABLE]
    extra = f"; --resume-changes {','.join(may)} accepts {'this change' if len(may) == 1 else 'these'}" if may else ""
    raise UsageError(f"--resume: settings differ from the run in {folder}: {listed}; resume with the run's "
                     f"settings or start a new run in another --output-dir{extra}")


# ------------------------------------------------------------------ the step log

def read_log(path: Path) -> Tuple[List[dict], List[int]]:
    """(records, ends): the records of log.jsonl up to its first line that is not a complete
    JSON object (a torn last line, from a write cut off by a crash or a full disk: dropped with
    a warning), and the byte offset after each."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    records, ends, start = [], [], 0
    while start < len(data):
        end = data.find(b"\n", start)
        try:
            if end < 0:
                raise ValueError("no newline")
            record = json.loads(data[start:end])
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except ValueError:
            dropped = len(data) - start
            warn(f"{path}: the last {dropped} bytes (from line {len(records) + 1}) are not a complete record "
                 f"(a write cut off by a crash or a full disk); dropped")
            break
        records.append(record)
        ends.append(end + 1)
        start = end + 1
    return records, ends


class StepLog:
    """Appends one JSON object per step to `path` (one write per line, never rewriting a
    line). On resume, the lines from the resumed step on (and a torn last line) are cut off
    with one truncate, so that the file reads as one uninterrupted run: the lines before are
    not touched. A failed write (a full disk) removes its partial line and is a one-line
    UsageError."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        records, ends = read_log(self.path) if start_step else ([], [])
        keep = 0
        for record, end in zip(records, ends):
            if record["step"] >= start_step:
                break
            keep = end
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise UsageError(f"cannot write {self.path}: {error.strerror}") from None
        self._close = weakref.finalize(self, os.close, self.fd)    # closes once, whoever calls first
        if os.fstat(self.fd).st_size > keep:
            os.ftruncate(self.fd, keep)

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        start = os.fstat(self.fd).st_size
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as error:
            try:
                os.ftruncate(self.fd, start)     # no partial line left behind
            except OSError:
                pass                             # read_log drops it on resume
            raise UsageError(f"cannot write {self.path}: {error.strerror}; the log holds the steps before "
                             f"step {record['step']}; once it can be written (free space?), continue with "
                             f"--resume") from None

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint that counts them)."""
        os.fsync(self.fd)

    def close(self) -> None:
        self._close()


# ------------------------------------------------------------------ the summary

def write_summary(folder: Path, result: dict, ran_steps: bool) -> dict:
    """Write summary.json; return what it holds. A session that ran no step (a --resume of a
    finished run) keeps the summary there; one that ran steps after an earlier session keeps
    the earlier summaries under "earlier_sessions"."""
    path = folder / SUMMARY_NAME
    earlier = None
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            warn(f"{path} is not JSON; it is replaced")
    if earlier is not None and not ran_steps:
        return {**earlier, "interrupted": result["interrupted"]}
    if earlier is not None:
        result = {**result, "earlier_sessions": [*earlier.pop("earlier_sessions", []), earlier]}
    checkpoint.write_text(path, json.dumps(result, indent=1))
    return result
