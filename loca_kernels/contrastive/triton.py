"""Triton kernel of queue_contrastive_loss, defined as the operator
loca_kernels::queue_contrastive_forward_triton (same meaning as
loca_kernels::queue_contrastive_forward, csrc/ops.cpp).

One program per block of query rows, like flash attention's forward with the queue as keys
and values: the program loops over queue tiles, keeping per row a running max, a running sum
of exp(l - max) and (WITH_GRAD) the running exp-weighted sum of queue rows, all in float32.
A whole row of D is one block (masked past D), so D is limited to TRITON_MAX_DIM. The first
row of a block and of a queue tile are int64 (they multiply strides); offsets within stay int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import TRITON_INTERPRET
from .._triton_dot import input_precision

BLOCK_N = 64
BLOCK_K = 64
# The interpreter multiplies bf16 tl.dot operands as integers: compute the dots in fp32 there.
DOT_IN_FP32 = TRITON_INTERPRET


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # At temperature 0.005 a logit is 200 times the dot product: float32's precision matters.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=input_precision(tl.float32))
    return tl.dot(a, b, input_precision=input_precision(a.dtype))


@triton.jit(do_not_specialize=["n", "k", "d"])
def _forward_kernel(query, positive, queue, loss, weighted, n, k, d, stride_qn, stride_qd, stride_pn, stride_pd,
                    stride_kk, stride_kd, inv_temperature,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    WITH_GRAD: tl.constexpr, DOT_FP32: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK_N
    lanes = tl.arange(0, BLOCK_N)
    rows = first + lanes
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    dim_ok = dims < d
    ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(query + first * stride_qn + lanes[:, None] * stride_qn + dims[None, :] * stride_qd, mask=ok,
                other=0.0)
    p = tl.load(positive + first * stride_pn + lanes[:, None] * stride_pn + dims[None, :] * stride_pd, mask=ok,
                other=0.0)
    positive_logit = tl.sum(q.to(tl.float32) * p.to(tl.float32), 1) * inv_temperature
    # l_0 starts the running max m, with sum exp(l_0 - m) = 1.
    # A NaN or infinite logit makes the row's loss NaN (SPEC.md section 5): l_0 * 0 starts the
    # running sum, and each tile's sum of l * 0 (0, or NaN) is added to the running max, so
    # that the rescale factor is NaN and the running sum stays NaN.
    running_max = positive_logit
    running_sum = 1.0 + positive_logit * 0.0
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    cols_lane = tl.arange(0, BLOCK_K)
    tiles = queue  # the current queue tile: a pointer advanced by 64-bit pointer arithmetic
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + cols_lane
        col_ok = cols < k
        tile = tl.load(tiles + cols_lane[:, None] * stride_kk + dims[None, :] * stride_kd,
                       mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        tiles += BLOCK_K * stride_kk
        logits = _dot(q, tl.trans(tile), DOT_FP32) * inv_temperature
        nan = tl.sum(tl.where(col_ok[None, :], logits * 0.0, 0.0), 1)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        grown = tl.maximum(running_max, tl.max(logits, 1)) + nan
        rescale = tl.exp(running_max - grown)
        e = tl.exp(logits - grown[:, None])
        running_sum = running_sum * rescale + tl.sum(e, 1)
        running_max = grown
        if WITH_GRAD:
            acc = acc * rescale[:, None] + _dot(e.to(tile.dtype), tile, DOT_FP32)
    tl.store(loss + rows, running_max + tl.log(running_sum) - positive_logit, mask=row_ok)
    if WITH_GRAD:
        tl.store(weighted + first * d + lanes[:, None] * d + dims[None, :], acc / running_sum[:, None], mask=ok)


def block_d(d: int) -> int:
    """The D block of the kernel: a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(d))


def launch_config(dtype: torch.dtype, d: int) -> dict:
    """Tiles and warps for the inputs' dtype and D. float32 dots run on the FMA units (IEEE)
    with their operands in registers: 64 x 64 tiles on 4 warps spilled at D 128 on sm_90 (an
    8 KB stack, benchmarks/results/gpu-resources.md), so float32 takes 32 queue rows per step,
    32 (D <= 128) or 16 query rows per program, and 8 warps from D 128. 16-bit inputs keep
    64 x 64 tiles, on 8 warps at D 256 (on 4 they spilled)."""
    block = block_d(d)
    if dtype != torch.float32:
        return dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block, num_warps=8 if block >= 256 else 4)
    return dict(BLOCK_N=32 if block <= 128 else 16, BLOCK_K=32, BLOCK_D=block, num_warps=8 if block >= 128 else 4)


@torch.library.custom_op("loca_kernels::queue_contrastive_forward_triton", mutates_args=())
def queue_contrastive_forward_triton(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor,
                                     inv_temperature: float, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of loca_kernels::queue_contrastive_forward (any strides)."""
    n, d = query.shape
    loss = torch.empty(n, dtype=torch.float32, device=query.device)
    weighted = torch.empty(n if with_grad else 0, d, dtype=torch.float32, device=query.device)
    config = launch_config(query.dtype, d)
    _forward_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        query, positive, queue, loss, weighted, n, queue.shape[0], d, *query.stride(), *positive.stride(),
        *queue.stride(), inv_temperature, WITH_GRAD=with_grad, DOT_FP32=DOT_IN_FP32, **config)
    return loss, weighted
