"""Triton kernels of patch_matching, defined as the operators loca_kernels::patch_matching_triton
and loca_kernels::patch_matching_backward_triton (same arguments as the C++ pair in csrc/ops.cpp;
fake functions and autograd in operators.py).

Forward: one program per (batch element, block of rows of a) loops over tiles of rows of b. As
the reference, rows are normalised in float32 (x / max(|x|, eps), a correctly rounded division)
and their dot products taken in IEEE float32 (tl.dot, whatever the input dtype: TF32 or fp16
operands would round the cosines and move near-ties), so exactly equal rows of b give exactly
equal cosines and a one-channel cosine is exactly +-1. The running maximum keeps the lowest
index on ties: within a tile the smallest column equal to the tile's maximum (tl.argmax does
not promise which), across tiles a strict >, tiles in ascending order.

Backward, deterministic without atomics: a first kernel writes grad_a (one program per block of
rows of a, the chosen row of b gathered) and, per row of a, the two scalars its chosen row of b
needs; the rows of a are then grouped by the row of b they chose (a stable sort and
searchsorted, deterministic on CUDA), and a second kernel with one program per block of rows
of b sums their groups, consecutive in that order, in a fixed order. (index_add_ would add
with float atomics: sums in an order that changes from run to run.)

Grids are one-dimensional, row blocks fastest, then batch elements (axes y and z stop at
65535), and the batch element of a program is int64: it multiplies strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_dot import input_precision

EPS = 1e-12  # F.normalize's default
BLOCK_N = 64
BLOCK_K = 64
BLOCK_J = 32  # rows of b per program of the grad_b kernel
BLOCK_G = 32  # rows of a summed per step of the grad_b kernel


@triton.jit
def _normalised(x, denom):
    """x / denom in float32, correctly rounded as F.normalize's division (not a reciprocal)."""
    return tl.math.div_rn(x.to(tl.float32), denom)


