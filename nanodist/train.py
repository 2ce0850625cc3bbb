"""The command line of training: `python -m nanodist.train` (or the repo's train.py).

    python -m nanodist.train --device cpu --model tiny ...                one process
    torchrun --standalone --nproc_per_node=4 -m nanodist.train \\
        --tensor_parallel_size=2 --data_parallel_size=2 ...               DP x TP = 2 x 2

Every way a run can end is one line, never a raw traceback (nanodist/faults.py):
bad flags or inputs `error: ...` (exit 2) on every rank; SIGTERM / Ctrl-C / a dead
launcher: saved and stopped (exit 128 + signal); a peer that died: `error: rank R lost
the connection ...` (exit 1).
"""
import os
import sys

import torch.distributed as dist

from nanodist import faults
from nanodist.config import parse_args
from nanodist.errors import UserError
from nanodist.trainer import Trainer


def main(argv=None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    cfg = None
    try:
        cfg = parse_args(argv)
        Trainer(cfg).train()
        return 0
    except UserError as error:  # bad flags or inputs: one line, no traceback, exit 2
        if rank0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except faults.Stopped as stopped:  # the ranks agreed on it: rank 0 says it
        if rank0:
            print(stopped, file=sys.stderr, flush=True)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save
        if rank0:
            print("interrupted before training began", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # noqa: BLE001 - only a collective's error is ours to explain
        message = faults.lost_peer(error, cfg.dist_timeout if cfg else 0)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)  # the rank that saw it
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
