"""Context parallelism: each sequence split across the C ranks of the CP group, every
rank running the model on its tokens; attention, the one op that mixes tokens, by ring
attention, by Ulysses, or by both, by hand; and PyTorch's ring (CUDA only), side by side.

Everything but attention is local to its tokens, so a rank runs the model on its part
of every sequence (global positions for wpe, its own targets for the loss). The cores:

    ring     (--context_parallel_type ring, ring_attention.py) K/V travel around the C
             ranks, each holding two zigzag chunks of every sequence: sends of 2 b s h/C
             values per step, C-1 steps; any number of heads
    ulysses  (ulysses.py) all-to-all from sequence-sharded to head-sharded, the model's own
             causal core over the whole sequence for H/C heads, all-to-all back:
             4 b s h/C values per layer forward; needs the heads of a TP rank to divide by C
    hybrid   Ulysses over runs of U consecutive CP ranks (cp_ulysses), the ring over the C/U
             ranks at the same place of each run (cp_ring): U as large as the heads allow

A CP rank's tokens: the two zigzag chunks of its ring rank (of 2 C/U), then its contiguous
piece of those among its Ulysses run; pure Ulysses: a contiguous piece of the sequence.

    C = 4, U = 2 (hybrid): ring rank 0: chunks 0, 3 -> CP ranks 0, 1 hold [0 | 3] in halves
                           ring rank 1: chunks 1, 2 -> CP ranks 2, 3 hold [1 | 2] in halves

A mixture of experts routes each token alone, but its load-balancing loss is a function of
the whole micro-batch's token statistics: `SequenceSum` fills the model's `token_sum` seam
with their sum over the CP group.

PyTorch (`apply_native_cp`): `_ContextParallel` on each attention core turns q, k, v into
DTensors sharded on the sequence, and DTensor's CP dispatcher runs its ring attention
(head-tail load balancing = the zigzag split). It has no rule for the CPU attention ops:
CUDA only, and no Ulysses (`check_context_parallel` refuses them elsewhere).
"""
from functools import partial

import torch
import torch.nn as nn

from nanodist import compat
from nanodist.errors import UserError
from nanodist.parallel.comm import Group, sum_over
from nanodist.parallel.ring_attention import RingAttention, split_sequence
from nanodist.parallel.ulysses import UlyssesAttention


def local_tokens(x: torch.Tensor, dim: int, ring: Group, ulysses: Group) -> torch.Tensor:
    """This CP rank's part of `x` along `dim` (the sequence): its ring rank's two zigzag
    chunks, then its contiguous piece of them among its Ulysses run."""
    if ring.size > 1:
        x = split_sequence(x, dim, ring.rank, ring.size)
    # a copy of its own: a view would keep the whole sequence's storage alive for backward
    return x.chunk(ulysses.size, dim)[ulysses.rank].clone() if ulysses.size > 1 else x


def _shard_inputs(model, args, kwargs, mesh):
    """Forward pre-hook of the GPT (or a pipeline chunk): keep this CP rank's tokens and
    targets, and pass the tokens' global positions (every CP rank of a DP group read the
    same batch). The loss is then the mean of this rank's tokens: equal counts on every
    CP rank, so the mean over DP x CP (what DDP/FSDP average gradients over) is the mean
    of the global batch."""
    mine = partial(local_tokens, ring=mesh.cp_ring, ulysses=mesh.cp_ulysses)
    if kwargs.get("targets") is not None:
        kwargs = {**kwargs, "targets": mine(kwargs["targets"], 1)}
    if model.transformer.wte is None:  # a later pipeline stage: its input is CP's already
        return args, kwargs
    (idx,) = args
    positions = torch.arange(idx.size(1), device=idx.device)
    return (mine(idx, 1),), {**kwargs, "positions": mine(positions, 0)}


def apply_native_cp(blocks: list, cp: Group):
    """PyTorch's ring attention on every block's attention core (CUDA only: no CPU sharding rule)."""
    from torch.distributed.tensor.parallel import parallelize_module
    compat.cp_options.enable_load_balance = True  # head-tail: the zigzag split of the inputs
    compat.enable_cp_dispatcher()
    style = compat.ContextParallel(seq_dim=2, attention_type=compat.ContextParallel.AttentionType.SDPA)
    for block in blocks:
        parallelize_module(block.attn.sdpa, cp.device_mesh, style)


