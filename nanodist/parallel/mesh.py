"""The processes of a layout (layout.py): this rank, its device, and a `Group` for every
role a strategy asks for, built once by `build_mesh` and passed explicitly (no global).

Groups by role (`mesh.groups[name]`, or `mesh.tp`, `mesh.dp_cp`, ...):

    pp, dp_replicate, dp_shard, cp, tp   the mesh's axes (DeviceMesh dimensions)
    dp           dp_replicate x dp_shard: the ranks that read different data
    dp_cp        dp x cp: the ranks that hold the same dense parameters (CP ranks hold the
                 same weights and different tokens): gradients are reduced over them
    dp_shard_cp  dp_shard x cp: what FSDP shards over (HSDP all-reduces across dp_replicate)
    ep, edp      carved from dp_cp: runs of --expert_parallel_size consecutive ranks trade
                 tokens (ep); the ranks at the same place of each run hold the same experts (edp)
    cp_ulysses, cp_ring   carved from cp: runs of the Ulysses degree consecutive ranks trade
                 heads all-to-all (cp_ulysses); the ranks at the same place pass K/V in a ring

A combined group is a flattened DeviceMesh dimension where more than one of its axes is
> 1, else the one axis itself (no extra process groups). DeviceMesh has no dimension to
split, so carved groups are made with `new_group` (every rank creates every group, in
the same order). e.g. dp_cp 4, ep 2: ep {0,1} {2,3}, edp {0,2} {1,3}.
"""
import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanodist import compat
from nanodist.errors import UserError
from nanodist.parallel.comm import Comm, Group
from nanodist.parallel.layout import AXES, CARVED, COMBINED, GROUPS, Layout


@dataclass(frozen=True)
class Mesh:
    """The processes of a layout: this rank, its device, and the group of every role."""
    layout: Layout
    rank: int
    device: torch.device
    groups: dict            # name of GROUPS -> Group
    device_mesh: DeviceMesh | None = None  # dims AXES; None for one process

    @classmethod
    def alone(cls, device=torch.device("cpu"), comm: Comm | None = None,
              layout: Layout = Layout()) -> "Mesh":
        """This rank on its own, every group of size 1 (one process, or a reference run
        inside a test); `layout`: its options (its axes are all 1)."""
        if layout.world != 1:
            raise UserError(f"a layout of {layout.world} processes needs torchrun "
                            f"--nproc_per_node={layout.world}")
        comm = comm or Comm()
        return cls(layout, 0, device, {name: comm.group() for name in GROUPS})

    def with_layout(self, layout: Layout) -> "Mesh":
        """The same processes and groups for another layout of the same axes (its options
        differ: a schedule, an implementation, checkpointing)."""
        if layout.group_sizes() != self.layout.group_sizes():
            raise ValueError(f"{layout.name} has other groups than this mesh's {self.layout.name}")
        return dataclasses.replace(self, layout=layout)

    def __getattr__(self, name: str) -> Group:
        """`mesh.tp`, `mesh.dp_cp`, ...: the group of that role."""
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(name)

    @property
    def comm(self) -> Comm:
        return self.groups["tp"].comm

    def replicate_shard_mesh(self) -> DeviceMesh:
        """The 2-D (dp_replicate, dp_shard x cp) DeviceMesh of HSDP (FSDP2's)."""
        shard = self.dp_shard_cp.device_mesh.mesh_dim_names[0]
        return self.device_mesh["dp_replicate", shard]

    @property
    def world_size(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _group_options(timeout: timedelta):
    """Options that carry `timeout` to the mesh's groups (DeviceMesh would give them
    PyTorch's default, not the world group's)."""
    if dist.get_backend() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = compat.C10dBackend.Options(dist.get_backend())
    return compat.set_timeout(options, timeout)


def build_mesh(layout: Layout, device: torch.device, comm: Comm | None = None,
               timeout: timedelta | None = None) -> Mesh:
    """The mesh of `layout` over the already initialised process group (or one process);
    its groups give up after `timeout` (None: PyTorch's default) and count their traffic
    in `comm` (a new Comm by default)."""
    if not dist.is_initialized():
        return Mesh.alone(device, comm, layout)
    comm = comm or Comm()
    waits = timeout and dist.get_backend() != "fake"  # a simulated cluster never waits
    override = {axis: _group_options(timeout) for axis in AXES} if waits else None
    sizes = layout.sizes()
    device_mesh = init_device_mesh(device.type, tuple(sizes.values()), mesh_dim_names=AXES,
                                   backend_override=override)
    groups = {axis: comm.group(device_mesh.get_group(axis), device_mesh[axis]) for axis in AXES}

    flattened = {}  # the axes > 1 of a combined group -> its Group (dp and dp_cp may agree)

    def combined(axes: tuple[str, ...], name: str) -> Group:
        """The ranks of `axes` together: a flattened dimension only where two are > 1."""
        used = tuple(a for a in axes if sizes[a] > 1)
        if len(used) <= 1:
            return groups[used[0] if used else axes[-1]]
        if used not in flattened:
            span = AXES[AXES.index(used[0]):AXES.index(used[-1]) + 1]  # contiguous mesh dims
            flat = compat.flatten(device_mesh[span], name)
            flattened[used] = comm.group(flat.get_group(), flat)
        return flattened[used]

    for name, axes in COMBINED.items():
        groups[name] = combined(axes, name)
    for parent, (runs, places) in CARVED.items():
        groups[runs], groups[places] = _carve(layout, parent, layout.run_size(parent), groups[parent], comm,
                                              timeout if waits else None)
    sizes = layout.group_sizes()
    assert all(groups[name].size == sizes[name] for name in GROUPS), "mesh.py and Layout.group_sizes disagree"
    return Mesh(layout, dist.get_rank(), device, groups, device_mesh)


def _carve(layout: Layout, parent: str, n: int, whole: Group, comm: Comm, timeout) -> tuple[Group, Group]:
    """(runs, places) of a `parent` group: the runs of n consecutive ranks of it, and its
    ranks at the same place of their run (DeviceMesh has no dimension to split)."""
    if n == 1:
        return comm.group(), whole
    if n == whole.size:  # one run: the parent itself (no second communicator for the same ranks)
        return whole, comm.group()
    ours = {}  # every rank creates every group, in the same order (new_group's rule)
    for ranks_of_world in _world_groups(layout, parent):
        runs = [ranks_of_world[i:i + n] for i in range(0, len(ranks_of_world), n)]
        places = [ranks_of_world[j::n] for j in range(n)]
        for kind, ranks in [("runs", r) for r in runs] + [("places", r) for r in places]:
            group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if dist.get_rank() in ranks:
                ours[kind] = comm.group(group)
    return ours["runs"], ours["places"]


def _world_groups(layout: Layout, name: str) -> list[list[int]]:
    """Every group of role `name` in the world, each in its own rank order."""
    groups = {}
    for rank in range(layout.world):
        at = layout.coordinates(rank)
        others = tuple(v for axis, v in at.items() if axis in AXES and axis not in COMBINED.get(name, (name,)))
        groups.setdefault(others, []).append((at[name], rank))
    return [[rank for _, rank in sorted(g)] for g in groups.values()]

