"""patch_matching (SPEC.md section 6): checks, backend choice, one fused call.

Home of the op: reference.py (the oracle), operators.py (fake functions and autograd of the fused
operators), triton.py (Triton kernels), csrc/matching/ (C++ CPU kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import choose_backend, support
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str
from . import reference
from .operators import OPERATORS

__all__ = ["patch_matching"]

OP = "patch_matching"
# float64 runs on the reference (for gradcheck) and on the C++ kernel.
DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        check_tensor(OP, name, t, ndim=3, layout="(B, N, C)", dtypes=DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"{OP}: a and b must share one dtype, got {a.dtype} and {b.dtype}")
    check_same_device(OP, [("a", a), ("b", b)])
    (batch, na, c), (batch_b, nb, c_b) = a.shape, b.shape
    if batch != batch_b:
        raise ValueError(f"{OP}: a has B={batch} but b has B={batch_b} (shapes {shape_str(a)} and {shape_str(b)}); "
                         "they must match")
    if c != c_b:
        raise ValueError(f"{OP}: a has C={c} but b has C={c_b} (shapes {shape_str(a)} and {shape_str(b)}); "
                         "they must match")
    if c == 0:
        raise ValueError(f"{OP}: a and b have a feature dim of zero (C=0), got shapes {shape_str(a)} and "
                         f"{shape_str(b)}; expected C >= 1")
    if na == 0:
        raise ValueError(f"{OP}: a has no rows (Na=0), got shape {shape_str(a)}; expected Na >= 1")
    if nb == 0:
        raise ValueError(f"{OP}: b has no rows (Nb=0) to match, got shape {shape_str(b)}; expected Nb >= 1")


def _support(a: torch.Tensor) -> dict:
    checks = support(OP, a.device)

    def triton() -> Optional[str]:
        reason = checks["triton"]()
        if reason is None and a.dtype == torch.float64:
            return "the Triton kernels take float32, float16 and bfloat16, got float64"
        return reason

    return {"cpu": checks["cpu"], "triton": triton}


def patch_matching(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None):
    """For every patch of `a`, the patch of `b` with the highest cosine similarity.

    Args:
        a: (B, Na, C) patch features; b: (B, Nb, C) patch features of the same B images (another
            view, or the teacher). float32, float16 or bfloat16 (float64 on the "torch" and
            "cpu" backends). Any strides.
        backend: None (fastest available, or $LOCA_KERNELS_BACKEND), "torch", "cpu" or "triton".

    Returns:
        (index, similarity): index int64 (B, Na), the row of b of highest cosine (the lowest
        index on ties, as torch.argmax); similarity (B, Na) float32 (float64 for float64
        inputs), that cosine, with rows normalised as F.normalize(x, dim=-1, eps=1e-12) (a zero
        vector has cosine 0 to every row). The cosines are computed in float32 from the inputs as
        given. similarity is differentiable in a and b through the chosen pairs; index is not.
        Fused backends never build the (B, Na, Nb) similarity tensor. A row with a NaN or
        infinite entry has NaN cosines, which win as in torch.argmax (SPEC.md section 6).
    """
    _check_inputs(a, b)
    name = choose_backend(OP, backend, a.device, _support(a))
    if name == "torch":
        return reference.patch_matching(a, b)
    similarity, index = OPERATORS[name](a, b)
    return index, similarity
