"""Pipeline parallelism: the schedules as data (valid, deadlock-free, the textbook bubble),
and the trainer with PP = 2 and 4 (alone, x DDP, x TP, custom and PyTorch) against one
process on the same global batch; the tied embedding, deferred init, bad layouts."""
import pytest
import torch

from harness import (REPO, assert_records_match, assert_resumes_across, run_distributed, run_train,
                     tiny_run, trainer_records)
from nanodist.run.config import TrainConfig, resolve
from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.layout import Layout
from nanodist.parallel.pipeline import split_layers
from nanodist.parallel.schedules import SCHEDULES, one_f_one_b, simulate, timeline
from nanodist.planner.cost import bubble
from nanodist.planner.traffic import traffic_bytes
from nanodist.parallel.rules import check_layout


# ------------------------------------------------------------------ schedules as data

def _layouts():
    for P in range(2, 6):
        for M in range(1, 3 * P + 1):
            yield "gpipe", P, M, 1
            yield "1f1b", P, M, 1
            if M % P == 0:
                for V in (1, 2, 3):
                    yield "interleaved_1f1b", P, M, V


def test_every_schedule_is_valid():
    """Each rank runs F and B of every (micro-batch, chunk) exactly once, F before its B;
    the timeline exists (`simulate` raises on an action waiting for one that never comes)."""
    for name, P, M, V in _layouts():
        schedule = SCHEDULES[name](P, M, V)
        expected = sorted((kind, m, v) for kind in "BF" for m in range(M) for v in range(V))
        for rank, actions in enumerate(schedule):
            assert sorted(map(tuple, actions)) == expected, (name, P, M, V, rank)
            forward_at = {(a.micro, a.chunk): i for i, a in enumerate(actions) if a.kind == "F"}
            assert all(forward_at[a.micro, a.chunk] < i for i, a in enumerate(actions) if a.kind == "B")
        slots = simulate(schedule)
        assert [len(row) for row in slots] == [2 * M * V] * P
        assert all(len({t for t, _ in row}) == len(row) for row in slots)  # one action a slot


def test_bubble_and_memory_are_the_textbook_ones():
    """Unit-time F and B (a chunk's, 1/V of a stage's): idle fraction (P-1)/(M+P-1) for
    GPipe and 1F1B, (P-1)/(V M+P-1) interleaved (Narayanan et al. 2021; the cost model's
    `bubble`); micro-batches in
    flight on rank r: M for GPipe, min(P - r, M) for 1F1B (why 1F1B exists)."""
    for name, P, M, V in _layouts():
        slots = simulate(SCHEDULES[name](P, M, V))
        end = max(t for row in slots for t, _ in row) + 1
        idle = sum(end - len(row) for row in slots) / (P * end)
        layout = Layout(pp=P, pp_schedule=name, virtual_stages=V)
        assert idle == pytest.approx(bubble(layout, M)) == (P - 1) / (V * M + P - 1), (name, P, M, V)
        if name == "interleaved_1f1b":
            continue
        for rank, row in enumerate(slots):
            in_flight = peak = 0
            for _, a in row:
                in_flight += 1 if a.kind == "F" else -1
                peak = max(peak, in_flight)
            assert peak == (M if name == "gpipe" else min(P - rank, M)), (name, P, M, rank)


def test_timeline_prints_the_docstring_diagram():
    import nanodist.parallel.schedules as schedules
    for line in timeline(one_f_one_b(4, 4)).splitlines():
        assert line in schedules.__doc__


def test_split_layers_gives_earlier_stages_the_extra_block():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(r) for r in split_layers(12, 8)] == [2, 2, 2, 2, 1, 1, 1, 1]


# ------------------------------------------------------------------ bad layouts