class SequenceSum(nn.Module):
    """A model's `token_sum` seam (moe.py: per-token statistics of a micro-batch) over the
    CP ranks: the statistics of whole sequences; backward sums the gradients as well, as
    each rank's loss holds its own share."""

    def __init__(self, cp: Group):
        super().__init__()
        self.cp = cp

    def forward(self, stats):
        return sum_over(stats, self.cp)


def apply_cp(part, setup):
    """The CP step of `parallelize` (after TP, before checkpointing and DDP/FSDP): each
    attention core becomes the ring over cp_ring, wrapped in Ulysses over cp_ulysses
    (either a group of one where the type has none of it)."""
    model, mesh = part.gpt, setup.mesh
    for module in [m for m in model.modules() if hasattr(m, "token_sum")]:
        module.token_sum = SequenceSum(mesh.cp)
    blocks = [block for block in model.transformer.h if not isinstance(block, nn.Identity)]  # this stage's
    if setup.layout.implementation == "pytorch":
        apply_native_cp(blocks, mesh.cp)
    else:
        for block in blocks:
            core = RingAttention(mesh.cp_ring) if mesh.cp_ring.size > 1 else block.attn.sdpa
            block.attn.sdpa = UlyssesAttention(core, mesh.cp_ulysses) if mesh.cp_ulysses.size > 1 else core
    model.register_forward_pre_hook(partial(_shard_inputs, mesh=mesh), with_kwargs=True)
    return part


def check_context_parallel(layout, run):
    """CP's rules (rules.py runs them): the split the sequence must allow, the heads
    Ulysses splits, what each implementation has."""
    cp, u = layout.cp, layout.ulysses
    if cp == 1:
        return
    if layout.cp_type != "ring" and layout.implementation == "pytorch":
        raise UserError(f"--context_parallel_type {layout.cp_type} is hand-written only (PyTorch 2.13 "
                        f"has no Ulysses attention); use --implementation custom")
    if layout.cp_type == "hybrid" and not (1 < u < cp and cp % u == 0):
        raise UserError(f"--context_parallel_type hybrid runs Ulysses over --ulysses_degree ranks and "
                        f"the ring over the rest: it must divide --context_parallel_size ({cp}) "
                        f"and lie between 2 and {cp // 2}, got {layout.ulysses_degree or 'none the heads allow'}"
                        + ("" if layout.ulysses_degree else "; use --context_parallel_type ring or ulysses"))
    if layout.cp_type == "ulysses" and run.block_size % cp:
        raise UserError(f"--context_parallel_type ulysses splits each sequence over {cp} ranks: "
                        f"--block_size ({run.block_size}) must be divisible by {cp}")
    if layout.cp_type != "ulysses" and run.block_size % (2 * cp):
        raise UserError(f"--context_parallel_size {cp} cuts each sequence into {2 * cp} "
                        f"zigzag chunks: --block_size ({run.block_size}) must be divisible by {2 * cp}")
    if run.dropout > 0:
        raise UserError("--context_parallel_size > 1 runs attention without dropout: use --dropout 0")
    if layout.implementation == "pytorch" and run.device_type != "cuda":
        raise UserError("--implementation pytorch --context_parallel_size > 1 runs on CUDA only "
                        "(PyTorch's context parallel has no CPU attention kernel rule); use "
                        "--implementation custom (ring attention by hand) on CPU")
    if run.model is None or run.model.n_head % layout.tp:  # (TP's rule says that one)
        return
    heads = run.model.n_head // layout.tp
    if heads % u:
        raise UserError(f"Ulysses splits the heads: n_head ({run.model.n_head}) / --tensor_parallel_size "
                        f"({layout.tp}) = {heads} heads per rank cannot be split over {u} Ulysses ranks; "
                        f"pick a degree that divides them (or the ring)")
