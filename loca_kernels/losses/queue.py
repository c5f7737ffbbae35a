"""MoCo's queue of negatives (a ring buffer of keys), shared by DenseContrastiveLoss and MMCLoss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import rows_of_ranks

__all__ = ["random_key_queue", "enqueue_keys"]


def random_key_queue(dim: int, size: int) -> torch.Tensor:
    """A (dim, size) queue of random unit keys, columns normalised: MoCo's initial queue."""
    return F.normalize(torch.randn(dim, size), dim=0)


@torch.no_grad()
def enqueue_keys(queues, queue_ptr: torch.Tensor, keys, group=None) -> None:
    """MoCo's ring buffer: each (N, D) tensor of `keys`, gathered over `group` (rank-major), is
    written into columns queue_ptr .. queue_ptr + N - 1 of its (D, K) queue of `queues`, and
    queue_ptr advances by N modulo K. K must be a multiple of the gathered N (callers check).
    The pointer stays a tensor: no host synchronisation, traceable."""
    keys = [rows_of_ranks(k, group) for k in keys]
    n = keys[0].shape[0]
    slots = queue_ptr + torch.arange(n, device=keys[0].device)
    for queue, k in zip(queues, keys):
        queue.index_copy_(1, slots, k.t().to(queue.dtype))
    queue_ptr.copy_((queue_ptr + n) % queues[0].shape[1])
