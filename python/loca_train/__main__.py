"""`python -m loca_train [--preset tiny|vit_s16|vit_b16] [--any-setting VALUE ...]`"""
import sys

import torch.distributed as dist

from .config import parse_args
from .train import train


def main(argv=None) -> int:
    result = train(parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()
    # Interrupted runs exit as the signal would (130 for SIGINT, 143 for SIGTERM), so job
    # schedulers see that the run is not finished.
    return 128 + result["interrupted"] if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
