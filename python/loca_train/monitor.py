"""What a user watches: a progress bar, one JSON line per step, a summary at the end."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from torch.utils._python_dispatch import TorchDispatchMode

# The library's fused kernels are operators of this namespace (forward and backward).
KERNEL_NAMESPACE = "loca_kernels"


class StepLog:
    """Appends one JSON object per step to `path`; on resume, drops lines past the resumed
    step so that the file reads as one uninterrupted run."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        kept = []
        if start_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] < start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.start, self.every, self.enabled = total, start, max(every, 1), enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, record: dict) -> None:
        done = step + 1
        if not self.enabled or not (self.tty or done % self.every == 0 or done == self.total):
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / max(elapsed, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        width = 24
        filled = int(width * done / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"loss {record['loss']:.3f} loc_acc {record['loc_acc']:.3f} "
                f"{record['images_per_s']:.0f} img/s eta {int(eta) // 60}:{int(eta) % 60:02d}")
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
        "final_loc_acc": last["loc_acc"],
        "final_loc_acc_visible": last["loc_acc_visible"],
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
