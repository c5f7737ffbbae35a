"""Write BENCHMARKS.md and its plots from the pytest-benchmark JSON files in benchmarks/results/.

Every figure in BENCHMARKS.md comes from those files (and results/notes.md, measured
observations written by hand, each saying how it was measured). For each JSON file and bench
module: what the module measures (its docstring), every implementation in words (ours from
OURS_DESCRIPTIONS, the peers from the module's PEERS dict, read without importing the module),
a plot of our speed-up over each peer per group (a PNG under results/plots/), and per benchmark
group its shape (the extra_info every row shares) and a table: each implementation's median, its
ratio to the best of ours, GB/s, the bandwidth-floor fraction and peak memory where the JSON has
them. Usage: python benchmarks/report.py [results/*.json ...]
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS_DESCRIPTIONS = {
    "cpu": "ours: loca_kernels' C++ CPU kernel (OpenMP, the widest ISA the machine has)",
    "cuda": "ours: loca_kernels' CUDA kernel",
    "triton": "ours: loca_kernels' Triton kernel",
    "kernels": "ours: loca_kernels' ops on their default backend for the device (backend=None: the C++ "
               "kernels on the CPU; CUDA, else Triton, on a GPU)",
}
OURS = tuple(OURS_DESCRIPTIONS)
# extra_info fields that are measurements or labels, not the shape of the problem.
MEASURED = ("impl", "device", "GB_per_s", "TFLOP_per_s", "bandwidth_floor_fraction", "peak_memory_bytes",
            "images_per_s", "sdpa_note")


def load(paths):
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append((Path(path), data))
    return runs


@functools.lru_cache(maxsize=None)
def describe(module: str) -> tuple[str, dict[str, str]]:
    """The docstring and PEERS dict of benchmarks/<module>.py, read from its source; empty where the
    file is gone or has neither."""
    path = HERE / f"{module}.py"
    if not path.exists():
        return "", {}
    tree = ast.parse(path.read_text())
    peers = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PEERS" for t in node.targets):
            peers = ast.literal_eval(node.value)
    return ast.get_docstring(tree) or "", peers


def module_of(benchmark) -> str:
    """The bench module a JSON row came from: benchmarks/bench_x.py::test_y[...] -> bench_x."""
    return Path(benchmark["fullname"].split("::")[0]).stem


def impl_of(benchmark) -> str:
    return benchmark["extra_info"].get("impl", benchmark["name"])


def shape(rows) -> str:
    """The extra_info fields that every row of a group shares, as `name=value` pairs."""
    common = {k: v for k, v in rows[0]["extra_info"].items() if k not in MEASURED}
    for b in rows[1:]:
        common = {k: v for k, v in common.items() if b["extra_info"].get(k) == v}
    return ", ".join(f"{k}={v}" for k, v in common.items())


def natural(text: str):
    """Sort key with the numbers in `text` compared as numbers (B=64 before B=256)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def best_ours(rows):
    ours = [b["stats"]["median"] for b in rows if impl_of(b) in OURS]
    return min(ours) if ours else None


def table(rows) -> list[str]:
    """Markdown table of one group; the GB/s, bandwidth-floor, images/s and memory columns only
    where some row has them (the bandwidth floor needs a measured peak, which only the GPUs have)."""
    rows = sorted(rows, key=lambda b: b["stats"]["median"])
    best = best_ours(rows)
    columns = [("GB/s", "GB_per_s", lambda v: f"{v:.2f}"),
               ("bandwidth-floor fraction", "bandwidth_floor_fraction", lambda v: f"{v:.1%}"),
               ("images/s", "images_per_s", lambda v: f"{v:.1f}"),
               ("peak memory (MB)", "peak_memory_bytes", lambda v: f"{v / 2**20:.0f}")]
    columns = [c for c in columns if any(b["extra_info"].get(c[1]) for b in rows)]
    lines = ["| implementation | median (ms) | time / best of ours |" + "".join(f" {c[0]} |" for c in columns),
             "|---|---|---|" + "---|" * len(columns)]
    for b in rows:
        info, median = b["extra_info"], b["stats"]["median"]
        ratio = f"{median / best:.2f}" if best else "-"
        cells = "".join(f" {fmt(info[key])} |" if key in info else " - |" for _, key, fmt in columns)
        lines.append(f"| {impl_of(b)} | {median * 1e3:.3f} | {ratio} |{cells}")
    return lines


def short_labels(groups: list[str]) -> list[str]:
    """Group names without the leading words that all of them share (the op's name)."""
    words = [g.split() for g in groups]
    common = 0
    while len(groups) > 1 and all(len(w) > common + 1 and w[common] == words[0][common] for w in words):
        common += 1
    return [" ".join(w[common:]) for w in words]


