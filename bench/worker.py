"""One layout of the benchmark matrix (bench/run.py starts it under torchrun).

    torchrun --standalone --nproc_per_node=N bench/worker.py --layout NAME --out F

NAME: one of nanodist_tools/layouts.py. Builds one `Trainer` per implementation (custom,
pytorch; one process: just one) and, for the custom one, a twin whose collectives are
local copies (`Comm(LocalCopies())`, "no comm": the compute alone). They take turns
step by step (bench/common.py's interleaving) from the same initial weights on the
same batches, so their losses are the layout's training curve.
Then, one step each: counted traffic and state memory, one forward's saved
activations, one step's peak tensor memory. Rank 0 writes everything as JSON.
"""
import argparse
import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from common import median, paired_speedup, time_interleaved
from nanodist.run.config import parse_args
from nanodist.run.metrics import device_peak_flops
from nanodist.model.gpt import flops_per_token
from nanodist.parallel.comm import Comm
from nanodist.parallel.layout import Layout
from nanodist.run.trainer import Trainer
from nanodist_tools.layouts import LAYOUTS
from nanodist_tools.measure import TrafficMode, peak_tensor_bytes, saved_activations, state_bytes

NO_COMM = "custom, no comm"


class _LocalWork:
    def wait(self):
        return True


class LocalCopies:
    """A transport for comm.Comm (`Trainer(cfg, comm=Comm(LocalCopies()))`): torch.distributed,
    but every collective of the hand-written strategies a local copy of the same shapes, the
    step's compute alone (the compute / exposed-communication split of the report)."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def all_reduce(tensor, op=None, group=None, async_op=False):
        return _LocalWork() if async_op else None

    @staticmethod
    def broadcast(tensor, group_src=None, group=None, async_op=False):
        return _LocalWork() if async_op else None

    @staticmethod
    def all_gather_single(output, input, group=None, async_op=False):
        output.view(-1, input.numel()).copy_(input.reshape(1, -1))
        return _LocalWork() if async_op else None

    @staticmethod
    def reduce_scatter_single(output, input, op=None, group=None, async_op=False):
        output.copy_(input.reshape(-1, output.numel())[0].view_as(output))
        return _LocalWork() if async_op else None


def train_flags(args, layout: Layout, implementation: str) -> list[str]:
    """Every layout trains on global batches of `ranks_per_batch` micro-batches."""
    tokens = args.batch_size * args.block_size * args.ranks_per_batch
    run_dir = tempfile.mkdtemp(prefix="nanodist-bench-")  # TensorBoard events: thrown away
    return [f"--device={args.device}", f"--model={args.model}", "--dataset=shakespeare_char",
            f"--data_dir={args.data_dir}", f"--batch_size={args.batch_size}",
            f"--block_size={args.block_size}", f"--total_batch_size={tokens}",
            f"--max_steps={args.warmup + args.steps + 3}", "--warmup_steps=2",
            "--learning_rate=1e-3", "--min_lr=1e-4", f"--dtype={args.dtype}",
            f"--out_dir={run_dir}", f"--log_dir={run_dir}",
            *replace(layout, implementation=implementation).flags()]


def measure_one(trainer: Trainer, step: int, custom: bool) -> dict:
    """Traffic and state of one optimizer step, saved activations of one forward, peak
    tensor memory of one more step. Each value is this rank's."""
    state = {}
    hook = trainer.optimizer.register_step_post_hook(lambda *_: state.update(state_bytes(trainer)))
    with TrafficMode() as traffic, trainer.comm.counting() as counted:
        trainer.train_step(step)
    hook.remove()
    counted = counted.summary() if custom else None

    x, y = trainer.data.train_batch(0, 0)
    stage = trainer.parallel.parts[0]
    with stage.loss_context():
        with saved_activations(stage.module.parameters()) as saved, trainer.autocast:
            loss = stage.module(x, targets=y)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)

    peak = peak_tensor_bytes(trainer, step + 1)
    return {"traffic": traffic.counter.summary(), "traffic_comm_py": counted, "state": state,
            "activations": sum(saved.values()), "peak": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", required=True, choices=list(LAYOUTS),
                   help="a name of nanodist_tools/layouts.py")
    p.add_argument("--out", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--ranks_per_batch", type=int, default=2, help="global batch in micro-batches")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    layout = LAYOUTS[args.layout]

    world = int(os.environ.get("WORLD_SIZE", 1))
    if not torch.cuda.is_available():  # one thread per process: a loaded machine makes
        torch.set_num_threads(1)       # OpenMP threads wait on each other for ages
    impls = ["custom", "pytorch"] if world > 1 else ["custom"]
    trainers = {impl: Trainer(parse_args(train_flags(args, layout, impl))) for impl in impls}
    if world > 1:
        trainers[NO_COMM] = Trainer(parse_args(train_flags(args, layout, "custom")),
                                    comm=Comm(LocalCopies()))
    first = trainers["custom"]
    device = first.mesh.device

    records = {name: [] for name in trainers}

    def stepper(name):
        return lambda: records[name].append(trainers[name].train_step(len(records[name])))

    times = time_interleaved({name: stepper(name) for name in trainers}, args.warmup, args.steps,
                             device, dist.barrier if world > 1 else None)
    next_step = args.warmup + args.steps
    measured = {impl: measure_one(trainers[impl], next_step, impl == "custom") for impl in impls}
    if world > 1:  # every rank's memory figures
        for impl in impls:
            ranks = [None] * world
            dist.all_gather_object(ranks, {k: measured[impl][k] for k in ("state", "activations", "peak")})
            measured[impl]["per_rank"] = ranks

    peak_flops = device_peak_flops(device, args.dtype)
    fpt = flops_per_token(first.model_cfg, first.n_params)
    rows = {}
    for impl in impls:
        step_s = median(times[impl])
        tokens_per_s = first.tokens_per_step / step_s
        rows[impl] = {
            "step_seconds": times[impl], "median_step_s": step_s, "tokens_per_s": tokens_per_s,
            "loss": [r["loss"] for r in records[impl]],
            "mfu": tokens_per_s * fpt / world / peak_flops if peak_flops else None,
            **measured[impl]}
    if world > 1:
        rows["custom"]["compute_s"] = median(times[NO_COMM])
        rows["custom"]["exposed_comm_s"] = rows["custom"]["median_step_s"] - median(times[NO_COMM])
        rows["custom"]["custom_over_pytorch"] = paired_speedup(times, "custom", "pytorch")
    if first.mesh.is_main:
        result = {"layout": args.layout, "layout_fields": asdict(layout), "world": world,
                  "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads/rank)",
                  "model": asdict(first.model_cfg), "n_params": first.n_params,
                  "dtype": args.dtype, "micro_batch": args.batch_size, "grad_accum": first.micro_steps,
                  "tokens_per_step": first.tokens_per_step, "flops_per_token": fpt,
                  "peak_flops": peak_flops, "warmup": args.warmup, "steps": args.steps,
                  "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
