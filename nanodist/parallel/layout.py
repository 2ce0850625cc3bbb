"""The parallel layout, in one place (torchtitan's ParallelDims): the axes and their
options, each declared once with its train.py flag (`option`), and their product. Its
rules are each strategy's (`check_*`, run by rules.py); the processes it runs on, mesh.py's.

Axes, outermost to innermost (mesh order; any of them may be 1):

    pp            pipeline stages (point-to-point only: tolerates the slowest links)
    dp_replicate  data parallel replicas (DDP and ZeRO-1: the whole model on each;
                  HSDP: --data_parallel_replicas groups)
    dp_shard      data parallel shards (FSDP: each holds 1/dp_shard of the model)
    cp            context parallel: each sequence split over these ranks (ring attention,
                  Ulysses, or Ulysses within ring steps: --context_parallel_type)
    tp            tensor parallel: contiguous ranks (the heaviest traffic stays in a node)

    rank = (((pp_rank * dp_replicate + r) * dp_shard + s) * cp + cp_rank) * tp + tp_rank

    e.g. pp=2 x dp=2 x tp=2 (cp=1):
              tp ->  0   1                  tp: a row             {0,1} {2,3} ...
    pp 0  dp 0    [  0 | 1 ]                dp: a column          {0,2} {1,3} {4,6} {5,7}
          dp 1    [  2 | 3 ]                pp: one (dp, tp)      {0,4} {1,5} {2,6} {3,7}
    pp 1  dp 0    [  4 | 5 ]                    across stages
          dp 1    [  6 | 7 ]

Expert parallelism and the Ulysses degree carve groups out of these (mesh.py): `ep`
within dp x cp, `cp_ulysses` (the inner runs) and `cp_ring` within cp.

One process started without torchrun runs with no process group at all.
"""
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple

from nanodist.errors import UserError

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# groups of several consecutive axes: the ranks that read different data (dp), that hold the
# same dense parameters (dp_cp: CP ranks hold the same weights, other tokens), that FSDP
# shards over (dp_shard_cp; HSDP then all-reduces across dp_replicate)
COMBINED = {"dp": ("dp_replicate", "dp_shard"), "dp_cp": ("dp_replicate", "dp_shard", "cp"),
            "dp_shard_cp": ("dp_shard", "cp")}
# groups carved out of another (DeviceMesh has no dimension to split): parent -> (the runs
# of n consecutive ranks, the ranks at the same place of each run), n given by the layout
CARVED = {"dp_cp": ("ep", "edp"), "cp": ("cp_ulysses", "cp_ring")}
GROUPS = AXES + tuple(COMBINED) + tuple(name for pair in CARVED.values() for name in pair)
class Run(NamedTuple):
    """What a layout's rules read besides the layout: the processes, the device, the
    sequence, and, once the trainer knows them, the model and its micro-steps."""
    world_size: int
    device_type: str
    block_size: int
    dropout: float = 0.0
    model: object = None          # GPTConfig
    micro_steps: int | None = None


class Needs(NamedTuple):
    """Where an option has an effect: `applies(layout)`, and the flags that make it so."""
    applies: Callable
    requirement: str


def option(default, flag: str, help: str, choices: tuple | None = None, needs: Needs | None = None,
           flag_default=None):
    """A Layout field and its train.py flag, declared once: the flag's name, its help, its
    choices, and where it has an effect (`needs`): set to other than its default where it
    has none, the option is refused (a flag that has no effect says so, whichever it is). `flag_default`: the flag's, where it differs."""
    return field(default=default, metadata=dict(flag=flag, help=help, choices=choices, needs=needs,
                                                 flag_default=default if flag_default is None else flag_default))


def _pp(layout) -> bool:
    return layout.pp > 1


def _tp(layout) -> bool:
    return layout.tp > 1


def _fsdp(layout) -> bool:
    return layout.dp_type == "fsdp"


FSDP_ONLY = Needs(_fsdp, "--data_parallel_type fsdp")


