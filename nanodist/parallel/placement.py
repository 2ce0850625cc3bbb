"""Where each parameter lives on the mesh: one `Placement` per GPT-2 parameter name.

The strategies that split parameters write it (TP from its plan, `tp_plan.tp_placements`;
EP, expert_parallel.py); everything else reads it: the data-parallel engines (ddp.py,
zero1.py, fsdp.py: which group reduces or shards a gradient, what its mean divides by),
the gradient norm (which groups hold different pieces, params.py -> clip.py),
checkpoints and --init_from (full GPT-2 tensor <-> this rank's part, params.py), and
the planner's state bytes per rank (cost.state_bytes, on a model built on meta).

    name                              shards        blocks  reduce  divisor
    transformer.h.0.attn.c_attn.weight  (tp, dim 0)   3       dp_cp   dp_cp    TP: q, k, v each split by heads
    transformer.h.0.mlp.c_proj.weight   (tp, dim 1)   1       dp_cp   dp_cp    TP: row-parallel
    transformer.h.1.mlp.experts.fc_weight (ep, dim 0) 1       edp     dp_cp    EP: E/ep experts here
    transformer.wpe.weight              ()            1       dp_cp   dp_cp    replicated (the default)

`reduce`: the ranks that hold the same values and saw different tokens, over which the
gradient is summed (DDP all-reduces over it, ZeRO-1 and FSDP reduce-scatter). `divisor`:
the group whose size the sum is divided by, the mean over every rank's tokens; an
expert's gradient already sums the tokens of its EP group, so it is reduced over edp
alone and still divided by dp_cp (Megatron's expert data parallel group). Groups are
named by role (mesh.py): tp, cp, ep, edp, dp_cp (every rank holding the same dense
parameters: DP x CP).
"""
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from nanodist.parallel.comm import gather
from nanodist.parallel.init import local_slice


@dataclass(frozen=True)
class Placement:
    shards: tuple[tuple[str, int], ...] = ()  # (group, dim): split over that group along dim
    blocks: int = 1          # the split dim is `blocks` equal blocks each split (c_attn's q, k, v)
    reduce: str = "dp_cp"    # the group its gradient is summed over
    divisor: str = "dp_cp"   # the group whose size divides that sum

    def groups(self, mesh) -> tuple:
        """The Groups whose ranks hold different pieces of it (the norm sums over them)."""
        return tuple(mesh.groups[name] for name, _ in self.shards)


REPLICATED = Placement()


def to_rank_major(full: torch.Tensor, n: int, blocks: int, dim: int = 0) -> torch.Tensor:
    """Reorder `blocks` stacked blocks along `dim` so that contiguous chunk r of n holds
    every block's r-th piece: then an even split shards each block. c_attn, n = tp:

        rows [q_0 q_1 | k_0 k_1 | v_0 v_1]  ->  [q_0 k_0 v_0 | q_1 k_1 v_1]
    """
    if blocks == 1:
        return full
    x = full.movedim(dim, 0)
    return x.reshape(blocks, n, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape).movedim(0, dim)


def from_rank_major(full: torch.Tensor, n: int, blocks: int, dim: int = 0) -> torch.Tensor:
    """The inverse of `to_rank_major`."""
    if blocks == 1:
        return full
    x = full.movedim(dim, 0)
    return x.reshape(n, blocks, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape).movedim(0, dim)


def local_part(full: torch.Tensor, placement: Placement, mesh) -> torch.Tensor:
    """This rank's piece of the full tensor (a new tensor when split)."""
    for name, dim in placement.shards:
        group = mesh.groups[name]
        full = to_rank_major(full, group.size, placement.blocks, dim)
        full = full.chunk(group.size, dim)[group.rank].clone()
    return full


@torch.no_grad()
def full_tensor(local: torch.Tensor, placement: Placement, mesh) -> torch.Tensor:
    """The parameter (or a tensor laid out like it: its gradient, Adam's moments) in
    GPT-2's layout from this rank's piece, plain or DTensor. Collective when split."""
    if isinstance(local, DTensor):  # DTensor TP, FSDP2: it knows its own placements
        full = local.full_tensor()
        for name, dim in reversed(placement.shards):
            full = from_rank_major(full, mesh.groups[name].size, placement.blocks, dim)
        return full
    full = local.detach()
    for name, dim in reversed(placement.shards):  # the inverse of local_part, innermost first
        group = mesh.groups[name]
        full = from_rank_major(gather(full, dim, group), group.size, placement.blocks, dim)
    return full


@torch.no_grad()
def local_tensor(full: torch.Tensor, like: torch.Tensor, placement: Placement, mesh) -> torch.Tensor:
    """The inverse of `full_tensor`: this rank's piece of `full`, laid out as `like`."""
    if isinstance(like, DTensor):  # (one split: TP's; DTensor slices it)
        for name, dim in placement.shards:
            full = to_rank_major(full, mesh.groups[name].size, placement.blocks, dim)
        return local_slice(full, like)
    return local_part(full, placement, mesh)


def by_reduction(named_params, placements: dict) -> dict[tuple[str, str], list]:
    """(reduce group, divisor) -> [(name, param)] in model order: what one data-parallel
    engine (DDP's, ZeRO-1's, an FSDP shard group) holds. The same on every rank, so their
    collectives go in one order everywhere."""
    classes = {}
    for name, p in named_params:
        placement = placements.get(name, REPLICATED)
        classes.setdefault((placement.reduce, placement.divisor), []).append((name, p))
    return classes
