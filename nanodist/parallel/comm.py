"""The one door of the custom strategies to torch.distributed (DESIGN.md invariant 7).

A `Group` is a process group bound to the `Comm` of its mesh; every collective of the
hand-written strategies is a method of one (`mesh.tp.all_reduce(x)`), so it is counted,
per kind, in that Comm's counter: no module-global state, each Trainer has its own. Two
numbers per call: `payload` (bytes of the full tensor the collective is about) and `bus`
(bytes each rank sends with a ring algorithm, the volume of the analytic model):

    all_reduce      bus = 2 (N-1)/N * payload
    all_gather      bus =   (N-1)/N * payload    (payload = the gathered tensor)
    reduce_scatter  bus =   (N-1)/N * payload    (payload = the unreduced input)
    broadcast       bus =             payload
    send            bus =             payload    (point-to-point, counted by the sender)
    all_to_all      bus = payload - own split    (payload = this rank's input; balanced:
                                                  (N-1)/N * payload)

`Comm(transport)` is the injection point of the tools: the transport is torch.distributed
itself, or a stand-in with the same functions (local copies for the compute-only twin of
the benchmark; zero-filled receives for the simulated cluster).

A group of one (a dimension of size 1, or one process) communicates nothing, so the
strategies need no special case for one process. `async_op=True` returns a work handle
to `.wait()` on. Under `--compile` the collectives run eagerly (`torch.compiler.disable`):
the graph breaks around each one and the compute between them is compiled.
"""
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanodist import compat

BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0,
              "send": lambda n: 1.0, "all_to_all": lambda n: (n - 1) / n}


