"""Shared by every benchmark: device choice, the quick or full sizes, synchronised timing, and
extra_info with achieved throughput and the fraction of the device's bandwidth floor.

Run: pytest benchmarks/ --benchmark-only [--full] [--benchmark-json=out.json]

By default every bench file runs at its quick sizes, 5 timed rounds per case (the whole CPU run
in a few minutes); --full (or LOCA_BENCH_FULL=1) runs the full sizes, 20 rounds: those of the
committed results, and of GPU runs. Each bench file states both sizes in one place, through
`sizes`. LOCA_BENCH_ROUNDS=n sets the rounds. LOCA_BENCH_IMPLS=ours|peers|compiled (or several,
comma-separated) runs only our implementations, only the peers that compile nothing, or only the
compile-heavy peers (FlexAttention, torch.compile): run_gpu.sh runs them in that order. A run
stopped by SIGTERM (`timeout`, `kill`) ends as one stopped by Ctrl-C does: with the table of what
finished, and the JSON.
"""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from report import OURS  # noqa: E402  (benchmarks/ is on the path from here on)

# Peak DRAM bandwidth (bytes/s) per device name, from what we measured with a device copy
# (see BENCHMARKS.md); used only to report the fraction of the bandwidth floor.
MEASURED_BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3.0e12, "NVIDIA H200": 4.3e12}

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
FULL_ENV = "LOCA_BENCH_FULL"
_SAVED_FULL_ENV = pytest.StashKey[str | None]()
_SAVED_SIGTERM = pytest.StashKey[object]()
IMPLS_ENV = "LOCA_BENCH_IMPLS"
COMPILED_PEERS = ("flex", "compiled")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help=f"benchmark at the full sizes (committed results, GPU runs) instead of the quick "
                          f"default ones; the same as {FULL_ENV}=1")


def pytest_configure(config):
    # The bench modules read the sizes when they are collected, after this hook: the option
    # reaches them through the environment variable, restored when the session ends.
    config.stash[_SAVED_FULL_ENV] = os.environ.get(FULL_ENV)
    if config.getoption("full"):
        os.environ[FULL_ENV] = "1"
    # SIGTERM would end the run without pytest-benchmark's table or JSON; as KeyboardInterrupt
    # pytest still prints and writes what finished.
    config.stash[_SAVED_SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)


def pytest_unconfigure(config):
    if _SAVED_SIGTERM in config.stash:
        signal.signal(signal.SIGTERM, config.stash[_SAVED_SIGTERM])
    if _SAVED_FULL_ENV not in config.stash:
        return
    saved = config.stash[_SAVED_FULL_ENV]
    if saved is None:
        os.environ.pop(FULL_ENV, None)
    else:
        os.environ[FULL_ENV] = saved


def impl_kind(impl) -> str:
    """"ours", "compiled" (a peer whose setup compiles: FlexAttention, torch.compile) or "peers"."""
    return "ours" if impl in OURS else "compiled" if impl in COMPILED_PEERS else "peers"


def pytest_collection_modifyitems(config, items):
    wanted = os.environ.get(IMPLS_ENV)
    if not wanted:
        return
    kinds = set(wanted.split(","))
    if not kinds <= {"ours", "peers", "compiled"}:
        raise pytest.UsageError(f"{IMPLS_ENV}={wanted}: expected ours, peers or compiled, comma-separated")
    chosen = [item for item in items if impl_kind(getattr(item, "callspec", None) and
                                                  item.callspec.params.get("impl")) in kinds]
    config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
    items[:] = chosen


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def full_run() -> bool:
    """Whether this run benchmarks the full sizes (--full or LOCA_BENCH_FULL=1)."""
    return os.environ.get(FULL_ENV) == "1"


def sizes(*, quick, full):
    """A bench file's sizes: `full` under --full or LOCA_BENCH_FULL=1, else `quick`."""
    return full if full_run() else quick


def device_generator(seed: int) -> torch.Generator:
    """A generator on DEVICE seeded with `seed`: inputs drawn with it are made where they are used
    (a GPU fills gigabytes in milliseconds where the CPU takes seconds, then a copy)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def run_benchmark(benchmark, fn, *, bytes_moved: float = 0.0, flops: float = 0.0, warmed_up: bool = False,
                  **info):
    """Time `fn` (synchronised) and record GB/s, TFLOP/s and the bandwidth-floor fraction.

    bytes_moved: the minimum bytes a perfect kernel reads and writes (the floor).
    warmed_up: `fn` has run already (compiled, autotuned): no extra untimed call first.
    """
    def timed():
        result = fn()
        synchronize()
        return result

    if not warmed_up:
        timed()  # warm-up: compilation and autotuning are not timed
    rounds = int(os.environ.get("LOCA_BENCH_ROUNDS") or sizes(quick=5, full=20))
    try:
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=sizes(quick=1, full=2))
    except KeyboardInterrupt:
        # Stopped before its first timed round: left out, as pytest-benchmark would fail on the
        # empty statistics when it prints the table and writes the JSON.
        if benchmark.stats is None or not benchmark.stats.stats.data:
            benchmark.has_error = True
        raise
    median = benchmark.stats.stats.median
    extra = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", **info}
    if bytes_moved:
        extra["GB_per_s"] = bytes_moved / median / 1e9
        peak = MEASURED_BANDWIDTH.get(extra["device"])
        if peak:
            extra["bandwidth_floor_fraction"] = bytes_moved / median / peak
    if flops:
        extra["TFLOP_per_s"] = flops / median / 1e12
    benchmark.extra_info.update(extra)
    return result


def measure_peak_memory(fn) -> int:
    """Peak memory in bytes that running `fn` once adds: allocated device memory on a GPU;
    on a Linux CPU, the growth of the process's peak resident set (VmHWM, reset first through
    /proc/self/clear_refs), page-granular. 0 where neither can be measured."""
    if ON_GPU:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")                      # 5: reset the peak resident set to the current one
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) * 1024
    except OSError:
        return 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the figures depend on in every JSON result."""
    import importlib.metadata as metadata

    import loca_kernels

    machine_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    machine_info["sizes"] = "full" if full_run() else "quick"
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    for package in ("triton", "xformers"):
        try:
            machine_info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            machine_info[package] = None
    machine_info["loca_kernels_backends"] = loca_kernels.backends()


@pytest.fixture
def device():
    return DEVICE
