"""The parallel layout, in one place (torchtitan's ParallelDims): the axes, their product,
every rule a layout must obey, and the mesh of processes it builds.

The trainer, the planner, the benchmarks and the command line all ask `Layout.check`:
a layout the planner lists is one train.py accepts on that device, and no other.

Axes, outermost to innermost (mesh order; any of them may be 1):

    pp            pipeline stages (point-to-point only: tolerates the slowest links)
    dp_replicate  data parallel replicas (DDP and ZeRO-1: the whole model on each;
                  HSDP: --data_parallel_replicas groups)
    dp_shard      data parallel shards (FSDP: each holds 1/dp_shard of the model)
    cp            context parallel: each sequence split over these ranks
    tp            tensor parallel: contiguous ranks (the heaviest traffic stays in a node)

    rank = (((pp_rank * dp_replicate + r) * dp_shard + s) * cp + cp_rank) * tp + tp_rank

    e.g. pp=2 x dp=2 x tp=2 (cp=1):
              tp ->  0   1                  tp: a row             {0,1} {2,3} ...
    pp 0  dp 0    [  0 | 1 ]                dp: a column          {0,2} {1,3} {4,6} {5,7}
          dp 1    [  2 | 3 ]                pp: one (dp, tp)      {0,4} {1,5} {2,6} {3,7}
    pp 1  dp 0    [  4 | 5 ]                    across stages
          dp 1    [  6 | 7 ]

Derived groups: `dp` = dp_replicate x dp_shard (the ranks that read different data),
`dp_cp` = dp x cp (the ranks that hold the same parameters: CP ranks hold the same
weights and different tokens of the same sequences, so gradients are reduced over both)
and `dp_shard_cp` = dp_shard x cp (the ranks FSDP shards over; HSDP then all-reduces the
shards' gradients over dp_replicate).
Each is a flattened mesh dimension where more than one of its axes is > 1, else the one
axis itself (no extra process groups).

Expert parallelism is carved from dp_cp, as torchtitan and Megatron do: `ep` = runs of
--expert_parallel_size consecutive dp_cp ranks (they split the experts and trade tokens
all-to-all); `edp` = the dp_cp ranks at the same place of their run (they hold the same
experts: the experts' data parallel group). e.g. dp 4, ep 2: ep {0,1} {2,3}, edp {0,2} {1,3}.

One process started without torchrun runs with no process group at all.
"""
import dataclasses
import math
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanodist import compat
from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.comm import Comm, Group

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
GROUPS = AXES + ("dp", "dp_cp", "dp_shard_cp", "ep", "edp")
CHOICES = {
    "dp_type": ("ddp", "zero1", "fsdp"),
    "pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"),
    "checkpointing": ("none", "full", "selective"),
    "implementation": ("custom", "pytorch"),
}
# each field of Layout and the train.py flag that sets it (the one table of both directions)
FLAGS = {"pp": "pipeline_parallel_size", "dp": "data_parallel_size", "cp": "context_parallel_size",
         "tp": "tensor_parallel_size", "ep": "expert_parallel_size", "dp_type": "data_parallel_type",
         "dp_replicas": "data_parallel_replicas",
         "reshard_after_forward": "fsdp_reshard_after_forward",
         "reduce_on_last_micro_step": "fsdp_reduce_on_last_micro_step",
         "bucket_cap_mb": "bucket_cap_mb", "sequence_parallel": "sequence_parallel",
         "loss_parallel": "enable_loss_parallelism", "pp_schedule": "pipeline_schedule",
         "virtual_stages": "virtual_stages", "checkpointing": "activation_checkpointing",
         "ac_every": "ac_every", "compile": "compile", "implementation": "implementation"}


def flag(field: str) -> str:
    return f"--{FLAGS[field]}"


