"""A simulated cluster: one process plays one rank of a layout of 64 or 512 ranks over
torch's fake process group (collectives return at once and move nothing) and runs the
same real code, Trainer and parallelize, on gpt2-medium to gpt2-xl (block 64, one
micro-batch of 1), held to the predictions of the cost model like the real layouts.

Values do not matter there, so the played rank gets two stand-ins, through the Trainer's
injection points: a GPT whose initial values are zeros (no 1.5e9 random draws; the loss
stays finite) and a transport whose receives are zeros (the fake group leaves them as
they were: uninitialised memory) and whose object broadcast keeps this rank's own (it
decides about its run directory alone).
"""
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from nanodist.run.config import parse_args
from nanodist.model.gpt import GPT
from nanodist.parallel.comm import Comm
from nanodist.parallel.layout import Layout
from nanodist.run.trainer import Trainer
from nanodist_tools.measure import measure_step, step_argv
from nanodist_tools.processes import as_rank_of

SIMULATED = [  # (name, layout, model); played: the first rank of the first and of the last stage
    ("fsdp64", Layout(dp=64, dp_type="fsdp"), "gpt2-xl"),
    ("fsdp16xtp4-sp-lp", Layout(dp=16, tp=4, dp_type="fsdp", sequence_parallel=True,
                                loss_parallel=True), "gpt2-large"),
    ("pp8xfsdp8", Layout(pp=8, dp=8, dp_type="fsdp"), "gpt2-xl"),
    ("fsdp64xtp8", Layout(dp=64, tp=8, dp_type="fsdp", sequence_parallel=True), "gpt2-medium"),
    ("pp8xfsdp64-zero2", Layout(pp=8, dp=64, dp_type="fsdp", reshard_after_forward=False), "gpt2-xl"),
    ("pp4xdp32xtp4", Layout(pp=4, dp=32, tp=4), "gpt2-large"),
    ("cp8xfsdp64", Layout(cp=8, dp=64, dp_type="fsdp"), "gpt2-xl"),
    ("hsdp8x8", Layout(dp=64, dp_type="fsdp", hsdp_replicas=8), "gpt2-xl"),
    ("zero1-32xtp4", Layout(dp=32, tp=4, dp_type="zero1", sequence_parallel=True), "gpt2-large"),
]


class ZerosGPT(GPT):
    """GPT-2 whose every initial value is zero: finite, and free to draw."""

    def initial_value(self, name: str, seed: int, shape) -> torch.Tensor:
        return torch.zeros(shape)


class PlayedRank:
    """torch.distributed for one played rank of the fake group: receives are zeros, an
    object broadcast leaves each rank its own object."""
    WRITES_FIRST_ARG = {"all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                        "reduce_scatter_tensor", "all_to_all_single"}  # torch 2.11's fake group leaves them

    def __getattr__(self, name):
        collective = getattr(dist, name)
        if name not in self.WRITES_FIRST_ARG:
            return collective

        def zeroed_output(output, *args, **kwargs):
            output.zero_()
            return collective(output, *args, **kwargs)
        return zeroed_output

    @staticmethod
    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is dist.irecv:
                op.tensor.zero_()
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def broadcast_object_list(objects, src=0, group=None, device=None):
        return None


def _play(argv: list[str]) -> dict:
    return measure_step(Trainer(parse_args(argv), comm=Comm(PlayedRank()), model_cls=ZerosGPT))


def simulate(layout: Layout, model: str, data_dir: str, ranks: list[int] | None = None) -> list[dict]:
    """Play `ranks` of `layout` (default: the first rank of the first and of the last
    pipeline stage), each in a fresh process over the fake process group, on `model`
    with one micro-batch of 1 x 64 tokens (M = P: the least a pipeline runs)."""
    ranks = ranks or sorted({0, (layout.pp - 1) * layout.world // layout.pp})
    with tempfile.TemporaryDirectory() as tmp:
        return [as_rank_of(layout.world, rank, _play,
                           step_argv(layout, data_dir, str(Path(tmp) / f"run{rank}"), model, block_size=64,
                                    micro_batch=1, micro_steps=layout.pp) + ["--deferred_init"])
                for rank in ranks]
