"""ZeRO-1 (DeepSpeed's stage 1, Megatron's distributed optimizer): parameters and
gradients replicated over the DP x CP ranks, the optimizer state sharded over them.

Custom (`ZeRO1`), on reduce-scatter and all-gather, with DDP's bucketing: the parameters
become views of flat buckets (reverse order, <= --bucket_cap_mb; one weight decay, one
set of sharding groups and the tied weight alone per bucket), padded to N, and so do
their gradients; rank r's 1/N slice of each bucket is its shard.

    backward   each gradient bucket is reduce-scattered once it is full (overlapping the
               rest of backward, at most two buckets in flight: gloo copies a reduce-scatter's
               whole input); rank r keeps the mean of its slice           (N-1)/N 4 Psi
    step       AdamW on the shards alone: a shard is a view of the flat parameters, so the
               update lands in place; Adam's moments exist for 1/N of the model; then
               every bucket's parameters are all-gathered (a step hook)     (N-1)/N 4 Psi

    = the bus bytes of DDP's all-reduce; state per rank (fp32): 4 Psi weights + 4 Psi
    gradients + 8 Psi / N moments (Megatron's table: 8 + 8/d with fp32 gradients)

Reduce-scatter and all-gather rather than all-reduce and a local update: the volume of
DDP instead of half again as much (an all-reduce is a reduce-scatter and an all-gather).
A step the NaN guard skips gathers nothing (nothing changed); a checkpoint load gathers
what it loaded. A parameter no rank used gets a zero gradient (one process would give
it none; GPT-2 uses every one).

PyTorch (--implementation pytorch): `DistributedDataParallel` all-reduces the gradients
and `ZeroRedundancyOptimizer` steps on whole parameters, each assigned to one rank, then
broadcasts them: 2 (N-1)/N + 1 of 4 Psi per step. (FSDP2 cannot express ZeRO-1.)
"""
import dataclasses
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from nanodist import compat
from nanodist.parallel.comm import Group
from nanodist.parallel.ddp import assign_buckets, broadcast_from_first_rank, native_ddp, no_sync_all
from nanodist.parallel.expert_parallel import reduction_groups
from nanodist.parallel.params import FlatParams, ModuleParams, flat_classes, parameter_owners


