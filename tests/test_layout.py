"""The layout stays as README's "Adding an operation" and ARCHITECTURE describe it: each op folder
loca_kernels/<op>/ holds that op alone, is reached from outside only through its public names,
and has every file of the recipe. Static checks (ast, file names): milliseconds."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loca_kernels"
# Packages at the top of loca_kernels that are shared code, not ops.
SHARED_PACKAGES = {"losses"}
OPS = sorted(p.name for p in PACKAGE.iterdir()
             if (p / "__init__.py").exists() and p.name not in SHARED_PACKAGES)
# Where an op's private modules may be imported from besides its own folder: its test and benchmark.
OWN_FILES = {op: {ROOT / "tests" / f"test_{op}.py", ROOT / "benchmarks" / f"bench_{op}.py"} for op in OPS}
# Checks of every op's kernels as the hardware sees them (grids, 64-bit offsets, registers):
# they may import each op's triton.py, and nothing else of an op folder.
KERNEL_INSPECTORS = {ROOT / "tests" / "test_gpu_limits.py", ROOT / "tests" / "test_gpu_resources.py",
                     ROOT / "benchmarks" / "gpu_resources.py"}
SOURCES = [p for folder in ("loca_kernels", "python", "tests", "benchmarks", "examples")
           for p in sorted((ROOT / folder).rglob("*.py")) if "build" not in p.parts]


def _module_of(path: Path) -> str:
    """The dotted module name of a file (python/ is the trainer's source root)."""
    parts = path.relative_to(ROOT / "python" if path.is_relative_to(ROOT / "python") else ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path):
    """(line, dotted module) of every import in `path`, at any depth; `from m import x` yields
    m.x as well, since x may be a submodule."""
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)


def _private_op_module(module: str):
    """The op whose private module `module` is (loca_kernels.<op>.<file>), else None."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[0] == "loca_kernels" and parts[1] in OPS:
        if (PACKAGE / parts[1] / f"{parts[2]}.py").exists():
            return parts[1]
    return None


def test_the_walk_sees_the_ops_and_their_imports():
    assert {"attention", "sinkhorn", "targets"} <= set(OPS)
    own = list(_imported(PACKAGE / "sinkhorn" / "__init__.py"))
    assert any(module == "loca_kernels.sinkhorn.operators" for _, module in own)
    assert _private_op_module("loca_kernels.sinkhorn.fused") == "sinkhorn"
    assert _private_op_module("loca_kernels.sinkhorn") is None          # the public face
    assert _private_op_module("loca_kernels.sinkhorn.sinkhorn") is None  # a public name


def test_no_module_reaches_into_another_op_folder():
    wrong = []
    for path in SOURCES:
        for line, module in _imported(path):
            op = _private_op_module(module)
            inspects_kernels = path in KERNEL_INSPECTORS and module == f"loca_kernels.{op}.triton"
            if op and not path.is_relative_to(PACKAGE / op) and path not in OWN_FILES[op] and not inspects_kernels:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, ("an op folder's modules are private to it: import the op's public names from "
                       "loca_kernels, or move shared code to the top of the package:\n" + "\n".join(wrong))


@pytest.mark.parametrize("op", OPS)
def test_every_op_folder_has_the_recipe_files(op):
    recipe = [f"loca_kernels/{op}/__init__.py", f"loca_kernels/{op}/reference.py",
              f"loca_kernels/{op}/operators.py", f"loca_kernels/{op}/triton.py", f"csrc/{op}/cpu.cpp",
              f"tests/test_{op}.py", f"benchmarks/bench_{op}.py"]
    missing = [name for name in recipe if not (ROOT / name).exists()]
    assert not missing, f"op folder {op} lacks the README recipe's {missing}"
    operators = (PACKAGE / op / "operators.py").read_text()
    assert f'fused_operators(_register, "loca_kernels.{op}.triton")' in operators
