"""What the Triton interpreter cannot show about the kernels of loca_kernels/*/triton.py,
checked without a GPU: every tl.dot states its input precision (on a GPU tl.dot multiplies
float32 in TF32 by default, the interpreter in full float32)."""
import ast
import pathlib

import pytest

KERNEL_FILES = sorted((pathlib.Path(__file__).parents[1] / "loca_kernels").glob("*/triton.py"))


def _dot_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
            yield node


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.parent.name)
def test_every_tl_dot_states_its_input_precision(path):
    calls = list(_dot_calls(ast.parse(path.read_text(), filename=str(path))))
    implicit = [f"{path.parent.name}/triton.py:{call.lineno}" for call in calls
                if not any(keyword.arg == "input_precision" for keyword in call.keywords)]
    assert not implicit, f"tl.dot without input_precision (TF32 for float32 on a GPU) at {implicit}"
