"""DenseCL's loss head: a global and a dense InfoNCE term against two queues of negatives."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, shape_str
from ..contrastive import queue_contrastive_loss
from ..matching import patch_matching
from .queue import enqueue_keys, random_key_queue

__all__ = ["DenseContrastiveLoss"]


class DenseContrastiveLoss(nn.Module):
    """DenseCL's loss head (Wang et al., CVPR 2021; official code WXinlong/DenseCL,
    openselfsup/models/densecl.py) with its two queues of negatives:

        total = (1 - dense_weight) * global + dense_weight * dense

    - global: InfoNCE of each image's query vector against its key vector (the positive) and
      the `queue_size` keys of earlier batches (`queue_global`), as MoCo v2.
    - dense: InfoNCE of each query patch against one key patch (the positive) and the pooled
      dense keys of earlier batches (`queue_dense`). The positive of query patch i is the key
      patch whose backbone feature is most similar (cosine) to query patch i's backbone
      feature (`patch_matching`, first index on ties).
    - Both are `queue_contrastive_loss` with `temperature`, averaged over images and over
      query patches respectively: the (N, K) logits are never built.
    - After the loss, the key vectors and the pooled dense keys (the mean of each image's
      un-normalised dense keys, normalised: DenseCL's `k2`) of all ranks of `group` are
      written into the queues, replacing the oldest (a ring buffer). The queues and their
      pointer are buffers: they are saved in `state_dict`, and a resumed run goes on with the
      same negatives.

    Every input is L2-normalised here (DenseCL normalises in its forward); keys get no gradient.
    The loss reads a snapshot of each queue, as DenseCL's `queue.clone().detach()`, so that
    writing the new keys cannot change what the backward pass recomputes (2 x dim x queue_size
    floats, 64 MB at DenseCL's size).

    Args:
        dim: the projection dim D of the global and dense heads (DenseCL: 128).
        queue_size: negatives per queue (DenseCL: 65536); a multiple of the global batch
            (the images of all ranks of a step).
        temperature: of both InfoNCE terms (DenseCL: 0.2).
        dense_weight: lambda (DenseCL: 0.5).
        group: the torch.distributed process group whose keys are enqueued, or None.
        backend: the backend of queue_contrastive_loss and patch_matching (None: the default).

    forward(query_global, query_dense, key_global, key_dense, query_backbone, key_backbone):
        query_global, key_global: (B, D) global projections of the two views (student, momentum).
        query_dense: (B, Sq, D) dense projections of the query view's Sq patches, token-major
            (a CNN grid (B, D, H, W) is `x.flatten(2).transpose(1, 2)`); key_dense: (B, Sk, D).
        query_backbone: (B, Sq, C), key_backbone: (B, Sk, C): the backbone features the
            patches are matched on (DenseCL: ResNet C5; ViT patch tokens).
        Returns (total, {"global": ..., "dense": ...}), float32 scalars.
    """

    def __init__(self, dim: int = 128, queue_size: int = 65536, *, temperature: float = 0.2,
                 dense_weight: float = 0.5, group=None, backend: Optional[str] = None):
        super().__init__()
        name = "DenseContrastiveLoss"
        if dim <= 0 or queue_size <= 0:
            raise ValueError(f"{name}: dim and queue_size must be positive, got dim={dim}, queue_size={queue_size}")
        if not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        if not 0 <= dense_weight <= 1:
            raise ValueError(f"{name}: dense_weight must be in [0, 1], got {dense_weight}")
        self.dim, self.queue_size, self.temperature = dim, queue_size, temperature
        self.dense_weight, self.group, self.backend = dense_weight, group, backend
        # (D, K) like DenseCL's buffers, read transposed in place by queue_contrastive_loss.
        self.register_buffer("queue_global", random_key_queue(dim, queue_size))
        self.register_buffer("queue_dense", random_key_queue(dim, queue_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, queue_size={self.queue_size}, temperature={self.temperature}, "
                f"dense_weight={self.dense_weight}")

    def _check(self, inputs: Dict[str, torch.Tensor]) -> None:
        name = "DenseContrastiveLoss"
        layouts = {"query_global": "(B, D)", "key_global": "(B, D)", "query_dense": "(B, Sq, D)",
                   "key_dense": "(B, Sk, D)", "query_backbone": "(B, Sq, C)", "key_backbone": "(B, Sk, C)"}
        for arg, layout in layouts.items():
            check_tensor(name, arg, inputs[arg], ndim=layout.count(",") + 1, layout=layout,
                         dtypes=FLOAT_DTYPES + (torch.float64,))
        check_same_device(name, list(inputs.items()))
        q, qd, kd = inputs["query_global"], inputs["query_dense"], inputs["key_dense"]
        b = q.shape[0]
        expected = {"query_global": (b, self.dim), "key_global": (b, self.dim),
                    "query_dense": (b, qd.shape[1], self.dim), "key_dense": (b, kd.shape[1], self.dim),
                    "query_backbone": (b, qd.shape[1], inputs["query_backbone"].shape[2]),
                    "key_backbone": (b, kd.shape[1], inputs["query_backbone"].shape[2])}
        for arg, shape in expected.items():
            if tuple(inputs[arg].shape) != shape:
                raise ValueError(f"{name}: {arg} must have shape {layouts[arg]} = {shape} (B={b}, D={self.dim} "
                                 f"and the patches and channels of the other inputs), got {shape_str(inputs[arg])}")

    def forward(self, query_global: torch.Tensor, query_dense: torch.Tensor, key_global: torch.Tensor,
                key_dense: torch.Tensor, query_backbone: torch.Tensor, key_backbone: torch.Tensor,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        self._check(dict(query_global=query_global, query_dense=query_dense, key_global=key_global,
                         key_dense=key_dense, query_backbone=query_backbone, key_backbone=key_backbone))
        q = F.normalize(query_global, dim=-1)
        q_dense = F.normalize(query_dense, dim=-1)
        with torch.no_grad():
            k = F.normalize(key_global, dim=-1)
            k_dense = F.normalize(key_dense, dim=-1)
            k_pooled = F.normalize(key_dense.mean(dim=1), dim=-1)
            index, _ = patch_matching(query_backbone.detach(), key_backbone.detach(), backend=self.backend)
            positive = k_dense.gather(1, index.unsqueeze(-1).expand(-1, -1, self.dim))   # (B, Sq, D)
            # Snapshots in the queries' dtype (the op takes one dtype); `copy=True` even where it matches.
            queue_global = self.queue_global.to(q.dtype, copy=True)
            queue_dense = self.queue_dense.to(q_dense.dtype, copy=True)
        global_term = queue_contrastive_loss(q, k.to(q.dtype), queue_global.t(), temperature=self.temperature,
                                             backend=self.backend)
        dense_term = queue_contrastive_loss(q_dense.flatten(0, 1), positive.flatten(0, 1).to(q_dense.dtype),
                                            queue_dense.t(), temperature=self.temperature, backend=self.backend)
        self._enqueue(k, k_pooled)
        total = (1 - self.dense_weight) * global_term + self.dense_weight * dense_term
        return total, {"global": global_term, "dense": dense_term}

    def _enqueue(self, keys: torch.Tensor, pooled_keys: torch.Tensor) -> None:
        n = keys.shape[0] * (1 if self.group is None else torch.distributed.get_world_size(self.group))
        if self.queue_size % n:
            raise ValueError(f"DenseContrastiveLoss: queue_size={self.queue_size} must be a multiple of the global "
                             f"batch (the images of all ranks of a step), got {n}")
        enqueue_keys((self.queue_global, self.queue_dense), self.queue_ptr, (keys, pooled_keys), self.group)
