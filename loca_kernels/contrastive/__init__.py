"""queue_contrastive_loss (SPEC.md section 5): MoCo / DenseCL InfoNCE against a queue of negatives.

Home of the op: reference.py (the oracle), operators.py (fake function and autograd of the fused
operators), triton.py (Triton kernel), csrc/contrastive/cpu.cpp (C++ CPU kernel).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backends import choose_backend, support
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str
from . import reference
from .operators import OPERATORS

__all__ = ["queue_contrastive_loss"]

OP = "queue_contrastive_loss"
REDUCTIONS = ("mean", "sum", "none")
# float64 runs on the reference only (for gradcheck).
DTYPES = FLOAT_DTYPES + (torch.float64,)
TRITON_MAX_DIM = 256  # the Triton kernel keeps a whole row of D in registers


def _check_inputs(query, positive, queue, temperature, reduction) -> None:
    check_tensor(OP, "query", query, ndim=2, layout="(N, D)", dtypes=DTYPES)
    check_tensor(OP, "positive", positive, ndim=2, layout="(N, D)", dtypes=DTYPES)
    check_tensor(OP, "queue", queue, ndim=2, layout="(K, D)", dtypes=DTYPES)
    if positive.dtype != query.dtype or queue.dtype != query.dtype:
        raise TypeError(f"{OP}: query, positive and queue must share one dtype, got "
                        f"{query.dtype}, {positive.dtype} and {queue.dtype}")
    check_same_device(OP, [("query", query), ("positive", positive), ("queue", queue)])
    if positive.shape != query.shape:
        raise ValueError(f"{OP}: positive must have the shape of query {shape_str(query)}, "
                         f"got {shape_str(positive)}")
    n, d = query.shape
    if n == 0:
        raise ValueError(f"{OP}: query has N of zero rows {shape_str(query)}; a loss needs N >= 1")
    if d == 0:
        raise ValueError(f"{OP}: query has a feature dim D of zero {shape_str(query)}; expected D >= 1")
    if queue.shape[1] != d:
        raise ValueError(f"{OP}: queue must be (K, D={d}) like query, got {shape_str(queue)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _support(query: torch.Tensor) -> dict:
    """The generic checks of the fused backends, then the dtypes and dims their kernels take."""
    checks = support("queue_contrastive_forward", query.device)

    def dtype_limit() -> Optional[str]:
        return None if query.dtype in FLOAT_DTYPES else f"dtype {query.dtype} runs on the 'torch' backend only"

    def triton() -> Optional[str]:
        reason = checks["triton"]() or dtype_limit()
        if reason is None and query.shape[1] > TRITON_MAX_DIM:
            reason = f"feature dim D={query.shape[1]} is larger than the {TRITON_MAX_DIM} the Triton kernel takes"
        return reason

    return {"cpu": lambda: checks["cpu"]() or dtype_limit(), "cuda": checks["cuda"], "triton": triton}


def queue_contrastive_loss(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, *,
                           temperature: float = 0.2, reduction: str = "mean",
                           backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE of each query against its positive and a queue of K shared negatives (MoCo, DenseCL).

    loss_i = logsumexp(l_0, l_1, ..., l_K) - l_0 with l_0 = query_i . positive_i / T and
    l_k = query_i . queue_k / T: F.cross_entropy(cat([l_pos, l_neg], 1) / T, zeros) as MoCo and
    DenseCL write it, without their (N, K + 1) logits. Normalising the vectors is the caller's job.

    Args:
        query, positive: (N, D), N >= 1, any strides.
        queue: (K, D) negatives, K >= 0, any strides: DenseCL's (D, K) buffer is passed as
            `buffer.t()` and read in place. A constant: no gradient reaches it.
        temperature: T > 0 (stable down to 0.005 on unit vectors).
        reduction: "mean", "sum" or "none" (the (N,) per-row losses).
        backend: None (fastest available, or $LOCA_KERNELS_BACKEND), "torch", "cpu" or "triton".

    Returns:
        float32 (a scalar, or (N,) for "none") for float32, float16 and bfloat16 inputs (all
        three alike; float64 runs on the reference). Differentiable in query and positive.
        A NaN or infinite logit makes its row's loss NaN (SPEC.md section 5).
    """
    _check_inputs(query, positive, queue, temperature, reduction)
    name = choose_backend(OP, backend, query.device, _support(query))
    if name == "torch":
        return reference.queue_contrastive_loss(query, positive, queue, temperature=float(temperature),
                                                reduction=reduction)
    with_grad = torch.is_grad_enabled() and (query.requires_grad or positive.requires_grad)
    loss, _weighted = OPERATORS[name](query, positive, queue.detach(), 1.0 / temperature, with_grad)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
