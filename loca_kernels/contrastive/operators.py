"""Every operator of queue_contrastive_loss: fake function and autograd, registered once for the
C++ operator (csrc/ops.cpp; "cpu") and its Triton twin (triton.py).

The forward operator returns, besides the per-row losses, the softmax-weighted mean of the
queue rows, sum_k p_k queue_k (what flash attention computes with the queue as keys and
values), accumulated in the same pass over the queue. With it the gradients are elementwise:
for row i, with p_0 = exp(-loss_i) and g_i the upstream gradient,
    d loss_i / d query_i    = (weighted_i + (p_0 - 1) positive_i) / T
    d loss_i / d positive_i = (p_0 - 1) query_i / T,
so the backward pass reads neither the queue nor the logits again. The queue is a constant.
"""
from __future__ import annotations

import torch

from .._backends import fused_operators


def _forward_fake(query, positive, queue, inv_temperature, with_grad):
    n, d = query.shape
    return query.new_empty((n,), dtype=torch.float32), query.new_empty((n if with_grad else 0, d), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    query, positive, _queue, inv_temperature, _with_grad = inputs
    loss, weighted = output
    ctx.save_for_backward(query, positive, loss, weighted)
    ctx.inv_temperature = inv_temperature
    ctx.mark_non_differentiable(weighted)


def _backward(ctx, grad_loss, _grad_weighted):
    query, positive, loss, weighted = ctx.saved_tensors
    if weighted.shape[0] != query.shape[0]:
        raise RuntimeError("queue_contrastive_forward was called with with_grad=False: it saved nothing to "
                           "differentiate; call it with with_grad=True when query or positive needs a gradient")
    scale = grad_loss.float() * ctx.inv_temperature        # g_i / T
    positive_weight = torch.expm1(-loss)                     # p_0 - 1, exact for small losses
    grad_query = grad_positive = None
    if ctx.needs_input_grad[0]:
        grad_query = (scale[:, None] * (weighted + positive_weight[:, None] * positive.float())).to(query.dtype)
    if ctx.needs_input_grad[1]:
        grad_positive = ((scale * positive_weight)[:, None] * query.float()).to(positive.dtype)
    return grad_query, grad_positive, None, None, None


def _register(suffix: str):
    """Register the fake function and autograd of queue_contrastive_forward<suffix>; return it."""
    name = "queue_contrastive_forward" + suffix
    torch.library.register_fake(f"loca_kernels::{name}", _forward_fake)
    torch.library.register_autograd(f"loca_kernels::{name}", _backward, setup_context=_setup_context)
    return getattr(torch.ops.loca_kernels, name)


# backend name -> the forward operator
OPERATORS = fused_operators(_register, "loca_kernels.contrastive.triton")
