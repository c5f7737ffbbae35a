"""benchmarks/report.py (issue 20): BENCHMARKS.md states each group's shape, describes every
implementation in words, leaves out the bandwidth-floor column where no peak bandwidth is known
(the CPU), and plots our speed-up over each peer; benchmarks/conftest.py's --full and
LOCA_BENCH_FULL=1 choose the full sizes, and SIGTERM stops a run as Ctrl-C does."""
import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def report():
    # benchmarks/ is not a package: load report.py by path, without touching sys.path.
    spec = importlib.util.spec_from_file_location("benchmarks_report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(impl, group, median, **info):
    return {"group": group, "name": f"test_attention[{impl}]",
            "fullname": f"benchmarks/bench_attention.py::test_attention[{impl}]",
            "stats": {"median": median}, "extra_info": {"impl": impl, "device": "cpu", **info}}


def _run(path, device, rows):
    path.write_text(json.dumps({"machine_info": {"device": device, "sizes": "quick"}, "commit_info": {"id": "f" * 40},
                                "datetime": "2026-12-02", "benchmarks": rows}))
    return path


def test_report_states_shapes_peers_and_plots(report, tmp_path):
    shape = dict(bk=2, views=10, nq=36, nk=196, heads=6, head_dim=64, pattern="run")
    cpu = _run(tmp_path / "cpu-fixture.json", "cpu", [
        _row("cpu", "attention Bk=2 run forward", 0.010, **shape, GB_per_s=5.0, direction="forward"),
        _row("eager", "attention Bk=2 run forward", 0.025, **shape, GB_per_s=2.0, direction="forward"),
        _row("sdpa_mask", "attention Bk=2 run forward", 0.040, **shape, GB_per_s=1.2, direction="forward"),
        _row("cpu", "attention Bk=2 run forward_backward", 0.020, **shape, direction="forward_backward"),
        _row("mystery", "attention Bk=2 run forward_backward", 0.030, **shape, direction="forward_backward")])
    gpu = _run(tmp_path / "gpu-fixture.json", "NVIDIA H200", [
        _row("triton", "attention Bk=32", 0.001, GB_per_s=2000.0, bandwidth_floor_fraction=0.5, bk=32),
        _row("eager", "attention Bk=32", 0.004, GB_per_s=500.0, bandwidth_floor_fraction=0.125, bk=32)])
    markdown = tmp_path / "BENCHMARKS.md"
    text = report.report(report.load([cpu, gpu]), markdown, tmp_path / "plots")
    cpu_part, gpu_part = text.split("## gpu-fixture.json")

    # The shape every row of a group shares, not the measurements or the implementation.
    assert ("Shape and settings: bk=2, views=10, nq=36, nk=196, heads=6, head_dim=64, pattern=run, "
            "direction=forward.") in cpu_part
    assert "GB_per_s" not in text and "impl=" not in text
    # Every implementation in words: ours, the peers from bench_attention.PEERS, and a missing one named.
    _, peers = report.describe("bench_attention")
    assert "masked_fill" in peers["eager"]
    assert f"- `eager`: {peers['eager']}." in cpu_part and f"- `sdpa_mask`: {peers['sdpa_mask']}." in cpu_part
    assert "- `cpu`: ours: loca_kernels' C++ CPU kernel" in cpu_part
    assert "- `mystery`: not described: add it to PEERS in bench_attention.py." in cpu_part
    assert "> masked_cross_attention at LOCA shapes" in cpu_part             # the module's docstring
    # Ratios to ours; the bandwidth floor only where the JSON has it (the GPU run).
    assert "| eager | 25.000 | 2.50 | 2.00 |" in cpu_part
    assert "| implementation | median (ms) | time / best of ours | GB/s |\n" in cpu_part
    assert "| triton | 1.000 | 1.00 | 2000.00 | 50.0% |" in gpu_part
    # One speed-up plot per (JSON file, module), linked relative to BENCHMARKS.md.
    for name in ("cpu-fixture-bench_attention.png", "gpu-fixture-bench_attention.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name})" in text


def test_every_committed_implementation_is_described(report):
    described = 0
    for path in sorted((BENCHMARKS / "results").glob("*.json")):
        for row in json.loads(path.read_text())["benchmarks"]:
            module, impl = report.module_of(row), report.impl_of(row)
            assert impl in report.OURS_DESCRIPTIONS or impl in report.describe(module)[1], (path.name, module, impl)
            described += 1
    assert described > 0


def test_every_bench_file_has_peers_and_sizes():
    for path in sorted(BENCHMARKS.glob("bench_*.py")):
        tree = ast.parse(path.read_text())
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        assert "PEERS" in names, f"{path.name}: no PEERS dict describing the peers"
        assert "sizes(quick=" in path.read_text(), f"{path.name}: sizes not chosen through conftest.sizes"


def test_full_option_reaches_the_bench_files():
    env = {k: v for k, v in os.environ.items() if k != "LOCA_BENCH_FULL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "benchmarks/bench_sinkhorn.py", "--collect-only", "-q", "--full",
               "-p", "no:cacheprovider"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    sizes = {line.split("-")[2] for line in out.stdout.splitlines() if "test_sinkhorn[" in line}
    assert sizes == {"12544", "50176"}, out.stdout                  # the quick size is 3136


def test_sizes_follow_the_option_and_the_environment(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))                 # the conftest prepends benchmarks/
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", BENCHMARKS / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.delenv("LOCA_BENCH_FULL", raising=False)
    assert conftest.sizes(quick="q", full="f") == "q"

    def session(full: bool):
        config = SimpleNamespace(stash=pytest.Stash(), getoption=lambda name: {"full": full}[name])
        before = signal.getsignal(signal.SIGTERM)
        conftest.pytest_configure(config)
        inside = conftest.sizes(quick="q", full="f")
        with pytest.raises(KeyboardInterrupt):     # SIGTERM stops a run as Ctrl-C does: table and JSON
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        conftest.pytest_unconfigure(config)
        assert signal.getsignal(signal.SIGTERM) == before
        return inside

    assert session(full=True) == "f" and "LOCA_BENCH_FULL" not in os.environ   # restored after the session
    assert session(full=False) == "q"
    monkeypatch.setenv("LOCA_BENCH_FULL", "1")
    assert session(full=False) == "f" and os.environ["LOCA_BENCH_FULL"] == "1"
