"""patch_matching, forward + backward of the similarity, against what users write instead.

Shapes: DenseCL matches the backbone's C5 features of two views (ResNet-50: 2048 channels on a
7 x 7 grid, 32 images per GPU); GTSA matches the 196 patch features of a ViT-S/16 student and
teacher (384 channels, 64 images per GPU). On a GPU in bf16, on the CPU in fp32.
"""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, device_generator, run_benchmark, sizes

# name: (B, Na, Nb, C); B of one GPU with --full on a GPU
SHAPES = {"densecl": (32, 49, 49, 2048), "gtsa": (64, 196, 196, 384)}
BATCH = sizes(quick=4, full=None if ON_GPU else 8)       # None: each shape's own B
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
OURS = ("triton",) if ON_GPU else ("cpu",)
PEERS = {
    "torch": "loca_kernels' torch backend: the op in plain PyTorch (the tests' reference)",
    "eager": "F.normalize of both sides, torch.bmm into the (B, Na, Nb) similarity tensor, max over Nb",
}


def eager(a, b):
    similarity = torch.bmm(F.normalize(a, dim=-1), F.normalize(b, dim=-1).transpose(1, 2))
    best, index = similarity.max(dim=-1)
    return index, best


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", OURS + tuple(PEERS))
def test_matching(benchmark, impl, shape):
    batch, na, nb, c = SHAPES[shape]
    batch = BATCH or batch
    benchmark.group = f"matching {shape} B={batch} Na={na} Nb={nb} C={c}"
    g = device_generator(0)
    a = torch.randn(batch, na, c, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    b = torch.randn(batch, nb, c, generator=g, device=DEVICE).to(DTYPE).requires_grad_()

    def call():
        index, similarity = eager(a, b) if impl == "eager" else lk.patch_matching(a, b, backend=impl)
        return torch.autograd.grad(similarity.sum(), (a, b))

    try:
        call()
    except (RuntimeError, ValueError) as error:  # a backend that cannot run here
        pytest.skip(str(error))
    element = a.element_size()
    # Floor: a and b read by the forward and by the backward, the gradients written, index and
    # similarity written.
    bytes_moved = 3 * (a.numel() + b.numel()) * element + batch * na * (8 + 4)
    run_benchmark(benchmark, call, bytes_moved=bytes_moved, flops=2 * batch * na * nb * c, impl=impl,
                  shape=shape, batch=batch, na=na, nb=nb, channels=c, dtype=str(DTYPE))
