"""Train GPT-2 with any layout (the same as `python -m nanodist.train`).

    python train.py --device cpu --model tiny ...                        one process
    torchrun --standalone --nproc_per_node=4 train.py \\
        --tensor_parallel_size=2 --data_parallel_size=2 ...               DP x TP = 2 x 2

See `python train.py --help` for every flag and the README for recipes.
"""
import sys

from nanodist.train import main

if __name__ == "__main__":
    sys.exit(main())
