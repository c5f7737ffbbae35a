"""The linear probe: a linear classifier of standardised patch features, one fixed recipe."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# The linear probe's recipe: standardised features, zero-initialised weights, full-batch L-BFGS
# on the class-balanced cross-entropy plus this L2 penalty on the weights.
PROBE_ITERATIONS, PROBE_WEIGHT_DECAY = 100, 1e-3


@dataclass
class LinearProbe:
    """A linear classifier of standardised patch features."""

    mean: torch.Tensor
    std: torch.Tensor
    linear: torch.nn.Linear

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., classes)."""
        with torch.no_grad():
            return self.linear((features.float() - self.mean) / self.std)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> LinearProbe:
    """The fixed recipe: standardise each feature (train mean and std), zero weights, then
    PROBE_ITERATIONS of full-batch L-BFGS (strong Wolfe line search) on the class-balanced
    cross-entropy (class weights n / (classes * count), so that the background, most patches,
    does not make predicting it everywhere the optimum) + PROBE_WEIGHT_DECAY * |W|^2.
    Deterministic; no random draw. features (n, dim), labels (n,)."""
    features = features.float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp_min(1)), 0.0)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    linear = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], num_classes)   # no random draw
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERATIONS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels, weight=weights) + PROBE_WEIGHT_DECAY * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, linear.requires_grad_(False))
