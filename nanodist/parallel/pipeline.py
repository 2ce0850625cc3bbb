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
slot t every rank exchanges, in one batch through `comm` (counted), what slot t-1
produced, so every message is sent and received in the same round on both sides and no
schedule can deadlock on the order of its messages.

Micro-batches are the gradient-accumulation micro-steps of one global batch, so the
pipeline follows the one-process trajectory; the loss is computed on the last stage.
"""
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from nanodist.config import grad_accum_steps
from nanodist.model import TIED_NAMES
from nanodist.parallel import comm
from nanodist.parallel.clip import grad_norm, scale_grads_
from nanodist.parallel.parallelize import Parallel
from nanodist.parallel.schedules import SCHEDULES, Action, check_layout, interleaved_1f1b, simulate

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
    return stage


# ------------------------------------------------------------------ the runner

class PipelineParallel(Parallel):
    """The stages of this rank (one Parallel per chunk) and the schedule that drives them."""

    def __init__(self, stages: list[Parallel], mesh, schedule, n_chunks: int, act_shape,
                 wire_dtype, tied, embedding_group, stage_names):
        super().__init__(nn.ModuleList(s.model for s in stages), mesh)
        self.stages, self.schedule, self.S = stages, schedule, n_chunks
        self.train_slots = simulate(schedule)
        self.eval_slots = simulate([sorted((a for a in row if a.kind == "F"), key=lambda a: a[::-1])
                                    for row in schedule])
        self.act_shape, self.wire_dtype = act_shape, wire_dtype
        self.loss_dtype = torch.promote_types(wire_dtype, torch.float32)  # as cross_entropy's
        self.tied, self.embedding_group = tied, embedding_group  # None off the first/last stage
        self.stage_names = stage_names  # per global chunk: [(name, full shape)], optimizer order
        self.trace = None  # a list to record (kind, micro, chunk, start s, end s) in: bench/pp.py
        self.optimizer_params = lambda: tuple(
            [p for s in stages for p in s.optimizer_params()[i]] for i in (0, 1))
        self.sharded_over = {p: g for s in stages for p, g in s.sharded_over.items()}

    def _message(self, a: Action, rank: int):
        """What action `a` of pp rank `rank` sends: (consumer's key, pp rank) or None."""
        P, s = self.mesh.pp_size, a.chunk * self.mesh.pp_size + rank
        if a.kind == "F" and s < self.S - 1:
            return ("F", a.micro, s + 1), (rank + 1) % P
        if a.kind == "B" and s > 0:
            return ("B", a.micro, s - 1), (rank - 1) % P
        return None

    def _run(self, slots, batches, autocast, train: bool) -> torch.Tensor:
        """Execute the timeline `slots` (`simulate`'s). Before slot t every rank exchanges,
        in one batch, what the actions of slot t-1 produced: a message is sent and received
        in the same round on both sides, so no order of sends can deadlock."""
        rank, M, group = self.mesh.pp_rank, len(batches), self.mesh.pp_group
        at = {(q, t): a for q, row in enumerate(slots) for t, a in row}
        end = max(t for row in slots for t, _ in row) + 1
        last_backward = {a.chunk: a.micro for _, a in slots[rank] if a.kind == "B"}
        neighbours = sorted({(rank - 1) % self.mesh.pp_size, (rank + 1) % self.mesh.pp_size})
        inbox, inputs, outputs, outbox = {}, {}, {}, []
        loss_sum = torch.zeros((), dtype=self.loss_dtype, device=self.mesh.device)
        for t in range(end + 1):
            recvs = []
            for q in neighbours:
                message = self._message(at[q, t - 1], q) if (q, t - 1) in at else None
                if message is not None and message[1] == rank:
                    inbox[message[0]] = torch.empty(self.act_shape, dtype=self.wire_dtype,
                                                    device=self.mesh.device)
                    recvs.append((inbox[message[0]], q))
            start = self._now()
            comm.send_recv(outbox, recvs, group)
            self._record("p2p", -1, -1, start)
            outbox = []
            if (rank, t) not in at:
                continue
            a = at[rank, t]
            s, key = a.chunk * self.mesh.pp_size + rank, (a.micro, a.chunk)
            stage, is_last, message = self.stages[a.chunk], s == self.S - 1, self._message(a, rank)
            start = self._now()
            if a.kind == "F":
                x = batches[a.micro][0] if s == 0 else inbox.pop(("F", a.micro, s)).requires_grad_(train)
                with torch.set_grad_enabled(train), (stage.loss_context() if is_last else nullcontext()):
                    with autocast:
                        out = stage.model(x)
                    if is_last:
                        out = stage.loss_fn(out, batches[a.micro][1]) / M
                        loss_sum += out.detach()
                    else:
                        outbox.append((out.detach().to(self.wire_dtype).contiguous(), message[1]))
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
            self._record(a.kind, a.micro, a.chunk, start)
        comm.all_reduce(loss_sum, group)  # from the last stage to every rank
        return loss_sum

    def _now(self) -> float:
        if self.trace is not None and self.mesh.device.type == "cuda":
            torch.cuda.synchronize(self.mesh.device)  # GPU work done: times are the kernels'
        return time.perf_counter()

    def _record(self, kind: str, micro: int, chunk: int, start: float):
        if self.trace is not None:
            self.trace.append((kind, micro, chunk, start, self._now()))

    def sum_tied_grads(self):
        """The tied wte / lm_head: the first and last stage add their gradients (both
        copies then take the same step)."""
        if self.tied is not None and self.tied.grad is not None:
            grad = self.tied.grad
            comm.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, self.embedding_group)

    def forward_backward(self, batches, autocast) -> torch.Tensor:
        loss = self._run(self.train_slots, batches, autocast, train=True)
        self.sum_tied_grads()
        return loss

    @torch.no_grad()
    def eval_loss(self, batches, autocast) -> torch.Tensor:
        return self._run(self.eval_slots, batches, autocast, train=False)

    def clip_grad_norm(self, max_norm: float | None):
        params = self.optimizer_param_list()
        on_last_only = self.tied if self.mesh.pp_rank == self.mesh.pp_size - 1 else None
        norm = grad_norm([p for p in params if p is not on_last_only], self.sharded_over,
                         across=self.mesh.pp_group)
        if max_norm is not None:
            scale_grads_(params, norm, max_norm)
        return norm

    def _per_stage(self, tensors):
        at = {id(p): t for p, t in zip(self.optimizer_param_list(), tensors)}
        return [[at[id(p)] for p in s.optimizer_param_list()] for s in self.stages]

    def _walk(self):
        """(global chunk, owner's pp rank, local chunk, name, shape, duplicate of the tied
        weight), in one order on every rank."""
        P = self.mesh.pp_size
        for c in range(self.S):
            for name, shape in self.stage_names[c]:
                yield c, c % P, c // P, name, shape, c == self.S - 1 and name == TIED_ON_LAST

    def full_tensors(self, tensors):
        """Every (GPT-2 name, full tensor) on every rank: the owning stage makes it, a
        broadcast over the pp group hands it on, one parameter at a time. Collective."""
        per_stage = self._per_stage(tensors)
        making = [s.full_tensors(t) for s, t in zip(self.stages, per_stage)]
        dtype = tensors[0].dtype
        for _, owner, v, name, shape, duplicate in self._walk():
            mine = owner == self.mesh.pp_rank
            full = next(making[v])[1].contiguous() if mine else None
            if duplicate:  # the last stage's copy of the tied weight equals the first's
                continue
            if not mine:
                full = torch.empty(shape, dtype=dtype, device=self.mesh.device)
            comm.broadcast(full, owner, self.mesh.pp_group)
            yield name, full

    @torch.no_grad()
    def load_full_tensors(self, full_of, tensors):
        """Every rank asks `full_of` for every name, in one order (it may be collective);
        the owning stage keeps its part. The tied weight is asked for once."""
        tied_full = {}

        def once(name):
            if name == TIED_ON_LAST:
                return tied_full[TIED]
            value = full_of(name)
            if name == TIED:
                tied_full[TIED] = value
            return value

        per_stage = self._per_stage(tensors)
        for c in range(self.S):
            owner, v = c % self.mesh.pp_size, c // self.mesh.pp_size
            if owner == self.mesh.pp_rank:
                self.stages[v].load_full_tensors(once, per_stage[v])
            else:
                for name, _ in self.stage_names[c]:
                    once(name)


