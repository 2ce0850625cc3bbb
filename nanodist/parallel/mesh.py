"""The layout of the processes, built once and passed explicitly (no global).

Named dimensions, outermost to innermost: pp, dp, cp, tp (any of them may be 1). TP ranks
are contiguous (TP traffic is the heaviest: keep it in a node), then CP (a ring of K/V
blocks every layer), then DP; PP is outermost (point-to-point only, it tolerates the
slowest links).

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

    e.g. pp=2 x dp=2 x tp=2 (cp=1):
              tp ->  0   1                  tp_group: a row          {0,1} {2,3} ...
    pp 0  dp 0    [  0 | 1 ]                dp_group: a column       {0,2} {1,3} {4,6} {5,7}
          dp 1    [  2 | 3 ]                pp_group: one (dp, tp)   {0,4} {1,5} {2,6} {3,7}
    pp 1  dp 0    [  4 | 5 ]                          across stages
          dp 1    [  6 | 7 ]

    dp=1 x cp=2 x tp=2: cp_group {0,2} {1,3}; dp=2 x cp=2 x tp=1: cp_group {0,1} {2,3},
    dp_group {0,2} {1,3}

CP ranks hold the same parameters and different tokens of the same sequences, so
gradients are reduced over DP x CP: `dp_cp_group` (custom strategies) and `dp_cp_mesh`
(the flattened "dp_cp" dimension for PyTorch's), the DP ones when cp = 1.

One process started without torchrun runs with no process group at all.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanodist.config import UserError
from nanodist.faults import check_restartable


@dataclass
class Mesh:
    dp_size: int = 1
    tp_size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    device_mesh: DeviceMesh | None = None   # dims ("pp", "dp", "cp", "tp"); None for one process
    cp_size: int = 1
    dp_cp_mesh: DeviceMesh | None = None    # 1-D: "dp", or "dp" x "cp" flattened (DDP, FSDP run on it)
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.pp_size * self.dp_size * self.cp_size * self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp_size * self.cp_size * self.tp_size)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cp_size * self.tp_size) % self.dp_size

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp_size % self.cp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def group(self, dim: str):
        return self.device_mesh.get_group(dim) if self.device_mesh is not None else None

    @property
    def pp_group(self):
        return self.group("pp")

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def cp_group(self):
        return self.group("cp")

    @property
    def tp_group(self):
        return self.group("tp")

    @property
    def dp_cp_size(self) -> int:
        """Ranks that hold the same parameters (DP replicas or FSDP shards, x CP)."""
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def dp_cp_group(self):
        return self.dp_cp_mesh.get_group() if self.dp_cp_mesh is not None else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str = "auto") -> torch.device:
    """cuda when present (or asked for), else cpu; the local rank picks the GPU, one
    GPU per process of this machine."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; "
                        "use --device cpu (or auto)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    gpus = torch.cuda.device_count()
    if max(local_world, local_rank + 1) > gpus:  # NCCL: "invalid device ordinal" / "Duplicate GPU"
        raise UserError(f"{local_world} processes on this machine need one GPU each, but "
                        f"{gpus} visible; use --nproc_per_node={gpus} (a smaller layout) or "
                        f"--device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); joining and
    every collective on it give up after `timeout` (None: PyTorch's 10/30 minutes).
    Returns (rank, world_size); (0, 1) with no group when not launched by torchrun
    (an already initialised group, as in the tests, is used as it is)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return 0, 1
        check_restartable()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _group_options(timeout: timedelta):
    """Options that carry `timeout` to the mesh's sub-groups (DeviceMesh would give them
    PyTorch's default, not the world group's)."""
    if dist.get_backend() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = C10dBackend.Options(dist.get_backend())
    options._timeout = timeout
    return options


def build_mesh(dp_size: int, tp_size: int, device: torch.device,
               timeout: timedelta | None = None, pp_size: int = 1, cp_size: int = 1) -> Mesh:
    """The PP x DP x CP x TP mesh over the already initialised process group (or one process);
    its groups give up after `timeout` (None: PyTorch's default)."""
    world = pp_size * dp_size * cp_size * tp_size
    if not dist.is_initialized():
        if world != 1:
            raise UserError(f"a layout of pp={pp_size} x dp={dp_size} x cp={cp_size} x tp={tp_size} needs "
                            f"torchrun --nproc_per_node={world}")
        return Mesh(device=device)
    dims = ("pp", "dp", "cp", "tp")
    waits = timeout and dist.get_backend() != "fake"  # a simulated cluster never waits
    override = {dim: _group_options(timeout) for dim in dims} if waits else None
    device_mesh = init_device_mesh(device.type, (pp_size, dp_size, cp_size, tp_size), mesh_dim_names=dims,
                                   backend_override=override)
    dp_cp_mesh = device_mesh["dp", "cp"]._flatten("dp_cp") if cp_size > 1 else device_mesh["dp"]
    return Mesh(dp_size, tp_size, dist.get_rank(), device, device_mesh, cp_size, dp_cp_mesh, pp_size)
