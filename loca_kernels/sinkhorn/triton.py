"""Triton kernel of one streaming Sinkhorn pass, defined as the operator
loca_kernels::sinkhorn_pass_triton (same meaning as loca_kernels::sinkhorn_pass, csrc/ops.cpp).

A fixed number of programs each take a contiguous range of row blocks. When a row block fits
one tile (K <= 8192, LOCA's 4096 included) it is read once and the program's column sums stay
in registers. Otherwise a first sweep over K computes each row's max (and, for normalised
rows, its log-sum-exp online) and a second sweep re-reads the row block (just read: from
cache) to write the probabilities or add them into the program's column sums in memory.
Sums are per program, not per row block: their size does not grow with N. The host adds
them in a fixed order. Row offsets are int64: N x K passes 2**31 at LOCA's scale (N 50176 x
K 65536 is 3.3e9); the offsets within a row block stay int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import TRITON_INTERPRET

TILE_ELEMENTS = 8192        # BLOCK_N * BLOCK_K: one tile of float32 in registers
PROGRAMS_PER_SM = 4


@triton.jit
def _load_x(scores, col_scale, rows, cols, ok, k, stride_n, inv_epsilon):
    """x = scores / epsilon - col_scale on a (rows, cols) tile, -inf outside the matrix (rows
    counted from the row block's first, which `scores` points at)."""
    s = tl.load(scores + rows[:, None] * stride_n + cols[None, :], mask=ok, other=0.0)
    x = s.to(tl.float32) * inv_epsilon - tl.load(col_scale + cols, mask=cols < k, other=0.0)[None, :]
    return tl.where(ok, x, float("-inf"))


@triton.jit
def _row_nan(x, ok):
    """Per row of a tile, the sum of x * 0 over the matrix: 0 when every x is finite, NaN when
    one is NaN or infinite (a non-finite score, or a NaN col_scale)."""
    return tl.sum(tl.where(ok, x * 0.0, 0.0), 1)


# k and stride_n stay specialised: their divisibility by 16 is what lets Triton load 4 floats at once.
@triton.jit(do_not_specialize=["n", "blocks_per_program"])
def _sinkhorn_pass_kernel(scores, col_scale, out, partial, partial_shift, n, k, stride_n, inv_epsilon,
                          blocks_per_program, NORMALIZE: tl.constexpr, WRITE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_lane = tl.arange(0, BLOCK_N)
    col_lane = tl.arange(0, BLOCK_K)
    # Unnormalised column sums are of exp(x - shift), shift the largest x seen so far.
    shift = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    column_sums = tl.zeros([BLOCK_K], tl.float32)  # ONE_TILE: the program's sums stay in registers
    for block in range(pid * blocks_per_program, (pid + 1) * blocks_per_program):
        first = block * BLOCK_N      # int64
        block_scores = scores + first * stride_n
        block_out = out + first * k
        row_ok = first + row_lane < n
        if ONE_TILE:  # the rows fit one tile: read once, kept for both sweeps
            ok = row_ok[:, None] & (col_lane < k)[None, :]
            x = _load_x(block_scores, col_scale, row_lane, col_lane, ok, k, stride_n, inv_epsilon)
            peak = tl.max(x, 1)
            safe = tl.where(peak == float("-inf"), 0.0, peak)        # rows past N
            total = tl.sum(tl.exp(x - safe[:, None]), 1)
            nan = _row_nan(x, ok)
        else:
            peak = tl.full([BLOCK_N], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_N], tl.float32)
            nan = tl.zeros([BLOCK_N], tl.float32)
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + col_lane
                ok = row_ok[:, None] & (cols < k)[None, :]
                x = _load_x(block_scores, col_scale, row_lane, cols, ok, k, stride_n, inv_epsilon)
                nan += _row_nan(x, ok)
                grown = tl.maximum(peak, tl.max(x, 1))
                if NORMALIZE:
                    safe = tl.where(grown == float("-inf"), 0.0, grown)
                    total = total * tl.exp(peak - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
                peak = grown
        if NORMALIZE:
            subtract = tl.where(row_ok, peak + tl.log(tl.where(row_ok, total, 1.0)), 0.0)  # the row's log-sum-exp
            rescale = 1.0
        elif WRITE:
            subtract = tl.zeros([BLOCK_N], tl.float32)
            rescale = 1.0
        else:
            grown = tl.maximum(shift, tl.max(peak, 0))
            rescale = tl.where(shift == grown, 1.0, tl.exp(shift - grown))
            shift = grown
            subtract = tl.zeros([BLOCK_N], tl.float32) + grown
        if NORMALIZE or not WRITE:  # a row with a non-finite x: all NaN (an unnormalised write: exp(x) entrywise)
            subtract += nan
        if ONE_TILE:
            p = tl.exp(x - subtract[:, None])
            if WRITE:
                tl.store(block_out + row_lane[:, None] * k + col_lane[None, :], p, mask=ok)
            else:
                column_sums = column_sums * rescale + tl.sum(p, 0)
        else:  # second sweep: the row block was just read, from cache
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + col_lane
                ok = row_ok[:, None] & (cols < k)[None, :]
                p = tl.exp(_load_x(block_scores, col_scale, row_lane, cols, ok, k, stride_n, inv_epsilon)
                           - subtract[:, None])
                if WRITE:
                    tl.store(block_out + row_lane[:, None] * k + cols[None, :], p, mask=ok)
                else:
                    sums = partial + pid * k + cols
                    tl.store(sums, tl.load(sums, mask=cols < k, other=0.0) * rescale + tl.sum(p, 0), mask=cols < k)
    if not WRITE:
        if ONE_TILE:
            tl.store(partial + pid * k + col_lane, column_sums, mask=col_lane < k)
        if NORMALIZE:
            shift = 0.0
        tl.store(partial_shift + pid, shift)


def _launch_shape(n: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, programs, row blocks per program)."""
    block_k = min(triton.next_power_of_2(k), TILE_ELEMENTS)
    block_n = max(1, min(triton.next_power_of_2(n), TILE_ELEMENTS // block_k, 64))
    row_blocks = triton.cdiv(n, block_n)
    if TRITON_INTERPRET or device.type != "cuda":
        most = 4
    else:
        most = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    per_program = triton.cdiv(row_blocks, min(row_blocks, most))
    return block_n, block_k, triton.cdiv(row_blocks, per_program), per_program


def _warps(tile: int) -> int:
    """A tile of 8192 float32 on 4 warps (64 per thread, kept for both sweeps) spilled on sm_90;
    on 8 warps it fits (benchmarks/results/gpu-resources.md)."""
    return 8 if tile >= 4096 else 4


@torch.library.custom_op("loca_kernels::sinkhorn_pass_triton", mutates_args=())
def sinkhorn_pass_triton(scores: torch.Tensor, col_scale: torch.Tensor, inv_epsilon: float, normalize_rows: bool,
                         write: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of loca_kernels::sinkhorn_pass: scores (N, K) contiguous along K."""
    n, k = scores.shape
    block_n, block_k, programs, per_program = _launch_shape(n, k, scores.device)
    cols = col_scale.contiguous()
    out = torch.empty(n, k, dtype=torch.float32, device=scores.device) if write else cols
    partial = cols if write else torch.zeros(programs, k, dtype=torch.float32, device=scores.device)
    partial_shift = torch.empty(programs, dtype=torch.float32, device=scores.device)
    _sinkhorn_pass_kernel[(programs,)](scores, cols, out, partial, partial_shift, n, k, scores.stride(0),
                                       inv_epsilon, per_program, NORMALIZE=normalize_rows, WRITE=write,
                                       BLOCK_N=block_n, BLOCK_K=block_k, ONE_TILE=block_k >= k,
                                       num_warps=_warps(block_n * block_k))
    if write:
        return out, torch.zeros((), dtype=torch.float32, device=scores.device)
    shift = partial_shift.max()
    return (partial * torch.exp(partial_shift - shift)[:, None]).sum(0), shift
