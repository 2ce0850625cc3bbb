"""The tensor-parallel plan of GPT-2, written once (DESIGN.md invariant 5), and how it
lays out each parameter (full GPT-2 tensor <-> this rank's part, for either executor).

A plan maps module paths to styles; the custom executor (`tensor_parallel.apply_custom_tp`)
and the DTensor executor (`tensor_parallel_native.apply_dtensor_tp`) both read it. Modules
not in the plan stay replicated (wpe; the LayerNorms without sequence parallelism).

    idx -> wte [vocab]  + wpe -> drop [scatter*] -> blocks -> ln_f [seq*] -> lm_head [head]
    block:  ln_1 [seq*] -> c_attn [col] -> attention (local heads) -> c_proj [row]  (+ x)
            ln_2 [seq*] -> c_fc   [col] -> gelu                     -> c_proj [row]  (+ x)
    * only under sequence parallelism: the residual stream is (B, T/tp, C) between
      the scatter and the head; col layers all-gather it, row layers reduce-scatter.

Sharding of the weights (nn.Linear weight is (out, in)):
    colwise  W, b split on dim 0 (c_attn by heads: rank r holds [q_r; k_r; v_r])
    rowwise  W split on dim 1, b replicated (added once, after the reduction)
    vocab    wte (V, C) split on dim 0; lm_head is tied to it, the same shard
The plan's sharding, per parameter, is written as placements (placement.py), which the
DP strategies, the gradient norm and checkpoints read; TP replicates the experts.
"""
from dataclasses import dataclass

import torch

from nanodist.parallel.placement import Placement, to_rank_major


@dataclass(frozen=True)
class Style:
    kind: str                          # colwise | rowwise | vocab_embedding | head | sequence_norm | sequence_scatter
    sequence_parallel: bool = False    # colwise/head input, rowwise output sharded on the sequence
    qkv: bool = False                  # colwise on the fused q, k, v: split by heads
    loss_parallel: bool = False        # head: logits stay sharded on the vocab


def gpt_plan(n_layer: int, sequence_parallel: bool, loss_parallel: bool) -> dict[str, Style]:
    sp = sequence_parallel
    plan = {"transformer.wte": Style("vocab_embedding")}   # first: lm_head reuses its shard
    if sp:
        plan["transformer.drop"] = Style("sequence_scatter")
    for i in range(n_layer):
        block = f"transformer.h.{i}"
        if sp:
            plan[f"{block}.ln_1"] = plan[f"{block}.ln_2"] = Style("sequence_norm")
        plan[f"{block}.attn.c_attn"] = Style("colwise", sp, qkv=True)
        plan[f"{block}.attn.c_proj"] = Style("rowwise", sp)
        plan[f"{block}.mlp.c_fc"] = Style("colwise", sp)
        plan[f"{block}.mlp.c_proj"] = Style("rowwise", sp)
    if sp:
        plan["transformer.ln_f"] = Style("sequence_norm")
    plan["lm_head"] = Style("head", sp, loss_parallel=loss_parallel)
    return plan


def shard_dim(style: Style, param_name: str) -> int | None:
    """The dim of a parameter the style splits across TP ranks; None: replicated."""
    if style.kind in ("colwise", "head", "vocab_embedding"):
        return 0
    if style.kind == "rowwise" and param_name == "weight":
        return 1
    return None


def shard_of(full: torch.Tensor, style: Style, name: str, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the full parameter `name` (weight, bias) of a module of
    `style`; c_attn by heads: rank r holds [q_r; k_r; v_r] (placement.to_rank_major)."""
    dim = shard_dim(style, name)
    if dim is None:
        return full
    return to_rank_major(full, tp, 3 if style.qkv else 1, dim).chunk(tp, dim)[rank].clone()


def held_plan(model, plan: dict) -> dict:
    """The entries of `plan` whose module `model` holds (a pipeline stage holds some
    blocks; a MoE block has experts in place of c_fc and c_proj)."""
    def holds(path: str) -> bool:
        try:
            model.get_submodule(path)
            return True
        except AttributeError:
            return False
    return {path: style for path, style in plan.items() if holds(path)}


def tp_placements(model, plan: dict) -> dict:
    """The Placement (placement.py) of every parameter the plan splits over TP, by GPT-2
    name: the dim `shard_dim` says; c_attn's rows as 3 blocks, q, k and v each split."""
    out = {}
    for path, style in plan.items():
        for leaf, _ in model.get_submodule(path).named_parameters(recurse=False):
            dim = shard_dim(style, leaf)
            if dim is not None:
                out[f"{path}.{leaf}"] = Placement(shards=(("tp", dim),), blocks=3 if style.qkv else 1)
    return out
