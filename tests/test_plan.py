"""The layout planner: the cost model's pipeline terms against the real stage split and
the schedules (its bubble: tests/test_pipeline.py), the command line (ranking, JSON, runnable command, bad inputs),
and a fast subset of --validate (predicted = measured per rank on real processes)."""
import json

import pytest
import torch

from harness import run_distributed
from nanodist.config import fit, parse_args, resolve
from nanodist.errors import UserError
from nanodist.model import GPT, GPTConfig, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.pipeline import stage_model
from nanodist_tools import plan, simulate, validate
from nanodist_tools.cost import (activation_bytes, activations_in_flight, chunks, param_counts,
                                 schedule, stage_params)
from nanodist_tools.layouts import LAYOUTS
from nanodist_tools.measure import measure_run, step_argv
from nanodist_tools.traffic import fsdp_gathers

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=5, n_head=2, n_embd=8)


@pytest.mark.parametrize("pp,V", [(2, 1), (2, 2), (5, 1)])
def test_stage_params_are_what_each_stage_holds(pp, V):
    """Per pp rank, the parameters of its chunks of the real model; over all ranks the
    model plus the last stage's copy of the tied wte / lm_head."""
    with torch.device("meta"):
        model = GPT(CFG)
    layout = Layout(pp=pp, pp_schedule="interleaved_1f1b" if V > 1 else "1f1b", virtual_stages=V)
    total = 0
    for r in range(pp):
        held = sum(p.numel() for blocks, first, last in chunks(CFG, layout, r)
                   for p in stage_model(model, blocks, first, last).parameters())
        assert stage_params(CFG, layout, r)["total"] == held
        total += held
    assert total == param_counts(CFG)["total"] + CFG.vocab_size * CFG.n_embd


def test_activations_in_flight_follow_the_schedule():
    """GPipe keeps all M micro-batches of a stage, 1F1B at most P - r; without PP one."""
    M = 4
    per = [activation_bytes(CFG, Layout(pp=2), 1, None, 1, *c)
           for r in range(2) for c in chunks(CFG, Layout(pp=2), r)]
    assert activations_in_flight(CFG, Layout(pp=2, pp_schedule="gpipe"), 1, M, 0) == M * per[0]
    assert activations_in_flight(CFG, Layout(pp=2), 1, M, 0) == 2 * per[0]
    assert activations_in_flight(CFG, Layout(pp=2), 1, M, 1) == per[1]
    assert activations_in_flight(CFG, Layout(), 1, M) == activation_bytes(CFG, Layout(), 1)


def test_fsdp_gathers_per_unit():
    """ZeRO-3 gathers for every forward and backward; ZeRO-2 once per micro-step alone,
    and under 1F1B only where a backward released the unit before a forward."""
    assert fsdp_gathers(schedule(1, "1f1b", 1, 3)[0], 0, reshard_after_forward=True) == 6
    assert fsdp_gathers(schedule(1, "1f1b", 1, 3)[0], 0, reshard_after_forward=False) == 3
    # P=2, M=4, rank 0: F0 F1 B0 F2 B1 F3 B2 B3 -> gathers at F0, F2, F3, B3
    assert fsdp_gathers(schedule(2, "1f1b", 1, 4)[0], 0, reshard_after_forward=False) == 4


