"""masked_cross_attention at LOCA shapes against what users would pick instead.

Each of Bk reference images is attended by V = 10 query views of Nq = 36 tokens; of its Nk = 196
tokens 39 are visible (a consecutive run, or a random subset); head dim D = 64. Forward, and
forward + backward into q, k and v. On a GPU H = 12 heads in bf16, on the CPU H = 6 in fp32.
"""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, device_generator, run_benchmark, sizes

VIEWS, NQ, NK, VISIBLE, D = 10, 36, 196, 39, 64
BATCHES = sizes(quick=(2,), full=(32, 128, 256) if ON_GPU else (4,))
HEADS = 12 if ON_GPU else 6
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
OURS = ("cuda", "triton") if ON_GPU else ("cpu",)
PEERS = {
    "eager": "plain PyTorch: K and V repeated for each query view, scores by einsum, the hidden keys "
             "masked_fill'ed with -inf, softmax, einsum",
    "sdpa_mask": "F.scaled_dot_product_attention on the repeated K and V with a boolean attn_mask of the "
                 "visible keys (on a GPU the mask rules out the flash kernel: memory-efficient or cuDNN)",
    "gather_sdpa": "the visible keys and values gathered per query row, then F.scaled_dot_product_attention "
                   "without a mask",
    "flex": "FlexAttention (torch.compile'd) with a block mask of the visible keys; GPU only (compiling "
            "takes minutes on a CPU)",
    "xformers": "xformers memory_efficient_attention with a -inf tensor bias on the hidden keys; GPU only "
                "(no CPU kernel)",
}
GPU_ONLY = ("flex", "xformers")


def eager(q, k, v, mask, scale):
    idx = torch.arange(q.shape[0], device=q.device) % k.shape[0]
    scores = torch.einsum("bnhd,bjhd->bhnj", q, k[idx]) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhnj,bjhd->bnhd", scores.softmax(-1), v[idx])


def sdpa_mask(q, k, v, mask, scale):
    idx = torch.arange(q.shape[0], device=q.device) % k.shape[0]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k[idx].transpose(1, 2), v[idx].transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


def gather_sdpa(q, k, v, index, scale):
    # index: (Bq, 39) visible positions per query row; gathers visible K/V once per row.
    idx = torch.arange(q.shape[0], device=q.device) % k.shape[0]
    rows = idx[:, None].expand_as(index)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k[rows, index].transpose(1, 2),
                                         v[rows, index].transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def make_peer(name, q, k, v, keep_index):
    scale = D ** -0.5
    mask = lk.keep_to_mask(keep_index, q.shape[0], NK, q.device)
    rows = keep_index[torch.arange(q.shape[0], device=q.device) % keep_index.shape[0]]
    if name == "eager":
        return lambda: eager(q, k, v, mask, scale)
    if name == "sdpa_mask":
        return lambda: sdpa_mask(q, k, v, mask, scale)
    if name == "gather_sdpa":
        return lambda: gather_sdpa(q, k, v, rows, scale)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        bk = k.shape[0]
        block_mask = torch.compile(create_block_mask)(lambda b, h, qi, kj: mask[b, kj], q.shape[0], None, NQ, NK,
                                                      device=q.device)
        flex = torch.compile(flex_attention)
        idx = torch.arange(q.shape[0], device=q.device) % bk
        return lambda: flex(q.transpose(1, 2), k[idx].transpose(1, 2), v[idx].transpose(1, 2),
                            block_mask=block_mask, scale=scale).transpose(1, 2)
    if name == "xformers":
        xops = pytest.importorskip("xformers.ops")
        idx = torch.arange(q.shape[0], device=q.device) % k.shape[0]
        # Tensor bias padded to a multiple of 8 along keys, as xformers requires.
        bias = torch.zeros(q.shape[0], HEADS, NQ, 200, device=q.device, dtype=q.dtype)
        bias[..., :NK].masked_fill_(~mask[:, None, None, :], float("-inf"))
        bias = bias[..., :NK]
        return lambda: xops.memory_efficient_attention(q, k[idx], v[idx], attn_bias=bias, scale=scale)
    raise ValueError(name)


def inputs(bk, pattern):
    g, values = torch.Generator().manual_seed(0), device_generator(0)
    q = torch.randn(VIEWS * bk, NQ, HEADS, D, generator=values, device=DEVICE).to(DTYPE)
    kv = torch.randn(bk, NK, 2, HEADS, D, generator=values, device=DEVICE).to(DTYPE)
    if pattern == "run":
        keep = lk.consecutive_keep(1, NK, VISIBLE, generator=g, device=DEVICE)
    else:
        keep = lk.random_keep(bk, NK, VISIBLE, generator=g, device=DEVICE)
    return q, kv[:, :, 0], kv[:, :, 1], keep


def floor_bytes(q, k, visible, backward):
    element = q.element_size()
    once = 2 * q.numel() + 2 * k.shape[0] * visible * k.shape[2] * k.shape[3]  # q, out, visible k and v
    return element * (once * 2 if backward else once)                          # + their gradients


def flops(q, visible, backward):
    forward = 4 * q.shape[0] * q.shape[1] * q.shape[2] * visible * q.shape[3]
    return forward * (3.5 if backward else 1)


@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("pattern", ["run", "random"])
@pytest.mark.parametrize("bk", BATCHES)
@pytest.mark.parametrize("impl", OURS + tuple(p for p in PEERS if ON_GPU or p not in GPU_ONLY))
def test_attention(benchmark, impl, bk, pattern, direction):
    benchmark.group = f"attention Bk={bk} {pattern} {direction}"
    q, k, v, keep = inputs(bk, pattern)
    backward = direction == "forward_backward"
    if impl in OURS:
        run_keep = lk.KeepRun(keep[:, 0], VISIBLE) if pattern == "run" else keep
        try:
            lk.masked_cross_attention(q[:1 * bk], k, v, run_keep, backend=impl)
        except (RuntimeError, ValueError) as error:  # a backend this op lacks or cannot run here
            pytest.skip(str(error))
        fn = lambda: lk.masked_cross_attention(q, k, v, run_keep, backend=impl)  # noqa: E731
    else:
        fn = make_peer(impl, q, k, v, keep)
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
        forward_fn = fn
        grad = torch.ones(q.shape, device=DEVICE, dtype=DTYPE)

        def fn():
            out = forward_fn()
            return torch.autograd.grad(out, (q, k, v), grad)
    info = dict(impl=impl, bk=bk, views=VIEWS, nq=NQ, nk=NK, visible=VISIBLE, heads=HEADS, head_dim=D,
                dtype=str(DTYPE), pattern=pattern, direction=direction)
    if impl == "sdpa_mask" and ON_GPU:
        info["sdpa_note"] = "attn_mask given: flash excluded; memory-efficient or cuDNN kernel"
    run_benchmark(benchmark, fn, bytes_moved=floor_bytes(q, k, VISIBLE, backward), flops=flops(q, VISIBLE, backward),
                  **info)