def _typed(value) -> str:
    """A flag's value as one types it: false, 5, 0.5."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


# The options that only an axis or a mode reads: field -> (whether the layout reads it, what
# it needs). Set to other than its default where it is not read, it is refused: a flag
# that has no effect says so, whichever it is.
NEEDS = {
    "pp_schedule": (lambda l: l.pp > 1, "--pipeline_parallel_size > 1"),
    "virtual_stages": (lambda l: l.pp > 1, "--pipeline_parallel_size > 1"),
    "dp_replicas": (lambda l: l.dp_type == "fsdp", "--data_parallel_type fsdp"),
    "reshard_after_forward": (lambda l: l.dp_type == "fsdp", "--data_parallel_type fsdp"),
    "reduce_on_last_micro_step": (lambda l: l.dp_type == "fsdp", "--data_parallel_type fsdp"),
    "bucket_cap_mb": (lambda l: l.dp_type != "fsdp", "--data_parallel_type ddp or zero1"),
    "loss_parallel": (lambda l: l.tp > 1, "--tensor_parallel_size > 1"),
    "sequence_parallel": (lambda l: l.tp > 1, "--tensor_parallel_size > 1"),
    "ac_every": (lambda l: l.checkpointing == "full", "--activation_checkpointing full"),
}


@dataclass(frozen=True)
class Layout:
    """The axes and how each runs. Frozen: one layout, decided once."""
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1                              # expert parallel, within dp_cp (a divisor of it)
    dp_type: str = "ddp"                     # ddp | zero1 (optimizer state sharded) | fsdp
    dp_replicas: int = 1                     # FSDP: replica groups of dp / dp_replicas shards (HSDP)
    reshard_after_forward: bool = True       # FSDP: ZeRO-3; False: ZeRO-2
    reduce_on_last_micro_step: bool = False  # FSDP: reduce-scatter once per step
    bucket_cap_mb: float = 25.0              # custom DDP's gradient buckets
    sequence_parallel: bool = False          # TP: norms and residuals sharded on the sequence
    loss_parallel: bool = False              # TP: vocab-parallel loss
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1                  # PP: model chunks per rank
    checkpointing: str = "none"              # activation checkpointing: none | full | selective
    ac_every: int = 1                        # full: every K-th block
    compile: bool = False                    # torch.compile each block
    implementation: str = "custom"           # custom (by hand) | pytorch

    # ---- the axes and their product

    @property
    def dp_replicate(self) -> int:
        return self.dp_replicas if self.dp_type == "fsdp" else self.dp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicas if self.dp_type == "fsdp" else 1

    def sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "cp": self.cp, "tp": self.tp}

    @property
    def world(self) -> int:
        return math.prod(self.sizes().values())

    @property
    def dp_cp(self) -> int:
        """Ranks that hold the same parameters (replicas or shards, x CP)."""
        return self.dp * self.cp

    @property
    def fsdp(self) -> bool:
        """Sharded: FSDP over more than one rank holding the same parameters."""
        return self.dp_type == "fsdp" and self.dp_cp > 1

    @property
    def hsdp(self) -> bool:
        """FSDP within groups of dp_shard x cp ranks, replicated across dp_replicas groups."""
        return self.fsdp and self.dp_replicas > 1

    @property
    def ddp(self) -> bool:
        return self.dp_type == "ddp" and self.dp_cp > 1

    @property
    def zero1(self) -> bool:
        return self.dp_type == "zero1" and self.dp_cp > 1

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis, and within `dp` and `dp_cp`."""
        at, rest = {}, rank
        for axis in reversed(AXES):
            rest, at[axis] = divmod(rest, self.sizes()[axis])
        at["dp"] = at["dp_replicate"] * self.dp_shard + at["dp_shard"]
        at["dp_cp"] = at["dp"] * self.cp + at["cp"]
        at["dp_shard_cp"] = at["dp_shard"] * self.cp + at["cp"]
        at["edp"], at["ep"] = divmod(at["dp_cp"], self.ep)
        return at

    @property
    def name(self) -> str:
        """e.g. dp2-fsdp-tp2-custom-pp2-1f1b-cp2 (run directories are named after it)."""
        return (f"dp{self.dp}-{self.dp_type}" + (f"x{self.dp_replicas}" if self.hsdp else "")
                + f"-tp{self.tp}-{self.implementation}"
                + (f"-pp{self.pp}-{self.pp_schedule}" if self.pp > 1 else "")
                + (f"-cp{self.cp}" if self.cp > 1 else "") + (f"-ep{self.ep}" if self.ep > 1 else ""))

    def flags(self) -> list[str]:
        """The train.py flags of this layout."""
        return [f"{flag(f.name)}={getattr(self, f.name)}" for f in fields(self)]

    # ---- every rule

    def micro_steps(self, total_batch_size: int, batch_size: int, block_size: int) -> int:
        """Micro-steps per optimizer step so that every DP size sees the same global batch
        (CP ranks read the same sequences: they do not count)."""
        per_micro = batch_size * block_size * self.dp
        if total_batch_size % per_micro:
            raise UserError(
                f"--total_batch_size ({total_batch_size}) must be divisible by batch_size x "
                f"block_size x data_parallel_size = {batch_size} x {block_size} x {self.dp} = "
                f"{per_micro}; pick e.g. --total_batch_size "
                f"{per_micro * max(total_batch_size // per_micro, 1)}")
        return total_batch_size // per_micro

    def check(self, world_size: int, device_type: str, block_size: int, dropout: float = 0.0,
              model: GPTConfig | None = None, micro_steps: int | None = None):
        """Every rule of a layout; the first one broken raises a UserError that names the
        flags to change. The rules on the model's shape and on the micro-batches apply when
        `model` and `micro_steps` are given (the trainer knows them once the data is open)."""
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise UserError(f"unknown {flag(field)} {getattr(self, field)!r}; choose from "
                                f"{', '.join(allowed)}")
        for field, (reads, needs) in NEEDS.items():
            value = getattr(self, field)
            if value != getattr(Layout, field) and not reads(self):
                raise UserError(f"{flag(field)} {_typed(value)} needs {needs}, and has no effect without it; "
                                f"drop it (or set {needs})")
        self._check_data_parallel()  # before the world: the axes' sizes need R | dp
        self._check_world(world_size)
        self._check_tensor_parallel(block_size)
        self._check_context_parallel(device_type, block_size, dropout)
        self._check_expert_parallel()
        if self.compile and self.fsdp and self.implementation == "custom":
            raise UserError("--compile cannot trace the custom FSDP (it frees and regrows parameter "
                            "storage between the ops); use --implementation pytorch with --compile")
        if self.pp > 1 and self.implementation == "pytorch" and (self.cp > 1 or self.tp > 1):
            what = "PyTorch's context parallel" if self.cp > 1 else "DTensor TP"
            raise UserError(f"torch.distributed.pipelining x {what} is not wired up here; use "
                            f"--implementation custom for PP x {'CP' if self.cp > 1 else 'TP'}")
        if self.pp > 1:
            self._check_pipeline(model, micro_steps)
        if model is not None:
            self._check_model(model)

    def _check_world(self, world_size: int):
        if self.world != world_size:
            n = self.world
            raise UserError(
                f"--pipeline_parallel_size ({self.pp}) x --data_parallel_size ({self.dp}) x "
                f"--context_parallel_size ({self.cp}) x --tensor_parallel_size ({self.tp}) = {n} "
                f"processes, but {world_size} were launched: launch with torchrun "
                f"--nproc_per_node={n} or change the sizes so that their product is {world_size}")

    def _check_data_parallel(self):
        R = self.dp_replicas
        if R < 1 or self.dp % R:
            raise UserError(f"--data_parallel_replicas ({R}) must divide --data_parallel_size ({self.dp})")
        if R > 1 and self.dp_shard * self.cp == 1:
            raise UserError(f"--data_parallel_replicas {R} = --data_parallel_size leaves one shard per "
                            f"replica group: that is DDP; use --data_parallel_type ddp")
        if self.zero1 and self.implementation == "pytorch" and (self.tp > 1 or self.pp > 1):
            raise UserError("--data_parallel_type zero1 --implementation pytorch (DDP + "
                            "ZeroRedundancyOptimizer) holds plain tensors only: no DTensor TP, no "
                            "pipeline stages; use --implementation custom for ZeRO-1 x TP or PP")

    def sequence_divides(self, block_size: int) -> bool:
        """Whether sequence parallelism can split a CP rank's tokens over the TP ranks."""
        return (block_size // self.cp) % self.tp == 0

    def _check_tensor_parallel(self, block_size: int):
        if self.sequence_parallel and not self.sequence_divides(block_size):
            what = (f"--block_size ({block_size})" if self.cp == 1 else f"the {block_size // self.cp} "
                    f"tokens of a CP rank (--block_size / --context_parallel_size)")
            raise UserError(f"--sequence_parallel splits the sequence: {what} must be divisible by "
                            f"--tensor_parallel_size ({self.tp})")

    def _check_context_parallel(self, device_type: str, block_size: int, dropout: float):
        if self.cp == 1:
            return
        if block_size % (2 * self.cp):
            raise UserError(f"--context_parallel_size {self.cp} cuts each sequence into {2 * self.cp} "
                            f"zigzag chunks: --block_size ({block_size}) must be divisible by {2 * self.cp}")
        if dropout > 0:
            raise UserError("--context_parallel_size > 1 runs attention without dropout: use --dropout 0")
        if self.implementation == "pytorch" and device_type != "cuda":
            raise UserError("--implementation pytorch --context_parallel_size > 1 runs on CUDA only "
                            "(PyTorch's context parallel has no CPU attention kernel rule); use "
                            "--implementation custom (ring attention by hand) on CPU")

    def _check_model(self, model: GPTConfig):
        for what, size in (("n_head", model.n_head), ("n_embd", model.n_embd),
                           ("padded vocab_size", model.vocab_size)):
            if size % self.tp:
                raise UserError(f"{what} ({size}) is not divisible by --tensor_parallel_size "
                                f"({self.tp}); pick a tensor parallel size that divides it")
        E = model.moe_experts
        if self.ep > 1 and (E == 0 or E % self.ep):
            raise UserError(f"--expert_parallel_size {self.ep} splits the experts over {self.ep} ranks: "
                            + ("the model has none; add --moe_experts" if E == 0 else
                               f"--moe_experts ({E}) must be divisible by it"))
        if E and self.sequence_parallel:
            raise UserError("--moe_experts with --sequence_parallel is not wired up (the router and "
                            "experts would see a slice of the sequence per TP rank and need their "
                            "gradients summed over TP); drop --sequence_parallel")
        if E and self.compile:
            raise UserError("--moe_experts with --compile is not wired up (routing sizes are data-"
                            "dependent: each MoE block would recompile); drop --compile")
        if E and self.pp > 1 and self.implementation == "pytorch":
            raise UserError("--moe_experts with torch.distributed.pipelining is not wired up (its "
                            "shape inference cannot run data-dependent routing); use "
                            "--implementation custom for PP x MoE")

    def _check_expert_parallel(self):
        if self.ep == 1:
            return
        if self.ep < 1 or self.dp_cp % self.ep:
            raise UserError(f"--expert_parallel_size ({self.ep}) is carved from the data_parallel_size "
                            f"x context_parallel_size = {self.dp_cp} ranks: it must divide {self.dp_cp}")
        if self.implementation == "pytorch":
            raise UserError("--expert_parallel_size > 1 is hand-written only (PyTorch 2.13 offers no "
                            "expert-parallel module or MoE layer); use --implementation custom")
        if self.hsdp:
            raise UserError("--expert_parallel_size > 1 with --data_parallel_replicas > 1 (HSDP) is not "
                            "wired up; use --data_parallel_type ddp, zero1 or fsdp without replicas")

    def _check_pipeline(self, model: GPTConfig | None, M: int | None):
        P, V, schedule = self.pp, self.virtual_stages, self.pp_schedule
        if model is not None and P > model.n_layer:
            raise UserError(f"--pipeline_parallel_size ({P}) is larger than the model's n_layer "
                            f"({model.n_layer}): every stage needs a block; use at most {model.n_layer} stages")
        if model is not None and P * V > model.n_layer:
            raise UserError(f"--pipeline_parallel_size x --virtual_stages = {P} x {V} = {P * V} chunks, "
                            f"but the model has {model.n_layer} blocks; lower --virtual_stages")
        if V > 1 and schedule not in ("interleaved_1f1b", "zero_bubble"):
            raise UserError(f"--virtual_stages {V} needs --pipeline_schedule interleaved_1f1b "
                            f"(or zero_bubble with --implementation pytorch)")
        if schedule == "zero_bubble" and self.implementation != "pytorch":
            raise UserError("--pipeline_schedule zero_bubble exists with --implementation pytorch only")
        if M is None:
            return
        where = (f"M = {M} micro-batches (the gradient accumulation steps: --total_batch_size / "
                 f"(batch_size x block_size x data_parallel_size))")
        if schedule in ("interleaved_1f1b", "zero_bubble") and M % P:
            raise UserError(f"--pipeline_schedule {schedule} needs M to be a multiple of the "
                            f"{P} stages, got {where}; raise --total_batch_size or lower --batch_size")
        if schedule == "1f1b" and self.implementation == "pytorch" and M < P:
            raise UserError(f"PyTorch's 1F1B needs at least M = P = {P} micro-batches, got {where}")


# ------------------------------------------------------------------ the mesh

@dataclass(frozen=True)
class Mesh:
    """The processes of a layout: this rank, its device, and the group of every axis
    (`mesh.tp.size`, `mesh.dp.rank`, `mesh.dp_cp.all_reduce(x)`). Built once by
    `build_mesh` and passed explicitly (no global)."""
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
        if layout.sizes() != self.layout.sizes():
            raise ValueError(f"{layout.name} has other axes than this mesh's {self.layout.name}")
        return dataclasses.replace(self, layout=layout)

    @property
    def comm(self) -> Comm:
        return self.groups["tp"].comm

    @property
    def pp(self) -> Group:
        return self.groups["pp"]

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    @property
    def cp(self) -> Group:
        return self.groups["cp"]

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def dp_cp(self) -> Group:
        return self.groups["dp_cp"]

    @property
    def dp_shard_cp(self) -> Group:
        return self.groups["dp_shard_cp"]

    @property
    def dp_replicate(self) -> Group:
        return self.groups["dp_replicate"]

    @property
    def ep(self) -> Group:
        return self.groups["ep"]

    @property
    def edp(self) -> Group:
        return self.groups["edp"]

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

    groups["dp"] = combined(("dp_replicate", "dp_shard"), "dp")
    groups["dp_cp"] = combined(("dp_replicate", "dp_shard", "cp"), "dp_cp")
    groups["dp_shard_cp"] = combined(("dp_shard", "cp"), "dp_shard_cp")
    groups["ep"], groups["edp"] = _expert_groups(layout, groups["dp_cp"], comm, timeout if waits else None)
    return Mesh(layout, dist.get_rank(), device, groups, device_mesh)


def _expert_groups(layout: Layout, dp_cp: Group, comm: Comm, timeout) -> tuple[Group, Group]:
    """(ep, edp): the runs of layout.ep consecutive dp_cp ranks, and the dp_cp ranks at the
    same place of theirs (DeviceMesh has no dimension to split: groups of their own)."""
    if layout.ep == 1:
        return comm.group(), dp_cp
    ours = {}  # every rank creates every group, in the same order (new_group's rule)
    for ranks_of_world in _all_dp_cp_groups(layout):
        runs = [ranks_of_world[i:i + layout.ep] for i in range(0, len(ranks_of_world), layout.ep)]
        places = [ranks_of_world[j::layout.ep] for j in range(layout.ep)]
        for name, ranks in [("ep", r) for r in runs] + [("edp", r) for r in places]:
            group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if dist.get_rank() in ranks:
                ours[name] = comm.group(group)
    return ours["ep"], ours["edp"]


def _all_dp_cp_groups(layout: Layout) -> list[list[int]]:
    """The world's dp_cp groups, each in dp_cp order (one per pp x tp place)."""
    groups = {}
    for rank in range(layout.world):
        at = layout.coordinates(rank)
        groups.setdefault((at["pp"], at["tp"]), []).append((at["dp_cp"], rank))
    return [[rank for _, rank in sorted(g)] for g in groups.values()]
