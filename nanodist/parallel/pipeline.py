"""Pipeline parallelism by hand: the model cut into stages, micro-batches flowing through.

Stage split: the L blocks into S = P x V chunks, as evenly as possible (the earlier
chunks take one block more when S does not divide L); chunk s lives on pp rank s % P
(Megatron's interleaving: with V > 1 rank r holds chunks r, r + P, ...). A chunk is the
GPT itself with what it does not own removed (blocks -> nn.Identity, keeping the
indices; wte/wpe/drop only on the first, ln_f/lm_head only on the last), so parameter
names stay GPT-2's and each chunk is parallelised (TP, DDP/FSDP) as a model of its own.

    P=2, V=1, L=4:  rank 0  [wte wpe drop h.0 h.1]  --x (B,T,C)-->  rank 1  [h.2 h.3 ln_f lm_head]
                                                    <--dx (B,T,C)--

The tied wte / lm_head weight: the first and last stage each hold a copy, both from the
same initial value (GPT.initial_value); after every backward their gradients are summed
over a 2-rank group (Megatron's embedding group), so both copies take the same step. The
gradient norm counts it once (on the first stage).

Schedules are data (`schedules.py`); one runner here executes any of them: before time
slot t every rank exchanges, in one batch through the pp Group (counted), what slot t-1
produced, so every message is sent and received in the same round on both sides and no
schedule can deadlock on the order of its messages. The parameter side (every stage's,
the gradient norm across stages, full tensors handed on by the stage that holds them)
is params.PipelineParams.

Micro-batches are the gradient-accumulation micro-steps of one global batch, so the
pipeline follows the one-process trajectory; the loss is computed on the last stage.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from nanodist.errors import UserError
from nanodist.model.gpt import TIED_NAMES
from nanodist.parallel.comm import Group
from nanodist.parallel.mesh import Mesh
from nanodist.parallel.params import Params
from nanodist.parallel.schedules import SCHEDULES, Action, interleaved_1f1b, simulate

TIED, TIED_ON_LAST = TIED_NAMES


# ------------------------------------------------------------------ the stage split

def split_layers(n_layer: int, n_chunks: int) -> list[range]:
    """Block indices of each chunk: as even as possible, the earlier chunks one more."""
    size, extra = divmod(n_layer, n_chunks)
    starts = [c * size + min(c, extra) for c in range(n_chunks + 1)]
    return [range(starts[c], starts[c + 1]) for c in range(n_chunks)]


def stage_model(model: nn.Module, blocks: range, first: bool, last: bool) -> nn.Module:
    """The chunk of `model` (a GPT) that holds `blocks`: the same class, sharing the
    modules it keeps; what it does not own is None (blocks: Identity, to keep indices)."""
    stage = type(model).__new__(type(model))
    nn.Module.__init__(stage)
    stage.config, t = model.config, model.transformer
    stage.transformer = nn.ModuleDict(dict(
        wte=t.wte if first else None, wpe=t.wpe if first else None, drop=t.drop if first else None,
        h=nn.ModuleList(t.h[i] if i in blocks else nn.Identity() for i in range(len(t.h))),
        ln_f=t.ln_f if last else None))
    stage.register_module("lm_head", model.lm_head if last else None)
    stage.head_loss = model.head_loss
    return stage


@dataclass(frozen=True)
class Split:
    """How the model is cut, the same description on every rank of a pipeline."""
    mesh: Mesh
    n_chunks: int                  # S = P x V; rank r holds chunks r, r + P, ...
    chunk_names: list              # per global chunk: [(GPT-2 name, full shape)], optimizer order
    schedule: list                 # per pp rank, its actions (schedules.py)
    act_shape: tuple               # what crosses a boundary: (B, T / (cp x tp under SP), C)
    wire_dtype: torch.dtype        # activations cross in the residual stream's dtype: the
                                   # compute dtype under FSDP's mixed precision (its bf16
                                   # embeddings make it so without PP too), else the master's
    loss_dtype: torch.dtype        # the last stage's output, the mean loss: fp32 (fp64 for fp64)
    tied: torch.Tensor | None      # this rank's copy of the tied wte / lm_head (first, last stage)
    embedding: Group | None        # the first and last stage: they sum the tied gradient

    def sum_tied_grads(self):
        """The tied wte / lm_head: the first and last stage add their gradients (both
        copies then take the same step)."""
        if self.tied is not None and self.tied.grad is not None:
            grad = self.tied.grad
            self.embedding.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad)


def embedding_group(mesh: Mesh) -> Group | None:
    """The first and last stage of this rank's pipeline. Every rank creates every group,
    in the same order (new_group is collective over the world)."""
    P, mine = mesh.pp.size, None
    for pipeline in mesh.device_mesh.mesh.movedim(0, -1).reshape(-1, P).tolist():
        group = dist.new_group([pipeline[0], pipeline[-1]])
        if mesh.rank in pipeline:
            mine = mesh.comm.group(group)
    return mine


def _holder(params: Params, name: str):
    """The optimizer parameter that holds GPT-2 parameter `name` alone (the custom FSDP
    gives the tied weight a flat of its own), or None."""
    return next((p for p, held in zip(params.param_list(), params.names()) if held == [name]), None)


def split_into_stages(model: nn.Module, setup, parallelize_stage) -> tuple[list, Split]:
    """This rank's chunks of `model`, each parallelised as a model of its own by
    `parallelize_stage` (the split first, then TP, FSDP/DDP per stage), and the Split."""
    mesh, layout = setup.mesh, setup.layout
    P, V, rank = layout.pp, layout.virtual_stages, mesh.pp.rank
    S, blocks = P * V, split_layers(model.config.n_layer, P * V)
    wire_dtype = next(model.parameters()).dtype
    if layout.fsdp and setup.compute_dtype is not None:
        wire_dtype = setup.compute_dtype
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # before TP shards them
    shapes[TIED_ON_LAST] = shapes[TIED]
    stages, names = [], []
    for v in range(V):
        c = v * P + rank
        stage = parallelize_stage(stage_model(model, blocks[c], c == 0, c == S - 1), setup)
        names.append([(name, shapes[name]) for held in stage.params.names() for name in held])
        stages.append(stage)
    gathered = [None] * P
    dist.all_gather_object(gathered, names, group=mesh.pp.process_group)
    tied = (_holder(stages[0].params, TIED) if rank == 0 else
            _holder(stages[-1].params, TIED_ON_LAST) if rank == P - 1 else None)
    seq_split = layout.cp * (layout.tp if layout.sequence_parallel else 1)  # tokens a rank holds
    batch, block = setup.micro_batch
    # zero_bubble (native only) has no hand-written schedule; the native runner does not read it
    schedule = SCHEDULES.get(layout.pp_schedule, interleaved_1f1b)(P, setup.micro_steps, V)
    split = Split(mesh, S, [gathered[c % P][c // P] for c in range(S)], schedule,
                  (batch, block // seq_split, model.config.n_embd), wire_dtype,
                  torch.promote_types(setup.compute_dtype or wire_dtype, torch.float32), tied,
                  embedding_group(mesh))
    return stages, split


# ------------------------------------------------------------------ the runner

class PipelineRunner:
    """The stages of this rank and the schedule that drives them (a step runner)."""

    def __init__(self, stages: list, split: Split):
        self.stages, self.split, self.mesh = stages, split, split.mesh
        self.train_slots = simulate(split.schedule)
        self.eval_slots = simulate([sorted((a for a in row if a.kind == "F"), key=lambda a: a[::-1])
                                    for row in split.schedule])

    def train(self):
        for stage in self.stages:
            stage.module.train()

    def eval(self):
        for stage in self.stages:
            stage.module.eval()

    def _message(self, a: Action, rank: int):
        """What action `a` of pp rank `rank` sends: (consumer's key, pp rank) or None."""
        P, S = self.mesh.pp.size, self.split.n_chunks
        s = a.chunk * P + rank
        if a.kind == "F" and s < S - 1:
            return ("F", a.micro, s + 1), (rank + 1) % P
        if a.kind == "B" and s > 0:
            return ("B", a.micro, s - 1), (rank - 1) % P
        return None

    def _run(self, slots, batches, autocast, train: bool) -> torch.Tensor:
        """Execute the timeline `slots` (`simulate`'s). Before slot t every rank exchanges,
        in one batch, what the actions of slot t-1 produced: a message is sent and received
        in the same round on both sides, so no order of sends can deadlock."""
        pp, M, device = self.mesh.pp, len(batches), self.mesh.device
        rank, S = pp.rank, self.split.n_chunks
        at = {(q, t): a for q, row in enumerate(slots) for t, a in row}
        end = max(t for row in slots for t, _ in row) + 1
        last_backward = {a.chunk: a.micro for _, a in slots[rank] if a.kind == "B"}
        neighbours = sorted({(rank - 1) % pp.size, (rank + 1) % pp.size})
        inbox, inputs, outputs, outbox = {}, {}, {}, []
        loss_sum = torch.zeros((), dtype=self.split.loss_dtype, device=device)
        for t in range(end + 1):
            recvs = []
            for q in neighbours:
                message = self._message(at[q, t - 1], q) if (q, t - 1) in at else None
                if message is not None and message[1] == rank:
                    inbox[message[0]] = torch.empty(self.split.act_shape, dtype=self.split.wire_dtype,
                                                    device=device)
                    recvs.append((inbox[message[0]], q))
            with self.span("p2p", -1, -1):
                pp.send_recv(outbox, recvs)
            outbox = []
            if (rank, t) not in at:
                continue
            a = at[rank, t]
            s, key = a.chunk * pp.size + rank, (a.micro, a.chunk)
            stage, is_last, message = self.stages[a.chunk], s == S - 1, self._message(a, rank)
            with self.span(a.kind, a.micro, a.chunk):
                if a.kind == "F":
                    x = batches[a.micro][0] if s == 0 else inbox.pop(("F", a.micro, s)).requires_grad_(train)
                    with torch.set_grad_enabled(train), (stage.loss_context() if is_last else nullcontext()):
                        with autocast:
                            out = stage.module(x, targets=batches[a.micro][1]) if is_last else stage.module(x)
                        if is_last:
                            out = out / M
                            loss_sum += out.detach()
                        else:
                            outbox.append((out.detach().to(self.split.wire_dtype).contiguous(), message[1]))
                    if train:
                        inputs[key], outputs[key] = x, out
                else:
                    x, out = inputs.pop(key), outputs.pop(key)
                    grad = None if is_last else inbox.pop(("B", a.micro, s)).to(out.dtype)
                    sync = a.micro == last_backward[a.chunk]  # DP reduces on the last micro-batch
                    with (nullcontext() if sync else stage.no_sync()), \
                            (stage.loss_context() if is_last else nullcontext()):
                        torch.autograd.backward(out, grad)
                    if message is not None:
                        outbox.append((x.grad, message[1]))
        pp.all_reduce(loss_sum)  # from the last stage to every rank
        return loss_sum

    def span(self, kind: str, micro: int, chunk: int):
        """What wraps each exchange ("p2p", -1, -1) and each action: nothing here (bench/pp.py's
        TracedRunner times them)."""
        return nullcontext()

    def forward_backward(self, batches, autocast) -> torch.Tensor:
        loss = self._run(self.train_slots, batches, autocast, train=True)
        self.split.sum_tied_grads()
        return loss

    @torch.no_grad()
    def eval_loss(self, batches, autocast) -> torch.Tensor:
        return self._run(self.eval_slots, batches, autocast, train=False)


def check_pipeline(layout, run):
    """The pipeline's rules (rules.py runs them): blocks for every chunk, a schedule that
    exists for this implementation and fits the micro-steps."""
    P, V, schedule, model, M = layout.pp, layout.virtual_stages, layout.pp_schedule, run.model, run.micro_steps
    if P == 1:
        return
    if layout.implementation == "pytorch" and (layout.cp > 1 or layout.tp > 1):
        what = "PyTorch's context parallel" if layout.cp > 1 else "DTensor TP"
        raise UserError(f"torch.distributed.pipelining x {what} is not wired up here; use "
                        f"--implementation custom for PP x {'CP' if layout.cp > 1 else 'TP'}")
    if model is not None and P > model.n_layer:
        raise UserError(f"--pipeline_parallel_size ({P}) is larger than the model's n_layer "
                        f"({model.n_layer}): every stage needs a block; use at most {model.n_layer} stages")
    if model is not None and P * V > model.n_layer:
        raise UserError(f"--pipeline_parallel_size x --virtual_stages = {P} x {V} = {P * V} chunks, "
                        f"but the model has {model.n_layer} blocks; lower --virtual_stages")
    if V > 1 and schedule not in ("interleaved_1f1b", "zero_bubble"):
        raise UserError(f"--virtual_stages {V} needs --pipeline_schedule interleaved_1f1b "
                        f"(or zero_bubble with --implementation pytorch)")
    if schedule == "zero_bubble" and layout.implementation != "pytorch":
        raise UserError("--pipeline_schedule zero_bubble exists with --implementation pytorch only")
    if M is None:
        return
    where = (f"M = {M} micro-batches (the gradient accumulation steps: --total_batch_size / "
             f"(batch_size x block_size x data_parallel_size))")
    if schedule in ("interleaved_1f1b", "zero_bubble") and M % P:
        raise UserError(f"--pipeline_schedule {schedule} needs M to be a multiple of the "
                        f"{P} stages, got {where}; raise --total_batch_size or lower --batch_size")
    if schedule == "1f1b" and layout.implementation == "pytorch" and M < P:
        raise UserError(f"PyTorch's 1F1B needs at least M = P = {P} micro-batches, got {where}")
