"""Every operator of masked_cross_attention: fake (meta) functions and autograd, registered once.

Every fused backend implements the same pair of schemas (csrc/ops.cpp):
attention_forward -> (out, lse) and attention_backward -> (grad_q, grad_k, grad_v).
The C++ pair serves the "cpu" and "cuda" backends (one operator, two dispatch keys);
the Triton pair (suffix _triton) is defined in triton.py. Both get the same fake functions
and autograd.
"""
from __future__ import annotations

import torch

from .._backends import fused_operators


# Every fused backend returns contiguous tensors, whatever the strides of its inputs.
def _forward_fake(q, k, v, keep_index, keep_count, keep_is_run, scale):
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


def _backward_fake(grad_out, q, k, v, out, lse, keep_index, keep_count, keep_is_run, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register(suffix: str):
    """Register fake functions and autograd of attention_forward<suffix>; return it."""
    forward_name, backward_name = "attention_forward" + suffix, "attention_backward" + suffix
    forward = getattr(torch.ops.loca_kernels, forward_name)
    backward = getattr(torch.ops.loca_kernels, backward_name)

    def setup_context(ctx, inputs, output):
        q, k, v, keep_index, keep_count, keep_is_run, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, keep_index, keep_count)
        ctx.keep_is_run, ctx.scale = keep_is_run, scale
        ctx.mark_non_differentiable(lse)

    def backward_fn(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, keep_index, keep_count = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward(grad_out.contiguous(), q, k, v, out, lse, keep_index,
                                          keep_count, ctx.keep_is_run, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None, None

    torch.library.register_fake(f"loca_kernels::{forward_name}", _forward_fake)
    torch.library.register_fake(f"loca_kernels::{backward_name}", _backward_fake)
    torch.library.register_autograd(f"loca_kernels::{forward_name}", backward_fn,
                                    setup_context=setup_context)
    return forward


# backend name -> the forward operator
OPERATORS = fused_operators(_register, "loca_kernels.attention.triton")
