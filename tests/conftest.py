import os
import sys

import torch

# Without a GPU the Triton kernels run (and are tested) under Triton's interpreter. The
# variable must be set before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
