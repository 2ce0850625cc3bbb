"""The command line of training: `python -m nanodist.train` (or the repo's train.py).

    python -m nanodist.train --device cpu --model tiny ...                one process
    torchrun --standalone --nproc_per_node=4 -m nanodist.train \\
        --tensor_parallel_size=2 --data_parallel_size=2 ...               DP x TP = 2 x 2

Bad flags or inputs end in one line (`error: ...`, exit code 2) on every rank.
"""
import os
import sys

import torch.distributed as dist

from nanodist.config import UserError, parse_args
from nanodist.trainer import Trainer


def main(argv=None) -> int:
    try:
        Trainer(parse_args(argv)).train()
        return 0
    except UserError as error:  # bad flags or inputs: one line, no traceback, exit 2
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
