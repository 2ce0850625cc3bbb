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
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from nanodist.errors import UserError
from nanodist.parallel.comm import Group
from nanodist.parallel.engines import (Flat, InOrder, assign_buckets, broadcast_from_first_rank,
                                       engine_params, native_ddp, no_sync_all)
from nanodist.parallel.params import FlatParams, ModuleParams, flat_classes, parameter_owners


class FlatBucket(Flat):
    """One bucket: its parameters as one flat vector padded to k N values (`values`),
    their gradients likewise (`grads`); the model's parameters are views of the one,
    their `.grad`s views of the other, this rank's k values of both its shard."""

    def __init__(self, named_params, owners, group: Group, groups: tuple):
        super().__init__(named_params, group, groups)
        like, k = named_params[0][1], self.shard_numel
        self.values = torch.zeros(k * group.size, dtype=like.dtype, device=like.device)
        self.grads = torch.zeros_like(self.values)
        with torch.no_grad():
            for (_, old), value in zip(named_params, self.split(self.values)):
                value.copy_(old.reshape(-1))
        self.params = self.install_views(named_params, owners, self.values)
        self.grad_views = [g.view(p.shape) for g, p in zip(self.split(self.grads), self.params)]
        mine = slice(group.rank * k, (group.rank + 1) * k)
        self.shard = nn.Parameter(self.values[mine])  # a view: the optimizer's update lands in values
        self.grad_shard = self.grads[mine]


class ZeRO1:
    """Custom ZeRO-1 of `named_params` (a model's, or those of one reduction) over `group`,
    by hooks; `owners`: parameter_owners of their model; `placements`: how TP or EP split
    them (on `mesh`); `scale`: the gradients' factor (default 1 / group size)."""

    def __init__(self, named_params, owners, group: Group, bucket_cap_mb: float, placements: dict,
                 mesh, scale: float | None = None):
        self.group, self.scale, self.sync = group, scale or 1.0 / group.size, True
        named = [(name, p) for name, p in named_params if p.requires_grad][::-1]
        broadcast_from_first_rank([p for _, p in named], group)
        order = {id(p): i for i, (_, p) in enumerate(named)}  # backward's order, roughly
        flats = []
        for (_, split_over, _), members in flat_classes(named, placements, mesh).items():
            name_of = dict((id(p), name) for name, p in members)
            for bucket in assign_buckets([p for _, p in members], int(bucket_cap_mb * 2**20)):
                flat = FlatBucket([(name_of[id(p)], p) for p in bucket], owners, group, (group,) + split_over)
                flats.append((order[id(bucket[0])], flat))
        # launched strictly in this order, the one backward fills them in, on every rank
        self.flats = [flat for _, flat in sorted(flats, key=lambda item: item[0])]
        for b, flat in enumerate(self.flats):
            for i, p in enumerate(flat.params):
                p.register_post_accumulate_grad_hook(lambda p, b=b, i=i: self._grad_ready(b, i, p))
        self.queue = InOrder([len(f.params) for f in self.flats], self._launch, self._finish)
        self._new_backward()

    def _new_backward(self):
        self.ready, self.in_flight = set(), None  # gradients in their bucket; the reduction pending

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
        self.queue.arrived(b)

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
        self.in_flight = launched

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
        """End of backward, every bucket launched: land the last one."""
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

    def gather(self):
        for engine in self.engines:
            engine.gather()

    def after_each_step(self, optimizer):
        optimizer.register_step_post_hook(lambda *_: self.gather())

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        super().load_full_tensors(full_of, tensors)
        self.gather()  # (the moments' loads gather unchanged values: once, at a resume)


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


def apply_zero1(part, setup):
    """The ZeRO-1 step of `parallelize`, last, as DDP's (real tensors): one engine per
    reduction of the placements (dp_cp; under EP the experts' over edp, divided by dp_cp)."""
    layout, mesh, model = setup.layout, setup.mesh, part.gpt
    if layout.implementation == "pytorch":
        wrapped = native_ddp(model, mesh.dp_cp, mesh.device, layout.bucket_cap_mb)
        return dataclasses.replace(part, module=wrapped, no_sync=wrapped.no_sync,
                                   params=ZeroRedundancyParams(model, mesh, part.params.placements))
    owners, placements = parameter_owners(model), part.params.placements
    engines = [ZeRO1(members, owners, group, layout.bucket_cap_mb, placements, mesh, scale)
               for group, scale, members in engine_params(part, mesh)]  # EP: the experts' over edp
    return dataclasses.replace(part, no_sync=partial(no_sync_all, engines),
                               params=ZeRO1Params(engines, mesh, placements))


def check_zero1(layout, run):
    """ZeRO-1's rule (rules.py runs it): PyTorch's holds plain tensors only."""
    if layout.zero1 and layout.implementation == "pytorch" and (layout.tp > 1 or layout.pp > 1):
        raise UserError("--data_parallel_type zero1 --implementation pytorch (DDP + "
                        "ZeroRedundancyOptimizer) holds plain tensors only: no DTensor TP, no "
                        "pipeline stages; use --implementation custom for ZeRO-1 x TP or PP")
