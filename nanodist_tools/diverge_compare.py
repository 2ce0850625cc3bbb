"""Two layouts' recordings compared tensor by tensor, in the order one process computes a
step, against the difference rounding explains (docs/diverge.md derives it):

    float64   2 u D max|x|: each run's sum of n terms, in whatever order, is within
              (n-1) u sum|terms| of the exact one (u = 2^-53); D, the reduction depth, is
              the terms summed on the way to the tensor: (j + 1) L for the j-th tensor of
              the step, L the longest single sum of the model (4 C, T, the vocabulary or
              the B T tokens of a gradient); terms assumed no larger than the tensor
    params    after AdamW: lr / eps times the gradient's bound (the update's slope in g)
              plus 2 u max|p|; a later step adds the parameters' measured distance after
              the step before, carried through the model as max|x| sqrt(P) times it
              (tests/harness.py's argument, Hessian ~ gradient)
    fp32/bf16 each layout's distance from its own float64 run, plus the float64 bound of
              those two runs: |A - B| <= |A - A64| + |A64 - B64| + |B64 - B|, and a
              correct layout's float64 runs agree within the float64 bound

A comparison yields one `Row` per tensor; the first whose difference passes its bound is
where the layouts part.
"""
import math
from dataclasses import dataclass

import torch

from nanodist.errors import UserError
from nanodist.model.gpt import TIED_NAMES
from nanodist.parallel.layout import Layout
from nanodist.parallel.parallelize import STEPS
from nanodist.parallel.tp_plan import gpt_plan
from nanodist_tools.diverge_assemble import Full, assemble, forward_order, stage_of

UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}


@dataclass
class Row:
    key: tuple          # (step, name, kind)
    diff: float         # max |A - B| over the entries, or the replicas' spread if larger
    bound: float
    a: Full
    b: Full

    @property
    def parts(self) -> bool:
        return self.diff > self.bound

    @property
    def ratio(self) -> float:
        return self.diff / max(self.bound, 1e-300)


def keys_of(step: int, recordings) -> list[tuple]:
    """One step's tensors in the order one process computes them."""
    forward = forward_order(recordings)
    params = sorted({name for r in recordings for (name, kind) in r.order if kind == "grad"},
                    key=lambda name: recordings[0].order.get((name, "grad"), (0, math.inf))[1])
    return ([(step, name, "forward") for name in forward] + [(step, "loss", "loss")]
            + [(step, name, "backward") for name in reversed(forward)]
            + [(step, name, "grad") for name in params] + [(step, name, "value") for name in params])


def longest_sum(meta: dict) -> int:
    model = meta["model"]
    tokens = meta["batch_size"] * meta["micro_steps"] * meta["dp"] * meta["block_size"]
    return max(4 * model["n_embd"], meta["block_size"], model["vocab_size"], tokens)


def max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def diff_of(a: Full, b: Full) -> float:
    return max(max_abs(a.value - b.value), a.spread, b.spread)


def compare(a, b, a64=None, b64=None, steps: int | None = None) -> list[Row]:
    """Rows of every tensor both recorded, step by step; `a64`, `b64`: the layouts' float64
    recordings when a and b ran in float32 or bfloat16. On one thread: the tensors are
    small, and threads waiting on a busy shared machine made it 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compare(a, b, a64, b64, steps)
    finally:
        torch.set_num_threads(threads)


def _compare(a, b, a64, b64, steps: int | None) -> list[Row]:
    meta = a.meta
    u, L = UNIT_ROUNDOFF["float64"], longest_sum(meta)
    n_params = meta["n_params"]
    rows, apart = [], 0.0  # apart: the parameters' measured distance after the step before
    for step in range(steps or 1 + max(k[0] for k in a.pieces)):
        grad_bound, apart_after = {}, 0.0
        for j, key in enumerate(keys_of(step, [a, b])):
            fa, fb = assemble(a, key), assemble(b, key)
            if fa is None or fb is None:
                continue  # one layout never computes it as a module output (loss parallelism's head)
            same = fa.index is None and fb.index is None or (
                fa.index is not None and fb.index is not None and torch.equal(fa.index, fb.index))
            if not same:
                raise UserError(f"{key[1]}: the two recordings sampled different entries; record both "
                                f"with the same --digest")
            kind, scale = key[2], max(max_abs(fa.value), max_abs(fb.value))
            if kind == "value":  # carried over, plus AdamW's update: slope <= lr / eps in g
                bound = apart + meta["lr"] / meta["eps"] * grad_bound.get(key[1], 0.0) + 2 * u * scale
            else:  # this step's sums, plus the parameters' distance carried through the model
                bound = 2 * u * (j + 1) * L * scale + scale * math.sqrt(n_params) * apart
            if a64 is not None:  # rounding of each low-precision layout, measured
                f64a, f64b = assemble(a64, key), assemble(b64, key)
                bound += diff_of(fa, f64a) + diff_of(fb, f64b)
            row = Row(key, diff_of(fa, fb), bound, fa, fb)
            rows.append(row)
            if kind == "grad":
                grad_bound[key[1]] = bound
            if kind == "value":
                apart_after = max(apart_after, row.diff)
        apart = apart_after  # measured, and within its bound unless the layouts parted already
    return rows


def owning_steps(name: str, kind: str, meta: dict) -> list[str]:
    """The parallelize steps of the recorded layout (`meta`) that touch this tensor."""
    layout = Layout(**meta["layout_fields"])
    applied = [step for step, applies, _ in STEPS if applies(layout)]
    if kind == "loss":  # the trainer's mean over DP x CP of each rank's mean over its tokens
        owners = [s for s in applied if s in ("context parallel", "tensor parallel")]
        return owners or ["none (the trainer's mean)"]
    plan = gpt_plan(meta["model"]["n_layer"], layout.sequence_parallel, layout.loss_parallel)
    if kind in ("grad", "value"):
        owners = [s for s in applied if s in ("FSDP", "DDP", "ZeRO-1")]
        if "tensor parallel" in applied and (name.rsplit(".", 1)[0] in plan or name in TIED_NAMES):
            owners.append("tensor parallel")
        if "expert parallel" in applied and ".experts." in name:
            owners.append("expert parallel")
        if layout.pp > 1 and name in TIED_NAMES:
            owners.append("pipeline split (tied embedding)")
        return owners or ["none (one process: no reduction)"]
    owners = []
    if "tensor parallel" in applied and (name in plan or name.endswith("attn.sdpa")):
        owners.append(f"tensor parallel ({plan[name].kind if name in plan else 'local heads'})")
    if "context parallel" in applied and name.endswith("attn.sdpa"):
        owners.append(f"context parallel ({layout.cp_type} attention core)")
    if "expert parallel" in applied and name.endswith(".mlp"):
        owners.append("expert parallel (dispatch, experts, combine)")
    if "activation checkpointing" in applied and name.startswith("transformer.h."):
        owners.append("activation checkpointing")
    return owners or ["none: as one process, on this rank's tokens"]


STAGE_NAMES = {"forward": "forward", "backward": "backward", "loss": "loss", "grad": "gradients",
               "value": "after AdamW"}


def stage_label(key: tuple, n_layer: int) -> str:
    step, name, kind = key
    if kind in ("loss", "grad", "value"):
        return f"step {step + 1} {STAGE_NAMES[kind]}"
    stage = stage_of(name, n_layer)
    where = "embeddings" if stage == 0 else ("head" if stage == n_layer + 1 else f"block {stage - 1}")
    return f"step {step + 1} {STAGE_NAMES[kind]} {where}"
