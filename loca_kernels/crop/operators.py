"""Every operator of crop_features: fake functions and autograd, registered once.

Every fused backend implements the same pair of schemas (csrc/ops.cpp):
crop_features -> out and crop_features_backward -> grad_features. The C++ pair serves the "cpu"
backend; the Triton pair (suffix _triton) is defined in triton.py. Only the features are
differentiable; the backward saves the small box, flip and turn tensors, not the features.
"""
from __future__ import annotations

import torch

from .._backends import fused_operators


def _forward_fake(features, view_boxes, regions, out_size, view_flip, view_rot90, sampling_ratio):
    m, c = features.shape[:2]
    return features.new_empty((m, regions.shape[1], c, out_size[0], out_size[1]))


def _backward_fake(grad_out, view_boxes, regions, feature_size, view_flip, view_rot90, sampling_ratio):
    m, _, c = grad_out.shape[:3]
    return grad_out.new_empty((m, c, feature_size[0], feature_size[1]))


def _register(suffix: str):
    """Register fake functions and autograd of crop_features<suffix>; return it."""
    forward_name, backward_name = "crop_features" + suffix, "crop_features_backward" + suffix
    forward = getattr(torch.ops.loca_kernels, forward_name)
    backward = getattr(torch.ops.loca_kernels, backward_name)

    def setup_context(ctx, inputs, output):
        features, view_boxes, regions, out_size, view_flip, view_rot90, sampling_ratio = inputs
        ctx.save_for_backward(view_boxes, regions, view_flip, view_rot90)
        ctx.feature_size, ctx.sampling_ratio = list(features.shape[2:]), sampling_ratio

    def backward_fn(ctx, grad_out):
        view_boxes, regions, view_flip, view_rot90 = ctx.saved_tensors
        grad = backward(grad_out.contiguous(), view_boxes, regions, ctx.feature_size, view_flip, view_rot90,
                        ctx.sampling_ratio)
        return grad, None, None, None, None, None, None

    torch.library.register_fake(f"loca_kernels::{forward_name}", _forward_fake)
    torch.library.register_fake(f"loca_kernels::{backward_name}", _backward_fake)
    torch.library.register_autograd(f"loca_kernels::{forward_name}", backward_fn, setup_context=setup_context)
    return forward


# backend name -> the forward operator
OPERATORS = fused_operators(_register, "loca_kernels.crop.triton")