@triton.jit
def _load_rows(rows, ok, k0, c, sc, BLOCK_K: tl.constexpr):
    """Channels k0 .. k0 + BLOCK_K of a block of rows (`rows`: (R, 1) row pointers, `ok`: (R,)
    which exist) in float32, zeros outside."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(rows + offs_k[None, :] * sc, mask=ok[:, None] & (offs_k < c)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _program_block(rows, BLOCK: tl.constexpr):
    """This program's batch element (int64) and first row, for blocks of BLOCK of `rows` rows."""
    blocks = tl.cdiv(rows, BLOCK)
    return (tl.program_id(0) // blocks).to(tl.int64), (tl.program_id(0) % blocks) * BLOCK


@triton.jit
def _row_norm(rows, ok, c, sc, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """|row| in float32 of each of a block of BLOCK_R rows (as _load_rows)."""
    squares = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, c, BLOCK_K):
        x = _load_rows(rows, ok, k0, c, sc, BLOCK_K)
        squares += tl.sum(x * x, axis=1)
    return tl.sqrt(squares)


@triton.jit
def _forward_kernel(a, b, index, similarity, na, nb, c, sab, san, sac, sbb, sbn, sbc, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    batch, m0 = _program_block(na, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < na
    a_rows = a + batch * sab + offs_m[:, None] * san
    denom_a = tl.maximum(_row_norm(a_rows, row_ok, c, sac, BLOCK_M, BLOCK_K), eps)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, nb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < nb
        b_rows = b + batch * sbb + offs_n[:, None] * sbn
        denom_b = tl.maximum(_row_norm(b_rows, col_ok, c, sbc, BLOCK_N, BLOCK_K), eps)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, c, BLOCK_K):
            x = _load_rows(a_rows, row_ok, k0, c, sac, BLOCK_K)
            y = _load_rows(b_rows, col_ok, k0, c, sbc, BLOCK_K)
            s = tl.dot(_normalised(x, denom_a[:, None]), tl.trans(_normalised(y, denom_b[:, None])), s,
                       input_precision=input_precision(tl.float32))
        # A NaN cosine (a NaN or infinite entry in its rows) wins as in torch.argmax: it is
        # ranked as +inf (cosines are at most 1), the first one kept, and stored as NaN.
        s = tl.where(col_ok[None, :], tl.where(s != s, float("inf"), s), float("-inf"))
        tile_best = tl.max(s, axis=1)
        tile_index = tl.min(tl.where(s == tile_best[:, None], offs_n[None, :], nb), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(index + batch * na + offs_m, best_index.to(tl.int64), mask=row_ok)
    tl.store(similarity + batch * na + offs_m, tl.where(best == float("inf"), float("nan"), best), mask=row_ok)


@triton.jit
def _grad_a_kernel(grad_similarity, a, b, index, grad_a, weight, along, na, c, sab, san, sac, sbb, sbn, sbc, eps,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_a_i = g_i / d_i (b_j / e_j - [|a_i| >= eps] sim_i a_i / d_i) for j = index_i, and the
    terms of grad_b_j: weight_i = g_i / d_i (multiplies a_i), along_i = g_i sim_i."""
    batch, m0 = _program_block(na, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < na
    rows = batch * na + offs_m
    j = tl.load(index + rows, mask=row_ok, other=0)
    a_rows = a + batch * sab + offs_m[:, None] * san
    b_rows = b + batch * sbb + j[:, None] * sbn
    squares_a = tl.zeros([BLOCK_M], tl.float32)
    squares_b = tl.zeros([BLOCK_M], tl.float32)
    dots = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, c, BLOCK_K):
        x = _load_rows(a_rows, row_ok, k0, c, sac, BLOCK_K)
        y = _load_rows(b_rows, row_ok, k0, c, sbc, BLOCK_K)
        squares_a += tl.sum(x * x, axis=1)
        squares_b += tl.sum(y * y, axis=1)
        dots += tl.sum(x * y, axis=1)
    norm_a = tl.sqrt(squares_a)
    d = tl.maximum(norm_a, eps)
    e = tl.maximum(tl.sqrt(squares_b), eps)
    sim = dots / (d * e)
    g = tl.load(grad_similarity + rows, mask=row_ok, other=0.0)
    scale = g / d
    gated = tl.where(norm_a >= eps, sim, 0.0)
    for k0 in range(0, c, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + offs_k) < c)[None, :]
        x = _load_rows(a_rows, row_ok, k0, c, sac, BLOCK_K)
        y = _load_rows(b_rows, row_ok, k0, c, sbc, BLOCK_K)
        grad = scale[:, None] * (y / e[:, None] - gated[:, None] * x / d[:, None])
        tl.store(grad_a + batch * na * c + offs_m[:, None] * c + (k0 + offs_k)[None, :],
                 grad.to(grad_a.dtype.element_ty), mask=mask)
    tl.store(weight + rows, scale, mask=row_ok)
    tl.store(along + rows, g * sim, mask=row_ok)


@triton.jit
def _grad_b_kernel(a, b, order, chosen, starts, weight, along, grad_b, na, nb, c, sab, san, sac, sbb, sbn, sbc,
                   eps, BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_b_j = (sum_i weight_i a_i - [|b_j| >= eps] (sum_i along_i) b_j / e_j) / e_j over the
    rows i that chose j. The program's BLOCK_J rows of b were chosen by the consecutive run
    order[starts[j0]:starts[j0 + BLOCK_J]] (chosen: their rows of b); each step takes BLOCK_G
    of them and adds a segmented sum as one product (weights where the row matches) @ a rows."""
    batch, j0 = _program_block(nb, BLOCK_J)
    offs_j = j0 + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    j_ok = offs_j < nb
    first = tl.load(starts + batch * (nb + 1) + j0)
    last = tl.load(starts + batch * (nb + 1) + tl.minimum(j0 + BLOCK_J, nb))
    b_rows = b + batch * sbb + offs_j[:, None] * sbn
    norm = _row_norm(b_rows, j_ok, c, sbc, BLOCK_J, BLOCK_K)
    e = tl.maximum(norm, eps)
    total = tl.zeros([BLOCK_J], tl.float32)
    for g0 in range(first, last, BLOCK_G):
        g_ok = g0 + offs_g < last
        i = tl.load(order + batch * na + g0 + offs_g, mask=g_ok, other=0)
        hit = tl.load(chosen + batch * na + g0 + offs_g, mask=g_ok, other=-1)[None, :] == offs_j[:, None]
        total += tl.sum(tl.where(hit, tl.load(along + batch * na + i, mask=g_ok, other=0.0)[None, :], 0.0), axis=1)
    gated = tl.where(norm >= eps, total, 0.0)
    for k0 in range(0, c, BLOCK_K):
        k_ok = (k0 + offs_k) < c
        acc = tl.zeros([BLOCK_J, BLOCK_K], tl.float32)
        for g0 in range(first, last, BLOCK_G):
            g_ok = g0 + offs_g < last
            i = tl.load(order + batch * na + g0 + offs_g, mask=g_ok, other=0)
            hit = tl.load(chosen + batch * na + g0 + offs_g, mask=g_ok, other=-1)[None, :] == offs_j[:, None]
            pick = tl.where(hit, tl.load(weight + batch * na + i, mask=g_ok, other=0.0)[None, :], 0.0)
            x = _load_rows(a + batch * sab + i[:, None] * san, g_ok, k0, c, sac, BLOCK_K)
            acc = tl.dot(pick, x, acc, input_precision=input_precision(x.dtype))
        y = _load_rows(b_rows, j_ok, k0, c, sbc, BLOCK_K)
        grad = (acc - gated[:, None] * y / e[:, None]) / e[:, None]
        tl.store(grad_b + batch * nb * c + offs_j[:, None] * c + (k0 + offs_k)[None, :],
                 grad.to(grad_b.dtype.element_ty), mask=j_ok[:, None] & k_ok[None, :])


def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


@torch.library.custom_op("loca_kernels::patch_matching_triton", mutates_args=())
def patch_matching_triton(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, na, c = a.shape
    nb = b.shape[1]
    index = torch.empty(batch, na, dtype=torch.int64, device=a.device)
    similarity = torch.empty(batch, na, dtype=torch.float32, device=a.device)
    block_m = _block_m(na)
    _forward_kernel[(triton.cdiv(na, block_m) * batch,)](
        a, b, index, similarity, na, nb, c, *a.stride(), *b.stride(), EPS,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return similarity, index


@torch.library.custom_op("loca_kernels::patch_matching_backward_triton", mutates_args=())
def patch_matching_backward_triton(grad_similarity: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                   index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, na, c = a.shape
    nb = b.shape[1]
    grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    grad_b = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    weight = torch.empty(batch, na, dtype=torch.float32, device=a.device)
    along = torch.empty_like(weight)
    index = index.contiguous()
    block_m = _block_m(na)
    _grad_a_kernel[(triton.cdiv(na, block_m) * batch,)](
        grad_similarity.float().contiguous(), a, b, index, grad_a, weight, along, na, c, *a.stride(), *b.stride(),
        EPS, BLOCK_M=block_m, BLOCK_K=BLOCK_K)
    # The rows of a grouped by their chosen row of b, ascending within a group.
    chosen, order = torch.sort(index, dim=1, stable=True)
    targets = torch.arange(nb + 1, device=a.device).expand(batch, nb + 1).contiguous()
    starts = torch.searchsorted(chosen, targets)
    _grad_b_kernel[(triton.cdiv(nb, BLOCK_J) * batch,)](
        a, b, order, chosen, starts, weight, along, grad_b, na, nb, c, *a.stride(), *b.stride(), EPS,
        BLOCK_J=BLOCK_J, BLOCK_G=BLOCK_G, BLOCK_K=BLOCK_K)
    return grad_a, grad_b
