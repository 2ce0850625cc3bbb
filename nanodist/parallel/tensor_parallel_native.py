"""The same tensor-parallel plan executed by PyTorch's DTensor (`parallelize_module`).

Style of `tp_plan.py`  ->  DTensor ParallelStyle (on the 1-D "tp" sub-mesh)

    vocab_embedding     RowwiseParallel on nn.Embedding: weight Shard(0), output Replicate
    colwise             ColwiseParallel, input Replicate (Shard(1) under SP: all-gathered)
    rowwise             RowwiseParallel, output Replicate (Shard(1) under SP: reduce-scattered)
    head                ColwiseParallel, output Replicate, or a Shard(-1) DTensor for `loss_parallel`
    sequence_norm       SequenceParallel: Replicate params, Shard(1) activations
    sequence_scatter    PrepareModuleInput Replicate -> Shard(1) (no comm forward)

The fused c_attn is sharded by heads: its rows are permuted once (`placement.to_rank_major`) so
that DTensor's contiguous Shard(0) gives rank r its [q_r; k_r; v_r]. Parameters are given
their full values first (the existing tensor, or the initial value when on meta) and
sliced locally (src_data_rank=None): each rank holds its slice of the global tensor.
"""
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from nanodist.parallel.init import full_value
from nanodist.parallel.placement import to_rank_major
from nanodist.parallel.tp_plan import Style, shard_dim


def dtensor_style(style: Style):
    seq_or_replicate = Shard(1) if style.sequence_parallel else Replicate()
    if style.kind == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if style.kind == "colwise":
        return ColwiseParallel(input_layouts=seq_or_replicate)
    if style.kind == "head":
        return ColwiseParallel(input_layouts=seq_or_replicate,
                               output_layouts=Shard(-1) if style.loss_parallel else Replicate(),
                               use_local_output=not style.loss_parallel)
    if style.kind == "rowwise":
        return RowwiseParallel(output_layouts=seq_or_replicate)
    if style.kind == "sequence_norm":
        return SequenceParallel()
    if style.kind == "sequence_scatter":
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                  use_local_output=True)
    raise ValueError(f"unknown tensor-parallel style {style.kind!r}")


def apply_dtensor_tp(model: nn.Module, plan: dict, tp_group, seed: int, device):
    """parallelize_module, one plan entry at a time (on meta, only that module's full
    tensors exist at once), on the TP group's 1-D mesh. Tied parameters (wte = lm_head)
    stay one DTensor parameter."""
    tp_mesh, tp = tp_group.device_mesh, tp_group.size
    distributed = {}   # id(original param) -> its DTensor parameter
    for path, style in plan.items():
        module = model.get_submodule(path)
        originals = dict(module.named_parameters(recurse=False))
        for name, param in originals.items():
            if id(param) in distributed:   # already a DTensor: the style keeps its placement
                module.register_parameter(name, distributed[id(param)])
            elif shard_dim(style, name) is not None:
                full = full_value(model, f"{path}.{name}", param, seed, device)
                module.register_parameter(name, nn.Parameter(
                    to_rank_major(full, tp, 3) if style.qkv else full))
        parallelize_module(module, tp_mesh, dtensor_style(style), src_data_rank=None)
        for name, param in originals.items():  # the style re-wraps parameters: re-tie
            if id(param) in distributed:
                module.register_parameter(name, distributed[id(param)])
            else:
                distributed[id(param)] = getattr(module, name)
