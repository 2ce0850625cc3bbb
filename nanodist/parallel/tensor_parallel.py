"""Megatron-style tensor parallelism, by hand: executes the plan of `tp_plan.py`.

Megatron's conjugate operators on the TP group (f and g of the paper):

    copy_to_tp        f   forward identity        backward all-reduce
    reduce_from_tp    g   forward all-reduce      backward identity
    gather_from_tp        forward all-gather last dim, backward keep own slice
    scatter_to_sp         forward keep own sequence slice, backward all-gather
    gather_from_sp        forward all-gather sequence, backward reduce-scatter
    reduce_scatter_to_sp  forward reduce-scatter sequence, backward all-gather

A column-parallel layer then a row-parallel one (the MLP, attention) cost one g forward
and one f backward; with sequence parallelism the all-reduce becomes an all-gather before
the column layer and a reduce-scatter after the row layer (same bytes, activations /tp):

    x (B,T,C) -f-> [x W1_r] -> gelu -> [. W2_r] -g-> y (B,T,C)          without SP
    x (B,T/tp,C) -gather_sp-> [x W1_r] -> gelu -> [. W2_r] -reduce_scatter_sp-> (B,T/tp,C)

Every collective is a method of the TP `Group` (comm.py: counted). The DTensor executor
of the same plan is `tensor_parallel_native.py`.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

from nanodist.errors import UserError
from nanodist.parallel.comm import Group, all_reduce, conjugate, gather, reduce_scatter, split
from nanodist.parallel.init import full_value
from nanodist.parallel.loss_parallel import DTensorHeadLoss, VocabParallelHeadLoss
from nanodist.parallel.params import ModuleParams
from nanodist.parallel.tensor_parallel_native import apply_dtensor_tp
from nanodist.parallel.tp_plan import Style, gpt_plan, held_plan, shard_dim, shard_of, tp_placements


copy_to_tp = conjugate("CopyToTP", lambda x, g: x, all_reduce)
reduce_from_tp = conjugate("ReduceFromTP", all_reduce, lambda dy, g: dy)
gather_from_tp = conjugate("GatherFromTP", lambda x, g: gather(x, -1, g),
                            lambda dy, g: split(dy, -1, g))
scatter_to_sp = conjugate("ScatterToSP", lambda x, g: split(x, 1, g),
                           lambda dy, g: gather(dy, 1, g))
gather_from_sp = conjugate("GatherFromSP", lambda x, g: gather(x, 1, g),
                            lambda dy, g: reduce_scatter(dy, 1, g))
reduce_scatter_to_sp = conjugate("ReduceScatterToSP", lambda x, g: reduce_scatter(x, 1, g),
                                  lambda dy, g: gather(dy, 1, g))


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r with W (out, in) split on `out`: (..., in) -> (..., out/tp),
    or gathered to (..., out) with `gather_output`."""

    def __init__(self, weight, bias, group, sequence_parallel=False, gather_output=False):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output

    def gather_input(self, x):
        """What every rank multiplies: x, gathered along the sequence under SP; its
        gradient (each rank's partial sum) summed over TP."""
        return gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def forward(self, x):
        y = F.linear(self.gather_input(x), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b with W (out, in) split on `in`: (..., in/tp) -> (..., out),
    or (B, T/tp, out) under sequence parallelism. The bias is replicated and added once."""

    def __init__(self, weight, bias, group, sequence_parallel=False):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:  # each rank adds b to its tokens only: sum its grad over TP
            return reduce_scatter_to_sp(y, self.group) + copy_to_tp(self.bias, self.group)
        return reduce_from_tp(y, self.group) + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r V/tp, (r+1) V/tp) of the table; ids outside give zeros and
    the all-reduce sums the one rank that has each id: (B, T) -> (B, T, C) replicated."""

    def __init__(self, weight, group):
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, idx):
        start = self.group.rank * self.weight.size(0)
        local = idx - start
        outside = (local < 0) | (local >= self.weight.size(0))
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class SequenceParallelLayerNorm(nn.Module):
    """LayerNorm of the local tokens (B, T/tp, C): its replicated weight and bias see only
    this rank's tokens, so their gradients are summed over TP (copy_to_tp)."""

    def __init__(self, norm: nn.LayerNorm, group):
        super().__init__()
        self.weight, self.bias, self.group = norm.weight, norm.bias, group
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps

    def forward(self, x):
        bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, copy_to_tp(self.weight, self.group), bias,
                            self.eps)


