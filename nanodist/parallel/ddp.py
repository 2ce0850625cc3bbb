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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nanodist import compat
from nanodist.parallel.comm import Group
from nanodist.parallel.expert_parallel import reduction_groups
from nanodist.parallel.fsdp import fsdp2_no_sync


@dataclass
class Bucket:
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


def assign_buckets(params: list[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive params share a bucket while their gradients fit in cap_bytes (a param
    larger than the cap gets one of its own); a dtype or device change starts a new one."""
    buckets, size = [], 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is not None and size + nbytes <= cap_bytes and \
                (last.dtype, last.device) == (param.dtype, param.device):
            buckets[-1].append(param)
            size += nbytes
        else:
            buckets.append([param])
            size = nbytes
    return buckets


class DataParallel:
    """Custom DDP of `model` over `group` (the DP x CP ranks of the mesh), by hooks.
    `params`: the ones to reduce (default: all of the model's, and its buffers broadcast);
    `scale`: the gradients' factor (default 1 / group size: the mean over the group)."""

    def __init__(self, model: nn.Module, group: Group, bucket_cap_mb: float = 25.0,
                 params: list | None = None, scale: float | None = None):
        self.group, self.scale = group, scale or 1.0 / group.size
        self.sync = True
        broadcast_from_first_rank(model, group, params)
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        self.buckets = []
        for members in assign_buckets(params[::-1], int(bucket_cap_mb * 2**20)):
            numel = sum(p.numel() for p in members) + len(members)
            self.buckets.append(Bucket(members, members[0].new_zeros(numel)))
        self.slot = {param: (b, i) for b, bucket in enumerate(self.buckets)
                     for i, param in enumerate(bucket.params)}
        for param in params:
            param.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._new_backward()

    def _new_backward(self):
        self.missing = [len(bucket.params) for bucket in self.buckets]  # grads not ready yet
        self.next_bucket = 0          # buckets before it are launched
        self.ready = set()            # params whose gradient is in its bucket, divided by N
        self.works, self.unused_here = [], []
        self.finish_queued = False

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
        if not self.finish_queued:
            compat.queue_callback(self._finish)
            self.finish_queued = True
        self.missing[b] -= 1
        while self.next_bucket < len(self.buckets) and self.missing[self.next_bucket] == 0:
            self._launch(self.next_bucket)

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
        self.next_bucket = b + 1

    def _finish(self):
        """End of backward: launch the buckets still incomplete, wait for all of them."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
        for work in self.works:
            work.wait()
        # used on another rank: take the average there (one host sync per bucket)
        used = {b: self.buckets[b].used.tolist() for b, _ in self.unused_here}
        for b, i in self.unused_here:
            if used[b][i] > 0:
                self.buckets[b].params[i].grad = self.buckets[b].grads[i]
        self._new_backward()


@contextmanager
def no_sync_all(engines):
    """The no_sync of every engine at once (expert parallelism: two, over dp x cp and edp)."""
    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(engine.no_sync())
        yield


@torch.no_grad()
def broadcast_from_first_rank(model: nn.Module, group: Group, params: list | None = None):
    """Replicas start equal whatever each rank drew: DP rank 0's values win (of `params`;
    default: all of the model's parameters and buffers)."""
    for tensor in [*model.parameters(), *model.buffers()] if params is None else params:
        group.broadcast(tensor, 0)


def native_ddp(model: nn.Module, group: Group, device: torch.device, bucket_cap_mb: float):
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=group.process_group, bucket_cap_mb=bucket_cap_mb)


def apply_ddp(stage, setup):
    """The DP step of `parallelize`, last (it broadcasts and buckets real tensors), over
    the DP x CP group, for either implementation.

    PyTorch: `DistributedDataParallel` cannot hold DTensor (TP) parameters, and its no_sync
    must wrap a forward and its backward together (a pipeline schedule interleaves
    micro-batches), so a TP model or a pipeline stage uses PyTorch's FSDP2-based
    `replicate` instead (DDP semantics: whole replicas, gradients averaged over the group
    in backward; no_sync is decided at backward)."""
    layout, mesh, model = setup.layout, setup.mesh, stage.gpt
    if layout.implementation == "custom":
        engines = [DataParallel(model, group, layout.bucket_cap_mb, params, scale)  # EP: experts over edp
                   for group, params, scale in reduction_groups(stage, mesh)]
        return dataclasses.replace(stage, no_sync=partial(no_sync_all, engines))
    if layout.tp > 1 or layout.pp > 1:
        replicated = compat.replicate(model, mesh=mesh.dp_cp.device_mesh)
        return dataclasses.replace(stage, module=replicated, no_sync=partial(fsdp2_no_sync, replicated))
    wrapped = native_ddp(model, mesh.dp_cp, mesh.device, layout.bucket_cap_mb)
    return dataclasses.replace(stage, module=wrapped, no_sync=wrapped.no_sync)