@dataclass(frozen=True)
class Layout:
    """The axes (mesh order) and how each runs. Frozen: one layout, decided once."""
    pp: int = option(1, "pipeline_parallel_size", "PP size: pipeline stages (the outermost mesh dimension)")
    pp_schedule: str = option("1f1b", "pipeline_schedule", "gpipe | 1f1b | interleaved_1f1b (| zero_bubble: "
                              "--implementation pytorch); micro-batches = the gradient accumulation steps M",
                              ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"),
                              Needs(_pp, "--pipeline_parallel_size > 1"))
    virtual_stages: int = option(1, "virtual_stages", "model chunks per pipeline rank (interleaved_1f1b, "
                                 "zero_bubble)", needs=Needs(_pp, "--pipeline_parallel_size > 1"))
    dp: int = option(1, "data_parallel_size", "DP size (0: the world size / (PP x CP x TP))", flag_default=0)
    dp_type: str = option("ddp", "data_parallel_type", "ddp: replicate the model; zero1: replicate it, shard "
                          "the optimizer state (ZeRO-1); fsdp: shard it (ZeRO-3; ZeRO-2 by "
                          "--fsdp_reshard_after_forward)", ("ddp", "zero1", "fsdp"))
    hsdp_replicas: int = option(1, "data_parallel_replicas", "fsdp: R replica groups of data_parallel_size / R "
                                "shards each (HSDP; 1: plain FSDP)", needs=FSDP_ONLY)
    reshard_after_forward: bool = option(True, "fsdp_reshard_after_forward", "false: keep gathered params "
                                         "until backward (ZeRO-2)", needs=FSDP_ONLY)
    reduce_on_last_micro_step: bool = option(False, "fsdp_reduce_on_last_micro_step", "FSDP: reduce-scatter on "
                                             "the last micro-step only (unsharded grads kept: +4 bytes per "
                                             "parameter per rank, less traffic)",
                                             needs=FSDP_ONLY)
    bucket_cap_mb: float = option(25.0, "bucket_cap_mb", "custom DDP gradient bucket size in MiB",
                                  needs=Needs(lambda l: not _fsdp(l), "--data_parallel_type ddp or zero1"))
    cp: int = option(1, "context_parallel_size", "CP size: each sequence split over this many ranks; they "
                     "read the same batch")
    cp_type: str = option("ring", "context_parallel_type", "ring: K/V passed around a ring (zigzag); ulysses: "
                          "all-to-all from sequence- to head-sharded and back (heads must divide by it x TP); "
                          "hybrid: Ulysses within, ring across", ("ring", "ulysses", "hybrid"),
                          Needs(lambda l: l.cp > 1, "--context_parallel_size > 1"))
    ulysses_degree: int = option(0, "ulysses_degree", "hybrid CP: ranks of each Ulysses all-to-all, the ring "
                                 "over the rest (0: the largest the heads allow)",
                                 needs=Needs(lambda l: l.cp_type == "hybrid", "--context_parallel_type hybrid"))
    tp: int = option(1, "tensor_parallel_size", "TP size; TP ranks are contiguous")
    sequence_parallel: bool = option(False, "sequence_parallel", "shard norms and residuals along the "
                                     "sequence under TP", needs=Needs(_tp, "--tensor_parallel_size > 1"))
    loss_parallel: bool = option(False, "enable_loss_parallelism", "vocab-parallel loss: full logits never "
                                 "on one rank", needs=Needs(_tp, "--tensor_parallel_size > 1"))
    ep: int = option(1, "expert_parallel_size", "EP size: each MoE layer's experts split over this many of "
                     "the DP x CP ranks, tokens sent to them all-to-all")
    checkpointing: str = option("none", "activation_checkpointing", "none | full: blocks keep only their "
                                "input and recompute the rest | selective: keep matmul outputs, recompute "
                                "element-wise ops", ("none", "full", "selective"))
    ac_every: int = option(1, "ac_every", "--activation_checkpointing full: checkpoint every K-th block",
                           needs=Needs(lambda l: l.checkpointing == "full", "--activation_checkpointing full"))
    loss_chunks: int = option(1, "loss_chunks", "the head's matmul and loss in N chunks of tokens, never "
                              "holding the whole fp32 logits (model/loss.py; 1: whole, the reference; 0: "
                              "automatic, chunks as large as the head's input)")
    compile: bool = option(False, "compile", "torch.compile the model")
    implementation: str = option("custom", "implementation", "custom: hand-written on collectives; pytorch: "
                                 "DDP, FSDP2, DTensor", ("custom", "pytorch"))

    # ---- the axes and their product

    @property
    def dp_replicate(self) -> int:
        return self.hsdp_replicas if self.dp_type == "fsdp" else self.dp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.hsdp_replicas if self.dp_type == "fsdp" else 1

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
    def ulysses(self) -> int:
        """CP ranks that trade heads all-to-all (mesh.py's cp_ulysses); the ring runs over
        cp / ulysses of them (cp_ring)."""
        return {"ring": 1, "ulysses": self.cp,
                "hybrid": self.ulysses_degree or 1}[self.cp_type]  # 0: not resolved (rules refuse it)

    def with_heads(self, n_head: int) -> "Layout":
        """Hybrid CP's default degree, once the heads are known: the largest proper divisor
        of cp that the heads of a TP rank divide by (the rest of cp runs the ring)."""
        if self.cp_type != "hybrid" or self.ulysses_degree or n_head % self.tp:
            return self  # (a TP size that does not divide the heads is refused by the rules)
        heads = n_head // self.tp
        fits = [u for u in range(2, self.cp) if self.cp % u == 0 and heads % u == 0]
        return dataclasses.replace(self, ulysses_degree=max(fits, default=0))

    @property
    def fsdp(self) -> bool:
        """Sharded: FSDP over more than one rank holding the same parameters."""
        return self.dp_type == "fsdp" and self.dp_cp > 1

    @property
    def hsdp(self) -> bool:
        """FSDP within groups of dp_shard x cp ranks, replicated across hsdp_replicas groups
        (the dp_replicate axis)."""
        return self.fsdp and self.hsdp_replicas > 1

    @property
    def ddp(self) -> bool:
        return self.dp_type == "ddp" and self.dp_cp > 1

    @property
    def zero1(self) -> bool:
        return self.dp_type == "zero1" and self.dp_cp > 1

    def run_size(self, parent: str) -> int:
        """The runs carved out of `parent` (CARVED): EP's size, the Ulysses degree."""
        return {"dp_cp": self.ep, "cp": self.ulysses}[parent]

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index within a group of every role (GROUPS)."""
        at, rest, sizes = {}, rank, self.sizes()
        for axis in reversed(AXES):
            rest, at[axis] = divmod(rest, sizes[axis])
        for name, axes in COMBINED.items():
            at[name] = 0
            for axis in axes:
                at[name] = at[name] * sizes[axis] + at[axis]
        for parent, (runs, places) in CARVED.items():
            at[places], at[runs] = divmod(at[parent], self.run_size(parent))
        return at

    def group_sizes(self) -> dict[str, int]:
        """The size of every group role (mesh.py builds them; the planner prices them)."""
        sizes = self.sizes()
        out = {**sizes, **{name: math.prod(sizes[a] for a in axes) for name, axes in COMBINED.items()}}
        for parent, (runs, places) in CARVED.items():
            out[runs] = self.run_size(parent)
            out[places] = out[parent] // out[runs]
        return out

    def spans(self) -> dict[str, int]:
        """Consecutive ranks one group of each role covers (how far apart its ranks sit):
        from its outermost axis inwards; a run, n of its parent's innermost places."""
        sizes = self.sizes()
        inward = {axis: math.prod(sizes[a] for a in AXES[AXES.index(axis):]) for axis in AXES}
        out = {**inward, **{name: inward[axes[0]] for name, axes in COMBINED.items()}}
        for parent, (runs, places) in CARVED.items():
            out[runs], out[places] = self.run_size(parent) * self.tp, out[parent]
        return out

    @property
    def name(self) -> str:
        """e.g. dp2-fsdp-tp2-custom-pp2-1f1b-cp2 (run directories are named after it)."""
        return (f"dp{self.dp}-{self.dp_type}" + (f"x{self.hsdp_replicas}" if self.hsdp else "")
                + f"-tp{self.tp}-{self.implementation}"
                + (f"-pp{self.pp}-{self.pp_schedule}" if self.pp > 1 else "")
                + (f"-cp{self.cp}" + (f"-{self.cp_type}{self.ulysses}" if self.cp_type != "ring" else "")
                   if self.cp > 1 else "") + (f"-ep{self.ep}" if self.ep > 1 else ""))

    def flags(self) -> list[str]:
        """The train.py flags of this layout."""
        return [f"{flag(f.name)}={getattr(self, f.name)}" for f in fields(self)]

    # ---- what the rules (rules.py) and the trainer ask

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

    def sequence_divides(self, block_size: int) -> bool:
        """Whether sequence parallelism can split a CP rank's tokens over the TP ranks."""
        return (block_size // self.cp) % self.tp == 0


FLAGS = {f.name: f.metadata["flag"] for f in fields(Layout)}  # field -> its train.py flag
CHOICES = {f.name: f.metadata["choices"] for f in fields(Layout) if f.metadata["choices"]}
NEEDS = {f.name: f.metadata["needs"] for f in fields(Layout) if f.metadata["needs"]}


def flag(field: str) -> str:
    return f"--{FLAGS[field]}"


def typed_value(value) -> str:
    """A flag's value as one types it: false, 5, 0.5."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