class CommCounter:
    """Calls and bytes per collective kind."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.payload_bytes = defaultdict(int)
        self.bus_bytes = defaultdict(float)

    def add(self, kind: str, payload: int, group_size: int, bus: float | None = None):
        """`bus`: the bytes sent, where known exactly (uneven all-to-all splits)."""
        self.calls[kind] += 1
        self.payload_bytes[kind] += payload
        self.bus_bytes[kind] += BUS_FACTOR[kind](group_size) * payload if bus is None else bus

    def summary(self) -> dict:
        return {kind: {"calls": self.calls[kind], "payload_bytes": self.payload_bytes[kind],
                       "bus_bytes": self.bus_bytes[kind]} for kind in sorted(self.calls)}


class Comm:
    """What the groups of one mesh share: the transport and the traffic counter."""

    def __init__(self, transport=dist):
        self.transport = transport
        self.counter = CommCounter()

    @contextmanager
    def counting(self):
        """`with comm.counting() as c:` counts into c the collectives inside the block only."""
        outside, self.counter = self.counter, CommCounter()
        try:
            yield self.counter
        finally:
            self.counter = outside

    def group(self, process_group=None, device_mesh=None) -> "Group":
        return Group(self, process_group, device_mesh)


class _Done:
    """Work handle of a collective that had nothing to do."""

    def wait(self):
        return True


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Group:
    """A process group (None: this rank alone) with its 1-D DeviceMesh (for PyTorch's
    strategies) and the Comm its collectives are counted by."""

    def __init__(self, comm: Comm, process_group=None, device_mesh=None):
        self.comm, self.process_group, self.device_mesh = comm, process_group, device_mesh
        alone = process_group is None
        self.size = 1 if alone else dist.get_world_size(process_group)
        self.rank = 0 if alone else dist.get_rank(process_group)

    def __repr__(self):
        return f"Group(size={self.size}, rank={self.rank})"

    def __eq__(self, other):  # DTensor's groups, wrapped again, are the same group
        return isinstance(other, Group) and (self.process_group, self.size) == (other.process_group, other.size)

    def __hash__(self):
        return hash((self.process_group, self.size))

    def _count(self, kind: str, payload: int):
        self.comm.counter.add(kind, payload, self.size)

    @torch.compiler.disable
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        """In place. op: sum | max (averages: callers scale, where it fuses with a copy)."""
        if self.size == 1:
            return _Done() if async_op else None
        self._count("all_reduce", _nbytes(tensor))
        t = self.comm.transport
        return t.all_reduce(tensor, op={"sum": t.ReduceOp.SUM, "max": t.ReduceOp.MAX}[op],
                            group=self.process_group, async_op=async_op)

    @torch.compiler.disable
    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """output (N * k, ...) <- the inputs (k, ...) of the N ranks, in rank order."""
        if self.size == 1:
            output.copy_(input)
            return _Done() if async_op else None
        self._count("all_gather", _nbytes(output))
        return compat.collective(self.comm.transport, "all_gather_single")(
            output, input, group=self.process_group, async_op=async_op)

    @torch.compiler.disable
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """output (k, ...) <- rank r's slice of the sum of the inputs (N * k, ...)."""
        if self.size == 1:
            output.copy_(input)
            return _Done() if async_op else None
        self._count("reduce_scatter", _nbytes(input))
        return compat.collective(self.comm.transport, "reduce_scatter_single")(
            output, input, group=self.process_group, async_op=async_op)

    @torch.compiler.disable
    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int]):
        """Rows input_splits[j] of `input` (in order) to rank j; output: rank j's rows for
        this rank, output_splits[j] of them, in rank order. Uneven splits welcome."""
        if self.size == 1:
            output.copy_(input)
            return
        row = _nbytes(input) // max(input.size(0), 1)
        self.comm.counter.add("all_to_all", _nbytes(input), self.size,
                              bus=row * (input.size(0) - input_splits[self.rank]))
        self.comm.transport.all_to_all_single(output, input, output_splits, input_splits,
                                              group=self.process_group)

    @torch.compiler.disable
    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """In place, from the rank of index `src` within this group."""
        if self.size == 1:
            return _Done() if async_op else None
        self._count("broadcast", _nbytes(tensor))
        return self.comm.transport.broadcast(tensor, group_src=src, group=self.process_group,
                                             async_op=async_op)

    @torch.compiler.disable
    def send_recv(self, sends, recvs, async_op: bool = False):
        """Point-to-point, batched: `sends` and `recvs` are lists of (tensor, peer), peers as
        ranks within this group; recvs fill their tensors. Returns when all are done, or,
        with `async_op`, their work handles. One batch (`batch_isend_irecv`) posts sends and
        receives together, so two ranks that send to each other at the same time do not
        deadlock (NCCL serialises p2p calls otherwise)."""
        if self.size == 1:  # the ring of one: each send is this rank's own receive
            for (tensor, _), (received, _) in zip(sends, recvs):
                received.copy_(tensor)
            return [] if async_op else None
        t = self.comm.transport
        ops = [t.P2POp(t.isend, x, group=self.process_group, group_peer=peer) for x, peer in sends]
        ops += [t.P2POp(t.irecv, x, group=self.process_group, group_peer=peer) for x, peer in recvs]
        for tensor, _ in sends:
            self._count("send", _nbytes(tensor))
        works = t.batch_isend_irecv(ops) if ops else []
        if async_op:
            return works
        for work in works:
            work.wait()


# ------------------------------------------------- differentiable collectives (out of place)

def split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's slice of `x` along `dim` (no communication)."""
    return x.chunk(group.size, dim)[group.rank].contiguous()


def gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenation along `dim` of every rank's x, in rank order."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty(group.size * x.size(0), *x.shape[1:])
    group.all_gather(out, x)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Rank r's slice along `dim` of the sum of every rank's x."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty(x.size(0) // group.size, *x.shape[1:])
    group.reduce_scatter(out, x)
    return out.movedim(0, dim)


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of every rank's x (a new tensor)."""
    x = x.clone()
    group.all_reduce(x)
    return x


def conjugate(name: str, forward, backward):
    """An autograd op computing `forward(x, group)` whose gradient is `backward(grad, group)`:
    Megatron's f and g (tensor_parallel.py) and their kin are pairs of the functions above."""
    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    op = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd),
                                                 "backward": staticmethod(bwd)})
    return op.apply


# the sum over a group whose ranks each hold a share of one loss: backward sums the gradients too
sum_over = conjugate("SumOver", all_reduce, all_reduce)