class Flat:
    """One bucket: its parameters as one flat vector padded to k N values (`values`),
    their gradients likewise (`grads`); the model's parameters are views of the one,
    their `.grad`s views of the other, this rank's k values of both its shard."""

    def __init__(self, named_params, owners, group: Group, groups: tuple):
        self.group, self.groups = group, groups
        self.decay = named_params[0][1].dim() >= 2
        self.names = [name for name, _ in named_params]
        self.numels = [p.numel() for _, p in named_params]
        k, like = -(-sum(self.numels) // group.size), named_params[0][1]
        self.values = torch.zeros(k * group.size, dtype=like.dtype, device=like.device)
        self.grads = torch.zeros_like(self.values)
        self.params, self.grad_views = [], []
        with torch.no_grad():
            for (_, old), value, grad in zip(named_params, self.split(self.values), self.split(self.grads)):
                value.copy_(old.reshape(-1))
                new = nn.Parameter(value.view(old.shape), requires_grad=old.requires_grad)
                for module, attr in owners[id(old)]:
                    module._parameters[attr] = new
                self.params.append(new)
                self.grad_views.append(grad.view(old.shape))
        mine = slice(group.rank * k, (group.rank + 1) * k)
        self.shard = nn.Parameter(self.values[mine])  # a view: the optimizer's update lands in values
        self.grad_shard = self.grads[mine]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The per-parameter (flattened) views of a padded flat vector."""
        return flat[:sum(self.numels)].split(self.numels)


class ZeRO1:
    """Custom ZeRO-1 of `model` over `group` (the DP x CP ranks), by hooks. `params`: the
    ones it holds (default: all); `scale`: the gradients' factor (default 1 / group size)."""

    def __init__(self, model: nn.Module, group: Group, bucket_cap_mb: float, sharded_over: dict,
                 params: list | None = None, scale: float | None = None):
        self.group, self.scale, self.sync = group, scale or 1.0 / group.size, True
        broadcast_from_first_rank(model, group, params)
        held = None if params is None else {id(p) for p in params}
        named = [(name, p) for name, p in model.named_parameters()
                 if p.requires_grad and (held is None or id(p) in held)][::-1]
        order = {id(p): i for i, (_, p) in enumerate(named)}  # backward's order, roughly
        owners, flats = parameter_owners(model), []
        for (_, groups, _), members in flat_classes(named, sharded_over).items():
            name_of = dict((id(p), name) for name, p in members)
            for bucket in assign_buckets([p for _, p in members], int(bucket_cap_mb * 2**20)):
                flat = Flat([(name_of[id(p)], p) for p in bucket], owners, group, (group,) + groups)
                flats.append((order[id(bucket[0])], flat))
        # launched strictly in this order, the one backward fills them in, on every rank
        self.flats = [flat for _, flat in sorted(flats, key=lambda item: item[0])]
        for b, flat in enumerate(self.flats):
            for i, p in enumerate(flat.params):
                p.register_post_accumulate_grad_hook(lambda p, b=b, i=i: self._grad_ready(b, i, p))
        self._new_backward()

    def _new_backward(self):
        self.missing = [len(f.params) for f in self.flats]  # gradients not in yet
        self.next_flat, self.ready, self.in_flight, self.finish_queued = 0, set(), None, False

    @contextmanager
    def no_sync(self):
        """Micro-steps inside accumulate gradients in the buckets and communicate nothing."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _grad_ready(self, b: int, i: int, param: nn.Parameter):
        view = self.flats[b].grad_views[i]
        if param.grad is not view:  # autograd made a new tensor: into the bucket (scaled on the last)
            torch.mul(param.grad, self.scale if self.sync else 1.0, out=view)
            param.grad = view
        elif self.sync:  # accumulated over the micro-steps: divide by N once, as DDP does
            view.mul_(self.scale)
        if not self.sync:
            return
        self.ready.add(param)
        if not self.finish_queued:
            compat.queue_callback(self._finish)
            self.finish_queued = True
        self.missing[b] -= 1
        while self.next_flat < len(self.flats) and self.missing[self.next_flat] == 0:
            self._launch(self.next_flat)

    def _launch(self, b: int):
        flat = self.flats[b]
        for param, view in zip(flat.params, flat.grad_views):
            if param in self.ready:
                continue
            if param.grad is None:  # no gradient on this rank: it contributes zeros
                view.zero_()
            else:  # its gradient came in an earlier micro-step only
                view.mul_(self.scale)
        out = torch.empty_like(flat.shard)
        launched = (flat, out, self.group.reduce_scatter(out, flat.grads, async_op=True))
        self._land()  # one bucket in flight besides the new one: gloo copies each whole
        self.in_flight, self.next_flat = launched, b + 1

    def _land(self):
        """Wait for the reduction in flight; its mean is the shard's gradient."""
        if self.in_flight is not None:
            flat, out, work = self.in_flight
            work.wait()
            flat.grad_shard.copy_(out)
            flat.shard.grad = flat.grad_shard
            for param in flat.params:  # the next backward starts afresh (grads are in the shards)
                param.grad = None
            self.in_flight = None

    def _finish(self):
        """End of backward: reduce what is left."""
        while self.next_flat < len(self.flats):
            self._launch(self.next_flat)
        self._land()
        self._new_backward()

    @torch.no_grad()
    def gather(self):
        """Every bucket's parameters, from every rank's (updated) shard, two in flight."""
        previous = None
        for flat in self.flats:
            work = self.group.all_gather(flat.values, flat.shard.detach().clone(), async_op=True)
            if previous is not None:
                previous.wait()
            previous = work
        if previous is not None:
            previous.wait()


class ZeRO1Params(FlatParams):
    """The custom ZeRO-1's shards: after each optimizer step, and after a load into them,
    every rank gathers the whole model again."""

    def after_each_step(self, optimizer):
        optimizer.register_step_post_hook(lambda *_: self.engine.gather())

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        super().load_full_tensors(full_of, tensors)
        self.engine.gather()  # (the moments' loads gather unchanged values: once, at a resume)


class ZeroRedundancyParams(ModuleParams):
    """PyTorch's ZeRO-1: the module's (DDP's) parameters, and ZeroRedundancyOptimizer over
    them, which keeps each parameter's state on one rank of the DP x CP group (its owner):
    a checkpoint hands each moment on from its owner."""

    def optimizer(self, weight_decay: float, **adamw) -> torch.optim.Optimizer:
        # imported when used: torch.distributed.optim scripts its functional optimizers at
        # import (deprecation warnings; tensors c10 could not count, see metrics.StepMemory)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        group = self.mesh.dp_cp
        self.zero = ZeroRedundancyOptimizer(self.param_groups(weight_decay), torch.optim.AdamW,
                                            process_group=group.process_group, **adamw)
        self.mine = {id(p) for g in self.zero.optim.param_groups for p in g["params"]}
        owned = [i for i, p in enumerate(self.param_list()) if id(p) in self.mine]
        everyone = [None] * group.size
        dist.all_gather_object(everyone, owned, group=group.process_group)
        self.owner = {i: rank for rank, indices in enumerate(everyone) for i in indices}
        return self.zero

    def optimizer_state(self, optimizer) -> "_OwnState":
        return _OwnState(self.zero.optim.state, self.mine)

    def full_tensors(self, tensors):
        for i, ([name], tensor) in enumerate(zip(self.names(), tensors)):
            full = tensor.detach().clone()
            self.mesh.dp_cp.broadcast(full, self.owner[i])
            yield name, full


class _OwnState:
    """param -> its optimizer state on its owner; elsewhere a scratch dict, dropped."""

    def __init__(self, state, mine: set):
        self.state, self.mine = state, mine

    def __getitem__(self, param):
        return self.state[param] if id(param) in self.mine else {}


class Engines:
    """Several ZeRO-1 engines as one for ZeRO1Params (expert parallelism: the experts' over edp)."""

    def __init__(self, engines: list[ZeRO1]):
        self.engines = engines
        self.flats = [flat for engine in engines for flat in engine.flats]

    def gather(self):
        for engine in self.engines:
            engine.gather()

    def no_sync(self):
        return no_sync_all(self.engines)


def apply_zero1(stage, setup):
    """The ZeRO-1 step of `parallelize`, last, as DDP's (real tensors): over the DP x CP
    group; expert-parallel parameters over edp, divided by DP x CP (as DDP's)."""
    layout, mesh, model = setup.layout, setup.mesh, stage.gpt
    if layout.implementation == "pytorch":
        wrapped = native_ddp(model, mesh.dp_cp, mesh.device, layout.bucket_cap_mb)
        return dataclasses.replace(stage, module=wrapped, no_sync=wrapped.no_sync,
                                   params=ZeroRedundancyParams(model, mesh, stage.params.plan))
    engine = Engines([ZeRO1(model, group, layout.bucket_cap_mb, stage.params.sharded_over, params, scale)
                      for group, params, scale in reduction_groups(stage, mesh)])
    return dataclasses.replace(stage, no_sync=engine.no_sync,
                               params=ZeRO1Params(engine, mesh, stage.params.plan))
