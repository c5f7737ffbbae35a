"""Run each CUDA kernel once (attention forward and backward in every dtype and keep form;
relative-position targets; every Sinkhorn pass, K in and past shared memory) on small shapes:
the workload that run_gpu.sh puts under compute-sanitizer (memcheck, racecheck)."""
import torch

import loca_kernels as lk


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.randn(3 * 2, 7, 3, 64, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(2, 19, 2, 3, 64, device=device, dtype=dtype, requires_grad=True)
        k, v = kv.unbind(2)
        for keep in (None, lk.random_keep(2, 19, 5, generator=generator, device=device),
                     lk.consecutive_keep(1, 19, 4, generator=generator, device=device, as_run=True)):
            out = lk.masked_cross_attention(q, k, v, keep, backend="cuda")
            out.float().square().sum().backward()
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 40.0], [10.0, 5.0, 90.0, 70.0]]], device=device)
    ref = torch.tensor([[5.0, 5.0, 80.0, 60.0]], device=device)
    lk.relative_position_targets(boxes, ref, (6, 6), (14, 14), query_rot90=torch.tensor([[1, 2]], device=device),
                                 backend="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, k in ((37, 11), (9, 9000)):
            scores = torch.randn(n, k, device=device).to(dtype)
            for mode, iterations in (("loca", 0), ("swav", 0), ("loca", 2), ("swav", 2)):
                lk.sinkhorn(scores, iterations=iterations, mode=mode, backend="cuda")
    torch.cuda.synchronize()
    print("sanitize_cuda: ran every CUDA kernel")


if __name__ == "__main__":
    main()
