"""The input precision of tl.dot in every Triton kernel (loca_kernels/*/triton.py), in one place.

On NVIDIA GPUs tl.dot multiplies float32 operands in TF32 by default: 10-bit mantissas, about
5e-4 relative error per operand, past the float32 tolerances of SPEC.md (tests/helpers.py);
the Triton interpreter multiplies in full float32, so tests on the CPU cannot see it
(tests/test_attention.py emulates it). Imported by the Triton kernel modules only.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.constexpr_function
def input_precision(dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: float32 in IEEE float32 (no TF32);
    float16 and bfloat16 in their own precision on the tensor cores (their products are exact in
    the float32 accumulator; "tf32", tl.dot's default, only concerns float32 operands)."""
    return "ieee" if dtype == tl.float32 else "tf32"
