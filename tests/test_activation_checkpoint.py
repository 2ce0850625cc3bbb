"""Activation checkpointing (full, every K-th block, selective) changes memory, never
the numbers: gradients and trained trajectories bitwise equal to no checkpointing (the
recompute is the same arithmetic on the same values), on one process and under every
layout on 2 ranks; the bytes kept for backward are those the cost model predicts
(nanodist/planner/cost.py)."""

import pytest
import torch

from harness import assert_records_match, run_distributed, tiny_run, trainer_records
from nanodist.run.config import TrainConfig, resolve
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, GPTConfig
from nanodist.model.loss import cross_entropy
from nanodist.parallel.activation_checkpoint import apply_activation_checkpointing
from nanodist.parallel.layout import Layout
from nanodist.planner.cost import activation_bytes
from nanodist_tools.measure import saved_activations


MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=3, n_head=4, n_embd=64)
POLICIES = [("full", 1), ("full", 2), ("selective", 1)]


def _forward_backward(policy, every):
    model = GPT(MODEL, seed=0)
    if policy != "none":
        apply_activation_checkpointing(model, policy, every)
    idx, targets = torch.randint(0, MODEL.vocab_size, (2, 2, MODEL.block_size),
                                 generator=torch.Generator().manual_seed(0))
    with saved_activations(model.parameters()) as kept:
        loss = cross_entropy(model(idx), targets)
    kept.pop(loss.untyped_storage().data_ptr())  # the caller's own result
    loss.backward()
    return loss, dict(model.named_parameters()), sum(kept.values())


@pytest.mark.parametrize("policy,every", POLICIES)
def test_gradients_bitwise_and_bytes_as_analytic(policy, every):
    loss_ref, params_ref, kept_ref = _forward_backward("none", 1)
    loss, params, kept = _forward_backward(policy, every)
    assert list(params) == list(params_ref)  # GPT-2 names kept
    assert torch.equal(loss, loss_ref)
    for name, p in params.items():
        assert torch.equal(p.grad, params_ref[name].grad), name
    assert kept_ref == activation_bytes(MODEL, Layout(), 2)
    assert kept == activation_bytes(MODEL, Layout(), 2, policy, every)
    assert kept < kept_ref


def _layouts():
    return [dict(data_parallel_size=2, implementation=impl, data_parallel_type=dp_type)
            for impl in ("custom", "pytorch") for dp_type in ("ddp", "fsdp")] + \
           [dict(tensor_parallel_size=2, sequence_parallel=True, implementation=impl)
            for impl in ("custom", "pytorch")]


@pytest.mark.parametrize("layout, policy", [(layout, POLICIES[1 + i % 2]) for i, layout in enumerate(_layouts())],
                         ids=lambda v: "-".join(map(str, v.values() if isinstance(v, dict) else v)))
def test_every_layout_trains_bitwise_as_without(char_data, tmp_path, layout, policy):
    """3 AdamW steps on 2 ranks: loss and gradient norm of every step bitwise equal with
    and without checkpointing (FSDP: the recompute runs while the unit is gathered). The
    layouts take the two policies in turn (every 2nd block full, selective)."""
    runs = [run_distributed(trainer_records, 2, tiny_run(char_data, tmp_path / f"{name}{every}",
                                                         activation_checkpointing=name, ac_every=every,
                                                         **layout))
            for name, every in (("none", 1), policy)]
    assert runs[1] == runs[0]


def test_compiled_checkpointed_blocks_train_like_eager(char_data, tmp_path):
    """--compile traces the checkpointed blocks: the eager run's arithmetic fused in another
    order; in float64 the bound of harness.assert_records_match holds on any CPU."""
    eager = trainer_records(tiny_run(char_data, tmp_path / "eager", dtype="float64"))
    compiled = trainer_records(tiny_run(char_data, tmp_path / "compiled", compile=True,
                                        activation_checkpointing="full", dtype="float64"))
    assert_records_match(compiled, eager, "compiled + checkpointed")


def test_bad_flags():
    with pytest.raises(UserError, match="activation_checkpointing 'some'"):
        resolve(TrainConfig(activation_checkpointing="some"), 1, "cpu")
    with pytest.raises(UserError, match="ac_every"):
        resolve(TrainConfig(ac_every=0), 1, "cpu")