def embedding_group(mesh):
    """The first and last stage of this rank's pipeline. Every rank creates every group,
    in the same order (new_group is collective over the world)."""
    P, mine = mesh.pp_size, None
    for pipeline in mesh.device_mesh.mesh.movedim(0, -1).reshape(-1, P).tolist():
        group = dist.new_group([pipeline[0], pipeline[-1]])
        if mesh.rank in pipeline:
            mine = group
    return mine


def _holder(stage: Parallel, name: str):
    """The optimizer parameter that holds GPT-2 parameter `name` alone (the custom FSDP
    gives the tied weight a flat of its own), or None."""
    return next((p for p, held in zip(stage.optimizer_param_list(), stage.param_names())
                 if held == [name]), None)


def apply_pp(model: nn.Module, cfg, mesh, parallelize_stage) -> PipelineParallel:
    """Split `model` into this rank's chunks, parallelise each as a model of its own
    (torchtitan's order: split first, then TP, FSDP/DDP per stage)."""
    P, V, n_layer = mesh.pp_size, cfg.virtual_stages, model.config.n_layer
    M = grad_accum_steps(cfg)
    check_layout(n_layer, P, V, M, cfg.pipeline_schedule, cfg.implementation)
    S, blocks = P * V, split_layers(n_layer, P * V)
    wire_dtype = next(model.parameters()).dtype  # activations cross in the master dtype
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # before TP shards them
    shapes[TIED_ON_LAST] = shapes[TIED]
    stages, names = [], []
    for v in range(V):
        c = v * P + mesh.pp_rank
        par = parallelize_stage(stage_model(model, blocks[c], c == 0, c == S - 1), cfg, mesh)
        names.append([(name, shapes[name]) for held in par.param_names() for name in held])
        stages.append(par)
    gathered = [None] * P
    dist.all_gather_object(gathered, names, group=mesh.pp_group)
    stage_names = [gathered[c % P][c // P] for c in range(S)]
    tied = (_holder(stages[0], TIED) if mesh.pp_rank == 0 else
            _holder(stages[-1], TIED_ON_LAST) if mesh.pp_rank == P - 1 else None)
    seq_split = mesh.cp_size * (mesh.tp_size if cfg.sequence_parallel else 1)  # tokens a rank holds
    act_shape = (cfg.batch_size, cfg.block_size // seq_split, model.config.n_embd)
    # zero_bubble (native only) has no hand-written schedule; the native steps do not read it
    schedule = SCHEDULES.get(cfg.pipeline_schedule, interleaved_1f1b)(P, M, V)
    args = (stages, mesh, schedule, S, act_shape, wire_dtype, tied, embedding_group(mesh), stage_names)
    if cfg.implementation == "pytorch":
        from nanodist.parallel.pipeline_native import NativePipelineParallel  # builds on this file
        return NativePipelineParallel(*args, schedule_name=cfg.pipeline_schedule, n_micro=M,
                                      batch=(cfg.batch_size, cfg.block_size),
                                      vocab=model.config.vocab_size)
    return PipelineParallel(*args)
