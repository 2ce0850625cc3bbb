"""Expert parallelism, by hand: the experts of each MoE layer split over the EP group
(carved from the DP x CP ranks, mesh.py), tokens dispatched to their experts' ranks
and combined back with all-to-all, uneven splits (dropless routing, moe.py).

EP rank r holds experts [r E/P, (r+1) E/P). In one MoE layer, on each rank:

    routed (n, C) sorted by expert, counts (E,)           this rank's tokens, k rows each
      all-to-all counts        -> received (P, E/P)        how many rows each rank sends me, per expert
      all-to-all rows          -> (sum received, C)        grouped by source rank, then expert
      regroup by expert        -> [e0: src0 src1 ..][e1: src0 ..]
      local experts            -> their outputs, same order
      regroup by source, all-to-all back (splits swapped) -> (n, C) in `routed`'s order

The split sizes are the layer's one read on the host (the uneven all-to-all needs them
there); the local experts (moe.Experts.run) take their counts on the device and their
largest from those splits, so they read nothing more.

The row all-to-all is differentiable (`_AllToAll`: backward is the all-to-all of the
gradients with the splits swapped), so one MoE layer costs 2 all-to-alls forward and 2
backward, (P-1)/P of the routed activations n C each when balanced (comm.py counts the
exact bytes), plus the (E,) counts forward.

Gradients: the router and everything else are replicated over DP x CP as before; an
expert's gradient on its owner already sums the tokens of every EP rank, so each expert
tensor's placement (placement.py) says: split over ep on dim 0, reduced over `edp` only
(the ranks holding the same experts), divided by the whole DP x CP size, the mean over
every rank's tokens (Megatron's expert data parallel group). DDP, ZeRO-1 and FSDP read
that and give the experts an engine of their own. TP replicates the experts: each TP
rank routes the same tokens (no sequence parallelism) and runs the same experts.
"""
import dataclasses

import torch
import torch.nn as nn

from nanodist.errors import UserError
from nanodist.model.moe import Experts, moe_layers
from nanodist.parallel.comm import Group
from nanodist.parallel.init import full_value
from nanodist.parallel.params import ModuleParams
from nanodist.parallel.placement import Placement, local_part

EXPERTS = Placement(shards=(("ep", 0),), reduce="edp", divisor="dp_cp")  # every expert tensor (E, ...)


class _AllToAll(torch.autograd.Function):
    """Rows to ranks by `send` splits, rows from ranks by `recv`; backward the reverse."""

    @staticmethod
    def forward(ctx, x, group: Group, send: list[int], recv: list[int]):
        ctx.group, ctx.send, ctx.recv = group, send, recv
        out = x.new_empty(sum(recv), *x.shape[1:])
        group.all_to_all(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.recv, ctx.send), None, None, None


def _regroup(x: torch.Tensor, sizes: list[list[int]]) -> torch.Tensor:
    """Rows in blocks sizes[i][j] (row-major order) -> the same blocks in column-major order."""
    blocks = x.split([n for row in sizes for n in row])
    rows, cols = len(sizes), len(sizes[0])
    return torch.cat([blocks[i * cols + j] for j in range(cols) for i in range(rows)])


class ExpertParallel(Experts):
    """A MoE layer's experts, E/P of them here (the same names, each tensor's shard on
    dim 0), called as `moe.Experts` is: all of this rank's routed rows, in, out."""

    def __init__(self, experts: Experts, model: nn.Module, path: str, mesh, seed):
        nn.Module.__init__(self)
        self.group, self.n_experts, self.host_reads = mesh.ep, experts.fc_weight.size(0), 0
        with torch.no_grad():
            for name, param in experts._parameters.items():
                if param is not None:  # the full value (drawn, if on meta), this rank's slice
                    full = full_value(model, f"{path}.{name}", param, seed, mesh.device)
                    param = nn.Parameter(local_part(full, EXPERTS, mesh))
                self.register_parameter(name, param)

    def forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        P, mine = self.group.size, self.n_experts // self.group.size
        received = torch.empty_like(counts)
        self.group.all_to_all(received, counts, [mine] * P, [mine] * P)
        # the one wait of the layer: the uneven all-to-all needs its splits on the host
        ours, theirs = self.host(torch.cat([counts, received]).view(2, P, mine))  # [rank][its expert], [source][mine]
        send, recv = [sum(row) for row in ours], [sum(row) for row in theirs]
        rows = _AllToAll.apply(routed, self.group, send, recv)
        by_expert = [list(col) for col in zip(*theirs)]  # [my expert][source rank]
        out = self.run(_regroup(rows, theirs), received.view(P, mine).sum(0), max(map(sum, by_expert)))
        return _AllToAll.apply(_regroup(out, by_expert), self.group, recv, send)