def _plan(capsys, *argv):
    code = plan.main(["--model=gpt2", "--micro_batch_size=4", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_ranks_runnable_layouts(capsys):
    code, out, _ = _plan(capsys, "--gpus=8", "--json")
    rows = json.loads(out)
    assert code == 0 and rows
    keys = {"dp", "dp_type", "tp", "pp", "pp_schedule", "cp", "activation_checkpointing",
            "micro_batch_size", "fits", "memory_gib", "state_gib", "activation_gib",
            "comm_bytes_per_step", "step_time_s", "mfu", "command"}
    assert keys <= set(rows[0])
    fits = [r["fits"] for r in rows]
    assert fits == sorted(fits, reverse=True)  # fitting first
    times = [round(r["step_time_s"], 9) for r in rows if r["fits"]]  # equal ones: other keys
    assert times == sorted(times)
    for r in rows[:: max(len(rows) // 20, 1)]:  # the command is one train.py accepts
        argv = r["command"].split(" train.py ")[1].split()
        _, layout, _ = resolve(parse_args(argv), 8, "cuda")
        assert (layout.dp, layout.tp, layout.pp, layout.cp) == (r["dp"], r["tp"], r["pp"], r["cp"])
        assert r["memory_gib"] == pytest.approx(r["state_gib"] + r["activation_gib"] + r["buffer_gib"])


def test_table_and_multi_node_command(capsys):
    code, out, _ = _plan(capsys, "--gpus=16", "--top=3")
    assert code == 0
    assert len([line for line in out.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]) == 3
    assert "torchrun --nnodes=2 --nproc_per_node=8" in out.splitlines()[-1]


@pytest.mark.parametrize("argv,says", [
    (["--gpu=v100"], "unknown --gpu"),
    (["--gpus=12", "--gpus_per_node=8"], "whole nodes"),
    (["--model=gpt9"], "invalid choice"),
    (["--total_batch_size=1000"], "no layout"),
    (["--model=gpt2-xl", "--gpus=1", "--gpu_memory_gib=4"], "no layout fits"),
])
def test_bad_inputs_are_one_line(capsys, argv, says):
    code, out, err = _plan(capsys, *argv)
    assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1


def _accepted_by_train_py(args, layout: Layout, micro_batch: int) -> bool:
    """What train.py says of the planner's command for `layout` on args.gpus processes of
    args.device: its own path from the flags (resolve, then fit once the data is open)."""
    cfg = parse_args(plan.command(args, layout, micro_batch).split(" train.py ")[1].split())
    try:
        cfg, resolved, micro_steps = resolve(cfg, args.gpus, args.device)
        fit(cfg, resolved, micro_steps, 50257, args.device)
    except UserError:
        return False
    assert resolved == layout  # the flags carry the whole layout
    return True


@pytest.mark.parametrize("implementation", ["custom", "pytorch"])
def test_the_planner_lists_exactly_what_train_py_accepts_on_cpu(implementation):
    """Over the planner's whole search space for 4 CPU processes (both implementations:
    PyTorch's CP is CUDA only, native PP x TP is not wired up), every layout it lists is
    accepted by train.py, and every layout train.py accepts is listed."""
    args = plan.build_parser().parse_args(["--model=tiny", "--gpus=4", "--gpus_per_node=4",
                                           "--block_size=64", "--total_batch_size=2048",
                                           "--device=cpu", f"--implementation={implementation}"])
    model_cfg = model_config(args.model, args.block_size, 50257)
    listed = {(layout, mb) for layout, mb, _ in plan.candidates(args, model_cfg)}
    space = list(plan.search_space(args))
    accepted = {(layout, mb) for layout, mb in space if _accepted_by_train_py(args, layout, mb)}
    assert listed == accepted
    assert 0 < len(listed) < len(space)  # the rules do refuse some of the space
    assert any(layout.zero1 for layout, _ in listed) and any(layout.hsdp for layout, _ in listed)
    listed_cp = any(layout.cp > 1 for layout, _ in listed)
    assert listed_cp == (implementation == "custom")  # PyTorch's CP is refused on this CPU


@pytest.mark.parametrize("name", ["pp2-1f1b", "zero2"])
def test_predicted_state_and_traffic_are_measured(char_data, tmp_path, name):
    """--validate's check on 2 processes: every rank's state, activation and bus bytes per kind."""
    layout = LAYOUTS[name]
    measured = run_distributed(measure_run, layout.world, step_argv(layout, char_data, str(tmp_path)))
    rows = validate.compare(name, layout, measured)
    assert {r["what"] for r in rows} >= {"state", "activations", "all_reduce"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_a_simulated_64_rank_cluster_holds_and_sends_what_is_predicted(char_data):
    """--validate's simulated cluster: PP 2 x FSDP 8 x TP 4 (SP, loss parallel) of gpt2,
    the first rank of each stage played over the fake process group."""
    layout = Layout(pp=2, dp=8, tp=4, dp_type="fsdp", sequence_parallel=True, loss_parallel=True)
    rows = validate.compare("pp2xfsdp8xtp4", layout, simulate.simulate(layout, "gpt2", char_data))
    assert {r["rank"] for r in rows} == {0, 32}
    assert {r["what"] for r in rows} >= {"state", "activations", "all_gather", "reduce_scatter", "send"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
