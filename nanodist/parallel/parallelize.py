"""One entry point for every layout: `parallelize(model, cfg, mesh) -> Parallel`.

Order is fixed for both implementations (torchtitan's): the pipeline split first (each
stage is then a model of its own), then per stage tensor parallel, context parallel,
activation checkpointing, FSDP over the DP (x CP) ranks, materialise what is still on
the meta device, compile, DDP. Each strategy edits the `Parallel` it is given: the
trainer only talks to that.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from nanodist.config import TrainConfig
from nanodist.model import cross_entropy
from nanodist.parallel.activation_checkpoint import apply_activation_checkpointing
from nanodist.parallel.clip import clip_grad_norm_
from nanodist.parallel.context_parallel import apply_cp
from nanodist.parallel.ddp import apply_ddp
from nanodist.parallel.fsdp import apply_fsdp
from nanodist.parallel.init import materialize
from nanodist.parallel.mesh import Mesh
from nanodist.parallel import tensor_parallel
from nanodist.parallel.tensor_parallel import apply_tp


def split_by_weight_decay(named_params):
    """GPT-2 recipe: decay matrices and embeddings (>= 2-D), not biases and norms."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return decay, no_decay


@dataclass
class Parallel:
    """What the trainer asks of a layout. The defaults are those of one process."""
    model: nn.Module                          # what the trainer calls: logits = model(idx)
    mesh: Mesh
    loss_fn: Callable = cross_entropy         # (logits, targets) -> mean loss
    loss_context: Callable = nullcontext      # wraps forward + backward (DTensor loss_parallel)
    no_sync: Callable = nullcontext           # wraps micro-steps that must not reduce grads
    sharded_over: dict = field(default_factory=dict)  # plain param -> groups it is sharded across
    tp_plan: dict = field(default_factory=dict)       # module path -> TP Style (see plan.py)
    fsdp: object = None                       # the custom FSDP engine (full_state_dict needs it)
    # (decay params, no-decay params) the optimizer steps on; FSDP gives its shards instead
    optimizer_params: Callable = None

    def __post_init__(self):
        self.gpt = self.model  # never wrapped: its parameter names are GPT-2's
        if self.optimizer_params is None:
            self.optimizer_params = lambda: split_by_weight_decay(self.model.named_parameters())

    def optimizer_param_list(self) -> list:
        decay, no_decay = self.optimizer_params()
        return decay + no_decay

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay = self.optimizer_params()
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def forward_backward(self, batches, autocast) -> torch.Tensor:
        """Forward and backward of the micro-steps [(x, y), ...] of one global batch
        (gradients reduced on the last); returns the mean of their losses."""
        loss_sum = 0.0  # a tensor of the loss's dtype after the first add
        for micro, (x, y) in enumerate(batches):
            last = micro == len(batches) - 1
            with (nullcontext() if last else self.no_sync()), self.loss_context():
                with autocast:
                    logits = self.model(x)
                loss = self.loss_fn(logits, y) / len(batches)
                loss.backward()
            loss_sum = loss_sum + loss.detach()
        return loss_sum

    @torch.no_grad()
    def eval_loss(self, batches, autocast) -> torch.Tensor:
        """The mean loss of the micro-steps of one global batch, forward only."""
        loss_sum = 0.0
        for x, y in batches:
            with self.loss_context():
                with autocast:
                    logits = self.model(x)
                loss_sum = loss_sum + self.loss_fn(logits, y) / len(batches)
        return loss_sum

    def clip_grad_norm(self, max_norm: float | None):
        """Norm of the full gradient (over every shard); clips when max_norm is given."""
        return clip_grad_norm_(self.optimizer_param_list(), max_norm, self.sharded_over)

    def param_names(self) -> list[list[str]]:
        """Per optimizer parameter, in order, the GPT-2 names it holds (FSDP: a flat's)."""
        if self.fsdp is not None:
            return [f.names for f in self.fsdp.flats_in_optimizer_order()]
        names = {id(p): name for name, p in self.gpt.named_parameters()}
        return [[names[id(p)]] for p in self.optimizer_param_list()]

    def full_tensors(self, tensors):
        """(GPT-2 name, full tensor) for `tensors` laid out like the optimizer's params
        (the params themselves, or Adam's moments), one parameter at a time. Collective."""
        to_full = partial(tensor_parallel.full_tensor, plan=self.tp_plan, tp_group=self.mesh.tp_group)
        if self.fsdp is not None:
            yield from self.fsdp.full_tensors(tensors, to_full)
            return
        for [name], tensor in zip(self.param_names(), tensors):
            yield name, to_full(name, tensor)

    @torch.no_grad()
    def load_full_tensors(self, full_of: Callable, tensors):
        """The inverse: fill `tensors` (laid out like the optimizer's params) with this
        rank's part of `full_of(name)`, asked for one GPT-2 name at a time. Collective."""
        to_local = partial(tensor_parallel.local_tensor, plan=self.tp_plan, tp_group=self.mesh.tp_group)
        if self.fsdp is not None:
            self.fsdp.load_full_tensors(full_of, tensors, to_local)
            return
        for [name], tensor in zip(self.param_names(), tensors):
            local = to_local(name, full_of(name).to(tensor.device), tensor)
            (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(local)


def parallelize_stage(model: nn.Module, cfg: TrainConfig, mesh: Mesh) -> Parallel:
    """TP -> CP -> checkpointing -> FSDP -> materialise -> compile -> DDP on one model
    (or pipeline stage)."""
    par = Parallel(model, mesh)
    if mesh.tp_size > 1:
        apply_tp(par, cfg)
    if mesh.cp_size > 1:
        apply_cp(par, cfg)
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if mesh.dp_cp_size > 1 and cfg.data_parallel_type == "fsdp":
        apply_fsdp(par, cfg)  # before materialize: shards meta units one at a time
    materialize(par.model, model, cfg.seed, mesh.device)
    if cfg.compile:  # block by block, as torchtitan: FSDP2 and DTensor compose with it
        for block in model.transformer.h:
            if not isinstance(block, nn.Identity):  # a block another pipeline stage holds
                block.compile()
    if mesh.dp_cp_size > 1 and cfg.data_parallel_type == "ddp":
        apply_ddp(par, cfg)  # after materialize: it broadcasts and buckets real tensors
    return par


def parallelize(model: nn.Module, cfg: TrainConfig, mesh: Mesh) -> Parallel:
    if mesh.pp_size > 1:
        from nanodist.parallel.pipeline import apply_pp  # it builds on Parallel (this file)
        return apply_pp(model, cfg, mesh, parallelize_stage)
    return parallelize_stage(model, cfg, mesh)
