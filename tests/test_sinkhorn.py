"""sinkhorn against the textbook formulas of LOCA and SwAV on every backend: results, the pass
and all-reduce counts, stability, errors and the 2-process distributed case."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loca_kernels as lk
from helpers import IGNORE_NUMPY_NAN_WARNINGS, NON_FINITE, assert_close, backend_params, compile_for_gpu
from loca_kernels._backends import TRITON_AVAILABLE, extension_has_kernel
from loca_kernels.sinkhorn import fused
from loca_kernels.sinkhorn.operators import OPERATORS

BACKENDS = backend_params("sinkhorn_pass")
FUSED = backend_params("sinkhorn_pass", reference=False)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def textbook(scores, epsilon, iterations, mode):
    """The formulas as LOCA and SwAV write them, in float64 (overflows for large scores)."""
    s = scores.double().cpu() / epsilon
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


def random_scores(n, k, scale=0.1, dtype=torch.float32, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(n * 7919 + k if seed is None else seed)
    return (torch.randn(n, k, generator=gen) * scale).to(device, dtype)


# Every iteration count on the small shapes; the large ones (LOCA's K, N past every block
# size, and K past one Triton tile and the CUDA kernel's shared memory) at 0, 1 and 5.
SHAPES_AND_ITERATIONS = [(n, k, t) for n, k in [(1, 1), (7, 3), (1, 4096)] for t in range(6)] + \
    [(n, k, t) for n, k in [(196, 4096), (12544 + 3, 3), (5, 9000)] for t in (0, 1, 5)]


@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("n,k,iterations", SHAPES_AND_ITERATIONS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_the_textbook_formula(mode, n, k, iterations, backend, device):
    scores = random_scores(n, k, device=device)
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=iterations, mode=mode, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (n, k) and not got.requires_grad
    assert got.device == scores.device
    assert_close(got, textbook(scores, 0.05, iterations, mode), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("n,k", [(7, 3), (197, 4096)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_input_dtype_computes_in_float32(dtype, mode, n, k, backend, device):
    # The input is read in its own dtype and computed on in float32: against the textbook
    # formula on the same (rounded) values, the float32 tolerance holds.
    scores = random_scores(n, k, scale=0.2, dtype=dtype, device=device)
    got = lk.sinkhorn(scores, iterations=3, mode=mode, backend=backend)
    assert_close(got, textbook(scores, 0.05, 3, mode), torch.float32)


@pytest.mark.parametrize("backend,device", FUSED)
def test_reads_scores_in_place_with_a_row_stride(backend, device):
    wide = random_scores(50, 40, device=device)
    scores = wide[:, 3:30]                                  # row stride 40, contiguous along K
    got = lk.sinkhorn(scores, iterations=2, backend=backend)
    assert_close(got, textbook(scores, 0.05, 2, "loca"), torch.float32)


@pytest.mark.parametrize("backend,device", FUSED)
def test_transposed_and_single_prototype_layouts(backend, device):
    device = device
    transposed = random_scores(30, 20, device=device).t()          # stride 1 along N: copied once
    single = random_scores(1, 9, device=device).t()                # (9, 1) with stride 9 along K
    for scores in (transposed, single):
        got = lk.sinkhorn(scores, iterations=2, mode="swav", backend=backend)
        assert_close(got, textbook(scores, 0.05, 2, "swav"), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stable_where_the_textbook_overflows(dtype, mode, backend, device):
    scores = random_scores(300, 64, scale=100, dtype=dtype, device=device, seed=0)  # |s|/eps ~ 2000
    assert not torch.isfinite(torch.exp(scores.float() / 0.05)).all()  # the textbook would overflow
    got = lk.sinkhorn(scores, epsilon=0.05, iterations=3, mode=mode, backend=backend)
    assert torch.isfinite(got).all()
    # Against the float64 log-domain reference; x = scores / epsilon ~ 2000 carries float32
    # rounding of about 2000 * 6e-8 in every exponent.
    expected = lk.sinkhorn(scores.cpu(), epsilon=0.05, iterations=3, mode=mode, backend="torch")
    assert (got.cpu() - expected).abs().max() < 1e-3
    assert_close(got.sum(dim=1), torch.ones(300, dtype=torch.float64), torch.float32, "row sums")


@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_a_prototype_far_from_every_sample(mode, backend, device):
    # Column 0 lies ~400 below every sample: its pass-0 sum underflows float32, so pass 0 is
    # redone in the log domain; the other columns stay on the fast path's scale.
    scores = random_scores(40, 6, scale=0.5, seed=1)
    scores[:, 0] -= 20.0
    scores = scores.to(device)
    got = lk.sinkhorn(scores, iterations=3, mode=mode, backend=backend)
    assert_close(got, textbook(scores, 0.05, 3, mode), torch.float32)
    assert got[:, 0].sum() > 0.5       # the balancing gives the far prototype its share


# ---- NaN and infinite scores (SPEC.md section 4): a row holding one is NaN after the row
# softmax, and the first column normalisation (or SwAV's total mass) spreads NaN everywhere.



def _expected_nan(n, k, row, mode, iterations):
    """The SPEC's NaN pattern for a non-finite score in `row`."""
    nan = torch.zeros(n, k, dtype=torch.bool)
    if mode == "loca" and iterations == 0:
        nan[row] = True
    else:
        nan[:] = True
    return nan


