"""Gradient norm and clipping over a sharded model: the norm of the full gradient.

Each gradient is counted once across the mesh: the squared sum of a shard is summed
over the groups holding different pieces of it (TP, EP, the flat shards of FSDP and
ZeRO-1) and not over those it is replicated across. DTensor gradients say their
sharding themselves; plain tensors are looked up in `sharded_over` (Params derives it
from the placements, placement.py).
"""
import torch
from torch.distributed.tensor import DTensor, Replicate

from nanodist import compat
from nanodist.parallel.comm import Comm, Group


def _local_and_groups(grad, param, sharded_over, comm: Comm):
    if isinstance(grad, DTensor):
        if any(placement.is_partial() for placement in grad.placements):
            # a norm of partial sums is not the norm of their sum (DTensor sequence
            # parallel leaves LayerNorm grads Partial): reduce them first, in the param
            grad = param.grad = grad.redistribute(placements=[
                Replicate() if placement.is_partial() else placement for placement in grad.placements])
        mesh = grad.device_mesh
        groups = tuple(comm.group(mesh.get_group(dim)) for dim, placement in enumerate(grad.placements)
                       if not placement.is_replicate())  # Shard, or FSDP2's _StridedShard over TP
        return grad.to_local(), groups
    return grad, sharded_over.get(param, ())


@torch.no_grad()
def grad_norm(params, sharded_over: dict, comm: Comm, across: Group | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (float32 scalar; float64 for float64
    gradients), on the device: nothing waits for it. `across`: a group whose ranks hold
    different parameters altogether (pipeline stages): summed over too."""
    by_groups: dict[tuple, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            local, groups = _local_and_groups(param.grad, param, sharded_over, comm)
            by_groups.setdefault(groups, []).append(local)
    grads = [g for tensors in by_groups.values() for g in tensors]
    device = grads[0].device if grads else "cpu"
    dtype = max((torch.promote_types(g.dtype, torch.float32) for g in grads),  # fp32 at least
                key=lambda d: d.itemsize, default=torch.float32)
    total = torch.zeros((), dtype=dtype, device=device)
    # the squared sum of each set of shards, summed over the groups it is sharded across,
    # in the same order on every rank (keys sort by group count, then insertion)
    for groups, tensors in sorted(by_groups.items(), key=lambda item: len(item[0])):
        sq = torch.stack(compat.foreach_norm(tensors, dtype)).square().sum()
        for group in groups:
            group.all_reduce(sq)
        total += sq
    if across is not None:
        across.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def scale_grads_(params, norm: torch.Tensor, max_norm: float):
    """Scale the gradients of `params` so that their global norm `norm` is <= max_norm."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        compat.foreach_mul_([g for g in grads if g.dtype == dtype], scale.to(dtype))
