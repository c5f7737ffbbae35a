"""relative_position_targets: our kernels against the eager PyTorch reference, on the LOCA
grids against a 14x14 reference: the 9 focal views (6x6) and the large query (14x14), the two
calls of one training step (10 query views), for a batch of B images."""
import pytest
import torch

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, run_benchmark, sizes
from loca_kernels import geometry

BATCHES = sizes(quick=(64, 256), full=(64, 256, 1024) if ON_GPU else (64, 256))
OURS = ("cuda", "triton") if ON_GPU else ("cpu",)
PEERS = {
    "torch": "loca_kernels' torch backend: the op in plain PyTorch (the tests' reference), what a user "
             "would write",
}
# name: (views, query grid, query area range) of the official ImageNet recipe
VIEW_SETS = {"focal": (9, (6, 6), (0.05, 0.32)), "large": (1, (14, 14), (0.32, 1.0))}


def views(batch, num_views, area_range):
    gen = torch.Generator().manual_seed(0)
    qb = geometry.sample_boxes(batch, num_views, (256, 256), area_range, generator=gen)
    rb = geometry.sample_boxes(batch, 1, (256, 256), (0.32, 1.0), generator=gen)[:, 0]
    flips = geometry.sample_flips(batch, num_views, generator=gen)
    return qb.to(DEVICE), rb.to(DEVICE), flips.to(DEVICE)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("view_set", VIEW_SETS)
@pytest.mark.parametrize("impl", tuple(PEERS) + OURS)
def test_targets(benchmark, impl, view_set, batch):
    num_views, grid, area_range = VIEW_SETS[view_set]
    benchmark.group = f"targets {view_set} B={batch}"
    qb, rb, flips = views(batch, num_views, area_range)

    def call():
        return lk.relative_position_targets(qb, rb, grid, (14, 14), query_flip=flips, backend=impl)

    try:
        call()
    except (RuntimeError, ValueError) as error:  # a backend this op lacks or cannot run here
        pytest.skip(str(error))
    bytes_moved = qb.numel() * 4 + rb.numel() * 4 + flips.numel() + batch * num_views * grid[0] * grid[1] * 8
    run_benchmark(benchmark, call, bytes_moved=bytes_moved, impl=impl, batch=batch, views=num_views,
                  query_grid=f"{grid[0]}x{grid[1]}", ref_grid="14x14")