@pytest.mark.parametrize("n_layer, P, V, M, schedule, implementation, match", [
    (4, 5, 1, 8, "1f1b", "custom", "larger than the model's n_layer"),
    (4, 2, 3, 8, "interleaved_1f1b", "custom", "2 x 3 = 6 chunks"),
    (4, 2, 2, 3, "interleaved_1f1b", "custom", "multiple of the 2 stages"),
    (4, 2, 2, 4, "1f1b", "custom", "needs --pipeline_schedule interleaved_1f1b"),
    (4, 2, 1, 4, "zero_bubble", "custom", "--implementation pytorch only"),
    (4, 4, 1, 2, "1f1b", "pytorch", "at least M = P = 4"),
])
def test_bad_pipeline_layouts_are_refused(n_layer, P, V, M, schedule, implementation, match):
    layout = Layout(pp=P, virtual_stages=V, pp_schedule=schedule, implementation=implementation)
    model = GPTConfig(block_size=32, vocab_size=128, n_layer=n_layer, n_head=4, n_embd=64)
    with pytest.raises(UserError, match=match):
        check_layout(layout, P, "cpu", 32, model=model, micro_steps=M)


def test_world_must_be_pp_x_dp_x_tp():
    with pytest.raises(UserError, match=r"= 8 processes, but 4 were launched"):
        resolve(TrainConfig(pipeline_parallel_size=2, tensor_parallel_size=2, data_parallel_size=2), 4, "cpu")
    cfg, layout, _ = resolve(TrainConfig(pipeline_parallel_size=2, tensor_parallel_size=2), 8, "cpu")
    assert cfg.data_parallel_size == layout.dp == 2
    with pytest.raises(UserError, match="pipelining x PyTorch's context parallel"):
        resolve(TrainConfig(pipeline_parallel_size=2, context_parallel_size=2, implementation="pytorch"),
                4, "cuda")


def test_bad_layout_ends_in_one_message_on_every_rank(char_data, tmp_path):
    """Interleaved with M = 3 micro-batches on 2 stages: every rank stops before any
    communication; torchrun exits 2 with one line (no hang: the test has a timeout)."""
    kwargs = {**tiny_run(char_data, tmp_path, pipeline_parallel_size=2, virtual_stages=2,
                         pipeline_schedule="interleaved_1f1b"), "total_batch_size": 192}
    result = run_train([f"--{k}={v}" for k, v in kwargs.items()], nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "multiple of the 2 stages" in errors[0], result.stderr[-2000:]
    # torchrun reports the failed workers in its own words; none of ours raised a traceback
    assert "nanodist/" not in result.stderr


# ------------------------------------------------------------------ against one process

# float64 (harness.assert_records_match): the bound after AdamW steps holds on any CPU
F64 = dict(dtype="float64")


CUSTOM_SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]


