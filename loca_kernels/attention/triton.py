"""Triton kernels of masked_cross_attention, defined as the operators
loca_kernels::attention_forward_triton and loca_kernels::attention_backward_triton (same
arguments as the C++ pair in csrc/ops.cpp; fake functions and autograd in operators.py).

Sequences are short (36 to 196 tokens), so one program owns a (query row, head) pair and
a block of queries sized to Nq, and loops over the visible keys only, reading them through
the compact keep list (or from an offset for a run): masked tokens are never read. K and V
of a reference are read in place by each of its views (no copies). The backward is split:
one kernel for dQ (the forward's tiling) and one for dK/dV per (reference row, head, key
block) that loops over the views of that reference, so that dK/dV are summed in registers
and written once: deterministic, no atomics.

Grids are one-dimensional (axes y and z stop at 65535: (Bq x heads) passes it at a ViT-B batch
of about 550 per GPU), and the batch row and head of a program are int64: they multiply
strides, and Bq x Nq x H x D passes 2**31 at realistic batches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import TRITON_INTERPRET
from .._triton_dot import input_precision

# The interpreter multiplies bf16 tl.dot operands as integers: compute the dots in fp32 there.
DOT_IN_FP32 = TRITON_INTERPRET
# Head dims the kernels take (D is a block dimension: a power of two of at least 16 for tl.dot).
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _keep_positions(keep_index, keep_count, r, stride_keep, offs, IS_RUN: tl.constexpr):
    """Positions of the visible keys offs of keep row r, and which of offs are valid."""
    count = tl.load(keep_count + r)
    valid = offs < count
    if IS_RUN:
        pos = tl.load(keep_index + r * stride_keep) + offs
    else:
        pos = tl.load(keep_index + r * stride_keep + offs, mask=valid, other=0)
    return pos, valid


@triton.jit
def _query_block(nq, heads, bk, keep_rows, BLOCK_M: tl.constexpr):
    """This program's query row i, head h, reference row b, keep row r (int64), and block of
    queries; programs run query block fastest, then head, then query row."""
    blocks = tl.cdiv(nq, BLOCK_M)
    row_head = (tl.program_id(0) // blocks).to(tl.int64)
    i, h = row_head // heads, row_head % heads
    offs_m = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    return row_head, i, h, i % bk, i % keep_rows, offs_m, offs_m < nq


@triton.jit
def _key_value_tiles(k, v, b, h, pos, valid, offs_d, skb, skn, skh, svb, svn, svh):
    """The K and V rows at positions pos of reference row b, head h (zeros where not valid)."""
    kt = tl.load(k + b * skb + h * skh + pos[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
    vt = tl.load(v + b * svb + h * svh + pos[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
    return kt, vt


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=input_precision(tl.float32))
    return tl.dot(a, b, input_precision=input_precision(a.dtype))


@triton.jit
def _forward_kernel(q, k, v, out, lse, keep_index, keep_count,
                    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, stride_keep,
                    nq, heads, bk, keep_rows, scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_RUN: tl.constexpr, DOT_FP32: tl.constexpr):
    row_head, i, h, b, r, offs_m, row_ok = _query_block(nq, heads, bk, keep_rows, BLOCK_M)
    offs_d = tl.arange(0, D)
    qt = tl.load(q + i * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    count = tl.load(keep_count + r)
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    nan = tl.zeros([BLOCK_M], tl.float32)  # per row, the sum of score * 0: NaN once one is not finite
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pos, valid = _keep_positions(keep_index, keep_count, r, stride_keep, offs_n, IS_RUN)
        kt, vt = _key_value_tiles(k, v, b, h, pos, valid, offs_d, skb, skn, skh, svb, svn, svh)
        s = _dot(qt, tl.trans(kt), DOT_FP32) * scale
        nan += tl.sum(tl.where(valid[None, :], s * 0.0, 0.0), axis=1)
        s = tl.where(valid[None, :], s, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(s, axis=1))   # finite: the first block has a valid key
        p = tl.exp(s - new_peak[:, None])
        rescale = tl.exp(peak - new_peak)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _dot(p.to(vt.dtype), vt, DOT_FP32)
        peak = new_peak
    seen = total > 0
    # A row with a NaN or infinite score is all NaN (SPEC.md section 1), -inf scores included.
    result = acc / tl.where(seen, total, 1.0)[:, None] + nan[:, None]
    tl.store(out + i * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], result.to(out.dtype.element_ty),
             mask=row_ok[:, None])
    row_lse = tl.where(seen, peak + tl.log(tl.where(seen, total, 1.0)), float("-inf")) + nan
    tl.store(lse + row_head * nq + offs_m, row_lse, mask=row_ok)


@triton.jit
def _grad_q_kernel(q, k, v, grad_out, grad_q, lse, delta, keep_index, keep_count,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sgb, sgn, sgh, stride_keep,
                   nq, heads, bk, keep_rows, scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_RUN: tl.constexpr, DOT_FP32: tl.constexpr):
    row_head, i, h, b, r, offs_m, row_ok = _query_block(nq, heads, bk, keep_rows, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = i * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    qt = tl.load(q + rows, mask=row_ok[:, None], other=0.0)
    got = tl.load(grad_out + i * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :], mask=row_ok[:, None],
                  other=0.0)
    row_lse = tl.load(lse + row_head * nq + offs_m, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + row_head * nq + offs_m, mask=row_ok, other=0.0)
    count = tl.load(keep_count + r)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pos, valid = _keep_positions(keep_index, keep_count, r, stride_keep, offs_n, IS_RUN)
        kt, vt = _key_value_tiles(k, v, b, h, pos, valid, offs_d, skb, skn, skh, svb, svn, svh)
        p = tl.exp(_dot(qt, tl.trans(kt), DOT_FP32) * scale - row_lse[:, None])
        p = tl.where(valid[None, :] & row_ok[:, None], p, 0.0)
        dp = _dot(got, tl.trans(vt), DOT_FP32)
        ds = p * (dp - row_delta[:, None]) * scale
        acc += _dot(ds.to(kt.dtype), kt, DOT_FP32)
    tl.store(grad_q + i * nq * heads * D + h * D + offs_m[:, None] * (heads * D) + offs_d[None, :],
             acc.to(grad_q.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _grad_kv_kernel(q, k, v, grad_out, grad_k, grad_v, lse, delta, keep_index, keep_count, visible,
                    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sgb, sgn, sgh, stride_keep,
                    nq, nk, heads, bk, views, keep_rows, key_blocks, scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_RUN: tl.constexpr, SHARED: tl.constexpr, DOT_FP32: tl.constexpr):
    """SHARED: every view of reference b uses keep row b % keep_rows, and the program owns
    a block of that row's compact list. Otherwise (a keep row per query row) it owns a
    block of the dense key axis and `visible` (Bq, Nk) says which keys each view sees.
    Programs run key block fastest, then head, then reference row."""
    ref_head = (tl.program_id(0) // key_blocks).to(tl.int64)
    b, h = ref_head // heads, ref_head % heads
    offs_n = (tl.program_id(0) % key_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if SHARED:
        pos, key_ok = _keep_positions(keep_index, keep_count, b % keep_rows, stride_keep, offs_n, IS_RUN)
    else:
        pos = offs_n
        key_ok = offs_n < nk
    kt, vt = _key_value_tiles(k, v, b, h, pos, key_ok, offs_d, skb, skn, skh, svb, svn, svh)
    acc_k = tl.zeros([BLOCK_N, D], tl.float32)
    acc_v = tl.zeros([BLOCK_N, D], tl.float32)
    # A block past the end of a shorter keep list has nothing to do.
    n_views = tl.where(tl.max(key_ok.to(tl.int32), axis=0) > 0, views, 0)
    for view in range(0, n_views):
        i = view * bk + b
        if SHARED:
            seen = key_ok
        else:
            seen = key_ok & (tl.load(visible + i * nk + pos, mask=key_ok, other=0) != 0)
        for m0 in range(0, nq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < nq
            qt = tl.load(q + i * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None],
                         other=0.0)
            got = tl.load(grad_out + i * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :],
                          mask=row_ok[:, None], other=0.0)
            row_lse = tl.load(lse + (i * heads + h) * nq + offs_m, mask=row_ok, other=0.0)
            row_delta = tl.load(delta + (i * heads + h) * nq + offs_m, mask=row_ok, other=0.0)
            p = tl.exp(_dot(qt, tl.trans(kt), DOT_FP32) * scale - row_lse[:, None])
            p = tl.where(row_ok[:, None] & seen[None, :], p, 0.0)
            acc_v += _dot(tl.trans(p).to(got.dtype), got, DOT_FP32)
            dp = _dot(got, tl.trans(vt), DOT_FP32)
            ds = p * (dp - row_delta[:, None]) * scale
            acc_k += _dot(tl.trans(ds).to(qt.dtype), qt, DOT_FP32)
    base = b * nk * heads * D + h * D    # int64; the tile's offsets below stay int32
    dest = pos[:, None] * (heads * D) + offs_d[None, :]
    tl.store(grad_k + base + dest, acc_k.to(grad_k.dtype.element_ty), mask=key_ok[:, None])
    tl.store(grad_v + base + dest, acc_v.to(grad_v.dtype.element_ty), mask=key_ok[:, None])


def _dense_visible(keep_index, keep_count, keep_is_run: bool, nk: int) -> torch.Tensor:
    """int8 (R, Nk): 1 where a keep row sees a key (per-row keeps in the dK/dV kernel)."""
    positions = torch.arange(nk, device=keep_index.device)
    if keep_is_run:
        start = keep_index[:, :1]
        return ((positions >= start) & (positions < start + keep_count[:, None])).to(torch.int8)
    listed = torch.arange(keep_index.shape[1], device=keep_index.device) < keep_count[:, None]
    visible = torch.zeros(keep_index.shape[0], nk, dtype=torch.int8, device=keep_index.device)
    return visible.scatter_(1, keep_index.long(), listed.to(torch.int8))


def _block_m(nq: int) -> int:
    return min(64, max(16, triton.next_power_of_2(nq)))


def _grad_kv_config(nq: int, d: int, dtype: torch.dtype) -> dict:
    """Query block and warps of the dK/dV kernel: at D 128 its (64, D) query and grad_out tiles
    took 255 registers and spilled on 4 warps (sm_90, benchmarks/results/gpu-resources.md);
    32 query rows fit, on 8 warps for 16-bit inputs (171 registers), on 4 for float32 (180;
    on 8 warps its FMA dots spilled)."""
    if d >= 128:
        return dict(BLOCK_M=min(32, _block_m(nq)), num_warps=4 if dtype == torch.float32 else 8)
    return dict(BLOCK_M=_block_m(nq), num_warps=4)


BLOCK_N = 32


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("loca_kernels::attention_forward_triton", mutates_args=())
def attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_index: torch.Tensor,
                             keep_count: torch.Tensor, keep_is_run: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    bq, nq, heads, d = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((bq, heads, nq), dtype=torch.float32)
    block_m = _block_m(nq)
    _forward_kernel[(triton.cdiv(nq, block_m) * bq * heads,)](
        q, k, v, out, lse, keep_index, keep_count, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        keep_index.stride(0), nq, heads, k.shape[0], keep_index.shape[0], scale,
        D=d, BLOCK_M=block_m, BLOCK_N=BLOCK_N, IS_RUN=keep_is_run, DOT_FP32=DOT_IN_FP32)
    return out, lse


@torch.library.custom_op("loca_kernels::attention_backward_triton", mutates_args=())
def attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, keep_index: torch.Tensor,
                              keep_count: torch.Tensor, keep_is_run: bool,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bq, nq, heads, d = q.shape
    bk, nk = k.shape[:2]
    keep_rows = keep_index.shape[0]
    # delta = rowsum(dO * O): (Bq, H, Nq), 1/D of the size of q.
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    grad_q = q.new_empty(q.shape)
    grad_k, grad_v = k.new_zeros(k.shape), v.new_zeros(v.shape)  # keys no view sees get 0
    block_m = _block_m(nq)
    common = dict(D=d, BLOCK_N=BLOCK_N, IS_RUN=keep_is_run, DOT_FP32=DOT_IN_FP32)
    _grad_q_kernel[(triton.cdiv(nq, block_m) * bq * heads,)](
        q, k, v, grad_out, grad_q, lse, delta, keep_index, keep_count, *_strides(q), *_strides(k), *_strides(v),
        *_strides(grad_out), keep_index.stride(0), nq, heads, bk, keep_rows, scale, BLOCK_M=block_m, **common)
    shared = keep_rows != bq or bq == bk
    if shared:
        visible = keep_count  # not read by the SHARED kernel
        key_blocks = triton.cdiv(nk if keep_is_run else keep_index.shape[1], BLOCK_N)
    else:
        visible = _dense_visible(keep_index, keep_count, keep_is_run, nk)
        key_blocks = triton.cdiv(nk, BLOCK_N)
    _grad_kv_kernel[(key_blocks * bk * heads,)](
        q, k, v, grad_out, grad_k, grad_v, lse, delta, keep_index, keep_count, visible, *_strides(q), *_strides(k),
        *_strides(v), *_strides(grad_out), keep_index.stride(0), nq, nk, heads, bk, bq // bk, keep_rows, key_blocks,
        scale, SHARED=shared, **common, **_grad_kv_config(nq, d, q.dtype))
    return grad_q, grad_k, grad_v
