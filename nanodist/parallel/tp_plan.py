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
    experts  the stacked expert tensors (E, ...) split on dim 0 over the EP group, not TP
             (added by expert parallelism, parallel/expert_parallel.py; TP replicates them)
"""
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from nanodist.parallel.comm import Group
from nanodist.parallel.init import local_slice


@dataclass(frozen=True)
class Style:
    kind: str                          # colwise | rowwise | vocab_embedding | head | sequence_norm | sequence_scatter | experts
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
    if style.kind in ("colwise", "head", "vocab_embedding", "experts"):
        return 0
    if style.kind == "rowwise" and param_name == "weight":
        return 1
    return None


def qkv_to_rank_major(full: torch.Tensor, tp: int) -> torch.Tensor:
    """Reorder c_attn rows [q; k; v] (each by head) so that contiguous chunk r of dim 0 is
    rank r's [q_r; k_r; v_r]: then an even split on dim 0 shards by heads.

        rows (3, tp, C/tp) -> (tp, 3, C/tp)
    """
    return full.reshape(3, tp, -1, *full.shape[1:]).transpose(0, 1).reshape(full.shape)


def qkv_from_rank_major(full: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of `qkv_to_rank_major`: back to GPT-2's [q; k; v] row order."""
    return full.reshape(tp, 3, -1, *full.shape[1:]).transpose(0, 1).reshape(full.shape)


def shard_of(full: torch.Tensor, style: Style, name: str, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the full parameter `name` (weight, bias) of a module of `style`."""
    dim = shard_dim(style, name)
    if dim is None:
        return full
    if style.qkv:
        full = qkv_to_rank_major(full, tp)
    return full.chunk(tp, dim)[rank].clone()


def _style_and_dim(plan: dict, name: str):
    path, _, leaf = name.rpartition(".")
    style = plan.get(path)
    return style, shard_dim(style, leaf) if style else None


def gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenation along `dim` of every rank's x, in rank order."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty(group.size * x.size(0), *x.shape[1:])
    group.all_gather(out, x)
    return out.movedim(0, dim)


def _group(style: Style | None, mesh) -> Group:
    return mesh.ep if style is not None and style.kind == "experts" else mesh.tp


@torch.no_grad()
def full_tensor(name: str, local: torch.Tensor, plan: dict, mesh) -> torch.Tensor:
    """Parameter `name` (or a tensor laid out like it: a gradient, Adam's moments) in
    GPT-2's layout from this rank's part, from either executor (collective when sharded):
    TP (or EP) shards gathered, c_attn rows back in [q; k; v] order."""
    style, dim = _style_and_dim(plan, name)
    tp = _group(style, mesh)
    if isinstance(local, DTensor):
        local = local.full_tensor()
    elif dim is not None:
        local = gather(local.detach(), dim, tp)
    if dim is not None and style.qkv:
        local = qkv_from_rank_major(local, tp.size)
    return local


@torch.no_grad()
def local_tensor(name: str, full: torch.Tensor, like: torch.Tensor, plan: dict, mesh):
    """The inverse of `full_tensor`: this rank's part of `full`, laid out as `like`."""
    style, dim = _style_and_dim(plan, name)
    tp = _group(style, mesh)
    if dim is None:
        return local_slice(full, like)
    if isinstance(like, DTensor):
        return local_slice(qkv_to_rank_major(full, tp.size) if style.qkv else full, like)
    return shard_of(full, style, name.rpartition(".")[2], tp.size, tp.rank)
