"""queue_contrastive_loss, forward + backward, against DenseCL's eager contrastive head and
torch.compile of that head. DenseCL's dense term per GPU: N = B x 49 queries against K negatives
in a (D, K) queue (K = 65536 in DenseCL), D = 128, T = 0.2, fp32. Records time and peak memory
(device memory on a GPU, resident set on a CPU)."""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, device_generator, measure_peak_memory, run_benchmark, sizes

D, TEMPERATURE = 128, 0.2
K = sizes(quick=16384, full=65536)
SIZES = sizes(quick=(8 * 49,), full=(32 * 49, 256 * 49) if ON_GPU else (32 * 49,))
OURS = ("triton",) if ON_GPU else ("cpu",)
PEERS = {
    "eager": "DenseCL's head as written in openselfsup: einsums for the positive and the (N, K) negative "
             "logits against the queue, cat, /= T, cross-entropy with zero labels",
    "compiled": "torch.compile of the eager head (compilation not timed)",
}


def densecl_head(query, positive, queue_buffer):
    """DenseCL's head on its (D, K) queue buffer, eager."""
    l_pos = torch.einsum("nc,nc->n", query, positive).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", query, queue_buffer)
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= TEMPERATURE
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", OURS + tuple(PEERS))
def test_queue_contrastive(benchmark, impl, n):
    benchmark.group = f"queue_contrastive N={n} K={K} D={D} fp32"
    g = device_generator(0)
    query = F.normalize(torch.randn(n, D, generator=g, device=DEVICE), dim=1).requires_grad_()
    positive = F.normalize(torch.randn(n, D, generator=g, device=DEVICE), dim=1).requires_grad_()
    buffer = F.normalize(torch.randn(D, K, generator=g, device=DEVICE), dim=0)
    if impl == "eager":
        head = densecl_head
    elif impl == "compiled":
        head = torch.compile(densecl_head)
    else:
        def head(q, p, b):
            return lk.queue_contrastive_loss(q, p, b.t(), temperature=TEMPERATURE, backend=impl)

    def step():
        return torch.autograd.grad(head(query, positive, buffer), (query, positive))

    if impl == "compiled":
        try:
            step()
        except Exception as error:  # noqa: BLE001  (record why torch.compile cannot run here)
            pytest.skip(f"torch.compile failed: {type(error).__name__}: {error}")
    # The matrix products: logits (2 N K D) in the forward pass; gradients need one more.
    run_benchmark(benchmark, step, flops=4.0 * n * K * D, impl=impl, n=n, k=K, d=D, dtype="float32",
                  temperature=TEMPERATURE, peak_memory_bytes=measure_peak_memory(step))