def plot(path: Path, title: str, groups: dict[str, list], order) -> bool:
    """Bar chart of our speed-up over each peer (peer median / best median of ours) per group;
    False, and no file, where no group has both ours and a peer."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = [g for g, rows in groups.items() if best_ours(rows) and any(impl_of(b) not in OURS for b in rows)]
    if not names:
        return False
    peers = sorted({impl_of(b) for g in names for b in groups[g] if impl_of(b) not in OURS}, key=order)
    figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 3), 4.2), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs, ys = [], []
        for x, group in enumerate(names):
            medians = [b["stats"]["median"] for b in groups[group] if impl_of(b) == peer]
            if medians:
                xs.append(x + (i - (len(peers) - 1) / 2) * width)
                ys.append(medians[0] / best_ours(groups[group]))
        bars = axes.bar(xs, ys, width, label=peer)
        axes.bar_label(bars, labels=[f"{y:.2g}x" for y in ys], fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_ylabel("speed-up of ours over the peer\n(peer time / our time)")
    axes.set_xticks(range(len(names)), short_labels(names), rotation=20, ha="right", fontsize=8)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, metadata={"Software": None})
    return True


def impl_order(module: str):
    """Sort key of implementation names: ours first, then the peers in the order of PEERS."""
    order = list(OURS) + list(describe(module)[1])
    return lambda impl: (order.index(impl) if impl in order else len(order), impl)


def implementations(module: str, impls) -> list[str]:
    """One line per implementation that ran: ours from OURS_DESCRIPTIONS, peers from PEERS."""
    _, peers = describe(module)
    lines = []
    for impl in sorted(impls, key=impl_order(module)):
        text = OURS_DESCRIPTIONS.get(impl) or peers.get(impl) or f"not described: add it to PEERS in {module}.py"
        lines.append(f"- `{impl}`: {text}.")
    return lines


def report(runs, markdown: Path, plots: Path) -> str:
    """BENCHMARKS.md's text for `runs`; writes one PNG per (JSON file, bench module) under
    `plots`, linked relative to the directory of `markdown`."""
    out = ["# Benchmarks", "",
           "Generated by `python benchmarks/report.py` from the JSON files in `benchmarks/results/`;",
           "every number below is in those files. Reproduce with",
           "`pytest benchmarks/ --benchmark-only --full --benchmark-json=benchmarks/results/<name>.json`",
           "(the committed runs are at the full sizes; without `--full` the benchmarks run at quick sizes).",
           "Times are medians; \"time / best of ours\" divides by the fastest of our backends in the",
           "same group (below 1: faster than ours), and each plot shows the inverse, our speed-up over",
           "each peer. Each group states its shape: the parameters its rows share, named as in the bench",
           "file's docstring; the bench files at this commit describe what each implementation is.",
           "GB/s counts the bytes a perfect kernel must move (each bench file's floor).",
           "The bandwidth-floor fraction divides that by the device's measured peak bandwidth, known",
           "only for the GPUs in `benchmarks/conftest.py`; the CPU tables leave the column out.", ""]
    notes = HERE / "results" / "notes.md"
    if notes.exists():  # measured observations that the JSON files cannot hold
        out += [notes.read_text().strip(), ""]
    if not any(data["machine_info"].get("device") != "cpu" for _, data in runs):
        out += ["No GPU result has been committed yet: every figure here was measured on a CPU, and",
                "the GPU goals of the kernels are unmeasured (run `benchmarks/run_gpu.sh` on a GPU).", ""]
    for path, data in runs:
        machine, commit = data["machine_info"], data.get("commit_info", {})
        out += [f"## {path.name}", "",
                f"- device: {machine.get('device')} ({machine.get('cpu', {}).get('brand_raw', '')}, "
                f"{machine.get('cpu', {}).get('count', '?')} cores)",
                f"- torch {machine.get('torch')}, CUDA {machine.get('cuda')}, triton {machine.get('triton')}, "
                f"xformers {machine.get('xformers')}",
                f"- commit {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}, "
                f"{data.get('datetime', '')}",
                f"- sizes: {machine.get('sizes', 'full (measured before the quick default sizes existed)')}", ""]
        modules = defaultdict(lambda: defaultdict(list))
        for b in data["benchmarks"]:
            modules[module_of(b)][b["group"] or b["name"]].append(b)
        for module in sorted(modules):
            groups = dict(sorted(modules[module].items(), key=lambda item: natural(item[0])))
            doc, _ = describe(module)
            out += [f"### {module}.py", ""]
            if doc:
                out += ["> " + line if line else ">" for line in doc.splitlines()] + [""]
            out += implementations(module, {impl_of(b) for rows in groups.values() for b in rows}) + [""]
            png = plots / f"{path.stem}-{module}.png"
            if plot(png, f"{module}: {machine.get('device')}, {path.name}", groups, impl_order(module)):
                link = Path(os.path.relpath(png, markdown.parent)).as_posix()
                out += [f"![our speed-up over each peer, {module}]({link})", ""]
            for group, rows in groups.items():
                out += [f"#### {group}", "", f"Shape and settings: {shape(rows) or '-'}.", ""] + table(rows) + [""]
    return "\n".join(out)


def main(argv) -> None:
    paths = argv or sorted(str(p) for p in (HERE / "results").glob("*.json"))
    markdown = HERE.parent / "BENCHMARKS.md"
    markdown.write_text(report(load(paths), markdown, HERE / "results" / "plots"))


if __name__ == "__main__":
    main(sys.argv[1:])