class ScatterToSequenceParallel(nn.Module):
    """Runs `inner` (the embedding dropout) on this rank's slice of the sequence."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x):
        return self.inner(scatter_to_sp(x, self.group))


def _custom_module(module, style: Style, params: dict, group):
    sp = style.sequence_parallel
    if style.kind == "vocab_embedding":
        return VocabParallelEmbedding(params["weight"], group)
    if style.kind in ("colwise", "head"):
        return ColumnParallelLinear(params["weight"], params.get("bias"), group, sp,
                                    gather_output=style.kind == "head" and not style.loss_parallel)
    if style.kind == "rowwise":
        return RowParallelLinear(params["weight"], params.get("bias"), group, sp)
    if style.kind == "sequence_norm":
        return SequenceParallelLayerNorm(module, group)
    if style.kind == "sequence_scatter":
        return ScatterToSequenceParallel(module, group)
    raise ValueError(f"unknown tensor-parallel style {style.kind!r}")


def apply_custom_tp(model: nn.Module, plan: dict, tp: Group, seed: int, device):
    """Replace the modules of `plan` by their TP versions, in place. Every sharded
    parameter is rank r's slice of the full tensor (the existing one, or its initial value
    when on meta); replicated ones are kept as they are (materialised later if on meta)."""
    shards = {}   # id(original param) -> its shard: keeps wte = lm_head
    for path, style in plan.items():
        module = model.get_submodule(path)
        params = {}
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in shards and shard_dim(style, name) is not None:
                full = full_value(model, f"{path}.{name}", param, seed, device)
                shard = nn.Parameter(shard_of(full, style, name, tp.size, tp.rank))
                shards[id(param)] = shard
            params[name] = shards.get(id(param), param)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _custom_module(module, style, params, tp))


def apply_tp(part, setup):
    """The TP step of `parallelize`: the plan, executed by hand or by DTensor, and the
    loss that goes with it (the model's head_loss vocab-parallel under loss parallelism)."""
    layout, mesh, model = setup.layout, setup.mesh, part.gpt
    plan = gpt_plan(model.config.n_layer, layout.sequence_parallel, layout.loss_parallel)
    plan = held_plan(model, plan)
    placed = {**part.params.placements, **tp_placements(model, plan)}  # read before the modules change
    native = layout.implementation == "pytorch"
    (apply_dtensor_tp if native else apply_custom_tp)(model, plan, mesh.tp, setup.seed, mesh.device)
    if layout.loss_parallel:
        model.head_loss = (DTensorHeadLoss if native else VocabParallelHeadLoss)(mesh.tp, model.head_loss.chunks)
    return dataclasses.replace(part, params=ModuleParams(model, mesh, placed),
                               loss_context=loss_parallel if native and layout.loss_parallel else part.loss_context)




def check_tensor_parallel(layout, run):
    """TP's rules (rules.py runs them): what the chunked loss needs, what sequence
    parallelism and the model's shape must divide by."""
    if layout.tp > 1 and layout.loss_chunks != 1 and not layout.loss_parallel:
        raise UserError("--loss_chunks under --tensor_parallel_size > 1 needs --enable_loss_parallelism: "
                        "the chunks are vocab-parallel (without it the head gathers the whole logits); "
                        "add it, or drop --loss_chunks")
    if layout.sequence_parallel and not layout.sequence_divides(run.block_size):
        what = (f"--block_size ({run.block_size})" if layout.cp == 1 else f"the {run.block_size // layout.cp} "
                f"tokens of a CP rank (--block_size / --context_parallel_size)")
        raise UserError(f"--sequence_parallel splits the sequence: {what} must be divisible by "
                        f"--tensor_parallel_size ({layout.tp})")
    if run.model is None:
        return
    for what, size in (("n_head", run.model.n_head), ("n_embd", run.model.n_embd),
                       ("padded vocab_size", run.model.vocab_size)):
        if size % layout.tp:
            raise UserError(f"{what} ({size}) is not divisible by --tensor_parallel_size "
                            f"({layout.tp}); pick a tensor parallel size that divides it")


# ------------------------------------------------------------------ its traffic (planner/traffic.py)

FP32 = torch.float32.itemsize
FP32_EVERYWHERE = {"matmul": FP32, "residual": FP32, "norm": FP32}


def tp_collectives(B: int, T: int, C: int, V: int, L: int, sp: bool, lp: bool,
                   sizes: dict = FP32_EVERYWHERE, grad_norm: bool = True, first: bool = True,
                   last: bool = True, loss_chunks: int = 1) -> dict:
    """{kind: (calls, payload bytes)} of the TP collectives of one forward + backward
    (custom executor), plus (grad_norm) the 4-byte all-reduce of the squared gradient
    norm. `sizes`: bytes per value of each kind of activation (`value_bytes`).

    without SP   all-reduce   4 per layer (2 forward: row-parallel outputs; 2 backward:
                              column-parallel inputs) + wte forward + lm_head input backward
    with SP      all-gather   4 per layer (2 forward before column, 2 backward after row)
                              + drop scatter backward + lm_head input forward
                 reduce-scatter 4 per layer (mirror) + lm_head input backward
                 all-reduce   wte forward (B T C) + the sequence-sharded replicated
                              parameters' grads (2 LayerNorms x 2 + 2 row biases per layer,
                              + ln_f: C each)
    loss parallel  all-reduce of the max (B T) and of [sum exp, target logit] (2 B T),
                   fp32, instead of an all-gather of the logits (B T V); the chunked loss
                   (`loss_chunks` > 1) the same bytes in two calls per chunk
    A pipeline chunk of L blocks has the wte parts if `first`, the head's if `last`.
    """
    act = {what: B * T * C * size for what, size in sizes.items()}
    # per layer: 2 LayerNorm outputs (or their grads) and 2 matmul outputs (or their grads)
    layers = 2 * L * (act["norm"] + act["matmul"])
    embedding, head, lp = act["residual"] * first, act["norm"] * last, lp and last
    if sp:
        counts = {"all_gather": (4 * L + first + last, layers + embedding + head),
                  "reduce_scatter": (4 * L + last, layers + head),
                  "all_reduce": (first + 6 * L + 2 * last,
                                 embedding + (6 * L + 2 * last) * C * sizes["residual"])}
    else:
        counts = {"all_reduce": (4 * L + first + last, layers + embedding + head)}
    calls, payload = counts["all_reduce"]
    counts["all_reduce"] = (calls + grad_norm + (2 * loss_chunks if lp else 0),
                            payload + FP32 * grad_norm + (3 * B * T * FP32 if lp else 0))
    if last and not lp:
        calls, payload = counts.get("all_gather", (0, 0))
        counts["all_gather"] = (calls + 1, payload + B * T * V * sizes["matmul"])
    return counts
