"""benchmarks/run_gpu.sh (issue 25): one call of the device tool. Its stage budgets plus
kill-after fit 540 s, every stage it runs has a budget, the stages run in the order the GPU run
needs, no pytest stops at the first failure, and LOCA_BENCH_IMPLS splits the benchmarks into
ours, the peers and the compile-heavy peers."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


def _plan():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    stages = re.findall(r"^(\S+)\s+(\d+)s \+ (\d+)s kill-after$", out.stdout, re.M)
    total, limit = map(int, re.search(r"^total\s+(\d+)s of (\d+)s$", out.stdout, re.M).groups())
    return [(name, int(budget), int(kill)) for name, budget, kill in stages], total, limit


def test_budgets_fit_one_call():
    stages, total, limit = _plan()
    assert limit == 540 and total == sum(budget + kill for _, budget, kill in stages) <= 540


def test_stages_run_in_order_and_each_has_a_budget():
    names = [name for name, _, _ in _plan()[0]]
    text = SCRIPT.read_text()
    called = []
    for name in re.findall(r"^\s*(?:if ! )?(?:stage|skipped) \"?([\w$-]+)", text, re.M):
        expanded = ([f"bench-{kind}" for kind in re.search(r"for impls in ([\w ]+);", text).group(1).split()]
                    if name == "bench-$impls" else [name])
        called += [n for n in expanded if n not in called]
    assert called == names
    order = names.index
    assert order("build") < order("tests-kernels") < order("tests-rest")
    assert order("tests-kernels") < order("memcheck") < order("bench-ours")
    assert order("bench-ours") < order("bench-peers") < order("bench-compiled") < order("summary") == len(names) - 1


def test_no_pytest_stops_at_the_first_failure_and_memcheck_has_no_caching_allocator():
    text = SCRIPT.read_text()
    pytest_lines = [line for line in text.splitlines() if "pytest" in line]
    assert len(pytest_lines) >= 2 and not any(re.search(r"\s(-x|--exitfirst|--maxfail)\b", line)
                                              for line in pytest_lines)
    assert re.search(r"PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\\n\s*compute-sanitizer --tool memcheck", text)


@pytest.fixture
def conftest(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))                 # the conftest prepends benchmarks/
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_impls_select_ours_peers_or_compiled(conftest, monkeypatch):
    impls = ["cpu", "cuda", "triton", "kernels", "eager", "torch", "sdpa_mask", "xformers", "flex", "compiled"]
    kinds = {impl: conftest.impl_kind(impl) for impl in impls}
    assert kinds == {**dict.fromkeys(impls[:4], "ours"), **dict.fromkeys(impls[4:8], "peers"),
                     "flex": "compiled", "compiled": "compiled"}

    def selected(wanted):
        items = [SimpleNamespace(callspec=SimpleNamespace(params={"impl": impl})) for impl in impls]
        dropped = []
        config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: dropped.extend(items)))
        monkeypatch.setenv("LOCA_BENCH_IMPLS", wanted)
        conftest.pytest_collection_modifyitems(config, items)
        assert len(items) + len(dropped) == len(impls)
        return [item.callspec.params["impl"] for item in items]

    assert selected("ours") == impls[:4]
    assert selected("peers,compiled") == impls[4:]
    with pytest.raises(pytest.UsageError, match="LOCA_BENCH_IMPLS=eager"):
        selected("eager")