@pytest.mark.parametrize("schedule, V", CUSTOM_SCHEDULES)
def test_pp2_matches_one_process(char_data, tmp_path, single, schedule, V):
    kwargs = tiny_run(char_data, tmp_path, pipeline_parallel_size=2, pipeline_schedule=schedule,
                      virtual_stages=V, **F64)
    for records in run_distributed(trainer_records, 2, kwargs):
        assert_records_match(records, single, f"pp2 {schedule}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pp4_matches_one_process(char_data, tmp_path, single, schedule):
    kwargs = tiny_run(char_data, tmp_path, pipeline_parallel_size=4, pipeline_schedule=schedule, **F64)
    for records in run_distributed(trainer_records, 4, kwargs):
        assert_records_match(records, single, f"pp4 {schedule}")


@pytest.mark.parametrize("implementation, other", [
    ("custom", dict(data_parallel_size=2)),
    ("pytorch", dict(data_parallel_size=2)),                              # replicate
    ("custom", dict(data_parallel_size=2, data_parallel_type="fsdp", loss_chunks=3)),    # ZeRO-3 by hand
    ("pytorch", dict(data_parallel_size=2, data_parallel_type="fsdp", loss_chunks=3)),   # FSDP2
    ("custom", dict(tensor_parallel_size=2, sequence_parallel=True, enable_loss_parallelism=True,
                    loss_chunks=3)),
    ("custom", dict(context_parallel_size=2, activation_checkpointing="full")),  # + recompute
])
def test_pp2_x_dp_or_tp_matches_one_process(char_data, tmp_path, single, implementation, other):
    kwargs = tiny_run(char_data, tmp_path, pipeline_parallel_size=2, pipeline_schedule="1f1b",
                      implementation=implementation, deferred_init=True, **other, **F64)
    for records in run_distributed(trainer_records, 4, kwargs):
        assert_records_match(records, single, f"pp2 x {other} {implementation}")


@pytest.mark.parametrize("P, schedule, V, chunks", [(2, "gpipe", 1, 3), (2, "1f1b", 1, 1), (4, "1f1b", 1, 1),
                                                    (2, "interleaved_1f1b", 2, 1), (2, "zero_bubble", 2, 3)])
def test_native_pipeline_matches_one_process(char_data, tmp_path, single, P, schedule, V, chunks):
    """torch.distributed.pipelining on the same stage split (custom and native of one
    schedule then agree with each other through the one-process reference); the last
    stage's loss whole or in `chunks` (the targets reach it as a keyword every stage gets)."""
    kwargs = tiny_run(char_data, tmp_path, pipeline_parallel_size=P, pipeline_schedule=schedule,
                      virtual_stages=V, implementation="pytorch", loss_chunks=chunks, **F64)
    for records in run_distributed(trainer_records, P, kwargs):
        assert_records_match(records, single, f"native pp{P} {schedule}")


def _grads_and_tied(kwargs):
    """Rank side: deferred-init weights and the gradients of step 0 by GPT-2 name (full,
    before any optimizer step); then the tied weight of this rank after 3 steps."""
    from nanodist.run.trainer import Trainer
    trainer = Trainer(TrainConfig(**kwargs))
    params = trainer.params.param_list()
    weights = {name: t.detach().clone() for name, t in trainer.params.full_tensors(params)}
    batches = [trainer.data.train_batch(0, m) for m in range(trainer.micro_steps)]
    trainer.runner.forward_backward(batches, trainer.autocast)
    grads = {name: t.detach().clone() for name, t in trainer.params.full_tensors([p.grad for p in params])}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    split = getattr(trainer.runner, "split", None)  # one process: no pipeline
    tied = split.tied if split else None
    return weights, grads, None if tied is None else tied.detach().clone()


def test_pp_weights_gradients_and_tied_embedding(char_data, tmp_path):
    """Deferred init under PP=2 x TP=2 gives the one-process weights bitwise (invariant 1).
    The gradients of step 0 are the one-process ones within fp32 rounding (TP sums partial
    products in another order; the tied wte/lm_head adds its two stages' sums in one
    all-reduce). After 3 steps both copies of the tied weight are bitwise equal."""
    base = tiny_run(char_data, tmp_path / "one")
    weights_1, grads_1, _ = _grads_and_tied(base)
    kwargs = tiny_run(char_data, tmp_path / "pp", pipeline_parallel_size=2,
                      data_parallel_size=1, tensor_parallel_size=2, deferred_init=True)
    results = run_distributed(_grads_and_tied, 4, kwargs)
    for weights, grads, _ in results:
        assert weights.keys() == weights_1.keys()
        for name in weights_1:
            assert torch.equal(weights[name], weights_1[name]), name
            if name != "transformer.wte.weight":
                torch.testing.assert_close(grads[name], grads_1[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(grads["transformer.wte.weight"], grads_1["transformer.wte.weight"],
                                   rtol=1e-5, atol=1e-7)
    first, last = results[0][2], results[2][2]   # pp rank 0 / 1, tp rank 0
    assert first is not None and torch.equal(first, last)


def _first_loss_and_sends(kwargs):
    """Rank side: step 1's loss (before any update) and the bytes this rank sent to its
    pipeline neighbours (the custom pipeline's, counted by comm.py)."""
    from nanodist.run.config import TrainConfig
    from nanodist.run.trainer import Trainer
    trainer = Trainer(TrainConfig(**kwargs))
    with trainer.comm.counting() as sent:
        loss = trainer.train_step(0)["loss"]
    return loss, sent.bus_bytes.get("send", 0), trainer.mesh.pp.rank


@pytest.mark.parametrize("implementation", ["custom", "pytorch"])
def test_pp_x_fsdp_in_bf16_follows_fsdp(char_data, tmp_path, implementation):
    """FSDP's mixed precision gathers bf16 parameters, so the residual stream is bf16
    (its embeddings are); a pipeline boundary carries it as it is: step 1's loss is
    FSDP's without PP bitwise (the same ops on the same bf16 values), and the custom
    pipeline's sends are bf16 (traffic.py). Before, an fp32 boundary met bf16 LayerNorm
    weights on CPU (custom: an error) or was read as bf16 bytes (native: NaN)."""
    run = dict(dtype="bfloat16", data_parallel_size=2, data_parallel_type="fsdp",
               implementation=implementation)
    (reference, _, _), _ = run_distributed(_first_loss_and_sends, 2, tiny_run(char_data, tmp_path / "a", **run))
    results = run_distributed(_first_loss_and_sends, 4, tiny_run(char_data, tmp_path / "b", pipeline_parallel_size=2, **run))
    assert all(loss == reference for loss, _, _ in results)
    if implementation == "custom":
        cfg = GPTConfig(block_size=32, vocab_size=128, n_layer=4, n_head=4, n_embd=128)
        layout = Layout(pp=2, dp=2, dp_type="fsdp")
        for _, sent, pp_rank in results:
            bf16 = traffic_bytes(cfg, layout, 2, 2, "bfloat16", "cpu", pp_rank)["send"]
            assert sent == bf16 == traffic_bytes(cfg, layout, 2, 2, "float32", "cpu", pp_rank)["send"] / 2


# ------------------------------------------------------------------ checkpoints, 3D

@pytest.mark.parametrize("write, read", [
    ((2, ["--pipeline_parallel_size", "2"]), (1, [])),
    ((2, ["--pipeline_parallel_size", "2", "--pipeline_schedule", "interleaved_1f1b",
          "--virtual_stages", "2"]), (2, ["--tensor_parallel_size", "2"])),
    ((2, ["--pipeline_parallel_size", "2", "--implementation", "pytorch"]),
     (2, ["--data_parallel_size", "2"])),
    ((4, ["--pipeline_parallel_size", "2", "--data_parallel_size", "2"]),
     (4, ["--data_parallel_type", "fsdp"])),
    ((2, ["--data_parallel_type", "fsdp"]), (2, ["--pipeline_parallel_size", "2"])),
], ids=["pp2-to-1", "pp2v2-to-tp2", "native-pp2-to-ddp2", "pp2xdp2-to-fsdp4", "fsdp2-to-pp2"])
def test_a_pipeline_checkpoint_resumes_in_another_layout(write, read, char_data, tmp_path):
    """The layout-free format across PP: the stages hand every GPT-2 name on in one order."""
    # another reduction order from the same bits, in float64 (as test_checkpoint)
    assert_resumes_across(char_data, tmp_path, write, read)


def test_3d_pp_dp_tp_matches_one_process(char_data, tmp_path, single):
    """PP x DP x TP = 2 x 2 x 2 on 8 processes (mesh order pp, dp, tp), the custom FSDP."""
    kwargs = tiny_run(char_data, tmp_path, pipeline_parallel_size=2, data_parallel_size=2,
                      data_parallel_type="fsdp", tensor_parallel_size=2, sequence_parallel=True, deferred_init=True, **F64)
    for records in run_distributed(trainer_records, 8, kwargs, timeout=400):
        assert_records_match(records, single, "pp2 x dp2 x tp2")


# ------------------------------------------------------------------ what bench/pp.py measures

def _bench_measure(schedule):
    """Rank side: bench/pp.py's measurement of one schedule, P = 2, M = 4 (tiny model)."""
    import sys
    from types import SimpleNamespace
    sys.path.insert(0, str(REPO / "bench"))
    from pp import measure
    from nanodist.parallel.mesh import build_mesh
    args = SimpleNamespace(model="tiny", n_layer=4, block_size=32, batch_size=2, vocab_size=128,
                           warmup=0, steps=1)
    got = measure(args, build_mesh(Layout(pp=2), torch.device("cpu")), schedule, 1, 4)
    return got["sent"], got["sent_analytic"], got["in_flight"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_sends_and_micro_batches_in_flight_are_the_analytic_ones(schedule):
    """p2p bytes counted by comm.py = the cost model's (traffic.py), exactly; the peak of bytes
    saved for backward is M micro-batches' (GPipe) or min(P - r, M) (1F1B): measured as a
    multiple of one micro-batch's, up to the few scalars (the loss) a step adds."""
    for rank, (sent, analytic, in_flight) in enumerate(run_distributed(_bench_measure, 2, schedule)):
        assert sent == analytic > 0
        assert round(in_flight) == (4 if schedule == "gpipe" else min(2 - rank, 4)), in_flight
