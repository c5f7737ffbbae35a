"""loca_kernels: fused, exact kernels for LOCA location-aware self-supervised ViT pretraining.

Public API (docs/SPEC.md): the ops masked_cross_attention, relative_position_targets,
gather_at_targets, sinkhorn and queue_contrastive_loss; the keep helpers; the layers
MaskedCrossAttention, CrossAttentionBlock, PositionPredictor, ClusteringHead and the LocaLoss; and backends()
to see what was built and can run here.
"""
from ._backends import BACKENDS, backends
from .attention import KeepRun, consecutive_keep, keep_to_mask, masked_cross_attention, random_keep
from .contrastive import queue_contrastive_loss
from .losses import LocaLoss
from .modules import ClusteringHead, CrossAttentionBlock, MaskedCrossAttention, PositionPredictor
from .sinkhorn import sinkhorn
from .targets import gather_at_targets, relative_position_targets

__all__ = [
    "BACKENDS", "backends",
    "masked_cross_attention", "KeepRun", "consecutive_keep", "random_keep", "keep_to_mask",
    "relative_position_targets", "gather_at_targets", "sinkhorn", "queue_contrastive_loss",
    "MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor", "ClusteringHead", "LocaLoss",
]
