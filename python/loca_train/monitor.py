"""What a user watches: a start banner, a progress bar, one JSON line per step, a summary at
the end; and what a run records about the software it ran on."""
from __future__ import annotations

import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loca_kernels

# The library's fused kernels are operators of this namespace (forward and backward).
KERNEL_NAMESPACE = "loca_kernels"


def format_duration(seconds: float) -> str:
    """3:07 (minutes:seconds), or 2:03:07 from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal, printed every `every` steps otherwise."""

    # The first steps of a session start loader workers, compile and warm caches: the ETA
    # counts from the end of these.
    ETA_SKIPPED_STEPS = 3

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.start, self.every, self.enabled = total, start, max(every, 1), enabled
        self.tty = sys.stderr.isatty()
        self._eta_origin = None     # (steps done, time) once the skipped steps are done

    def eta(self, done: int) -> Optional[float]:
        """Seconds left after `done` steps, from the pace since the skipped steps; None before."""
        now = time.perf_counter()
        if self._eta_origin is None:
            if done - self.start >= min(self.ETA_SKIPPED_STEPS, self.total - self.start):
                self._eta_origin = (done, now)
            return None
        origin_done, origin_time = self._eta_origin
        if done == origin_done:
            return None
        return (self.total - done) * (now - origin_time) / (done - origin_done)

    def update(self, step: int, record: dict) -> None:
        done = step + 1
        eta = self.eta(done)    # every step, so that the ETA origin is the end of the skipped steps
        if not self.enabled or not (self.tty or done % self.every == 0 or done == self.total):
            return
        width = 24
        filled = int(width * done / self.total)
        accuracy = "".join(f"{key} {record[key]:.3f} " for key in ACCURACIES[::2] if key in record)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"loss {record['loss']:.3f} {accuracy}"
                f"{record['images_per_s']:.0f} img/s eta {'--:--' if eta is None else format_duration(eta)}")
        sys.stderr.write(("\r" + line + ("\n" if done == self.total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


class KernelTimer(TorchDispatchMode):
    """Inside `with KernelTimer() as timer:`, times every loca_kernels operator (the fused
    kernels, forward and backward); `timer.seconds()` is their total. CUDA kernels are timed
    with events (no synchronisation inside the step), CPU kernels with the wall clock."""

    def __init__(self):
        super().__init__()
        self._cpu_seconds = 0.0
        self._events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != KERNEL_NAMESPACE:
            return func(*args, **kwargs)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = func(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        self._cpu_seconds += time.perf_counter() - t0
        return out

    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
        return self._cpu_seconds + sum(s.elapsed_time(e) for s, e in self._events) * 1e-3


# Accuracy metrics an objective may log (loca: the first two, gtsa: the last); the progress line
# shows loc_acc and rotation_acc.
ACCURACIES = ("loc_acc", "loc_acc_visible", "rotation_acc")


def summary(records: list, first_loss: Optional[float]) -> dict:
    """Averages over the steps of this session (the last record's values for the rest)."""
    if not records:
        return {}
    last = records[-1]
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    timed = [r for r in records if "time_kernels" in r]
    out = {
        "steps": last["step"] + 1,
        "first_loss": first_loss,
        "final_loss": last["loss"],
        **{f"final_{key}": last[key] for key in ACCURACIES if key in last},
        "mean_images_per_s": mean("images_per_s"),
        "mean_time_data": mean("time_data"),
        "mean_time_forward_backward": mean("time_forward_backward"),
    }
    untimed = [r["time_step"] for r in records if "time_kernels" not in r]
    if timed and untimed:
        # Timing kernels slows the timed steps a little, so compare with the other steps.
        out["mean_time_kernels"] = sum(r["time_kernels"] for r in timed) / len(timed)
        out["kernel_share_of_step"] = out["mean_time_kernels"] / (sum(untimed) / len(untimed))
    return out


def versions() -> dict:
    """The software a run used: loca_kernels, torch, triton, and the git commit of this
    checkout (None outside one; git_dirty says whether tracked files were modified)."""
    def version(package: str) -> Optional[str]:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"loca_kernels": version("loca_kernels"), "torch": torch.__version__, "triton": version("triton"),
            "git_commit": commit, "git_dirty": None if status is None else bool(status)}


def kernels_in_words(device: torch.device, forced: Optional[str]) -> str:
    """Which loca_kernels backend the ops use on `device`, for people."""
    info = loca_kernels.backends()
    forced = forced or info["forced_backend"]
    if forced:
        return f"{forced} backend (forced)"
    if device.type == "cuda":
        if info["cuda_kernels"]:
            return "CUDA kernels (compiled extension)"
        if info["triton"]:
            return "Triton kernels (the extension has no CUDA kernels)"
    elif device.type == "cpu" and info["cpu_kernels"]:
        return f"C++ CPU kernels ({info['cpu_isa']})"
    reason = f": {info['extension_error']}" if info["extension_error"] else ""
    return f"PyTorch reference ops (no compiled kernels for {device.type}{reason})"
