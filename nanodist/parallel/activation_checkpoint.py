"""Activation checkpointing: trade compute for the memory of what backward needs.

    none       every op keeps what its backward needs: ~16 b s h floats per layer (fp32;
               nanodist/planner/cost.py `activation_bytes` itemises them)
    full       a block keeps only its input (b s h); backward reruns its whole forward
               first (one more forward per step: ~+33% compute). --ac_every K checkpoints
               blocks 0, K, 2K, ... and leaves the others as they are
    selective  torchtitan's op-level policy: the outputs of the matmuls and of attention
               are kept (expensive to recompute), the cheap element-wise ops between them
               (LayerNorm, GELU, residual adds, views) are recomputed in backward; ring
               attention (context parallel) is recomputed whole, its sends included

    block i forward:   x_i ──[ln_1 attn + ln_2 mlp + ]──> x_i+1     full: only x_i is saved
    block i backward:  rerun forward(x_i) under grad, then backward through it

`torch.utils.checkpoint` (non-reentrant) does the work; selective passes it the op policy
through `create_selective_checkpoint_contexts`. The block's `forward` is replaced on the
instance, not wrapped in a module: parameter names (state_dict keys) stay GPT-2's, and
every hook on the block (custom FSDP's gather, FSDP2's, DDP's) still fires around it. The
recompute runs inside the block's backward, after the unit's pre-backward hook gathered
it again (FSDP) and in the same order on every rank (TP recomputes its collectives).
"""
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanodist import compat

aten = torch.ops.aten
_c10d = compat.functional_collectives()
# outputs kept under `selective` (torchtitan's save list, without its float8 entries)
SAVE = {
    aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    _c10d.reduce_scatter_tensor.default,  # DTensor TP: keep its collectives' results,
    _c10d.all_reduce.default,             # no communication again in backward
    _c10d.all_gather_into_tensor.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    # ops that run without grad inside a forward under grad are the insides of an autograd
    # Function (ring attention): it keeps what its backward needs, their results are not
    if op in SAVE and torch.is_grad_enabled():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def checkpoint_module(module: torch.nn.Module, selective: bool = False):
    """Make `module` recompute its forward in backward (in place; names unchanged)."""
    forward = module.forward  # the class's forward, bound to the module
    # full passes no context_fn at all: --compile (dynamo) traces checkpoint only so
    options = dict(use_reentrant=False, **({"context_fn": selective_context} if selective else {}))

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, **options, **kwargs)

    module.forward = checkpointed_forward


def apply_activation_checkpointing(model: torch.nn.Module, policy: str, every: int = 1):
    """The AC step of `parallelize` (after TP, before FSDP/DDP): `policy` on the blocks of
    `model` (a GPT), every `every`-th block under `full`."""
    for i, block in enumerate(model.transformer.h):  # i: the block's index in the whole model
        if isinstance(block, torch.nn.Identity):  # a block another pipeline stage holds
            continue
        if policy == "selective" or (policy == "full" and i % every == 0):
            checkpoint_module(block, selective=policy == "selective")



def apply_ac(part, setup):
    """The activation-checkpointing step of `parallelize` (after TP and CP, before FSDP/DDP)."""
    apply_activation_checkpointing(part.gpt, setup.layout.checkpointing, setup.layout.ac_every)
    return part
