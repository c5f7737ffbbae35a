"""`python -m loca_train [--preset tiny|vit_s16|vit_b16] [--objective loca|densecl|gtsa|mmc]
[--any-setting VALUE ...]`"""
import sys

import torch.distributed as dist

from .config import UsageError, parse_args, usage_error
from .train import train


def main(argv=None) -> int:
    try:
        result = train(parse_args(argv))
    except UsageError as error:
        usage_error(str(error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Interrupted runs exit as the signal would (130 for SIGINT, 143 for SIGTERM), so job
    # schedulers see that the run is not finished.
    return 128 + result["interrupted"] if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
