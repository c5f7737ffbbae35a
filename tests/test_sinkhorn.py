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
from loca_kernels._backends import extension_has_kernel

BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not extension_has_kernel("sinkhorn_pass", "CPU"),
                                                 reason="extension built without the CPU Sinkhorn kernel")),
]


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
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_textbook_formula(mode, n, k, iterations, backend):
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.1
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=iterations, mode=mode, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (n, k) and not got.requires_grad
    assert_close(got, textbook(scores, 0.05, iterations, mode), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_where_the_textbook_overflows(dtype, mode, backend):
    scores = (torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)  # |s|/eps ~ 2000
    assert not torch.isfinite(torch.exp(scores.float() / 0.05)).all()  # the textbook would overflow
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=3, mode=mode, backend=backend)
    assert torch.isfinite(got).all()
    # Against the float64 log-domain reference; x = scores / epsilon ~ 2000 carries float32
    # rounding of about 2000 * 6e-8 in every exponent.
    expected = lk.sinkhorn(scores, epsilon=0.05, iterations=3, mode=mode, backend="torch")
    assert (got - expected).abs().max() < 1e-3
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


def _rank_main(rank, world, port, scores, mode, backend, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = scores.tensor_split(world)[rank]
        results[rank] = lk.sinkhorn(rows, iterations=3, mode=mode, group=dist.group.WORLD, backend=backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_scores(mode, backend):
    scores = torch.randn(37, 11, generator=torch.Generator().manual_seed(5)) * 3
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), scores, mode, backend, results), nprocs=2, join=True)
    together = torch.cat([results[0], results[1]])
    assert_close(together, lk.sinkhorn(scores, iterations=3, mode=mode).double(), torch.float32)


@pytest.mark.skipif(not extension_has_kernel("sinkhorn_pass", "CPU"), reason="extension built without the CPU kernel")
@pytest.mark.parametrize("write", [False, True])
def test_opcheck_cpu_pass(write):
    scores = torch.randn(70, 9)
    args = (scores, torch.zeros(70), torch.randn(9), 20.0, True, 0.0, write, 0.0)
    torch.library.opcheck(torch.ops.loca_kernels.sinkhorn_pass.default, args)


@pytest.mark.skipif(not extension_has_kernel("sinkhorn_pass", "CPU"), reason="extension built without the CPU kernel")
def test_cpu_result_does_not_depend_on_the_thread_count():
    scores = torch.randn(1000, 33, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lk.sinkhorn(scores, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, lk.sinkhorn(scores, backend="cpu"))
