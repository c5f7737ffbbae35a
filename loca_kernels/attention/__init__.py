"""masked_cross_attention (SPEC.md section 1): checks, backend choice, one fused call.

Home of the op: reference.py (the oracle), keep.py (keep forms and helpers), operators.py
(fake functions and autograd of the fused operators), triton.py (Triton kernels),
csrc/attention/ (C++ CPU and CUDA kernels).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import choose_backend, extension_has_kernel, support
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str, values_checkable
from . import reference
from .keep import KeepRun, compact_keep, consecutive_keep, keep_to_mask, random_keep
from .operators import OPERATORS

__all__ = ["masked_cross_attention", "KeepRun", "consecutive_keep", "random_keep", "keep_to_mask"]

OP = "masked_cross_attention"
MAX_HEAD_DIM = 256
# The head dims the CUDA kernels are compiled for, from the one list in csrc/include/loca_kernels/
# attention.h; empty when the extension has no CUDA kernels (backends()["cuda_kernels"] is False),
# where the "cuda" backend is refused before its head dims are asked.
CUDA_HEAD_DIMS = (tuple(torch.ops.loca_kernels.attention_cuda_head_dims())
                  if extension_has_kernel("attention_forward", "CUDA") else ())
# float64 runs on the reference (for gradcheck) and wherever a kernel accepts it.
DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_keep(keep, q: torch.Tensor, bk: int, nk: int) -> None:
    bq = q.shape[0]
    rows_ok = (1, bk, bq)
    if keep is None:
        return
    if isinstance(keep, KeepRun):
        check_tensor(OP, "keep.start", keep.start, ndim=1, layout="(R,)")
        if keep.start.dtype.is_floating_point or keep.start.dtype == torch.bool:
            raise TypeError(f"{OP}: keep.start must be an integer tensor, got {keep.start.dtype}")
        if keep.start.shape[0] not in rows_ok:
            raise ValueError(f"{OP}: keep.start must have R in (1, Bk={bk}, Bq={bq}) rows, "
                             f"got shape {shape_str(keep.start)}")
        if not 1 <= keep.length <= nk:
            raise ValueError(f"{OP}: keep.length must be in [1, Nk={nk}], got {keep.length}")
        if values_checkable(keep.start) and keep.start.numel() and (
                keep.start.min() < 0 or keep.start.max() + keep.length > nk):
            raise ValueError(f"{OP}: keep run positions out of range: start must lie in "
                             f"[0, {nk - keep.length}] for length {keep.length} and Nk={nk}")
        check_same_device(OP, [("q", q), ("keep.start", keep.start)])
        return
    check_tensor(OP, "keep", keep, ndim=2, layout="(R, Nk) bool or (R, Nkeep) integer")
    check_same_device(OP, [("q", q), ("keep", keep)])
    if keep.shape[0] not in rows_ok:
        raise ValueError(f"{OP}: keep must have R in (1, Bk={bk}, Bq={bq}) rows, got shape {shape_str(keep)}")
    if keep.dtype == torch.bool:
        if keep.shape[1] != nk:
            raise ValueError(f"{OP}: bool keep must have shape (R, Nk={nk}), got {shape_str(keep)}")
        return
    if keep.dtype.is_floating_point or keep.dtype.is_complex:
        raise TypeError(f"{OP}: keep must be a bool mask or an integer index tensor, got {keep.dtype}")
    if keep.dtype == torch.uint8:  # the old PyTorch mask dtype: ambiguous, never read as positions
        raise TypeError(f"{OP}: keep must be a bool mask or an integer index tensor (int32 or int64), got "
                        f"torch.uint8; for a mask pass keep.bool(), for positions keep.long()")
    if keep.shape[1] > nk:
        raise ValueError(f"{OP}: index keep has {keep.shape[1]} positions per row, more than Nk={nk}")
    if values_checkable(keep) and keep.numel():
        if keep.min() < 0 or keep.max() >= nk:
            raise ValueError(f"{OP}: keep positions out of range: expected values in [0, {nk}), "
                             f"got min {int(keep.min())} and max {int(keep.max())}")
        ordered = keep.sort(dim=1).values
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError(f"{OP}: keep positions must be distinct within a row")


def _check_inputs(q, k, v, keep) -> None:
    layout = "(B, N, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4, layout=layout, dtypes=DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(OP, [("q", q), ("k", k), ("v", v)])
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got {shape_str(k)} and {shape_str(v)}")
    (bq, nq, h, d), (bk, nk, hk, dk) = q.shape, k.shape
    if (h, d) != (hk, dk):
        raise ValueError(f"{OP}: q has H={h}, D={d} but k has H={hk}, D={dk}; they must match")
    if min(bq, nq, h, d, bk, nk) < 1:
        raise ValueError(f"{OP}: every dimension must be >= 1, got q {shape_str(q)} and k {shape_str(k)}")
    if bq % bk:
        raise ValueError(f"{OP}: Bq={bq} (q.shape[0]) must be a multiple of Bk={bk} (k.shape[0])")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim D={d} is larger than the supported {MAX_HEAD_DIM}")
    _check_keep(keep, q, bk, nk)


def _kernel_limits(q: torch.Tensor, head_dims: tuple) -> Optional[str]:
    """Why a compiled kernel for `head_dims` cannot take q, or None."""
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype} is not one of {FLOAT_DTYPES}"
    if q.shape[-1] not in head_dims:
        return f"head dim D={q.shape[-1]} is not one of {head_dims}"
    return None


def _support(q: torch.Tensor) -> dict:
    """The generic checks of the fused backends, then the dtypes and head dims each compiles."""
    checks = support("attention_forward", q.device)

    def cuda() -> Optional[str]:
        return checks["cuda"]() or _kernel_limits(q, CUDA_HEAD_DIMS)

    def triton() -> Optional[str]:
        reason = checks["triton"]()
        if reason is not None:
            return reason
        from .triton import HEAD_DIMS  # importable once the generic check passes (Triton is installed)
        return _kernel_limits(q, HEAD_DIMS)

    return {"cpu": checks["cpu"], "cuda": cuda, "triton": triton}


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels take any strides except along D; only an unusual layout is copied.
    return t if t.stride(-1) == 1 else t.contiguous()


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep=None, *,
                           scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Query-to-reference cross-attention where each query row sees only some reference tokens.

    Args:
        q: (Bq, Nq, H, D) query-view tokens.
        k, v: (Bk, Nk, H, D) reference tokens; Bq must be a multiple of Bk and query row
            i attends reference row i % Bk (views concatenated view-major). K and V are
            never copied per view.
        keep: which reference tokens each query row sees: None (all), a bool mask (R, Nk)
            (True = visible), an integer tensor (R, Nkeep) of distinct positions, or a
            KeepRun (consecutive tokens from a per-row offset). R is 1, Bk (shared by the
            views of a reference) or Bq (per query row).
        scale: multiplies q.k; default D ** -0.5.
        backend: None (fastest available, or $LOCA_KERNELS_BACKEND), "torch", "cpu",
            "triton" or "cuda".

    Returns:
        (Bq, Nq, H, D) in q's dtype. A row with no visible token gives zeros (and zero
        gradients). Differentiable in q, k and v. A NaN or infinite q, visible k or scale makes
        its rows NaN; hidden tokens never count (SPEC.md section 1).
    """
    _check_inputs(q, k, v, keep)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = choose_backend(OP, backend, q.device, _support(q))
    if name == "torch":
        return reference.masked_cross_attention(q, k, v, keep, scale=scale)
    keep_index, keep_count, keep_is_run = compact_keep(keep, k.shape[1], q.device)
    out, _lse = OPERATORS[name](_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
                              keep_index, keep_count, keep_is_run, float(scale))
    return out
