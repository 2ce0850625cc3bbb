"""How a layout holds the model's parameters: what the optimizer steps on, the norm of
the full gradient, and full GPT-2 tensors <-> this rank's parts (checkpoints, --init_from).

    Params          the protocol (what the trainer and checkpoint.py ask)
    ModuleParams    the module's own parameters: whole, sharded by the custom TP (sharded_over
                    says over which groups), or DTensors (TP, FSDP2, replicate: they say it)
    FlatParams      flat shards: the custom FSDP's (fsdp.py) and ZeRO-1's (zero1.py)
    pipeline.PipelineParams  one of the above per chunk, and the pipeline group between them

Tensors "laid out like the optimizer's params" are the params themselves, their
gradients, or Adam's moments: the conversions below serve all of them.
"""
from collections import defaultdict
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from nanodist.model.gpt import TIED_NAMES
from nanodist.parallel import tp_plan
from nanodist.parallel.clip import grad_norm, scale_grads_
from nanodist.parallel.layout import Mesh


def split_by_weight_decay(named_params) -> tuple[list, list]:
    """GPT-2 recipe: decay matrices and embeddings (>= 2-D), not biases and norms."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return decay, no_decay


def parameter_owners(model: nn.Module) -> dict:
    """id(param) -> [(module, attribute)] of every module holding it (tied: several), so
    that a flat engine can replace it by a view everywhere."""
    owners = defaultdict(list)
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners[id(p)].append((module, attr))
    return owners


def flat_classes(named_params, sharded_over: dict) -> dict:
    """(decay, groups sharded over, tied) -> [(name, param)]: what one flat may mix (one
    weight decay, one norm reduction; the tied weight alone, so that a pipeline's first
    and last stage flatten it alike)."""
    classes = defaultdict(list)
    for name, p in named_params:
        classes[(p.dim() >= 2, sharded_over.get(p, ()), name in TIED_NAMES)].append((name, p))
    return classes


class Params:
    """The parameters of one layout, as the optimizer, clipping and checkpoints see them."""
    mesh: Mesh
    sharded_over: dict   # plain tensor parameter -> the Groups it is sharded across

    def optimizer_params(self) -> tuple[list, list]:
        """(decay params, no-decay params) the optimizer steps on."""
        raise NotImplementedError

    def names(self) -> list[list[str]]:
        """Per optimizer parameter, in order, the GPT-2 names it holds (FSDP: a flat's)."""
        raise NotImplementedError

    def full_tensors(self, tensors) -> Iterator[tuple[str, torch.Tensor]]:
        """(GPT-2 name, full tensor) for `tensors` laid out like the optimizer's params, one
        parameter at a time. Collective: every rank iterates it to the end."""
        raise NotImplementedError

    def load_full_tensors(self, full_of: Callable, tensors):
        """The inverse: fill `tensors` with this rank's part of `full_of(name)`, asked for
        one GPT-2 name at a time. Collective."""
        raise NotImplementedError

    def param_list(self) -> list:
        decay, no_decay = self.optimizer_params()
        return decay + no_decay

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay = self.optimizer_params()
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def optimizer(self, weight_decay: float, **adamw) -> torch.optim.Optimizer:
        """AdamW over these parameters, GPT-2's weight decay on matrices only (a layout
        whose optimizer shards itself builds its own: PyTorch's ZeRO-1)."""
        optimizer = torch.optim.AdamW(self.param_groups(weight_decay), **adamw)
        self.after_each_step(optimizer)
        return optimizer

    def after_each_step(self, optimizer: torch.optim.Optimizer):
        """Register on `optimizer` what this layout does after every step (nothing here;
        ZeRO-1 gathers the updated shards)."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer):
        """param -> its optimizer state, as checkpoints read and fill it."""
        return optimizer.state

    def grad_norm(self) -> torch.Tensor:
        """The norm of the full gradient (every shard, every stage once)."""
        return grad_norm(self.param_list(), self.sharded_over, self.mesh.comm)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """The norm before clipping; scales the gradients to at most max_norm when given."""
        norm = self.grad_norm()
        if max_norm is not None:
            scale_grads_(self.param_list(), norm, max_norm)
        return norm


class ModuleParams(Params):
    """The parameters of `model` as they are (GPT-2 names), TP plan and shards included."""

    def __init__(self, model: nn.Module, mesh: Mesh, plan: dict | None = None,
                 sharded_over: dict | None = None):
        self.model, self.mesh = model, mesh
        self.plan = plan or {}            # module path -> tp_plan.Style, what TP sharded
        self.sharded_over = sharded_over or {}

    def optimizer_params(self):
        return split_by_weight_decay(self.model.named_parameters())

    def names(self):
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [[names[id(p)]] for p in self.param_list()]

    def full_tensors(self, tensors):
        for [name], tensor in zip(self.names(), tensors):
            yield name, tp_plan.full_tensor(name, tensor, self.plan, self.mesh)

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        for [name], tensor in zip(self.names(), tensors):
            local = tp_plan.local_tensor(name, full_of(name).to(tensor.device), tensor, self.plan,
                                         self.mesh)
            (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(local)


class FlatParams(Params):
    """Parameters kept as flat vectors sharded over a group, this rank's shard of each
    being what the optimizer steps on (and keeps state for): the custom FSDP's (fsdp.py)
    and ZeRO-1's (zero1.py). Each of `engine.flats` has: decay, shard, group, groups
    (those it is sharded over), names and params (of the model, in flat order) and
    split(flat) (the per-parameter views of a padded flat). `plan`: what TP did to the
    parameters first (their full tensors undo it)."""

    def __init__(self, engine, mesh: Mesh, plan: dict):
        self.engine, self.mesh, self.plan = engine, mesh, plan
        self.sharded_over = {f.shard: f.groups for f in engine.flats}

    def flats(self) -> list:
        """In optimizer order: decay flats, then no-decay ones."""
        return [f for f in self.engine.flats if f.decay] + [f for f in self.engine.flats if not f.decay]

    def optimizer_params(self):
        flats = self.engine.flats
        return [f.shard for f in flats if f.decay], [f.shard for f in flats if not f.decay]

    def names(self):
        return [f.names for f in self.flats()]

    def full_tensors(self, tensors):
        """One flat gathered at a time, split into its parameters."""
        for f, tensor in zip(self.flats(), tensors):
            full = torch.empty(tensor.numel() * f.group.size, dtype=tensor.dtype, device=tensor.device)
            f.group.all_gather(full, tensor.detach())
            for name, p, value in zip(f.names, f.params, f.split(full)):
                yield name, tp_plan.full_tensor(name, value.view(p.shape), self.plan, self.mesh)

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        for f, tensor in zip(self.flats(), tensors):
            full = torch.zeros(tensor.numel() * f.group.size, dtype=tensor.dtype, device=tensor.device)
            for name, p, value in zip(f.names, f.params, f.split(full)):
                local = tp_plan.local_tensor(name, full_of(name).to(tensor.device), p, self.plan,
                                             self.mesh)
                value.copy_(local.reshape(-1))
            tensor.copy_(full.chunk(f.group.size)[f.group.rank])


@torch.no_grad()
def full_state_dict(params: Params, model: nn.Module) -> dict:
    """The state dict of `model` (GPT-2 names, full tensors, on the CPU) as `params` holds
    it, on every rank. Collective."""
    values = {name: t.to("cpu", copy=True) for name, t in params.full_tensors(params.param_list())}
    names = {id(p): name for name, p in model.named_parameters()}  # tied: the first name
    return {key: values[names[id(p)]] for key, p in model.state_dict(keep_vars=True).items()}
