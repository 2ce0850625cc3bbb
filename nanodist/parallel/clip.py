"""Gradient norm and clipping over a sharded model: the norm of the full gradient.

Each gradient is counted once across the mesh: the squared sum of a shard is summed
over the groups it is sharded across (TP, FSDP's DP, or both) and not over the groups
it is replicated across. DTensor gradients say their sharding themselves; plain
tensors are looked up in `sharded_over` (filled by the custom strategies).
"""
import torch
from torch.distributed.tensor import DTensor, Replicate

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
    gradients). `across`: a group whose ranks hold different parameters altogether
    (pipeline stages): summed over too."""
    squares: dict[tuple, torch.Tensor] = {}
    device, dtype = "cpu", torch.float32
    for param in params:
        if param.grad is None:
            continue
        local, groups = _local_and_groups(param.grad, param, sharded_over, comm)
        device, dtype = local.device, torch.promote_types(local.dtype, torch.float32)  # fp32 at least
        sq = torch.linalg.vector_norm(local, dtype=dtype) ** 2
        squares[groups] = squares[groups] + sq if groups in squares else sq
    total = torch.zeros((), dtype=dtype, device=device)
    for groups, sq in sorted(squares.items(), key=lambda item: len(item[0])):
        for group in groups:  # same order on every rank: keys sort by count, then insertion
            group.all_reduce(sq)
        total += sq
    if across is not None:
        across.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def scale_grads_(params, norm: torch.Tensor, max_norm: float):
    """Scale the gradients of `params` so that their global norm `norm` is <= max_norm."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for param in params:
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            grad.mul_(scale.to(grad.dtype))
