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
    fp32/bf16 A64 vs B64 (each layout's float64 run) against the float64 bound: the
              layout's arithmetic; and each run against its own float64 run, by the same
              derivation with u = u_run + u_64 (float32 2^-24, bfloat16 autocast 2^-8 for
              what it computes, float32's for its master weights): a run leaving its
              float64 path by more than its dtype's rounding explains parts (a bf16
              all-reduce, a missing upcast), whichever of A or B it is
    NaN/Inf   a non-finite entry that the other side does not share is a divergence;
              max|x| is taken over the finite entries

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
    check: str = ""     # low precision: which pair passed (or came nearest) its bound

    @property
    def parts(self) -> bool:
        return not self.diff <= self.bound  # NaN: parts

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
    """L: the longest single sum of a step; under --gradient_clipping the norm's P squares."""
    model = meta["model"]
    tokens = meta["batch_size"] * meta["micro_steps"] * meta["dp"] * meta["block_size"]
    clip = meta["n_params"] if meta.get("gradient_clipping") else 0
    return max(4 * model["n_embd"], meta["block_size"], model["vocab_size"], tokens, clip)


def max_abs(x: torch.Tensor) -> float:
    """The largest finite |entry| (a NaN or Inf is no scale: it is a difference, diff_of)."""
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def diff_of(a: Full, b: Full) -> float:
    """max |A - B|; inf where one side is not finite and the other differs (NaN anywhere)."""
    va, vb = a.value, b.value
    finite = torch.isfinite(va) & torch.isfinite(vb)
    if not finite.all() and not torch.equal(va[~finite], vb[~finite]):  # NaN != NaN: parts too
        return math.inf
    gap = (va - vb)[finite]
    return max(gap.abs().max().item() if gap.numel() else 0.0, a.spread, b.spread)


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


def unit_roundoffs(meta: dict) -> tuple[float, float]:
    """(u of the computed tensors, u of the stored parameters) of a run: bfloat16 autocast
    rounds every matmul's output to bfloat16, and keeps float32 master weights."""
    dtype = meta["dtype"]
    return UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF["float32" if dtype == "bfloat16" else dtype]


class Pair:
    """Two recordings held to the bound of their two dtypes, with the step carry of them."""

    def __init__(self, x, y, check: str):
        (ux, px), (uy, py) = unit_roundoffs(x.meta), unit_roundoffs(y.meta)
        self.x, self.y, self.check, self.u, self.u_param = x, y, check, ux + uy, px + py
        self.apart, self.apart_after, self.grad_bound = 0.0, 0.0, {}

    def row(self, key: tuple, j: int, meta: dict, fx=None, fy=None) -> Row | None:
        fx = assemble(self.x, key) if fx is None else fx
        fy = assemble(self.y, key) if fy is None else fy
        if fx is None or fy is None:
            return None  # one layout never computes it as a module output (loss parallelism's head)
        same = fx.index is None and fy.index is None or (
            fx.index is not None and fy.index is not None and torch.equal(fx.index, fy.index))
        if not same:
            raise UserError(f"{key[1]}: the two recordings sampled different entries; record both "
                            f"with the same --digest")
        kind, scale = key[2], max(max_abs(fx.value), max_abs(fy.value))
        if kind == "value":  # carried over, plus AdamW's update: slope <= lr / eps in g
            bound = (self.apart + meta["lr"] / meta["eps"] * self.grad_bound.get(key[1], 0.0)
                     + self.u_param * scale)
        else:  # this step's sums, plus the parameters' distance carried through the model
            bound = (self.u * (j + 1) * longest_sum(meta) * scale
                     + scale * math.sqrt(meta["n_params"]) * self.apart)
        row = Row(key, diff_of(fx, fy), bound, fx, fy, self.check)
        if kind == "grad":
            self.grad_bound[key[1]] = bound
        if kind == "value":
            self.apart_after = max(self.apart_after, row.diff)
        return row

    def next_step(self):
        self.apart, self.apart_after, self.grad_bound = self.apart_after, 0.0, {}


def _compare(a, b, a64, b64, steps: int | None) -> list[Row]:
    """float64: A against B. Lower: A64 against B64 (the layouts' arithmetic), and each run
    against its own float64 run (its dtype's rounding); a tensor's row is the worst of them."""
    meta = a.meta
    if a64 is None:
        pairs = [Pair(a, b, "")]
    else:
        pairs = [Pair(a64, b64, "the float64 runs A64 vs B64"),
                 Pair(b64, b, f"B vs its float64 run ({b.meta['dtype']} rounding)"),
                 Pair(a64, a, f"A vs its float64 run ({a.meta['dtype']} rounding)")]
    rows = []
    for step in range(steps or 1 + max(k[0] for k in a.pieces)):
        for j, key in enumerate(keys_of(step, [a, b])):
            if a64 is None:
                found = [pairs[0].row(key, j, meta)]
            else:
                fa, fb, f64a, f64b = (assemble(r, key) for r in (a, b, a64, b64))
                found = [pairs[0].row(key, j, meta, f64a, f64b), pairs[1].row(key, j, meta, f64b, fb),
                         pairs[2].row(key, j, meta, f64a, fa)]
            found = [r for r in found if r is not None]
            if found:  # the first pair that parts, else the nearest to its bound
                rows.append(next((r for r in found if r.parts), max(found, key=lambda r: r.ratio)))
        for pair in pairs:
            pair.next_step()  # measured, and within its bound unless the runs parted already
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


def scale_hint(row) -> str:
    """B as a multiple of A, where it is one (a missing sum, a wrong divisor)."""
    a, b = row.a.value.flatten(), row.b.value.flatten()
    norm = float(a @ a)
    if norm == 0:
        return ""
    s = float(a @ b) / norm
    rest = (b - s * a).norm().item() / max(b.norm().item(), 1e-300)
    return f"; B = {s:.4g} x A (residual {rest:.1e})" if rest < 1e-3 else "; B is not a multiple of A"


def next_module(rows, row) -> str | None:
    """The module one process runs after row's (not one containing it, nor inside it)."""
    step, name = row.key[:2]
    forward = [r.key[1] for r in rows if r.key[0] == step and r.key[2] == "forward"]
    later = forward[forward.index(name) + 1:] if name in forward else []
    return next((m for m in later if not (m.startswith(name + ".") or name.startswith(m + "."))), None)
