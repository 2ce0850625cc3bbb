"""What the data-parallel engines share (ddp.py, zero1.py, fsdp.py): which parameters one
engine holds, buckets of gradients launched in order, flat vectors of parameters, and
the no_sync of several engines at once. None of them imports another.

One engine per distinct (reduce group, divisor) of the placements (placement.py):
every parameter over dp_cp by default; under expert parallelism the experts over edp
in an engine of their own, divided by dp_cp as well.
"""
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nanodist import compat
from nanodist.parallel.comm import Group
from nanodist.parallel.placement import by_reduction


def engine_params(part, mesh) -> list[tuple[Group, float, list]]:
    """(group, gradient factor 1/divisor, [(name, param)]) of each engine of a model part: its
    trainable parameters grouped by reduction, dense (dp_cp) first."""
    named = [(name, p) for name, p in part.gpt.named_parameters() if p.requires_grad]
    classes = by_reduction(named, part.params.placements)
    dense_first = sorted(classes.items(), key=lambda item: item[0] != ("dp_cp", "dp_cp"))
    return [(mesh.groups[reduce], 1.0 / mesh.groups[divisor].size, members)
            for (reduce, divisor), members in dense_first]


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


class InOrder:
    """Buckets launched strictly in their order, each once all of its gradients are in,
    whatever order backward delivers them: every rank issues the same collectives in the
    same order. At the end of backward (an autograd callback) the buckets still incomplete
    are launched (a parameter without a gradient here contributes zeros), then `finish`."""

    def __init__(self, sizes: list[int], launch, finish):
        self.sizes, self.launch, self.finish = sizes, launch, finish
        self._reset()

    def _reset(self):
        self.missing, self.next, self.queued = list(self.sizes), 0, False

    def arrived(self, b: int):
        """One more gradient of bucket b is in."""
        if not self.queued:
            compat.queue_callback(self._end)
            self.queued = True
        self.missing[b] -= 1
        while self.next < len(self.missing) and self.missing[self.next] == 0:
            self._launch_next()

    def _launch_next(self):
        self.next += 1
        self.launch(self.next - 1)

    def _end(self):
        while self.next < len(self.missing):
            self._launch_next()
        self.finish()
        self._reset()


class Flat:
    """Parameters of one class (one weight decay, one placement) as one flat vector
    padded to a multiple of the group size, rank r's k values its shard:

        [ p0 | p1 | ... | pad ]   numel = k * group.size
        [ rank 0 ][ rank 1 ] ...
    `groups`: those it is split over (the group, then TP's or EP's), for the norm."""

    def __init__(self, named_params, group: Group, groups: tuple):
        self.group, self.groups = group, groups
        self.decay = named_params[0][1].dim() >= 2
        self.names = [name for name, _ in named_params]
        self.numels = [p.numel() for _, p in named_params]
        self.shard_numel = -(-sum(self.numels) // group.size)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The per-parameter (flattened) views of a padded flat vector."""
        return flat[:sum(self.numels)].split(self.numels)

    def install_views(self, named_params, owners, flat: torch.Tensor) -> list[nn.Parameter]:
        """Replace each parameter, in every module holding it (`owners`), by a view of
        `flat` of its shape; returns the new parameters."""
        params = []
        for (_, old), view in zip(named_params, self.split(flat)):
            new = nn.Parameter(view.view(old.shape), requires_grad=old.requires_grad)
            for module, attr in owners[id(old)]:
                module._parameters[attr] = new
            params.append(new)
        return params


@contextmanager
def no_sync_all(engines):
    """The no_sync of every engine at once (expert parallelism: two, over dp_cp and edp)."""
    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(engine.no_sync())
        yield


@torch.no_grad()
def broadcast_from_first_rank(tensors, group: Group):
    """Replicas start equal whatever each rank drew: rank 0 of `group`'s values win."""
    for tensor in tensors:
        group.broadcast(tensor, 0)


def native_ddp(model: nn.Module, group: Group, device: torch.device, bucket_cap_mb: float):
    """PyTorch's DistributedDataParallel over `group` (DDP, and ZeRO-1's gradients)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=group.process_group, bucket_cap_mb=bucket_cap_mb)


@contextmanager
def fsdp2_no_sync(model):
    """no_sync of a module built on FSDP2 (`fully_shard`, `replicate`): keep unsharded
    gradients, reduce at a later backward."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
