"""sinkhorn against the textbook formulas of LOCA and SwAV, for stability, errors and the
2-process distributed case."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loca_kernels as lk
from helpers import assert_close


def textbook(scores, epsilon, iterations, mode):
    """The formulas as LOCA and SwAV write them, in float64 (overflows for large scores)."""
    s = scores.double() / epsilon
    if mode == "loca":
        q = torch.softmax(s, dim=1)
        for _ in range(iterations):
            q = q / q.sum(dim=0, keepdim=True)
            q = q / q.sum(dim=1, keepdim=True)
        return q
    n, k = s.shape
    q = torch.exp(s)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / k
        q = q / q.sum(dim=1, keepdim=True) / n
    return q * n


@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (196, 4096), (12544 + 3, 3)])
@pytest.mark.parametrize("iterations", [0, 1, 3, 5])
def test_matches_the_textbook_formula(mode, n, k, iterations):
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.1
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=iterations, mode=mode)
    assert got.dtype == torch.float32 and got.shape == (n, k) and not got.requires_grad
    assert_close(got, textbook(scores, 0.05, iterations, mode), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["loca", "swav"])
def test_stable_where_the_textbook_overflows(dtype, mode):
    scores = (torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)  # |s|/eps ~ 2000
    assert not torch.isfinite(torch.exp(scores.float() / 0.05)).all()  # the textbook would overflow
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=3, mode=mode)
    assert torch.isfinite(got).all()
    assert_close(got.sum(dim=1), torch.ones(300, dtype=torch.float64), torch.float32, "row sums")


@pytest.mark.parametrize("kwargs,kind,match", [
    (dict(scores=torch.zeros(3)), ValueError, r"scores must have 2 dimensions \(N, K\), got shape \(3\)"),
    (dict(scores=torch.zeros(0, 4)), ValueError, "N >= 1 samples and K >= 1"),
    (dict(scores=torch.zeros(4, 0)), ValueError, "K >= 1 prototypes"),
    (dict(scores=torch.zeros(4, 4, dtype=torch.int32)), TypeError, "dtype in"),
    (dict(epsilon=0.0), ValueError, "epsilon must be a number > 0, got 0.0"),
    (dict(epsilon=-1), ValueError, "epsilon"),
    (dict(iterations=-1), ValueError, "iterations must be an int >= 0"),
    (dict(mode="dino"), ValueError, "mode must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be None or one of"),
    ("scores", TypeError, "scores must be a torch.Tensor"),
])
def test_errors(kwargs, kind, match):
    if kwargs == "scores":
        with pytest.raises(kind, match=match):
            lk.sinkhorn([[1.0]])
        return
    args = dict(scores=torch.zeros(4, 4))
    args.update(kwargs)
    with pytest.raises(kind, match=match):
        lk.sinkhorn(args.pop("scores"), **args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, scores, mode, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = scores.tensor_split(world)[rank]
        results[rank] = lk.sinkhorn(rows, iterations=3, mode=mode, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["loca", "swav"])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_scores(mode):
    scores = torch.randn(37, 11, generator=torch.Generator().manual_seed(5)) * 3
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), scores, mode, results), nprocs=2, join=True)
    together = torch.cat([results[0], results[1]])
    assert_close(together, lk.sinkhorn(scores, iterations=3, mode=mode).double(), torch.float32)
