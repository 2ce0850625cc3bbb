"""The layout planner: the cost model's pipeline terms against the real stage split and
the schedules (its bubble: tests/test_pipeline.py), the command line (ranking, JSON, plot,
runnable command, bad inputs), a fast subset of --validate (predicted = measured per rank
on real processes), the published numbers it must reproduce (ZeRO, Megatron, Korthikanti,
PTD-P), and the measured peak memory against its predicted band."""
import functools
import json
import math
import random
import re

import pytest
import torch

from harness import run_distributed
from nanodist.planner import plan, search
from nanodist.run.config import TrainConfig, build_parser, fit, parse_args, resolve
from nanodist.planner.cost import (activation_bytes, activations_in_flight, bubble, chunks, param_counts,
                           schedule, stage_params, state_bytes, zero_state_bytes)
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, GPTConfig, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.rules import check_layout
from nanodist.parallel.pipeline import stage_model
from nanodist.parallel.schedules import SCHEDULES, simulate as simulate_schedule
from nanodist.planner.traffic import fsdp_gathers
from nanodist_tools import planner, simulate, validate
from nanodist_tools.layouts import LAYOUTS
from nanodist_tools.measure import measure_run, step_argv
from nanodist_tools.processes import on_processes

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
    code = planner.main(["--model=gpt2", "--micro_batch_size=4", *argv])
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
    times = [r["step_time_s"] for r in rows if r["fits"]]  # ties (within plan.TIE) first, by the tie rule
    tied = sum(t <= (1 + plan.TIE) * min(times) for t in times)
    assert max(times[:tied]) <= (1 + plan.TIE) * min(times) and times[tied:] == sorted(times[tied:])
    for r in rows[:: max(len(rows) // 20, 1)]:  # the command is one train.py accepts
        argv = r["command"].split(" train.py ")[1].split()
        _, layout, _ = resolve(parse_args(argv), 8, "cuda")
        assert (layout.dp, layout.tp, layout.pp, layout.cp) == (r["dp"], r["tp"], r["pp"], r["cp"])
        assert r["memory_gib"] == pytest.approx(r["state_gib"] + r["activation_gib"] + r["buffer_gib"]
                                                + r["transient_gib"])


def test_table_plot_and_multi_node_command(capsys, tmp_path):
    code, out, _ = _plan(capsys, "--gpus=16", "--top=3", f"--plot={tmp_path / 'layouts.png'}")
    assert code == 0
    assert len([line for line in out.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]) == 3
    assert "torchrun --nnodes=2 --nproc_per_node=8" in out.splitlines()[-2]
    assert (tmp_path / "layouts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,says", [
    (["--gpu=v100"], "invalid choice"),
    (["--gpus=12", "--gpus_per_node=8"], "whole nodes"),
    (["--model=gpt9"], "invalid choice"),
    (["--total_batch_size=1000"], "no layout"),
    (["--model=gpt2-xl", "--gpus=1", "--gpu_memory_gib=4"], "no layout fits"),
    (["--compute_efficiency=1.5"], "--compute_efficiency must be in (0, 1]"),
    (["--n_layer=-1"], "--n_layer must be >= 0"),
    (["--profile=/nonexistent.json"], "not a machine profile"),
])
def test_bad_inputs_are_one_line(capsys, argv, says):
    code, out, err = _plan(capsys, *argv)
    assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1


def _launched(command: str) -> tuple[int, list[str]]:
    """(processes, train.py's argv) of a planner command: `python train.py ...` one,
    `torchrun [--nnodes=K] --nproc_per_node=N ... train.py ...` N (x K); a multi-node
    command's trailing "(on each node)" is prose for its reader."""
    launch, _, flags = command.removesuffix(" (on each node)").partition(" train.py ")
    nodes, per_node = re.search(r"--nnodes=(\d+)", launch), re.search(r"--nproc_per_node=(\d+)", launch)
    assert launch == "python" or (launch.startswith("torchrun ") and per_node), command
    return (int(per_node[1]) * (int(nodes[1]) if nodes else 1) if per_node else 1), flags.split()


@functools.cache
def _train_py_parser():
    return build_parser()


def _train_py_says(job: plan.Job, layout: Layout, micro_batch: int):
    """What train.py says of the planner's command for `layout` (its flags through train.py's
    parser, on as many processes as it launches, of job.device): its own path from the
    flags, `resolve`, then `fit` once the data's vocabulary is known. None if it refuses,
    else (its layout, micro-steps); the model it builds must be the job's."""
    world, argv = _launched(plan.command(job, layout, micro_batch))
    assert world == job.ranks
    cfg = TrainConfig(**vars(_train_py_parser().parse_args(argv)))  # parse_args, its parser built once
    try:
        cfg, resolved, micro_steps = resolve(cfg, world, job.device)
        model = fit(cfg, resolved, micro_steps, job.model.vocab_size, job.device)  # (padded: pads to itself)
    except UserError:
        return None
    assert model == job.model  # the command carries the job's model
    return resolved, micro_steps


def _accepted_by_train_py(job: plan.Job, layout: Layout, micro_batch: int) -> bool:
    said = _train_py_says(job, layout, micro_batch)
    if said:
        assert said[0] == layout  # the flags carry the whole layout
    return said is not None


@pytest.mark.parametrize("implementation", ["custom", "pytorch"])
def test_the_planner_lists_exactly_what_train_py_accepts_on_cpu(implementation):
    """Over the planner's whole search space for 4 CPU processes (both implementations:
    PyTorch's CP is CUDA only, native PP x TP is not wired up), every layout it lists is
    accepted by train.py, and every layout train.py accepts is listed."""
    job = plan.Job("tiny", model_config("tiny", 64, 50257), 4, 4, 2048, "float32", "cpu", implementation)
    listed = {(layout, mb) for layout, mb, _ in search.candidates(job)}
    space = list(search.search_space(job))
    accepted = {(layout, mb) for layout, mb in space if _accepted_by_train_py(job, layout, mb)}
    assert listed == accepted
    assert 0 < len(listed) < len(space)  # the rules do refuse some of the space
    assert any(layout.zero1 for layout, _ in listed) and any(layout.hsdp for layout, _ in listed)
    listed_cp = any(layout.cp > 1 for layout, _ in listed)
    assert listed_cp == (implementation == "custom")  # PyTorch's CP is refused on this CPU


WORLDS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)  # non-powers of two: TP 3 does not divide 64-padded vocabularies
JOBS, SAMPLE = 32, 24  # random jobs; listed layouts, and refused ones, asked of train.py per job


def _random_job(rng: random.Random) -> plan.Job:
    """A job of any world, device, implementation, preset, vocabulary, block size and
    total batch (divisible or not), sometimes a mixture of experts, dropout or
    torch.compile, its micro-batch searched or given (plan.command carries the model's
    preset, block size, experts and dropout)."""
    world = rng.choice(WORLDS)
    preset = rng.choice(["tiny", "tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    T = rng.choice([16, 24, 32, 64, 96, 128, 1024])  # 24, 96: not every CP / SP split divides them
    n_layer = model_config(preset, T, 64).n_layer
    moe = {}
    if rng.random() < 0.4:
        E = rng.choice([2, 3, 4, 6, 8])
        moe = dict(moe_experts=E, moe_top_k=rng.randint(1, min(E, 2)), moe_every=rng.randint(1, min(n_layer, 3)))
    dropout = rng.choice([0.0, 0.0, 0.0, 0.1])
    model = model_config(preset, T, rng.choice([65, 50257, 1000, 7]), dropout, **moe)
    sequences = rng.choice([world * rng.choice([1, 2, 3, 4, 8, 16]), rng.randint(1, 96), 2 ** rng.randint(0, 7)])
    total = T * sequences if rng.random() < 0.85 else rng.randint(1, 10**6)  # not even a multiple of T
    micro_batch = rng.choice([None, 1, 2, 3, 4]) if world <= 8 else rng.choice([1, 2, 4])  # keep the space small
    per_node = rng.choice([world] + [n for n in (2, 4, 8) if n < world and world % n == 0])
    return plan.Job(preset, model, world, per_node, total, rng.choice(["float32", "bfloat16"]),
                    rng.choice(["cpu", "cuda"]), rng.choice(["custom", "pytorch"]), micro_batch,
                    compile=rng.random() < 0.15)


def test_the_planner_lists_only_what_train_py_accepts_for_random_jobs():
    """Property test over random jobs (fixed seeds): every layout the planner lists passes
    check_layout, and its command, read by train.py's parser on the processes it launches,
    is accepted by train.py's config path (resolve, fit) as that very layout, micro-steps
    and model; a sample of the layouts of its search space it leaves out train.py refuses
    (so whenever train.py accepts some layout of the space, the planner lists something)."""
    jobs_listing, refused_asked, seen = 0, 0, set()
    for seed in range(JOBS):
        rng = random.Random(seed)
        job = _random_job(rng)
        what = f"seed {seed}: {job}"
        listed = [(layout, mb, M) for layout, mb, M in search.candidates(job)]
        keys = {(layout, mb) for layout, mb, _ in listed}
        assert len(keys) == len(listed), what  # each layout once
        for layout, mb, M in rng.sample(listed, min(SAMPLE, len(listed))):
            check_layout(layout, job.ranks, job.device, job.block_size, job.model.dropout, job.model, M)
            assert _train_py_says(job, layout, mb) == (layout, M), f"{what}: {layout}, mb {mb}"
            seen |= {axis for axis in ("pp", "cp", "tp", "ep") if getattr(layout, axis) > 1}
            seen |= {kind for kind in ("zero1", "hsdp", "sequence_parallel") if getattr(layout, kind)}
            seen |= {(job.device, job.implementation), "multi-node" if job.ranks_per_node < job.ranks else ""}
        left_out = [(layout, mb) for layout, mb in search.search_space(job) if (layout, mb) not in keys]
        for layout, mb in rng.sample(left_out, min(SAMPLE, len(left_out))):
            assert _train_py_says(job, layout, mb) is None, f"{what}: accepts {layout}, mb {mb}"
        jobs_listing += bool(listed)
        refused_asked += min(SAMPLE, len(left_out))
    assert JOBS // 2 <= jobs_listing < JOBS and refused_asked > 10 * SAMPLE  # neither side is vacuous
    assert seen >= {"pp", "cp", "tp", "ep", "zero1", "hsdp", "sequence_parallel", "multi-node",
                    ("cpu", "custom"), ("cpu", "pytorch"), ("cuda", "custom"), ("cuda", "pytorch")}


def _one_step(argv: list[str]):
    """Rank side (or one process): train.py's Trainer of `argv` (its parse_args), one
    optimizer step; (its layout, micro-steps, losses)."""
    from nanodist.run.trainer import Trainer
    trainer = Trainer(parse_args(argv))
    return trainer.layout, trainer.micro_steps, [r["loss"] for r in trainer.train()]


@pytest.mark.parametrize("world, implementation, moe, seed", [
    (1, "custom", {}, 0), (2, "pytorch", {}, 1), (4, "custom", {}, 2),
    (4, "custom", dict(moe_experts=4, moe_top_k=2, moe_every=2), 3)], ids=["1", "2-pytorch", "4", "4-moe"])
def test_a_sample_of_the_listed_commands_trains(char_data, tmp_path, world, implementation, moe, seed):
    """A layout drawn from the planner's list for the tiny model on char-level data (1, 2,
    4 CPU processes; on 4 one of several axes, and one of a mixture of experts split
    over ranks): its command, with the run's own flags added as train.py's memory check
    adds them, trains one step as that layout."""
    job = plan.Job("tiny", model_config("tiny", 32, 65, **moe), world, world, 32 * 8 * world, "float32", "cpu",
                   implementation)
    listed = [(layout, mb, M) for layout, mb, M in search.candidates(job) if (layout.ep > 1 if moe else world < 4 or
              sum(n > 1 for n in (layout.pp, layout.dp, layout.cp, layout.tp)) >= 2)]
    layout, mb, M = random.Random(seed).choice(listed)
    run = ("--device=cpu", "--dataset=shakespeare_char", f"--data_dir={char_data}", f"--out_dir={tmp_path}",
           "--max_steps=1", "--eval_iters=1", "--checkpoint_interval=-1")
    procs, argv = _launched(plan.command(job, layout, mb, run))
    ranks = run_distributed(_one_step, procs, argv) if procs > 1 else [_one_step(argv)]
    for trained, micro_steps, losses in ranks:
        assert (trained, micro_steps) == (layout, M) and len(losses) == 1 and math.isfinite(losses[0]), argv


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


# ------------------------------------------------------------------ published numbers

@pytest.mark.parametrize("stage, paper_gb, printed", [(0, 120, 1), (1, 31.4, 0.1), (2, 16.6, 0.1),
                                                      (3, 1.88, 0.01)])
def test_zero_paper_model_state(stage, paper_gb, printed):
    """Rajbhandari et al. 2020, Figure 1: Psi = 7.5B parameters, Nd = 64, mixed-precision
    Adam (2 bytes of fp16 parameter + 2 of gradient + K = 12 of fp32 master copy and
    moments): 120 / 31.4 / 16.6 / 1.88 GB for DDP / P_os / P_os+g / P_os+g+p. Equal up to
    the paper's rounding (half its last printed digit)."""
    got = zero_state_bytes(7.5e9, 64, stage, param_bytes=2, grad_bytes=2, optimizer_bytes=12)["total"]
    assert abs(got / 1e9 - paper_gb) <= printed / 2


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_megatron_distributed_optimizer_bytes_per_parameter(d):
    """Megatron-LM's distributed optimizer table (docs/source/api-guide/dist_optimizer.md):
    fp32 parameters and gradients 16 bytes plain, 8 + 8/d distributed; bf16 parameters with
    fp32 gradients (and an fp32 master copy) 18, 6 + 12/d. This project's ZeRO-1 is the
    first row (cost.state_bytes: the same function at fp32)."""
    assert zero_state_bytes(1, d, 0)["total"] == 16
    assert zero_state_bytes(1, d, 1)["total"] == 8 + 8 / d
    assert zero_state_bytes(1, d, 0, 2, 4, 12)["total"] == 18
    assert zero_state_bytes(1, d, 1, 2, 4, 12)["total"] == 6 + 12 / d
    layout = Layout(dp=d, dp_type="zero1")
    assert state_bytes(CFG, layout)["total"] == zero_state_bytes(param_counts(CFG)["total"], d, 1)["total"]


def _one_layer(cfg: GPTConfig, layout: Layout, compute_bytes: int) -> float:
    return activation_bytes(cfg, layout, 1, "none", None, range(1), False, False, compute_bytes)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_korthikanti_activation_memory_per_layer(tp):
    """Korthikanti et al. 2022, Table 2, 2-byte activations per layer: s b h (34 + 5 a s/h)
    without parallelism, 34 s b h / t with TP + SP + selective recomputation (the a s^2
    attention matrices recomputed, as SDPA does). This model keeps, by its own count
    (cost.activation_bytes): no dropout masks (2 s b h, and a s^2 b for the softmax's); no
    a s^2 matrices (SDPA: 4 a s^2 b) but SDPA's fp32 logsumexp (4 a s b); LayerNorm inputs
    in fp32 (2 s b h more than 2-byte ones: + 4 s b h / t) and their statistics (16 s b /
    t); under SP the column-parallel layers' gathered inputs (2 x 2 s b h, not / t); and
    autocast's 2-byte casts of the fp32 weights (2 x 12 h^2 / t; Megatron keeps bf16 ones)."""
    cfg = GPTConfig(block_size=64, vocab_size=128, n_layer=1, n_head=4, n_embd=32)
    s, b, h, a = cfg.block_size, 1, cfg.n_embd, cfg.n_head
    sbh = s * b * h
    plain = sbh * (34 + 5 * a * s / h)
    casts = 2 * 12 * h * h
    assert _one_layer(cfg, Layout(), 2) == plain - (2 * sbh + a * s * s * b) - 4 * a * s * s * b \
        + 4 * a * s * b + 4 * sbh + 16 * s * b + casts
    layout = Layout(tp=tp, sequence_parallel=tp > 1)
    korthikanti = 34 * sbh / tp  # TP + SP + selective
    assert _one_layer(cfg, layout, 2) == pytest.approx(
        korthikanti - 2 * sbh / tp + 4 * a * s * b / tp + 4 * sbh / tp + 16 * s * b / tp
        - 4 * sbh / tp + 4 * sbh + casts / tp, rel=1e-12)


@pytest.mark.parametrize("schedule, P, M, V", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 16, 1),
                                               ("interleaved_1f1b", 4, 8, 2), ("interleaved_1f1b", 4, 8, 4)])
def test_ptd_p_pipeline_bubble(schedule, P, M, V):
    """Narayanan et al. 2021 (PTD-P): bubble time / ideal time = (p - 1) / m, interleaved
    (p - 1) / (v m). The cost model's bubble is the idle fraction f of a step, f / (1 - f)
    in their terms; both from the simulated schedule itself (unit-time actions)."""
    slots = simulate_schedule(SCHEDULES[schedule](P, M, V))
    end = max(t for row in slots for t, _ in row) + 1
    idle = sum(end - len(row) for row in slots) / (P * end)
    f = bubble(Layout(pp=P, pp_schedule=schedule, virtual_stages=V), M)
    assert idle == pytest.approx(f, rel=1e-12)
    assert f / (1 - f) == pytest.approx((P - 1) / (V * M), rel=1e-12)


# ------------------------------------------------------------------ memory: predicted vs measured

# One of each term of plan.memory: ZeRO-1's bucket copy, a pipeline's in-flight micro-batches,
# autocast's weight casts, FSDP's gathered units in bf16 (the characters' vocabulary: the
# blocks dominate); the loss's copies of the logits and TP+SP's gathered inputs with GPT-2's,
# and the chunked loss's one chunk (fp32; bf16 with its recast head, vocab-parallel).
MEMORY_CASES = [("float32", "zero1-2", "char"), ("float32", "pp2-1f1b", "char"),
                ("bfloat16", "ddp2", "char"), ("bfloat16", "zero2", "char"),
                ("float32", "ddp2", "bpe"), ("float32", "tp2-sp-lp", "bpe"),
                ("float32", "ddp2-chunks", "bpe"), ("bfloat16", "tp2-sp-lp-chunks", "bpe")]


@pytest.mark.parametrize("dtype, name, data", MEMORY_CASES)
def test_measured_peak_is_in_the_predicted_band(request, tmp_path, dtype, name, data):
    """The step's peak of live tensors (what train.py logs, metrics.StepMemory) lies
    between what plan.memory says lives through the step and that plus its largest
    transient, within MEMORY_MARGIN (autograd's and the kernels' small tensors, which the
    tiny model makes largest relative to the rest): what train.py's check relies on.
    Fresh processes: the allocator's total counts every tensor of the process. (All 19
    validated layouts: --validate.)"""
    layout = LAYOUTS[name]
    dataset = {"char": "shakespeare_char", "bpe": "shakespeare"}[data]
    argv = step_argv(layout, request.getfixturevalue(f"{data}_data"), str(tmp_path), block_size=64,
                     micro_batch=4) + [f"--dtype={dtype}", f"--dataset={dataset}"]
    for m in on_processes(layout.world, measure_run, argv, 0, True):
        band = plan.memory(validate.job_of(layout, m, dtype), layout, m["micro_batch"], m["micro_steps"],
                           m["pp_rank"])
        assert plan.within_margin(m["peak"], band), (m["peak"], band)


def _calibrated_collectives(payloads: list[int]):
    """Rank side: calibrate's collective timings for `payloads`, and the warnings on the way."""
    import warnings
    from nanodist_tools import calibrate
    kept, calibrate.PAYLOADS = calibrate.PAYLOADS, payloads
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = calibrate._collective_rank(2)
    finally:
        calibrate.PAYLOADS = kept
    return table, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_calibration_times_the_strategies_own_calls_without_warnings():
    """--calibrate once printed torch's FutureWarnings (reduce_scatter_tensor is deprecated):
    it times the collectives through comm.py's Group, as the strategies call them."""
    for table, caught in run_distributed(_calibrated_collectives, 2, [4, 4096]):
        assert caught == []
        assert {kind: [size for size, _ in rows] for kind, rows in table.items()} == \
            {kind: [8, 4096] for kind in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send")}
        assert all(seconds > 0 for rows in table.values() for _, seconds in rows)
