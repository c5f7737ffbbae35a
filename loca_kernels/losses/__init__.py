"""The objectives' losses, one module per method: loca.py (LocaLoss), densecl.py
(DenseContrastiveLoss), gtsa.py (PatchCorrespondenceLoss), mmc.py (MMCLoss); queue.py holds
MoCo's queue of negatives that DenseCL and MMC share."""
from .densecl import DenseContrastiveLoss
from .gtsa import PatchCorrespondenceLoss
from .loca import LocaLoss
from .mmc import MMCLoss
from .queue import enqueue_keys, random_key_queue

__all__ = ["LocaLoss", "DenseContrastiveLoss", "PatchCorrespondenceLoss", "MMCLoss", "enqueue_keys",
           "random_key_queue"]