def expert_placements(model: nn.Module) -> dict:
    """The placement of every expert tensor of `model`, by GPT-2 name (the same whether
    its experts are split yet or not: the planner asks before)."""
    names = {id(m): name for name, m in model.named_modules()}
    return {f"{names[id(moe)]}.experts.{name}": EXPERTS for moe in moe_layers(model)
            for name, _ in moe.experts.named_parameters()}


def apply_ep(part, setup):
    """The EP step of `parallelize`, after TP and CP and before DP: each MoE layer keeps
    its experts' shard and trades tokens over the EP group; their placement says so to
    the DP step, the gradient norm and checkpoints."""
    mesh, model = setup.mesh, part.gpt
    names = {id(m): name for name, m in model.named_modules()}
    placements = {**part.params.placements, **expert_placements(model)}
    for moe in moe_layers(model):
        moe.experts = ExpertParallel(moe.experts, model, f"{names[id(moe)]}.experts", mesh, setup.seed)
    return dataclasses.replace(part, params=ModuleParams(model, mesh, placements))


def check_expert_parallel(layout, run):
    """EP's rules, and the mixture of experts' with the other axes (rules.py runs them)."""
    E = run.model.moe_experts if run.model is not None else 0
    if layout.ep != 1:
        if layout.ep < 1 or layout.dp_cp % layout.ep:
            raise UserError(f"--expert_parallel_size ({layout.ep}) is carved from the data_parallel_size "
                            f"x context_parallel_size = {layout.dp_cp} ranks: it must divide {layout.dp_cp}")
        if layout.implementation == "pytorch":
            raise UserError("--expert_parallel_size > 1 is hand-written only (PyTorch 2.13 offers no "
                            "expert-parallel module or MoE layer); use --implementation custom")
        if layout.hsdp:
            raise UserError("--expert_parallel_size > 1 with --data_parallel_replicas > 1 (HSDP) is not "
                            "wired up; use --data_parallel_type ddp, zero1 or fsdp without replicas")
        if run.model is not None and (E == 0 or E % layout.ep):
            raise UserError(f"--expert_parallel_size {layout.ep} splits the experts over {layout.ep} ranks: "
                            + ("the model has none; add --moe_experts" if E == 0 else
                               f"--moe_experts ({E}) must be divisible by it"))
    if E and layout.sequence_parallel:
        raise UserError("--moe_experts with --sequence_parallel is not wired up (the router and "
                        "experts would see a slice of the sequence per TP rank and need their "
                        "gradients summed over TP); drop --sequence_parallel")
    if E and layout.compile:
        raise UserError("--moe_experts with --compile is not wired up (routing sizes are data-"
                        "dependent: each MoE block would recompile); drop --compile")
    if E and layout.pp > 1 and layout.implementation == "pytorch":
        raise UserError("--moe_experts with torch.distributed.pipelining is not wired up (its "
                        "shape inference cannot run data-dependent routing); use "
                        "--implementation custom for PP x MoE")


def moe_all_to_all(B: int, T: int, C: int, k: int, E: int, sizes: dict) -> tuple[int, float]:
    """(calls, payload bytes) of one MoE layer's all-to-alls in one forward + backward of a
    rank's B x T tokens: the counts (E int64), then the routed rows (k B T, the norm's
    dtype: ln_2's output) and the experts' outputs (the matmuls'), each sent forward and
    its gradient backward (expert_parallel.py). Balanced: every rank receives as many
    rows as it sends, so the payload of each is k B T C values."""
    rows = k * B * T * C
    return 5, 8 * E + 2 * rows * (sizes["norm"] + sizes["matmul"])
