"""`python -m nanodist_tools.planner`: which layout trains a GPT-2 fastest, and fits.

    python -m nanodist_tools.planner --model gpt2-xl --gpus 64          rank on 64 H100s
    python -m nanodist_tools.planner --calibrate --out cpu.json         measure this machine
    python -m nanodist_tools.planner --profile cpu.json --gpus 4 --model tiny --block_size 64 \\
        --total_batch_size 4096                                         rank on it
    python -m nanodist_tools.planner --validate [--profile cpu.json]    predicted vs measured
    python -m nanodist_tools.planner ... --plot layouts.png             memory vs step time

The model itself is the library's (nanodist/planner/plan.py, which train.py consults before
building anything and for `--layout auto`); a machine is a GPU's data sheet (--gpu and
its overrides) or a calibrated profile (nanodist/planner/hardware.py).
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from nanodist import cli

from nanodist.planner import plan
from nanodist.run.config import check_moe
from nanodist.errors import UserError
from nanodist.planner.hardware import GPUS, DataSheet, GiB, Profile
from nanodist.model.gpt import PRESETS, model_config

SHAPE = ("n_layer", "n_head", "n_embd")


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(description="Rank every layout of a GPT-2 job by predicted step time "
                              "(nanodist/planner/plan.py), calibrate this machine, or validate the model.")
    p.add_argument("--model", default="gpt2", choices=list(PRESETS))
    p.add_argument("--gpus", type=int, default=8, help="ranks (processes) of the job")
    p.add_argument("--gpus_per_node", type=int, default=0, help="default: --gpus up to 8 (GPUs), all (a profile)")
    p.add_argument("--gpu", default="h100", choices=list(GPUS), help="the data sheet to rank on")
    p.add_argument("--gpu_memory_gib", type=float, default=0,
                   help="memory per rank (default: the GPU's, or a profile's machine / its ranks)")
    p.add_argument("--intra_node_gb_s", type=float, default=0, help="GB/s per GPU in a node (default: the GPU's)")
    p.add_argument("--inter_node_gb_s", type=float, default=0, help="GB/s per GPU across nodes (default: the GPU's)")
    p.add_argument("--compute_efficiency", type=float, default=0,
                   help="fraction of peak FLOP/s a large matmul reaches (default: the GPU family's)")
    p.add_argument("--profile", default="", help="a machine profile (--calibrate) instead of a data sheet")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=50257, help="the tokenizer's (GPT-2 BPE: 50257)")
    for name in SHAPE:  # any GPT-2-shaped model, e.g. a published run's
        p.add_argument(f"--{name}", type=int, default=0, help=f"the model's {name} (default: --model's)")
    p.add_argument("--compile", action="store_true", help="train.py --compile: fused element-wise kernels")
    p.add_argument("--total_batch_size", type=int, default=524288)
    p.add_argument("--moe_experts", type=int, default=0, help="a mixture of experts (train.py's flag): "
                                                               "the planner then searches EP sizes too")
    p.add_argument("--moe_top_k", type=int, default=2)
    p.add_argument("--moe_every", type=int, default=1)
    p.add_argument("--micro_batch_size", type=int, default=0, help="0: search powers of 2 up to 64")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"],
                   help="default: bfloat16 on a GPU, float32 on a CPU profile")
    p.add_argument("--device", default="", choices=["", "cuda", "cpu"],
                   help="what the layouts run on (default: cuda, or the profile's; the rules differ)")
    p.add_argument("--implementation", default="custom", choices=["custom", "pytorch"])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the whole ranking as JSON")
    p.add_argument("--plot", default="", help="draw predicted memory vs step time of every layout (PNG)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine into --out (its GPU's matmuls with --device cuda)")
    p.add_argument("--out", default="machine_profile.json", help="--calibrate's profile file")
    p.add_argument("--validate", action="store_true", help="predicted against measured on this CPU")
    p.add_argument("--data_dir", default="", help="--validate: prepared shakespeare_char (default: synthetic tokens)")
    p.add_argument("--report_dir", default="docs/plan", help="--validate's report directory")
    p.add_argument("--layouts", nargs="*", help="--validate: a subset of its layouts (default: all)")
    return p


def machine_of(args):
    """The machine of the flags: a profile, or the GPU's data sheet with its overrides."""
    for name in ("gpus", "top", "block_size", "vocab_size", "total_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("gpus_per_node", "gpu_memory_gib", "intra_node_gb_s", "inter_node_gb_s", "micro_batch_size",
                 *SHAPE):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.compute_efficiency <= 1:
        raise UserError(f"--compute_efficiency must be in (0, 1] (0: the GPU's default), got {args.compute_efficiency}")
    if args.profile:
        machine = Profile.load(args.profile)
        per_node = args.gpus_per_node or args.gpus
        memory = args.gpu_memory_gib or machine.memory_gib / min(per_node, args.gpus)  # RAM is shared
    else:
        machine = DataSheet(args.gpu, args.compute_efficiency, args.intra_node_gb_s, args.inter_node_gb_s)
        per_node = args.gpus_per_node or min(args.gpus, 8)
        memory = args.gpu_memory_gib or GPUS[args.gpu][1]
    if args.gpus > per_node and args.gpus % per_node:
        raise UserError(f"--gpus {args.gpus} on nodes of --gpus_per_node {per_node}: whole nodes "
                        f"only, give a multiple of {per_node}")
    return machine.with_memory(memory), min(per_node, args.gpus)


