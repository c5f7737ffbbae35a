"""sinkhorn (SPEC.md section 4): balanced soft assignment of samples to prototypes.

Home of the op: reference.py (the oracle, log domain), fused.py (the streaming driver over one
backend's pass operator), operators.py (the pass operators and their fake function); sums over
the ranks of a group come from loca_kernels/distributed.py. The pass operator: csrc/sinkhorn/cpu.cpp (C++),
csrc/sinkhorn/kernels.cu (CUDA), triton.py (Triton).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backends import choose_backend, support
from .._validation import FLOAT_DTYPES, check_tensor, shape_str
from . import fused, reference
from .operators import OPERATORS

__all__ = ["sinkhorn"]

OP = "sinkhorn"
MODES = ("loca", "swav")

def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3, mode: str = "loca",
             group=None, backend: Optional[str] = None) -> torch.Tensor:
    """Sinkhorn-Knopp assignment of N samples to K prototypes (not differentiable).

    Fused backends read `scores` in place when its rows are contiguous (any row stride), in
    iterations + 1 passes (see fused.py); another layout, e.g. a transposed (K, N) tensor, is
    copied once into that form.

    Args:
        scores: (N, K) logits, float32, float16 or bfloat16.
        epsilon: temperature (> 0): the scores are divided by it.
        iterations: number of (column, row) normalisation rounds (>= 0).
        mode: "loca" (softmax rows, then columns / column sums, rows / row sums) or "swav"
            (SwAV's distributed_sinkhorn: total mass 1, columns to 1/K, rows to 1/N_total,
            times N_total).
        group: a torch.distributed process group: sums over samples span its ranks, each rank
            keeps its own rows; None for one process.
        backend: None, "torch", "cpu", "triton" or "cuda".

    Returns:
        float32 (N, K), without gradient. Stable for |scores| / epsilon in the thousands. A NaN
        or infinite score gives NaN: in its row with mode "loca" and iterations 0, in every
        entry otherwise (column sums span all rows).
    """
    check_tensor(OP, "scores", scores, ndim=2, layout="(N, K)", dtypes=FLOAT_DTYPES)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{OP}: scores must have N >= 1 samples and K >= 1 prototypes, got shape {shape_str(scores)}")
    if not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"{OP}: epsilon must be a number > 0, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{OP}: iterations must be an int >= 0, got {iterations!r}")
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {MODES}, got {mode!r}")
    name = choose_backend(OP, backend, scores.device, support("sinkhorn_pass", scores.device))
    if name == "torch":
        return reference.sinkhorn(scores, epsilon=float(epsilon), iterations=iterations, mode=mode, group=group)
    return fused.sinkhorn(OPERATORS[name], scores, epsilon=float(epsilon),
                          iterations=iterations, mode=mode, group=group)
