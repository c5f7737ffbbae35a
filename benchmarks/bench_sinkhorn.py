"""sinkhorn against the eager formulas as LOCA and SwAV write them: scores of N = B x 196 patches
against K = 4096 prototypes, 3 iterations, fp32 and bf16 scores. Records time, GB/s for the pass
count, and peak memory (device memory on a GPU, resident set on a CPU)."""
import pytest
import torch

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, device_generator, measure_peak_memory, run_benchmark, sizes

K = 4096
SIZES = sizes(quick=(16 * 196,), full=(64 * 196, 256 * 196))
OURS = ("cuda", "triton") if ON_GPU else ("cpu",)
ITERATIONS, EPSILON = 3, 0.05
PEERS = {
    "eager": "the eager formulas as the papers' code writes them, epsilon = 0.05: LOCA's (softmax of "
             "scores / epsilon, then columns and rows normalised in turn) for mode loca, SwAV's (exp, the "
             "total normalised to 1, then rows and columns) for mode swav",
}


@torch.no_grad()
def eager_loca(scores):
    q = torch.softmax(scores.float() / EPSILON, dim=1)
    for _ in range(ITERATIONS):
        q = q / q.sum(dim=0, keepdim=True)
        q = q / q.sum(dim=1, keepdim=True)
    return q


@torch.no_grad()
def eager_swav(scores):
    q = torch.exp(scores / EPSILON).t()
    q /= q.sum()
    k, n = q.shape
    for _ in range(ITERATIONS):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["loca", "swav"])
@pytest.mark.parametrize("impl", OURS + tuple(PEERS))
def test_sinkhorn(benchmark, impl, mode, n, dtype):
    benchmark.group = f"sinkhorn {mode} N={n} {str(dtype)[6:]}"
    scores = (torch.randn(n, K, generator=device_generator(0), device=DEVICE) * 0.1).to(dtype)
    if impl == "eager":
        fn = (lambda: eager_loca(scores)) if mode == "loca" else (lambda: eager_swav(scores))
    else:
        try:
            lk.sinkhorn(scores[:8], mode=mode, backend=impl)
        except (RuntimeError, ValueError) as error:  # a backend this op lacks or cannot run here
            pytest.skip(str(error))
        fn = lambda: lk.sinkhorn(scores, epsilon=EPSILON, iterations=ITERATIONS, mode=mode, backend=impl)  # noqa: E731
    passes = ITERATIONS + 1
    bytes_moved = passes * scores.numel() * scores.element_size() + n * K * 4  # reads + one float32 write
    run_benchmark(benchmark, fn, bytes_moved=bytes_moved, impl=impl, mode=mode, n=n, k=K, dtype=str(dtype),
                  iterations=ITERATIONS, passes_over_scores=passes, peak_memory_bytes=measure_peak_memory(fn))
