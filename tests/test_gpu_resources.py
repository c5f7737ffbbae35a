"""Register and shared-memory budgets at the benchmarked shapes, without a GPU: the Triton
specialisations that the host wrappers launch there are compiled for sm_90 by
benchmarks/gpu_resources.py (the full table: benchmarks/results/gpu-resources.md); none may
spill or ask for more shared memory than a block can have."""
import json
import os

import pytest

from helpers import compile_for_gpu
from loca_kernels._backends import TRITON_AVAILABLE

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
# One benchmarked case per op (every kernel of it), chosen to compile in well under a minute.
CASES = ["contrastive-n1568-k65536-d128-float32", "sinkhorn-n12544-k4096-float32-loca",
         "attention-bk32-nq36-d64-bfloat16-random", "crop-c768-14x14-r1-out10-float32",
         "matching-b32-n49-c2048-bfloat16", "targets-v9-6x6-centre"]


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
def test_benchmarked_kernels_neither_spill_nor_overflow_shared_memory():
    out = compile_for_gpu(f"""
        import dataclasses, json, sys
        sys.path.insert(0, {BENCHMARKS!r})
        import gpu_resources

        rows = gpu_resources.triton_resources({CASES!r})
        print(json.dumps([dict(dataclasses.asdict(row), over_shared=row.over_shared) for row in rows]))
    """, timeout=600)
    rows = json.loads(out.strip().splitlines()[-1])
    assert {row["kernel"].split(".")[0] for row in rows} == {"contrastive", "sinkhorn", "attention", "crop",
                                                              "matching", "targets"}
    bad = [f"{row['kernel']} ({row['specialisation']}, {row['warps']} warps): {row['spill_stores']}/"
           f"{row['spill_loads']} B spilled, {row['shared']} B shared" for row in rows
           if row["spill_stores"] or row["spill_loads"] or row["over_shared"]]
    assert not bad, "kernels that spill or need more than 227 KB of shared memory on sm_90:\n" + "\n".join(bad)