def _check_non_finite(scores, row, col, value, mode, iterations, backend, device):
    """Put `value` at scores[row, col] (col None: the whole row) and check the NaN pattern
    against the SPEC's and the reference's, and the other rows against the finite result."""
    n, k = scores.shape
    bad = scores.clone()
    bad[row, slice(None) if col is None else col] = value
    got = lk.sinkhorn(bad.to(device), iterations=iterations, mode=mode, backend=backend).cpu()
    expected = _expected_nan(n, k, row, mode, iterations)
    assert torch.equal(got.isnan(), expected), f"{int(got.isnan().sum())} NaN, expected {int(expected.sum())}"
    reference = lk.sinkhorn(bad, iterations=iterations, mode=mode, backend="torch")
    assert torch.equal(got.isnan(), reference.isnan())
    if not expected.all():  # rows are independent without column normalisation: the rest is untouched
        finite = scores.clone()
        finite[row] = 0.0
        clean = lk.sinkhorn(finite.to(device), iterations=iterations, mode=mode, backend=backend).cpu()
        assert torch.equal(got[~expected], clean[~expected])
        assert_close(got[~expected], textbook(finite, 0.05, iterations, mode)[~expected], torch.float32)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("col", [2, 35, None], ids=["entry", "entry-in-the-tail", "row"])
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("mode,iterations", [("loca", 0), ("loca", 3), ("swav", 0), ("swav", 1)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_scores_give_nan(col, value, mode, iterations, backend, device):
    # K = 37: the C++ kernel's 16-lane loop and its tail (columns 32..36).
    _check_non_finite(random_scores(9, 37), 4, col, value, mode, iterations, backend, device)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("mode,iterations", [("loca", 0), ("loca", 2), ("swav", 1)])
@pytest.mark.parametrize("n,k,row,col", [(300, 7, 200, 3), (3, 8200, 1, 8199)], ids=["rows-past-a-chunk", "two-tiles"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_non_finite_scores_past_one_block(n, k, row, col, value, mode, iterations, backend, device):
    # A row after the C++ kernel's first chunk of 128 rows; a column in the second Triton tile
    # (the two-sweep path) and past the CUDA kernel's shared-memory column sums.
    _check_non_finite(random_scores(n, k), row, col, value, mode, iterations, backend, device)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_scores_in_half_precision(dtype, backend, device):
    scores = random_scores(6, 20, dtype=dtype)
    scores[1, 3], scores[4, 0] = float("inf"), float("nan")
    got = lk.sinkhorn(scores.to(device), iterations=0, backend=backend).cpu()
    assert torch.equal(got.isnan().any(1), torch.tensor([False, True, False, False, True, False]))
    assert got.isnan().any(1).equal(got.isnan().all(1))


class CountingPass:
    def __init__(self, backend):
        self.op, self.calls = OPERATORS[backend], []

    def __call__(self, scores, col, inv_epsilon, normalize_rows, write):
        self.calls.append(write)
        return self.op(scores, col, inv_epsilon, normalize_rows, write)


@pytest.mark.parametrize("mode,iterations,passes", [("loca", 0, 1), ("swav", 0, 2), ("loca", 1, 2), ("swav", 1, 2),
                                                    ("loca", 3, 4), ("swav", 3, 4), ("loca", 5, 6)])
@pytest.mark.parametrize("backend,device", FUSED)
def test_passes_over_scores(mode, iterations, passes, backend, device):
    scores = random_scores(33, 10, device=device)
    counting = CountingPass(backend)
    got = fused.sinkhorn(counting, scores, epsilon=0.05, iterations=iterations, mode=mode)
    assert len(counting.calls) == passes and counting.calls.count(True) == 1 and counting.calls[-1]
    assert_close(got, textbook(scores, 0.05, iterations, mode), torch.float32)


@pytest.mark.parametrize("kwargs,kind,match", [
    (dict(scores=torch.zeros(3)), ValueError, r"scores must have 2 dimensions \(N, K\), got shape \(3\)"),
    (dict(scores=torch.zeros(0, 4)), ValueError, "N >= 1 samples and K >= 1"),
    (dict(scores=torch.zeros(4, 0)), ValueError, "K >= 1 prototypes"),
    (dict(scores=torch.zeros(4, 4, dtype=torch.int32)), TypeError, "dtype in"),
    (dict(scores=torch.zeros(4, 4, dtype=torch.float64)), TypeError, "dtype in"),
    (dict(epsilon=0.0), ValueError, "epsilon must be a number > 0, got 0.0"),
    (dict(epsilon=-1), ValueError, "epsilon"),
    (dict(epsilon="0.1"), ValueError, "epsilon"),
    (dict(iterations=-1), ValueError, "iterations must be an int >= 0"),
    (dict(iterations=1.0), ValueError, "iterations must be an int >= 0, got 1.0"),
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


def test_a_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        lk.sinkhorn(torch.zeros(4, 4), backend="cuda")


def test_input_is_not_written():
    scores = random_scores(20, 5)
    before = scores.clone()
    for backend in ("torch", "cpu"):
        lk.sinkhorn(scores, backend=backend)
    assert torch.equal(scores, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# scale 0.5: x = scores / epsilon spreads over ~60, the fast path; scale 3: over ~400, where
# pass 0 underflows and is redone in the log domain (two more all-reduces). poison: a NaN score
# on rank 1 (row 30), which makes every row of both ranks NaN, or that row alone without
# column normalisation (loca, 0 iterations), with no more all-reduces than the fast path.
GLOO_CASES = [("loca", 3, 0.5, False), ("swav", 3, 0.5, False), ("swav", 0, 0.5, False), ("loca", 3, 3.0, False),
              ("swav", 3, 3.0, False), ("loca", 2, 0.5, True), ("swav", 2, 0.5, True), ("loca", 0, 0.5, True)]


def _gloo_scores(scale, poison):
    scores = random_scores(37, 11, scale=scale, seed=5)
    if poison:
        scores[30, 4] = float("nan")
    return scores


def _rank_main(rank, world, port, backend, results):
    """Every case of GLOO_CASES in one process group (starting processes is the slow part)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    all_reduce = dist.all_reduce
    try:
        for case in GLOO_CASES:
            mode, iterations, scale, poison = case
            calls = []

            def counted(tensor, *args, **kwargs):
                calls.append(tensor.numel())
                return all_reduce(tensor, *args, **kwargs)

            dist.all_reduce = counted
            rows = _gloo_scores(scale, poison).tensor_split(world)[rank]
            got = lk.sinkhorn(rows, iterations=iterations, mode=mode, group=dist.group.WORLD, backend=backend)
            dist.all_reduce = all_reduce
            results[(rank, *case)] = (got, calls)
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_scores(backend, device):
    if device == "cuda":
        pytest.skip("gloo test runs on CPU tensors")
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), backend, results), nprocs=2, join=True)
    for key in GLOO_CASES:
        mode, iterations, scale, poison = key
        case = f"{mode}, iterations={iterations}, scale={scale}, poison={poison}"
        together = torch.cat([results[(0, *key)][0], results[(1, *key)][0]])
        # The textbook formulas spread a NaN score as SPEC.md says: its row, then everything.
        assert_close(together, textbook(_gloo_scores(scale, poison), 0.05, iterations, mode), torch.float32,
                     name=case)
        if poison:
            assert torch.equal(together.isnan(), _expected_nan(37, 11, 30, mode, iterations)), case
        if backend != "torch" and iterations > 0 and scale < 1:
            # One all-reduce of K (+ the row count) per iteration; SwAV adds the max for its shift.
            calls = results[(0, *key)][1]
            assert [size for size in calls if size > 1] == [11 + 1] + [11] * (iterations - 1), case
            assert len(calls) == iterations + (mode == "swav"), case


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck_pass_operators(backend, device, normalize_rows, write):
    scores = random_scores(70, 9, device=device)
    args = (scores, torch.randn(9, device=scores.device), 20.0, normalize_rows, write)
    torch.library.opcheck(OPERATORS[backend].default, args)


@pytest.mark.skipif(not extension_has_kernel("sinkhorn_pass", "CPU"), reason="extension built without the CPU kernel")
def test_cpu_result_does_not_depend_on_the_thread_count():
    scores = random_scores(1000, 33, scale=1.0, seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lk.sinkhorn(scores, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, lk.sinkhorn(scores, backend="cpu"))


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_pass_compiles_for_a_gpu():
    # The interpreter runs Python, not Triton's compiler: every variant the host can launch is
    # also compiled for sm_90 (no GPU needed).
    compile_for_gpu("""
        import itertools
        from loca_kernels.sinkhorn.triton import _sinkhorn_pass_kernel as kernel

        for normalize, write, one_tile, dtype in itertools.product((True, False), (True, False), (True, False),
                                                                   ("fp32", "fp16", "bf16")):
            types = dict(scores="*" + dtype, col_scale="*fp32", out="*fp32", partial="*fp32", partial_shift="*fp32",
                         n="i32", k="i32", stride_n="i32", inv_epsilon="fp32", blocks_per_program="i32")
            constexprs = dict(NORMALIZE=normalize, WRITE=write, BLOCK_N=2 if one_tile else 1, BLOCK_K=4096,
                              ONE_TILE=one_tile)
            compile_triton_kernel(kernel, types, constexprs, options={"enable_fp_fusion": True})
    """, timeout=600)
