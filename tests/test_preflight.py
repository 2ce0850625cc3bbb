"""What train.py asks the planner before building anything (nanodist/run/preflight.py): the
memory check refuses a layout over the budget and names one that fits (which then runs
within it), --layout auto takes the planner's best and says why, bad inputs are one line."""
import dataclasses
import gc
import json

import pytest
import torch

from harness import run_distributed, tiny_run
from nanodist.planner import plan, search
from nanodist.run import preflight
from nanodist.run.config import TrainConfig, fit, layout_of, parse_args, resolve
from nanodist.errors import UserError
from nanodist.planner.hardware import GiB, Profile
from nanodist.model.gpt import model_config
from nanodist.run.trainer import Trainer

CPU = torch.device("cpu")


def _cfg(char_data, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**tiny_run(char_data, tmp_path, **{"block_size": 64, "batch_size": 16,
                                                          "total_batch_size": 2048, **overrides}))


def _peak(cfg: TrainConfig, world: int = 1) -> float:
    cfg, layout, M = resolve(cfg, world, "cpu")
    the_job = preflight.job(cfg, model_config(cfg.model, cfg.block_size, 65), world, CPU)
    return plan.peak_memory(the_job, layout, cfg.batch_size, M)["total"]


def test_a_layout_over_the_budget_is_refused_naming_one_that_fits(char_data, tmp_path):
    """One process: micro-batch 16 without checkpointing needs more than the budget, half
    way to the smallest layout (micro-batch 1, full checkpointing). The error names a
    command whose predicted peak is within the budget; that run's measured peak is too
    (within the prediction's margin)."""
    cfg = _cfg(char_data, tmp_path / "big")
    smallest = _peak(dataclasses.replace(cfg, batch_size=1, activation_checkpointing="full"))
    budget = (smallest + _peak(cfg)) / 2 / GiB
    with pytest.raises(UserError, match="more than --memory_budget_gib") as refused:
        Trainer(dataclasses.replace(cfg, memory_budget_gib=budget))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "the best layout that fits: " in message
    fix = message.split(" train.py ")[1].split()
    argv = [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path / "fits").items()] + fix
    fitting = dataclasses.replace(parse_args(argv), memory_budget_gib=budget)
    assert _peak(fitting) <= budget * GiB
    gc.collect()  # the CPU peak counts every live tensor: none of earlier tests' garbage (cycles)
    trainer = Trainer(fitting)  # the check passes
    trainer.train_step(0)  # AdamW's moments exist from here on
    with trainer.memory.step(measure=True):
        trainer.train_step(1)
    assert trainer.memory.peak <= (1 + plan.MEMORY_MARGIN) * budget * GiB


def test_no_budget_on_cpu_means_no_check(char_data, tmp_path):
    cfg = _cfg(char_data, tmp_path)
    assert preflight.memory_budget(cfg, CPU) is None
    preflight.check_memory(cfg, layout_of(cfg, 1), 1, model_config("tiny", 64, 65), CPU)  # no error


def test_layout_auto_is_the_planners_best_and_says_why(char_data, tmp_path):
    """On 4 CPU ranks with a profile: the chosen flags are the first row of plan.rank on
    that machine and budget, and the line says memory, step time and MFU."""
    cfg = _cfg(char_data, tmp_path, layout="auto", memory_budget_gib=1.0)
    model = model_config("tiny", 64, 65)
    chosen, why = preflight.choose_layout(cfg, model, 4, CPU)
    machine, _ = preflight.machine(cfg, CPU, 1.0 * GiB)
    best = plan.rank(preflight.job(cfg, model, 4, CPU), machine)[0]
    assert layout_of(chosen, 4) == best["layout"] and chosen.batch_size == best["micro_batch_size"]
    assert len(why.splitlines()) == 1 and "GiB per rank" in why and "ms per step" in why and "MFU" in why
    assert resolve(chosen, 4, "cpu")[1] == best["layout"]  # train.py accepts it


def _auto_trainer(kwargs):
    trainer = Trainer(TrainConfig(**kwargs))
    trainer.train_step(0)
    return dataclasses.asdict(trainer.layout), trainer.cfg.batch_size


