"""The one door of the custom strategies to torch.distributed (DESIGN.md invariant 7).

Every collective passes through here so its traffic is counted per kind. Two numbers
per call: `payload` (bytes of the full tensor the collective is about) and `bus`
(bytes each rank sends with a ring algorithm, the volume of the analytic model):

    all_reduce      bus = 2 (N-1)/N * payload
    all_gather      bus =   (N-1)/N * payload    (payload = the gathered tensor)
    reduce_scatter  bus =   (N-1)/N * payload    (payload = the unreduced input)
    broadcast       bus =             payload
    send            bus =             payload    (point-to-point, counted by the sender)

All functions are no-ops on a group of one (or None), so strategies need no special
case for one process. `async_op=True` returns a work handle to `.wait()` on. Under
`--compile` they run eagerly (`torch.compiler.disable`): the graph breaks around each
collective and the compute between them is compiled.
"""
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommCounter:
    """Calls and bytes per collective kind."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.payload_bytes = defaultdict(int)
        self.bus_bytes = defaultdict(float)

    def add(self, kind: str, payload: int, group_size: int):
        factor = {"all_reduce": 2 * (group_size - 1) / group_size,
                  "all_gather": (group_size - 1) / group_size,
                  "reduce_scatter": (group_size - 1) / group_size,
                  "broadcast": 1.0, "send": 1.0}[kind]
        self.calls[kind] += 1
        self.payload_bytes[kind] += payload
        self.bus_bytes[kind] += factor * payload

    def summary(self) -> dict:
        return {kind: {"calls": self.calls[kind], "payload_bytes": self.payload_bytes[kind],
                       "bus_bytes": self.bus_bytes[kind]} for kind in sorted(self.calls)}


counter = CommCounter()


@contextmanager
def counting():
    """`with counting() as c:` counts into c the collectives inside the block, and only those."""
    global counter
    outside, counter = counter, CommCounter()
    try:
        yield counter
    finally:
        counter = outside


class _Done:
    """Work handle of a collective that had nothing to do."""

    def wait(self):
        return True


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _op(op: str):
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]


@torch.compiler.disable
def all_reduce(tensor: torch.Tensor, group, op: str = "sum", async_op: bool = False):
    """In place. op: sum | max (averages: callers scale, where it fuses with a copy)."""
    n = group_size(group)
    if n == 1:
        return _Done() if async_op else None
    counter.add("all_reduce", tensor.numel() * tensor.element_size(), n)
    return dist.all_reduce(tensor, op=_op(op), group=group, async_op=async_op)


@torch.compiler.disable
def all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    """output (N * k, ...) <- the inputs (k, ...) of the N ranks, in rank order."""
    n = group_size(group)
    if n == 1:
        output.copy_(input)
        return _Done() if async_op else None
    counter.add("all_gather", output.numel() * output.element_size(), n)
    return dist.all_gather_single(output, input, group=group, async_op=async_op)


@torch.compiler.disable
def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    """output (k, ...) <- rank r's slice of the sum of the inputs (N * k, ...)."""
    n = group_size(group)
    if n == 1:
        output.copy_(input)
        return _Done() if async_op else None
    counter.add("reduce_scatter", input.numel() * input.element_size(), n)
    return dist.reduce_scatter_single(output, input, group=group, async_op=async_op)


@torch.compiler.disable
def broadcast(tensor: torch.Tensor, src_group_rank: int, group, async_op: bool = False):
    """In place, from the rank of index `src_group_rank` within `group`."""
    n = group_size(group)
    if n == 1:
        return _Done() if async_op else None
    counter.add("broadcast", tensor.numel() * tensor.element_size(), n)
    return dist.broadcast(tensor, group_src=src_group_rank, group=group, async_op=async_op)


@torch.compiler.disable
def send_recv(sends, recvs, group, async_op: bool = False):
    """Point-to-point, batched: `sends` and `recvs` are lists of (tensor, peer), peers as
    ranks within `group`; recvs fill their tensors. Returns when all are done, or, with
    `async_op`, their work handles. One batch (`batch_isend_irecv`) posts sends and
    receives together, so two ranks that send to each other at the same time do not
    deadlock (NCCL serialises p2p calls otherwise)."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for t, peer in recvs]
    for tensor, _ in sends:
        counter.add("send", tensor.numel() * tensor.element_size(), group_size(group))
    works = dist.batch_isend_irecv(ops) if ops else []
    if async_op:
        return works
    for work in works:
        work.wait()
