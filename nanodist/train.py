"""The command line of training: `python -m nanodist.train` (or the repo's train.py).

    python -m nanodist.train --device cpu --model tiny ...                one process
    torchrun --standalone --nproc_per_node=4 -m nanodist.train \\
        --tensor_parallel_size=2 --data_parallel_size=2 ...               DP x TP = 2 x 2

Every way a run can end is one line, never a raw traceback (nanodist/cli.py, faults.py):
bad flags or inputs `error: ...` (exit 2) on every rank; SIGTERM / Ctrl-C / a dead
launcher: saved and stopped (exit 128 + signal); a peer that died: `error: rank R lost
the connection ...` (exit 1); anything unforeseen: its type and place (exit 1, `--debug`
for the traceback).
"""
import os
import sys

import torch.distributed as dist

from nanodist import cli

from nanodist.run import faults
from nanodist.run.config import parse_args
from nanodist.run.trainer import Trainer


def train(argv) -> int:
    rank0, cfg = os.environ.get("RANK", "0") == "0", None
    try:
        cfg = parse_args(argv)
        Trainer(cfg).train()
        return 0
    except faults.Stopped as stopped:  # the ranks agreed on it: rank 0 says it
        if rank0:
            print(stopped, file=sys.stderr, flush=True)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save
        if rank0:
            print("interrupted before training began", file=sys.stderr, flush=True)
        return 130
    except Exception as error:
        message = faults.lost_peer(error, cfg.dist_timeout if cfg else 0)
        if message is None:
            raise  # not a collective's: cli.run says what and where
        print(f"error: {message}", file=sys.stderr, flush=True)  # the rank that saw it
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    return cli.run(train, argv)


if __name__ == "__main__":
    sys.exit(main())