def test_layout_auto_trains_on_two_processes(char_data, tmp_path):
    kwargs = tiny_run(char_data, tmp_path, layout="auto", memory_budget_gib=1.0, block_size=64,
                      total_batch_size=2048)
    chosen, _ = preflight.choose_layout(TrainConfig(**kwargs), model_config("tiny", 64, 65), 2, CPU)
    for layout, batch_size in run_distributed(_auto_trainer, 2, kwargs):
        assert layout == dataclasses.asdict(layout_of(chosen, 2)) and batch_size == chosen.batch_size


@pytest.mark.parametrize("overrides, says", [
    (dict(tensor_parallel_size=2), "--layout auto chooses the parallel flags itself, but --tensor_parallel_size"),
    (dict(dtype="float64"), "--layout auto plans float32 and bfloat16 runs"),
    (dict(machine_profile="/nonexistent.json"), "--machine_profile /nonexistent.json: not a machine profile"),
])
def test_layout_auto_refuses_clearly(char_data, tmp_path, overrides, says):
    cfg = _cfg(char_data, tmp_path, layout="auto", **overrides)
    with pytest.raises(UserError) as refused:
        preflight.choose_layout(cfg, model_config("tiny", 64, 65), 2, CPU)
    assert says in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_bad_machine_profile_is_one_line(tmp_path):
    bad = tmp_path / "profile.json"
    for text in ["{", json.dumps({"name": "x"}), json.dumps([1, 2])]:
        bad.write_text(text)
        with pytest.raises(UserError, match="not a machine profile|out of range"):
            Profile.load(bad, "--machine_profile")


@pytest.mark.parametrize("argv, says", [(["--memory_budget_gib", "-1"], "--memory_budget_gib must be >= 0"),
                                        (["--layout", "best"], "invalid choice")])
def test_bad_preflight_flags(argv, says):
    with pytest.raises(UserError, match=says):
        resolve(parse_args(argv), 1, "cpu")


GRID = [(ranks, micro_batch, total) for ranks in (1, 2, 3, 4, 8) for micro_batch in (None, 1, 4)
        for total in (64, 256, 512, 768, 2048)]


@pytest.mark.parametrize("ranks, micro_batch, total", GRID)
def test_layout_auto_picks_only_what_train_py_accepts(char_data, tmp_path, ranks, micro_batch, total):
    """Over a grid of processes, micro-batch (given or not) and global batch: the planner's
    pick passes every rule train.py applies (the layout's and the batch arithmetic), or
    no layout exists and that is one line: when no DP size d | ranks and micro-batch b
    have b x 64 x d dividing the batch (the tiny model fills any ranks / d of this grid
    with PP, CP and TP)."""
    cfg = _cfg(char_data, tmp_path, layout="auto", memory_budget_gib=1.0, total_batch_size=total,
               batch_size=micro_batch or TrainConfig.batch_size)
    model = model_config("tiny", 64, 65)
    batches = [micro_batch] if micro_batch else search.MICRO_BATCHES
    runnable = any(total % (b * 64 * d) == 0 for d in search.divisors(ranks) for b in batches)
    try:
        chosen, _ = preflight.choose_layout(cfg, model, ranks, CPU)
    except UserError as refused:
        assert str(refused).startswith("no layout of tiny runs on") and not runnable
        return
    assert runnable
    chosen, layout, M = resolve(chosen, ranks, "cpu")
    fit(chosen, layout, M, 65, "cpu")
    assert micro_batch in (None, chosen.batch_size)


@pytest.mark.parametrize("ranks, micro_batch, total", [(4, 4, 512), (4, None, 768), (2, 4, 256)])
def test_layout_auto_starts_training(char_data, tmp_path, ranks, micro_batch, total):
    """The first is the issue's command, once refused: 512 tokens do not divide over 4 DP
    ranks of 4 x 64, but DP 2 x TP 2 (and others) fit."""
    kwargs = tiny_run(char_data, tmp_path, layout="auto", memory_budget_gib=1.0, block_size=64,
                      total_batch_size=total, batch_size=micro_batch or TrainConfig.batch_size)
    for _, batch_size in run_distributed(_auto_trainer, ranks, kwargs):
        assert micro_batch in (None, batch_size)
