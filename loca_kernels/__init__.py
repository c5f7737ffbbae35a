"""loca_kernels: fused, exact kernels for LOCA location-aware self-supervised ViT pretraining
and its dense relatives (DenseCL, GTSA).

Public API (docs/SPEC.md): the ops masked_cross_attention, relative_position_targets,
gather_at_targets, sinkhorn, queue_contrastive_loss, patch_matching and crop_features; the keep
helpers; the layers MaskedCrossAttention, CrossAttentionBlock, PositionPredictor,
ClusteringHead and RotationPredictor (GTSA); the losses LocaLoss, DenseContrastiveLoss
(DenseCL), PatchCorrespondenceLoss (GTSA) and MMCLoss (MMC); and backends() to see what was built
and can run here.

Layout: one folder per op (loca_kernels/<op>/: public function, reference, operators, Triton
kernels), private to it; what several ops or the trainer share sits at the top: geometry.py
(view and box sampling), distributed.py (collectives over ranks), modules.py (layers), losses/
(one module per objective), _backends.py and _validation.py.
"""
from ._backends import BACKENDS, backends
from .attention import KeepRun, consecutive_keep, keep_to_mask, masked_cross_attention, random_keep
from .contrastive import queue_contrastive_loss
from .crop import crop_features
from .losses import DenseContrastiveLoss, LocaLoss, MMCLoss, PatchCorrespondenceLoss
from .matching import patch_matching
from .modules import ClusteringHead, CrossAttentionBlock, MaskedCrossAttention, PositionPredictor, RotationPredictor
from .sinkhorn import sinkhorn
from .targets import gather_at_targets, relative_position_targets

__all__ = [
    "BACKENDS", "backends",
    "masked_cross_attention", "KeepRun", "consecutive_keep", "random_keep", "keep_to_mask",
    "relative_position_targets", "gather_at_targets", "sinkhorn", "queue_contrastive_loss", "patch_matching",
    "crop_features",
    "MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor", "ClusteringHead", "RotationPredictor",
    "LocaLoss", "DenseContrastiveLoss", "PatchCorrespondenceLoss", "MMCLoss",
]
