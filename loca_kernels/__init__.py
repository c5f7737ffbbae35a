"""loca_kernels: fused, exact kernels for LOCA location-aware self-supervised ViT pretraining.

Public API (SPEC.md): masked_cross_attention, relative_position_targets, sinkhorn,
MaskedCrossAttention, the keep helpers, and backends() to see what can run here.
"""
from ._backends import BACKENDS, backends
from .attention import KeepRun, consecutive_keep, keep_to_mask, masked_cross_attention, random_keep
from .sinkhorn import sinkhorn
from .targets import gather_at_targets, relative_position_targets

__all__ = [
    "BACKENDS", "backends",
    "masked_cross_attention", "KeepRun", "consecutive_keep", "random_keep", "keep_to_mask",
    "relative_position_targets", "gather_at_targets", "sinkhorn",
]
from .modules import ClusteringHead, CrossAttentionBlock, MaskedCrossAttention, PositionPredictor  # noqa: E402
from .losses import LocaLoss  # noqa: E402

__all__ += ["MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor", "ClusteringHead", "LocaLoss"]
