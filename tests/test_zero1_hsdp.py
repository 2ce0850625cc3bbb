"""ZeRO-1 (optimizer state sharded) and HSDP (FSDP within replica groups), custom and
PyTorch: each against one process in float64 and against its native twin, composed with
TP, PP and CP; their state and traffic against the cost model; checkpoints across DDP,
ZeRO-1, FSDP and HSDP; the layouts refused."""
import pytest
import torch

from harness import assert_records_match, assert_resumes_across, run_distributed, tiny_run, trainer_records
from nanodist.run.config import TrainConfig, resolve
from nanodist.errors import UserError
from nanodist.run.trainer import Trainer
from nanodist_tools import validate
from nanodist_tools.layouts import LAYOUTS
from nanodist_tools.measure import measure_run, step_argv

ZERO1 = dict(data_parallel_type="zero1")
HSDP = dict(data_parallel_type="fsdp", data_parallel_replicas=2)


@pytest.mark.parametrize("world, implementation, layout", [
    (2, "custom", dict(data_parallel_size=2, **ZERO1)),
    (2, "pytorch", dict(data_parallel_size=2, **ZERO1)),
    (4, "custom", dict(data_parallel_size=4, **ZERO1)),
    (4, "pytorch", dict(data_parallel_size=4, **ZERO1)),
    (4, "custom", dict(data_parallel_size=4, **HSDP)),
    (4, "pytorch", dict(data_parallel_size=4, **HSDP)),
    (4, "custom", dict(data_parallel_size=2, tensor_parallel_size=2, sequence_parallel=True,
                       enable_loss_parallelism=True, **ZERO1)),
    (4, "custom", dict(data_parallel_size=2, pipeline_parallel_size=2, **ZERO1)),
    (4, "custom", dict(data_parallel_size=2, context_parallel_size=2, **ZERO1)),
    (4, "custom", dict(data_parallel_size=2, context_parallel_size=2, **HSDP)),
], ids=["zero1-2", "zero1-2-native", "zero1-4", "zero1-4-native", "hsdp2x2", "hsdp2x2-native",
        "zero1-2xtp2", "pp2xzero1-2", "cp2xzero1-2", "cp2xhsdp2"])
def test_matches_one_process(char_data, tmp_path, single, world, implementation, layout):
    """Float64 AdamW steps with clipping: the bound of harness.assert_records_match."""
    kwargs = tiny_run(char_data, tmp_path, implementation=implementation, deferred_init=True,
                      dtype="float64", **layout)
    for records in run_distributed(trainer_records, world, kwargs):
        assert_records_match(records, single, f"{layout} {implementation}")


def _losses_and_weights(kwargs):
    """Rank side: the per-step losses and the full weights after training."""
    trainer = Trainer(TrainConfig(**kwargs))
    losses = [r["loss"] for r in trainer.train()]
    params = trainer.params
    return losses, {name: t.clone() for name, t in params.full_tensors(params.param_list())}


@pytest.mark.parametrize("world, layout", [(2, dict(data_parallel_size=2, **ZERO1)),
                                           (4, dict(data_parallel_size=4, **HSDP))],
                         ids=["zero1", "hsdp"])
def test_custom_and_native_twins(char_data, tmp_path, world, layout):
    """fp32 without clipping, the same per-element arithmetic (gradients divided by N and
    summed, AdamW elementwise): ZeRO-1's losses and weights bitwise equal to DDP +
    ZeroRedundancyOptimizer's on 2 ranks (a sum of two commutes). HSDP sums over two
    groups, in another order than FSDP2: within the float64 bound of the harness instead."""
    runs = {}
    for impl in ("custom", "pytorch"):
        kwargs = tiny_run(char_data, tmp_path / impl, implementation=impl, **layout)
        if layout["data_parallel_type"] == "zero1":
            kwargs["gradient_clipping"] = False
            runs[impl] = run_distributed(_losses_and_weights, world, kwargs)[0]
        else:
            runs[impl] = run_distributed(trainer_records, world, {**kwargs, "dtype": "float64"})[0]
    if layout["data_parallel_type"] == "zero1":
        (losses, weights), (native_losses, native_weights) = runs["custom"], runs["pytorch"]
        assert losses == native_losses
        assert weights.keys() == native_weights.keys()
        assert all(torch.equal(weights[k], native_weights[k]) for k in weights)
    else:
        assert_records_match(runs["custom"], runs["pytorch"], "hsdp custom vs FSDP2")


@pytest.mark.parametrize("name", ["zero1-2", "hsdp2x2", "pp2xzero1-2"])
def test_state_and_traffic_are_the_cost_model_s(char_data, tmp_path, name):
    """Every rank's state bytes (ZeRO-1: (4 + 4 + 8/d) Psi; HSDP: 16 Psi / shards) and bus
    bytes per kind (ZeRO-1: reduce-scatter + all-gather; HSDP: intra-group reduce-scatter
    and all-gather, inter-group all-reduce of 1/shards) as the cost model predicts."""
    layout = LAYOUTS[name]
    measured = run_distributed(measure_run, layout.world, step_argv(layout, char_data, str(tmp_path)))
    rows = validate.compare(name, layout, measured)
    assert {"state", "all_gather", "reduce_scatter", "all_reduce"} <= {r["what"] for r in rows}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.parametrize("write, read", [
    ((2, ["--data_parallel_type", "zero1"]), (2, ["--data_parallel_type", "ddp"])),
    ((4, ["--data_parallel_type", "fsdp", "--data_parallel_replicas", "2"]),
     (2, ["--data_parallel_type", "zero1", "--implementation", "pytorch"])),
    ((2, ["--data_parallel_type", "zero1", "--implementation", "pytorch"]),
     (4, ["--data_parallel_type", "fsdp", "--data_parallel_replicas", "2", "--implementation", "pytorch"])),
    ((2, ["--data_parallel_type", "fsdp"]), (4, ["--data_parallel_type", "zero1"])),
], ids=["zero1-to-ddp", "hsdp-to-native-zero1", "native-zero1-to-native-hsdp", "fsdp-to-zero1"])
def test_a_checkpoint_resumes_across_zero1_fsdp_and_hsdp(write, read, char_data, tmp_path):
    assert_resumes_across(char_data, tmp_path, write, read)  # as test_checkpoint argues


@pytest.mark.parametrize("flags, world, message", [
    (dict(data_parallel_size=4, data_parallel_replicas=2), 4, "needs --data_parallel_type fsdp"),
    (dict(data_parallel_size=4, data_parallel_type="fsdp", data_parallel_replicas=3), 4, "must divide"),
    (dict(data_parallel_size=2, data_parallel_type="fsdp", data_parallel_replicas=2), 2, "that is DDP"),
    (dict(data_parallel_size=2, tensor_parallel_size=2, data_parallel_type="zero1",
          implementation="pytorch"), 4, "ZeroRedundancyOptimizer"),
    (dict(data_parallel_size=2, pipeline_parallel_size=2, data_parallel_type="zero1",
          implementation="pytorch"), 4, "ZeroRedundancyOptimizer"),
])
def test_layouts_that_cannot_run_are_refused(flags, world, message):
    with pytest.raises(UserError, match=message):
        resolve(TrainConfig(**flags), world, "cpu")
