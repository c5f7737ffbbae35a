"""relative_position_targets: our kernels against the eager PyTorch reference, LOCA grids
(9 focal views on a 6x6 grid against a 14x14 reference)."""
import pytest
import torch

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, run_benchmark
from loca_kernels.targets import geometry

BATCHES = (64, 256, 1024) if ON_GPU else (64, 256)
IMPLS = ("torch", "cuda", "triton") if ON_GPU else ("torch", "cpu")


def views(batch):
    gen = torch.Generator().manual_seed(0)
    qb = geometry.sample_boxes(batch, 9, (256, 256), (0.05, 0.32), generator=gen)
    rb = geometry.sample_boxes(batch, 1, (256, 256), (0.32, 1.0), generator=gen)[:, 0]
    flips = geometry.sample_flips(batch, 9, generator=gen)
    return qb.to(DEVICE), rb.to(DEVICE), flips.to(DEVICE)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_targets(benchmark, impl, batch):
    benchmark.group = f"targets B={batch}"
    qb, rb, flips = views(batch)
    try:
        lk.relative_position_targets(qb, rb, (6, 6), (14, 14), query_flip=flips, backend=impl)
    except (RuntimeError, ValueError) as error:  # a backend this op lacks or cannot run here
        pytest.skip(str(error))
    bytes_moved = qb.numel() * 4 + rb.numel() * 4 + flips.numel() + batch * 9 * 36 * 8
    run_benchmark(benchmark, lambda: lk.relative_position_targets(qb, rb, (6, 6), (14, 14), query_flip=flips,
                                                                  backend=impl),
                  bytes_moved=bytes_moved, impl=impl, batch=batch, views=9, query_grid="6x6", ref_grid="14x14")
