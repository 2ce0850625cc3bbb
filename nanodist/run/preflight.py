"""What train.py asks the planner (plan.py) before it builds anything.

    --layout auto        the planner's fastest layout that fits replaces the parallel flags
                         and --batch_size; one line says why (memory, step time, MFU)
    the memory check     a layout whose predicted peak per rank (plan.memory's top) exceeds
                         the budget is refused, naming the best layout that fits as a
                         ready command. The budget: --memory_budget_gib, or on CUDA the
                         free memory of the device (none on CPU unless given)

The machine the planner ranks on: --machine_profile (a calibrated profile), else on CUDA
the GPU's data sheet, on CPU the lab's 2-core profile (nanodist/planner/profiles/lab-cpu.json,
uncalibrated for yours: its times are indicative, its memory is this machine's).
"""
import dataclasses
import os
from pathlib import Path

import torch

from nanodist.planner import plan
from nanodist.run.config import TrainConfig
from nanodist.errors import UserError
from nanodist.planner.hardware import GPUS, DataSheet, GiB, Profile
from nanodist.parallel.layout import FLAGS as LAYOUT_FLAGS, Layout

LAB_CPU = Path(__file__).parents[1] / "planner" / "profiles" / "lab-cpu.json"


def machine(cfg: TrainConfig, device: torch.device, budget: float):
    """(machine, what it is): the profile, data sheet or lab profile, whose fitting layouts
    are those of a predicted peak within `budget` bytes per rank."""
    if cfg.machine_profile:
        found, what = Profile.load(cfg.machine_profile, "--machine_profile"), f"profile {cfg.machine_profile}"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k, spec in GPUS.items() if spec[0].lower() in name.lower()), None)
        found = DataSheet(key or "h100")
        what = f"the {found.name} data sheet" if key else f"{name}: not in hardware.GPUS, H100 speeds"
    else:
        found = dataclasses.replace(Profile.load(LAB_CPU), cores=len(os.sched_getaffinity(0)))
        what = "the lab's CPU profile, uncalibrated here: --machine_profile for yours"
    return found.with_memory(budget / plan.USABLE_MEMORY / GiB), what


def memory_budget(cfg: TrainConfig, device: torch.device, ranks_per_node: int = 1,
                  default_cpu: bool = False) -> float | None:
    """Bytes one rank may use: --memory_budget_gib; on CUDA USABLE_MEMORY of the free
    memory; on CPU (`default_cpu`) that of the machine's, shared by its ranks; else None."""
    if cfg.memory_budget_gib > 0:
        return cfg.memory_budget_gib * GiB
    if device.type == "cuda":
        return plan.USABLE_MEMORY * torch.cuda.mem_get_info(device)[0]
    if default_cpu:
        return plan.USABLE_MEMORY * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks_per_node
    return None


def job(cfg: TrainConfig, model, world: int, device: torch.device, micro_batch: int | None = None) -> plan.Job:
    per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    return plan.Job(cfg.model, model, world, per_node, cfg.total_batch_size, cfg.dtype, device.type,
                    cfg.implementation, micro_batch, cfg.compile)


KEPT = ("implementation", "compile")  # --layout auto keeps these flags as given (the job's)
PLANNED = {"model", "block_size", "batch_size", "total_batch_size", "dtype", "layout", "dropout",
           *plan.MODEL_FLAGS, *LAYOUT_FLAGS.values()}  # what plan.command gives: the job's and the layout's


def other_flags(cfg: TrainConfig) -> tuple[str, ...]:
    """The run's flags that a planned command does not set (non-default ones only)."""
    default = TrainConfig()
    return tuple(f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                 if f.name not in PLANNED and getattr(cfg, f.name) != getattr(default, f.name))


def check_memory(cfg: TrainConfig, layout: Layout, micro_steps: int, model, device: torch.device):
    """Refuse the layout if its predicted peak per rank exceeds the budget (see the doc);
    float64 (a numerics check) is not planned."""
    budget = memory_budget(cfg, device)
    if budget is None or cfg.dtype == "float64":
        return
    the_job = job(cfg, model, layout.world, device)
    peak = plan.peak_memory(the_job, layout, cfg.batch_size, micro_steps)
    if peak["total"] <= budget:
        return
    where = (f"--memory_budget_gib {cfg.memory_budget_gib:g}" if cfg.memory_budget_gib > 0 else
             f"{plan.USABLE_MEMORY:.0%} of the {budget / plan.USABLE_MEMORY / GiB:.1f} GiB free on {device}")
    rows = plan.rank(the_job, machine(cfg, device, budget)[0])
    best = plan.command(the_job, rows[0]["layout"], rows[0]["micro_batch_size"], other_flags(cfg))
    fix = (f"the best layout that fits: {best}" if rows[0]["fits"] else
           f"no layout of {cfg.model} fits on {layout.world} ranks; the smallest needs "
           f"{rows[0]['memory_gib']:.2f} GiB: {rows[0]['command']}")
    raise UserError(f"{layout.name} needs a predicted {peak['total'] / GiB:.2f} GiB per rank (state "
                    f"{peak['state'] / GiB:.2f}, activations {peak['activations'] / GiB:.2f}, buffers and "
                    f"transients {(peak['buffers'] + peak['transient']) / GiB:.2f}), more than {where}; {fix}")


def choose_layout(cfg: TrainConfig, model, world: int, device: torch.device) -> tuple[TrainConfig, str]:
    """--layout auto: the config with the planner's best fitting layout, and why (one line).
    A --batch_size other than the default stays the micro-batch; else it is chosen too."""
    default = TrainConfig()
    given = [f"--{flag}" for name, flag in LAYOUT_FLAGS.items()
             if name not in KEPT and getattr(cfg, flag) != getattr(default, flag)]
    if given:
        raise UserError(f"--layout auto chooses the parallel flags itself, but {' '.join(given)} "
                        f"{'is' if len(given) == 1 else 'are'} given: drop them or --layout auto")
    if cfg.dtype == "float64":
        raise UserError("--layout auto plans float32 and bfloat16 runs; --dtype float64 is a "
                        "numerics check: give its layout's flags")
    the_job = job(cfg, model, world, device, cfg.batch_size if cfg.batch_size != default.batch_size else None)
    budget = memory_budget(cfg, device, the_job.ranks_per_node, default_cpu=True)
    found, what = machine(cfg, device, budget)
    rows = plan.rank(the_job, found)
    best = rows[0]
    if not best["fits"]:
        raise UserError(f"--layout auto: no layout of {cfg.model} fits in {budget / GiB:.2f} GiB per rank "
                        f"on {world} ranks; the smallest needs {best['memory_gib']:.2f} GiB "
                        f"({best['command']}): use more ranks or a smaller --total_batch_size")
    layout: Layout = best["layout"]
    cfg = dataclasses.replace(cfg, batch_size=best["micro_batch_size"],
                              **{LAYOUT_FLAGS[f.name]: getattr(layout, f.name)
                                 for f in dataclasses.fields(layout) if f.name not in KEPT})
    why = (f"--layout auto: {layout.name}, micro-batch {best['micro_batch_size']} x "
           f"{best['grad_accum']} micro-steps, predicted {best['memory_gib']:.2f} GiB per rank "
           f"(budget {budget / GiB:.2f}), {best['step_time_s'] * 1e3:.1f} ms per step, MFU "
           f"{best['mfu']:.0%}; the best of {sum(r['fits'] for r in rows)} fitting layouts on {what}")
    return cfg, why
