"""One entry point for every layout: `parallelize(model, setup) -> Parallelized`.

The steps are data, applied in one fixed order for both implementations, each only
where the layout asks for it:

    0. pipeline split    (PP)   the model cut into chunks; each chunk is a model of its own
                                and goes through steps 1-7 (pipeline.py)
    1. tensor parallel   (TP)   the plan, by hand or DTensor: first, while parameters have
                                their GPT-2 shapes (TP shards them from the full values)
    2. context parallel  (CP)   ring attention in each block, the loss on local tokens
    2b. expert parallel  (EP)   each MoE layer keeps its experts' shard, tokens all-to-all
    3. activation checkpointing
    4. compile                  each block, lazily (torchtitan's place: before FSDP; FSDP2's
                                hooks stay outside the compiled blocks)
    5. FSDP                     shards (meta units one at a time), over DP x CP
    6. materialize              what is still on the meta device gets its initial values
    7. DDP or ZeRO-1            last: they broadcast and bucket real tensors

Each step takes the `ModelPart` the previous one left and returns a new one (frozen: what a
step changes is in what it returns). The result is what the trainer asks of a layout: a
step runner (runner.py: the micro-steps of one global batch, or a pipeline schedule) and
the parameters as the layout holds them (params.py: optimizer, clipping, checkpoints).
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from nanodist.model.moe import moe_layers
from nanodist.parallel.activation_checkpoint import apply_ac
from nanodist.parallel.context_parallel import apply_cp
from nanodist.parallel.ddp import apply_ddp
from nanodist.parallel.expert_parallel import apply_ep
from nanodist.parallel.fsdp import apply_fsdp
from nanodist.parallel.init import materialize
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh
from nanodist.parallel.params import ModuleParams, Params, PipelineParams
from nanodist.parallel.pipeline import PipelineRunner, split_into_stages
from nanodist.parallel.runner import MicroSteps
from nanodist.parallel.tensor_parallel import apply_tp
from nanodist.parallel.zero1 import apply_zero1


@dataclass(frozen=True)
class Setup:
    """What the steps read: the mesh (and its layout), the seed of the initial values, the
    compute dtype (bfloat16 mixed precision; None: the parameters'), and for a pipeline the
    micro-batch shape (batch_size, block_size) and the micro-steps per optimizer step."""
    mesh: Mesh
    seed: int
    compute_dtype: torch.dtype | None = None
    micro_batch: tuple[int, int] | None = None
    micro_steps: int = 1

    @property
    def layout(self) -> Layout:
        return self.mesh.layout


@dataclass(frozen=True)
class ModelPart:
    """One model, or one pipeline chunk, as the steps leave it."""
    gpt: nn.Module                      # the GPT (chunk): GPT-2 names, never wrapped
    module: nn.Module                   # what runs it: loss = module(x, targets=y) (DDP may wrap gpt)
    params: Params                      # how its parameters are held
    loss_context: Callable = nullcontext  # wraps forward + backward (DTensor's loss_parallel)
    no_sync: Callable = nullcontext     # wraps the micro-steps that must not reduce gradients


def apply_compile(part: ModelPart, setup: Setup) -> ModelPart:
    """Block by block, as torchtitan: FSDP2 and DTensor compose with it."""
    for block in part.gpt.transformer.h:
        if not isinstance(block, nn.Identity):  # a block another pipeline stage holds
            block.compile()
    return part


def apply_materialize(part: ModelPart, setup: Setup) -> ModelPart:
    materialize(part.gpt, part.gpt, setup.seed, setup.mesh.device)
    return part


STEPS = (  # (name, whether the layout has it, step), in the order above
    ("tensor parallel", lambda layout: layout.tp > 1, apply_tp),
    ("context parallel", lambda layout: layout.cp > 1, apply_cp),
    ("expert parallel", lambda layout: layout.ep > 1, apply_ep),
    ("activation checkpointing", lambda layout: layout.checkpointing != "none", apply_ac),
    ("compile", lambda layout: layout.compile, apply_compile),
    ("FSDP", lambda layout: layout.fsdp, apply_fsdp),
    ("materialize", lambda layout: True, apply_materialize),
    ("DDP", lambda layout: layout.ddp, apply_ddp),
    ("ZeRO-1", lambda layout: layout.zero1, apply_zero1),
)


def parallelize_part(model: nn.Module, setup: Setup) -> ModelPart:
    """Steps 1-7 on one model (or pipeline chunk)."""
    part = ModelPart(model, model, ModuleParams(model, setup.mesh))
    model.head_loss.chunks = setup.layout.loss_chunks  # loss parallelism keeps it
    for moe in moe_layers(model):  # the loss is a mean over the micro-steps: so is aux
        moe.aux_loss_weight = model.config.moe_aux_loss_coef / setup.micro_steps
    for _, applies, step in STEPS:
        if applies(setup.layout):
            part = step(part, setup)
    return part


@dataclass(frozen=True)
class Parallelized:
    """A model laid out: how to run a global batch, and how its parameters are held."""
    runner: MicroSteps | PipelineRunner
    params: Params
    parts: list[ModelPart]              # this rank's: one, or its pipeline stages


def parallelize(model: nn.Module, setup: Setup) -> Parallelized:
    layout = setup.layout
    if layout.pp == 1:
        part = parallelize_part(model, setup)
        return Parallelized(MicroSteps(part), part.params, [part])
    stages, split = split_into_stages(model, setup, parallelize_part)
    if layout.implementation == "pytorch":
        # imported when used: torch.distributed.pipelining makes tensors at import, which c10
        # would warn about at exit once metrics.StepMemory counts CPU bytes
        from nanodist.parallel.pipeline_native import NativePipelineRunner
        runner = NativePipelineRunner(stages, split, layout.pp_schedule, setup.micro_steps,
                                      setup.micro_batch)
    else:
        runner = PipelineRunner(stages, split)
    return Parallelized(runner, PipelineParams(stages, split), stages)