def job_of(args, machine, per_node: int) -> plan.Job:
    device = args.device or machine.device
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    check_moe(args)
    moe = {name: getattr(args, name) for name in plan.MODEL_FLAGS} if args.moe_experts else {}
    of_preset = model_config(args.model, args.block_size, args.vocab_size, **moe)
    model = dataclasses.replace(of_preset, **{name: getattr(args, name) for name in SHAPE if getattr(args, name)})
    if model.n_embd % model.n_head:
        raise UserError(f"--n_embd {model.n_embd} must divide into --n_head {model.n_head} heads")
    preset = args.model if model == of_preset else "custom"
    return plan.Job(preset, model, args.gpus, per_node, args.total_batch_size, dtype, device,
                    args.implementation, args.micro_batch_size or None, args.compile)


def draw(rows: list[dict], job: plan.Job, machine, path: str):
    """Predicted memory against step time of every layout, the fitting ones in colour by
    data-parallel type, the best marked, the memory limit drawn."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    misfits = [r for r in rows if not r["fits"]]
    ax.scatter([r["step_time_s"] for r in misfits], [r["memory_gib"] for r in misfits], s=10,
               c="lightgrey", label=f"does not fit ({len(misfits)})")
    kinds = sorted({r["dp_type"].split("x")[0] for r in rows if r["fits"]})
    for kind in kinds:
        fit = [r for r in rows if r["fits"] and r["dp_type"].split("x")[0] == kind]
        ax.scatter([r["step_time_s"] for r in fit], [r["memory_gib"] for r in fit], s=14, label=kind)
    best = rows[0]
    if best["fits"]:
        ax.scatter([best["step_time_s"]], [best["memory_gib"]], marker="*", s=250, c="black",
                   label=f"best: {best['layout'].name}")
    ax.axhline(plan.USABLE_MEMORY * machine.memory_bytes / GiB, color="red", lw=0.8, ls="--",
               label=f"{plan.USABLE_MEMORY:.0%} of {machine.memory_bytes / GiB:.3g} GiB per rank")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("predicted step time (s)"), ax.set_ylabel("predicted peak memory per rank (GiB)")
    ax.set_title(f"{job.preset}: {len(rows)} layouts on {job.ranks} x {machine.name}, {job.dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UserError(f"--plot {path} cannot be written ({e.strerror or e}); pick a writable path") from e
    finally:
        plt.close(fig)


def rank(args) -> int:
    machine, per_node = machine_of(args)
    job = job_of(args, machine, per_node)
    rows = plan.rank(job, machine)
    if args.plot:
        draw(rows, job, machine, args.plot)
    if not rows[0]["fits"]:
        raise UserError(f"no layout fits in {machine.memory_bytes / GiB:g} GiB per rank; the "
                        f"closest, {rows[0]['command']}, {rows[0]['why']}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "layout"} for r in rows], indent=1))
        return 0
    fitting = sum(r["fits"] for r in rows)
    print(f"{args.model} on {args.gpus} x {machine.name} ({machine.memory_bytes / GiB:.3g} GiB per rank, "
          f"{per_node} per node), {job.dtype}: {len(rows)} layouts run, {fitting} fit")
    print(plan.table(rows[:args.top]))
    print(f"\nbest: {rows[0]['command']}" + (f"\nplot: {args.plot}" if args.plot else ""))
    return 0


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.calibrate:
        from nanodist_tools.calibrate import calibrate, gpu_profile
        out = Path(args.out).absolute()
        if out.is_dir() or not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
            raise UserError(f"--out {args.out}: cannot write a file there; pick a writable path")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--calibrate --device cuda: torch sees no GPU here; calibrate on the GPU "
                            "machine, or leave --device out to calibrate this CPU")
        profile = gpu_profile() if args.device == "cuda" else calibrate(args.data_dir or None)
        profile.save(args.out)
        print(f"{profile.name}: wrote {args.out}; rank with --profile {args.out}")
        return 0
    if args.validate:
        from nanodist_tools.validate import validate
        return validate(args.data_dir, args.report_dir, args.layouts, args.profile)
    return rank(args)


def main(argv=None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
