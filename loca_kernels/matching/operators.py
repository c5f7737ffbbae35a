"""Every operator of patch_matching: fake functions and autograd, registered once for the C++
pair (csrc/ops.cpp; "cpu") and its Triton twin (triton.py).

patch_matching(a, b) -> (similarity, index) and
patch_matching_backward(grad_similarity, a, b, index) -> (grad_a, grad_b): the backward
recomputes the cosine of each chosen pair from a, b and index (O(Na C), far less than the
forward's O(Na Nb C)), so nothing but the inputs and the index is saved.
"""
from __future__ import annotations

import torch

from .._backends import fused_operators


def _forward_fake(a, b):
    similarity_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    rows = a.shape[:2]
    return a.new_empty(rows, dtype=similarity_dtype), a.new_empty(rows, dtype=torch.int64)


def _backward_fake(grad_similarity, a, b, index):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _register(suffix: str):
    """Register fake functions and autograd of patch_matching<suffix>; return it."""
    forward_name, backward_name = "patch_matching" + suffix, "patch_matching_backward" + suffix
    forward = getattr(torch.ops.loca_kernels, forward_name)
    backward = getattr(torch.ops.loca_kernels, backward_name)

    def setup_context(ctx, inputs, output):
        a, b = inputs
        _similarity, index = output
        ctx.save_for_backward(a, b, index)
        ctx.mark_non_differentiable(index)

    def backward_fn(ctx, grad_similarity, _grad_index):
        a, b, index = ctx.saved_tensors
        return backward(grad_similarity.contiguous(), a, b, index)

    torch.library.register_fake(f"loca_kernels::{forward_name}", _forward_fake)
    torch.library.register_fake(f"loca_kernels::{backward_name}", _backward_fake)
    torch.library.register_autograd(f"loca_kernels::{forward_name}", backward_fn, setup_context=setup_context)
    return forward


# backend name -> the forward operator
OPERATORS = fused_operators(_register, "loca_kernels.matching.triton")
