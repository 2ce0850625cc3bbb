"""How a layout holds the model's parameters: what the optimizer steps on, the norm of
the full gradient, and full GPT-2 tensors <-> this rank's parts (checkpoints, --init_from).

    Params          the protocol (what the trainer and checkpoint.py ask)
    ModuleParams    the module's own parameters: whole, split by the custom TP or EP (their
                    placements say how, placement.py), or DTensors (TP, FSDP2, replicate)
    FlatParams      flat shards: the custom FSDP's (fsdp.py) and ZeRO-1's (zero1.py)
    PipelineParams  one of the above per pipeline chunk, and the pipeline group between them

Tensors "laid out like the optimizer's params" are the params themselves, their
gradients, or Adam's moments: the conversions below serve all of them.
"""
from collections import defaultdict
from functools import cached_property
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from nanodist.model.gpt import TIED_NAMES
from nanodist.parallel.clip import grad_norm, scale_grads_
from nanodist.parallel.mesh import Mesh
from nanodist.parallel.placement import REPLICATED, full_tensor, local_tensor

TIED, TIED_ON_LAST = TIED_NAMES  # a pipeline's first and last stage each hold one


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


def flat_classes(named_params, placements: dict, mesh: Mesh) -> dict:
    """(decay, groups split over, tied) -> [(name, param)]: what one flat may mix (one
    weight decay, one norm reduction; the tied weight alone, so that a pipeline's first
    and last stage flatten it alike), among the parameters of one reduction."""
    classes = defaultdict(list)
    for name, p in named_params:
        split_over = placements.get(name, REPLICATED).groups(mesh)
        classes[(p.dim() >= 2, split_over, name in TIED_NAMES)].append((name, p))
    return classes


class Params:
    """The parameters of one layout, as the optimizer, clipping and checkpoints see them."""
    mesh: Mesh
    placements: dict     # GPT-2 name -> Placement (placement.py); absent: replicated

    @property
    def sharded_over(self) -> dict:
        """Plain tensor optimizer parameter -> the Groups holding different pieces of it
        (what the gradient norm sums over; DTensors say it themselves)."""
        raise NotImplementedError

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
        """AdamW's groups: decayed and not, each split into DTensors and plain tensors (the
        fused AdamW takes one kind a group; DTensor TP without SP leaves the norms plain)."""
        decay, no_decay = self.optimizer_params()
        groups = []
        for params, decayed in ((decay, weight_decay), (no_decay, 0.0)):
            for dtensors in (True, False):
                kind = [p for p in params if isinstance(p, DTensor) == dtensors]
                if kind:
                    groups.append({"params": kind, "weight_decay": decayed})
        return groups

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
        with record_function("grad_norm"):  # a phase of the step in profiler traces
            norm = self.grad_norm()
            if max_norm is not None:
                scale_grads_(self.param_list(), norm, max_norm)
            return norm


