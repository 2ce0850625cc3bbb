"""Data parallelism: every DP rank holds the whole model and reads its slice of the
batch; gradients are averaged over the DP group before the optimizer step, so every
replica takes the same step.

    rank r:   forward(x_r) -> backward -> g_r ──┐  all-reduce per bucket, launched as
                                                ├─ soon as the bucket is full, while
    optimizer: g = (g_0 + ... + g_N-1) / N  <───┘  backward goes on to earlier layers

Custom (`DataParallel`): the model stays as it is (no wrapper, GPT-2 names kept). The
gradients live in flat buckets allocated once; each `param.grad` is a view into one:

    params (registration order):  wte wpe h.0.* ... h.L-1.* ln_f.*
    buckets (reverse order, each <= --bucket_cap_mb of gradients):
        bucket 0: [ln_f.* h.L-1.* ...|used]  bucket 1: [...|used]  ...  [... wpe wte|used]
                   ^ ready first in backward: its all-reduce overlaps the rest of it

A hook after each parameter's gradient accumulation counts the bucket down and
launches it when complete. Buckets launch strictly in order, so every rank issues the
same sequence of collectives. At the end of backward a queued callback launches what
is left (buckets holding a parameter that got no gradient here: it contributes zeros)
and waits for everything, so `loss.backward()` returns with averaged gradients, as
with PyTorch's DDP. Each bucket ends with one "used" flag per parameter that rides in
the same all-reduce: a parameter no rank used keeps grad None, as in one process.

PyTorch (`native_ddp`): `DistributedDataParallel` on the DP x CP group.
"""
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from nanodist import compat
from nanodist.parallel.comm import Group
from nanodist.parallel.engines import (InOrder, assign_buckets, broadcast_from_first_rank,
                                       engine_params, fsdp2_no_sync, native_ddp, no_sync_all)


@dataclass
class GradBucket:
    """Consecutive parameters' gradients in one buffer, all-reduced in one call."""
    params: list[nn.Parameter]
    buffer: torch.Tensor                       # [grad 0 | grad 1 | ... | used flags]
    grads: list[torch.Tensor] = field(init=False)   # param-shaped views into buffer
    used: torch.Tensor = field(init=False)          # one flag per param, summed over ranks

    def __post_init__(self):
        offset, self.grads = 0, []
        for param in self.params:
            self.grads.append(self.buffer[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        self.used = self.buffer[offset:]


class DataParallel:
    """Custom DDP of `params` (a model's, or those of one reduction) over `group`, by
    hooks; `scale`: the gradients' factor (default 1 / group size: the mean over it)."""

    def __init__(self, params, group: Group, bucket_cap_mb: float = 25.0, scale: float | None = None):
        self.group, self.scale = group, scale or 1.0 / group.size
        self.sync = True
        params = [p for p in params if p.requires_grad]
        broadcast_from_first_rank(params, group)
        self.buckets = []
        for members in assign_buckets(params[::-1], int(bucket_cap_mb * 2**20)):
            numel = sum(p.numel() for p in members) + len(members)
            self.buckets.append(GradBucket(members, members[0].new_zeros(numel)))
        self.slot = {param: (b, i) for b, bucket in enumerate(self.buckets)
                     for i, param in enumerate(bucket.params)}
        self.queue = InOrder([len(bucket.params) for bucket in self.buckets], self._launch, self._finish)
        for param in params:
            param.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._new_backward()

    def _new_backward(self):
        self.ready = set()            # params whose gradient is in its bucket, divided by N
        self.works, self.unused_here = [], []

    @contextmanager
    def no_sync(self):
        """Micro-steps inside accumulate gradients locally and communicate nothing."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _on_grad_ready(self, param: nn.Parameter):
        b, i = self.slot[param]
        view = self.buckets[b].grads[i]
        fresh = param.grad is not view  # grad was None: autograd made a new tensor
        if not self.sync:  # move it in; later micro-steps accumulate into the bucket
            if fresh:
                view.copy_(param.grad)
                param.grad = view
            return
        # divide by N on the way into the bucket, then sum: PyTorch's DDP arithmetic
        if fresh:
            torch.mul(param.grad, self.scale, out=view)
            param.grad = view
        else:
            view.mul_(self.scale)
        self.ready.add(param)
        self.queue.arrived(b)

    def _launch(self, b: int):
        bucket = self.buckets[b]
        bucket.used.fill_(1.0)
        for i, (param, grad) in enumerate(zip(bucket.params, bucket.grads)):
            if param in self.ready:
                continue
            if param.grad is None:  # no gradient on this rank: it contributes zeros
                grad.zero_()
                bucket.used[i] = 0.0
                self.unused_here.append((b, i))
            else:  # its gradient came in an earlier micro-step only
                grad.mul_(self.scale)
        self.works.append(self.group.all_reduce(bucket.buffer, async_op=True))

    def _finish(self):
        """End of backward, every bucket launched: wait for all of them."""
        for work in self.works:
            work.wait()
        # used on another rank: take the average there (one host sync per bucket)
        used = {b: self.buckets[b].used.tolist() for b, _ in self.unused_here}
        for b, i in self.unused_here:
            if used[b][i] > 0:
                self.buckets[b].params[i].grad = self.buckets[b].grads[i]
        self._new_backward()


def apply_ddp(part, setup):
    """The DP step of `parallelize`, last (it broadcasts and buckets real tensors), over
    the DP x CP group, for either implementation.

    PyTorch: `DistributedDataParallel` cannot hold DTensor (TP) parameters, and its no_sync
    must wrap a forward and its backward together (a pipeline schedule interleaves
    micro-batches), so a TP model or a pipeline stage uses PyTorch's FSDP2-based
    `replicate` instead (DDP semantics: whole replicas, gradients averaged over the group
    in backward; no_sync is decided at backward)."""
    layout, mesh, model = setup.layout, setup.mesh, part.gpt
    if layout.implementation == "custom":  # one engine per reduction (EP: the experts' over edp)
        engines = [DataParallel([p for _, p in members], group, layout.bucket_cap_mb, scale)
                   for group, scale, members in engine_params(part, mesh)]
        return dataclasses.replace(part, no_sync=partial(no_sync_all, engines))
    if layout.tp > 1 or layout.pp > 1:
        replicated = compat.replicate(model, mesh=mesh.dp_cp.device_mesh)
        return dataclasses.replace(part, module=replicated, no_sync=partial(fsdp2_no_sync, replicated))
    wrapped = native_ddp(model, mesh.dp_cp, mesh.device, layout.bucket_cap_mb)
    return dataclasses.replace(part, module=wrapped, no_sync=wrapped.no_sync)
