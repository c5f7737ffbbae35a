"""Shared by every equivalence test: one tolerance table per dtype, and an assertion
that reports the max absolute and relative error and any NaN/inf mismatch."""
from __future__ import annotations

import torch

# (atol, rtol) for a kernel computing in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None,
                 name: str = "output") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, at the tolerance of
    `dtype` (default: actual's dtype), comparing in float64; NaN and inf must sit at the same
    places with the same values."""
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    same_nan = torch.equal(a.isnan(), e.isnan())
    same_inf = torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()])
    if not (same_nan and same_inf):
        raise AssertionError(f"{name}: NaN/inf mismatch: {int(a_bad.sum())} non-finite values in actual, "
                             f"{int(e_bad.sum())} in expected (first actual at "
                             f"{a_bad.nonzero()[:1].tolist()}, expected at {e_bad.nonzero()[:1].tolist()})")
    finite = ~e_bad
    err = (a - e).abs()[finite]
    if err.numel() == 0:
        return
    bound = atol + rtol * e.abs()[finite]
    worst = int(torch.argmax(err - bound))
    if (err > bound).any():
        rel = err / e.abs()[finite].clamp_min(1e-30)
        raise AssertionError(
            f"{name} ({dtype}): {int((err > bound).sum())} of {err.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); max abs error {err.max().item():.3e}, max rel error "
            f"{rel.max().item():.3e}; worst element: actual {a[finite][worst].item():.6e} vs "
            f"expected {e[finite][worst].item():.6e}")