class ModuleParams(Params):
    """The parameters of `model` as they are (GPT-2 names), TP and EP pieces included."""

    def __init__(self, model: nn.Module, mesh: Mesh, placements: dict | None = None):
        self.model, self.mesh, self.placements = model, mesh, placements or {}

    @cached_property
    def sharded_over(self):  # asked once parallelize is done: the parameters are final then
        return {p: self.placements[name].groups(self.mesh) for name, p in self.model.named_parameters()
                if name in self.placements and not isinstance(p, DTensor)}

    def optimizer_params(self):
        return split_by_weight_decay(self.model.named_parameters())

    def names(self):
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [[names[id(p)]] for p in self.param_list()]

    def full_tensors(self, tensors):
        for [name], tensor in zip(self.names(), tensors):
            yield name, full_tensor(tensor, self.placements.get(name, REPLICATED), self.mesh)

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        for [name], tensor in zip(self.names(), tensors):
            local = local_tensor(full_of(name).to(tensor.device), tensor,
                                 self.placements.get(name, REPLICATED), self.mesh)
            (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(local)


class FlatParams(Params):
    """Parameters kept as flat vectors sharded over a group, this rank's shard of each
    being what the optimizer steps on (and keeps state for): the custom FSDP's (fsdp.py)
    and ZeRO-1's (zero1.py), one engine per reduction (placement.by_reduction). Each
    flat (`engines.Flat`) has: decay, shard, group, groups (those it is split over),
    names and params (of the model, in flat order) and split(flat). `placements`: how TP
    or EP split the parameters first (their full tensors undo it)."""

    def __init__(self, engines: list, mesh: Mesh, placements: dict):
        self.engines, self.mesh, self.placements = engines, mesh, placements
        self.all_flats = [f for engine in engines for f in engine.flats]

    @cached_property
    def sharded_over(self):
        return {f.shard: f.groups for f in self.all_flats}

    def flats(self) -> list:
        """In optimizer order: decay flats, then no-decay ones."""
        return [f for f in self.all_flats if f.decay] + [f for f in self.all_flats if not f.decay]

    def optimizer_params(self):
        return [f.shard for f in self.all_flats if f.decay], [f.shard for f in self.all_flats if not f.decay]

    def names(self):
        return [f.names for f in self.flats()]

    def full_tensors(self, tensors):
        """One flat gathered at a time, split into its parameters."""
        for f, tensor in zip(self.flats(), tensors):
            full = torch.empty(tensor.numel() * f.group.size, dtype=tensor.dtype, device=tensor.device)
            f.group.all_gather(full, tensor.detach())
            for name, p, value in zip(f.names, f.params, f.split(full)):
                yield name, full_tensor(value.view(p.shape), self.placements.get(name, REPLICATED), self.mesh)

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        for f, tensor in zip(self.flats(), tensors):
            full = torch.zeros(tensor.numel() * f.group.size, dtype=tensor.dtype, device=tensor.device)
            for name, p, value in zip(f.names, f.params, f.split(full)):
                local = local_tensor(full_of(name).to(tensor.device), p,
                                     self.placements.get(name, REPLICATED), self.mesh)
                value.copy_(local.reshape(-1))
            tensor.copy_(full.chunk(f.group.size)[f.group.rank])


class PipelineParams(Params):
    """Every pipeline chunk's parameters on this rank; the norm over all stages (the tied
    weight once); full tensors made by the stage that holds them, broadcast over the pp
    group. `split`: how the model is cut (pipeline.Split)."""

    def __init__(self, stages: list, split):
        self.chunks, self.split, self.mesh = [s.params for s in stages], split, split.mesh

    @cached_property
    def sharded_over(self):
        return {p: g for s in self.chunks for p, g in s.sharded_over.items()}

    def optimizer_params(self):
        return tuple([p for s in self.chunks for p in s.optimizer_params()[i]] for i in (0, 1))

    def names(self):
        return [held for s in self.chunks for held in s.names()]

    def after_each_step(self, optimizer):
        for stage in self.chunks:
            stage.after_each_step(optimizer)

    def grad_norm(self) -> torch.Tensor:
        on_last_only = self.split.tied if self.mesh.pp.rank == self.mesh.pp.size - 1 else None
        return grad_norm([p for p in self.param_list() if p is not on_last_only], self.sharded_over,
                         self.mesh.comm, across=self.mesh.pp)

    def _per_stage(self, tensors):
        at = {id(p): t for p, t in zip(self.param_list(), tensors)}
        return [[at[id(p)] for p in s.param_list()] for s in self.chunks]

    def full_tensors(self, tensors):
        """Every (GPT-2 name, full tensor) on every rank, in one order."""
        pp, P = self.mesh.pp, self.mesh.pp.size
        making = [s.full_tensors(t) for s, t in zip(self.chunks, self._per_stage(tensors))]
        dtype = tensors[0].dtype
        for c in range(self.split.n_chunks):
            owner, v = c % P, c // P
            for name, shape in self.split.chunk_names[c]:
                mine = owner == pp.rank
                full = next(making[v])[1].contiguous() if mine else None
                if c == self.split.n_chunks - 1 and name == TIED_ON_LAST:
                    continue  # the last stage's copy of the tied weight equals the first's
                if not mine:
                    full = torch.empty(shape, dtype=dtype, device=self.mesh.device)
                pp.broadcast(full, owner)
                yield name, full

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        """Every rank asks `full_of` for every name, in one order (it may be collective);
        the owning stage keeps its part. The tied weight is asked for once."""
        tied_full = {}

        def once(name):
            if name == TIED_ON_LAST:
                return tied_full[TIED]
            value = full_of(name)
            if name == TIED:
                tied_full[TIED] = value
            return value

        per_stage, P = self._per_stage(tensors), self.mesh.pp.size
        for c in range(self.split.n_chunks):
            owner, v = c % P, c // P
            if owner == self.mesh.pp.rank:
                self.chunks[v].load_full_tensors(once, per_stage[v])
            else:
                for name, _ in self.split.chunk_names[c]:
                    once(name)


@torch.no_grad()
def full_state_dict(params: Params, model: nn.Module) -> dict:
    """The state dict of `model` (GPT-2 names, full tensors, on the CPU) as `params` holds
    it, on every rank. Collective."""
    values = {name: t.to("cpu", copy=True) for name, t in params.full_tensors(params.param_list())}
    names = {id(p): name for name, p in model.named_parameters()}  # tied: the first name
    return {key: values[names[id(p)]] for key, p in model.state_dict(keep_vars=True).items()}
