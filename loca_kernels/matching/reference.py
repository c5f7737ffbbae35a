"""Plain-PyTorch patch matching (SPEC.md section 6): the oracle of every backend.

The cosines are computed in float64 from the inputs as given (fp16 and bf16 values exactly) and
rounded to float32 (kept in float64 for float64 inputs) before the argmax. A float32 bmm would
not do: BLAS sums different columns in different orders, so two equal rows of `b` could get
cosines an ulp apart and the later one win. Rounded from float64, equal rows (or rows equal up
to a power-of-two factor) tie exactly and the lowest index wins, as torch.argmax; the fused
kernels normalise and sum every row alike in float32, so they tie on the same rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the similarities are computed and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def patch_matching(a: torch.Tensor, b: torch.Tensor):
    """On checked inputs a (B, Na, C), b (B, Nb, C). Returns (index int64 (B, Na), similarity (B, Na))."""
    a_n = F.normalize(a.double(), dim=-1, eps=1e-12)
    b_n = F.normalize(b.double(), dim=-1, eps=1e-12)
    cosine = torch.bmm(a_n, b_n.transpose(1, 2)).to(compute_dtype(a.dtype))   # (B, Na, Nb)
    index = cosine.argmax(dim=-1)
    return index, cosine.gather(-1, index[..., None]).squeeze(-1)
