"""loca_kernels: fused, exact kernels for LOCA location-aware self-supervised ViT pretraining.

Public API (SPEC.md): masked_cross_attention, relative_position_targets, sinkhorn,
MaskedCrossAttention, the keep helpers, and backends() to see what can run here.
"""
from ._backends import BACKENDS, backends
from .attention import KeepRun, consecutive_keep, keep_to_mask, masked_cross_attention, random_keep

__all__ = [
    "BACKENDS", "backends",
    "masked_cross_attention", "KeepRun", "consecutive_keep", "random_keep", "keep_to_mask",
]
