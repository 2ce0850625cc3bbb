"""Fully sharded data parallel: ZeRO-3 / ZeRO-2 by hand, and PyTorch's FSDP2, side by side.

Units (the wrap policy): every module held in an nn.ModuleList (GPT's blocks), plus the
root for the rest (embeddings, final norm, the head; wte and lm_head are one tied
parameter, counted once). Each unit flattens its parameters, one flat vector per class
(decay / no-decay x the groups they are already sharded over, e.g. TP; the tied weight
alone, so that a pipeline's first and last stage shard it alike), padded to N:

    flat    [ c_attn.w | c_proj.w | c_fc.w | ... | pad ]   numel = k * N, fp32 (fp64: --dtype float64)
    shards  [ rank 0 ][ rank 1 ] ... [ rank N-1 ]           rank r keeps shard r (k values):
                                                            master weights, grad, AdamW state
The model keeps its parameters (names, shapes, state_dict keys) as views of `full`, a
buffer in the compute dtype whose storage exists only while the unit is gathered:

    forward  unit i: wait all-gather(i), start all-gather(i+1) | compute | free full(i)
    backward unit i: wait all-gather(i), start all-gather(i-1) | grads  | reduce-scatter
                     (master dtype, async) -> shard.grad, free full(i) and the unsharded grads
    traffic per step: all-gather x 2 + reduce-scatter = 3 (N-1)/N Psi   (ZeRO-3)
    reshard_after_forward=False (ZeRO-2) keeps full(i) from forward to backward: 2 (N-1)/N Psi
    HSDP (--data_parallel_replicas R): N = the dp_shard x cp ranks of a replica group; the
    reduce-scattered shard gradients are then all-reduced over the R groups: + 2 (R-1)/R Psi/N
The root runs at both ends (embeddings first, head last): it is re-gathered when backward
reaches the head and stays gathered until the embeddings' gradients are in.
"""
import dataclasses
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn

from nanodist import compat
from nanodist.errors import UserError
from nanodist.parallel.comm import Group
from nanodist.parallel.engines import Flat, fsdp2_no_sync
from nanodist.parallel.init import full_value
from nanodist.parallel.params import FlatParams, ModuleParams, flat_classes, parameter_owners
from nanodist.parallel.placement import by_reduction


def wrap_policy(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """FSDP units as (name, module) in execution order: the root, then every module
    held in an nn.ModuleList (the transformer blocks)."""
    in_lists = {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
                if any(True for _ in child.parameters())}  # not the blocks of other pipeline stages
    return [("", model)] + [(name, m) for name, m in model.named_modules() if id(m) in in_lists]


def _free(t: torch.Tensor):  # views of t (the parameters, autograd's saved tensors) stay valid
    t.untyped_storage().resize_(0)


def _allocate(t: torch.Tensor):
    t.untyped_storage().resize_(t.numel() * t.element_size())


class ShardedFlat(Flat):
    """Parameters of one unit and one class as one master-dtype (fp32, or fp64) vector,
    sharded over `group` (and replicated over `replicas`: HSDP); its gradient's mean
    divides the sum by `divisor` ranks.

    `named_params` holds the model's current parameters (real, or on the meta device
    under --deferred_init: then values come from `model.initial_value`, DESIGN.md
    invariant 1); they are replaced, in every module holding them (`owners`), by views
    of `full`. Only this unit is ever unsharded here, once."""

    def __init__(self, named_params, owners, model, seed, group: Group, groups: tuple,
                 replicas: Group, divisor: int, compute_dtype, device):
        super().__init__(named_params, group, groups)
        self.replicas, self.divisor = replicas, divisor
        n = group.size
        # the unit, unsharded, once, in the master dtype (the parameters': fp32 or fp64)
        unit = torch.zeros(self.shard_numel * n, dtype=named_params[0][1].dtype, device=device)
        with torch.no_grad():
            for (name, old), value in zip(named_params, self.split(unit)):
                value.copy_(full_value(model, name, old, seed, device).reshape(-1))
        self.shard = nn.Parameter(unit.chunk(n)[group.rank].clone())
        del unit
        self.full = torch.empty(self.shard_numel * n, dtype=compute_dtype, device=device)
        self.params = self.install_views(named_params, owners, self.full)
        _free(self.full)
        self.unsharded_grad = None  # master dtype; lives across micro-steps only under no_sync


class Unit:
    """One FSDP unit: its module, its flat parameters and whether they are gathered."""

    def __init__(self, module, flats):
        self.module, self.flats = module, flats
        self.params = [p for f in flats for p in f.params]
        self.gathered, self.in_flight, self.grads_ready = False, [], 0
        self.reduced = False  # this backward's gradients are reduced (no more gathers needed)

    def unshard(self):
        """Start the all-gathers (async); nothing to do if gathered or already started."""
        if self.gathered or self.in_flight:
            return
        for f in self.flats:
            _allocate(f.full)
            inp = f.shard.detach().to(f.full.dtype)
            # into .data: a fresh version counter, so the views autograd saved in forward
            # (now refilled with the same values) do not count as modified in place
            self.in_flight.append((f.group.all_gather(f.full.data, inp, async_op=True), inp))

    def wait(self):
        self.unshard()
        for work, _ in self.in_flight:
            work.wait()
        self.in_flight, self.gathered = [], True

    def reshard(self):
        # one compute stream: a unit is freed only after its all-gather was waited for
        if self.in_flight:
            raise RuntimeError("FSDP unit resharded while its all-gather is in flight")
        if self.gathered:
            for f in self.flats:
                _free(f.full)
            self.gathered = False


class FSDP:
    """Custom ZeRO-3 (reshard_after_forward) or ZeRO-2 of `model` on `mesh`, driven by
    module hooks: the model is called as it is. Each parameter is sharded over the ranks
    that reduce its gradient (its placement): dense ones over dp_shard x cp, replicated
    across dp_replicate (HSDP; a group of one otherwise), expert-parallel ones over edp."""

    def __init__(self, model: nn.Module, mesh, seed: int, compute_dtype=torch.float32,
                 reshard_after_forward: bool = True, placements: dict | None = None):
        placements = placements or {}
        self.reshard_after_forward = reshard_after_forward
        self.sync_grads, self.backward_started, self.reductions = True, False, []
        # the root's backward runs after the blocks' only where it holds the embeddings (on
        # a pipeline's last stage ln_f and the head are done first: prefetching the root
        # again cost an all-gather and kept it gathered through the optimizer step)
        owners, claimed, self.units = parameter_owners(model), set(), []
        for name, module in reversed(wrap_policy(model)):  # blocks first, the root takes the rest
            unclaimed = [(pname, p) for pname, p in module.named_parameters(prefix=name)
                         if id(p) not in claimed]
            claimed.update(id(p) for _, p in unclaimed)
            flats = []
            for (reduce, divisor), members in by_reduction(unclaimed, placements).items():
                dense = reduce == "dp_cp"  # HSDP: sharded within a replica group, all-reduced across
                group = mesh.dp_shard_cp if dense else mesh.groups[reduce]
                replicas = mesh.dp_replicate if dense else mesh.comm.group()
                for (_, split_over, _), params in flat_classes(members, placements, mesh).items():
                    flats.append(ShardedFlat(params, owners, model, seed, group, (group,) + split_over,
                                             replicas, mesh.groups[divisor].size, compute_dtype, mesh.device))
            self.units.insert(0, Unit(module, flats))
            claimed.update(id(p) for p in self.units[0].params)
        for i, unit in enumerate(self.units):
            unit.module.register_forward_pre_hook(lambda m, args, i=i: self._pre_forward(i))
            unit.module.register_forward_hook(lambda m, args, out, i=i: self._post_forward(i, out))
            for p in unit.params:
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._grad_ready(unit))

    @property
    def flats(self):
        return [f for unit in self.units for f in unit.flats]

    @contextmanager
    def no_sync(self):
        """Micro-steps inside keep unsharded master-dtype grads (whole model) instead of reducing."""
        self.sync_grads = False
        try:
            yield
        finally:
            self.sync_grads = True

    def _pre_forward(self, i):
        self.units[i].wait()
        if i + 1 < len(self.units):
            self.units[i + 1].unshard()  # prefetch: overlaps unit i's compute

    def _post_forward(self, i, output):
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(lambda grad: self._pre_backward(i))
            if self.reshard_after_forward:  # the root too: the loss runs before the head's backward
                self.units[i].reshard()
        else:  # no backward follows (evaluation)
            self.units[i].reshard()

    def _pre_backward(self, i):
        if not self.backward_started:
            self.backward_started = True
            compat.queue_callback(self._finish_backward)
        self.units[i].wait()
        if not self.units[i - 1].reduced:  # a pipeline's last stage is done with its head early
            self.units[i - 1].unshard()  # prefetch the unit backward reaches next (root: last block)

    def _grad_ready(self, unit):
        unit.grads_ready += 1
        if unit.grads_ready == len(unit.params):
            self._reduce_grads(unit)

    def _reduce_grads(self, unit):
        """Unit's grads -> one master-dtype vector -> reduce-scatter, async: it overlaps the next
        unit's backward, which waits for it first (one unit's flat grads in flight)."""
        self._finish_reductions()
        for f in unit.flats:
            if f.unsharded_grad is None:
                f.unsharded_grad = torch.zeros(f.full.numel(), dtype=f.shard.dtype, device=f.shard.device)
            for view, p in zip(f.split(f.unsharded_grad), f.params):
                if p.grad is not None:
                    view.add_(p.grad.reshape(-1))  # compute dtype -> master dtype
                p.grad = None
            if self.sync_grads:
                out = torch.empty_like(f.shard)
                work = f.group.reduce_scatter(out, f.unsharded_grad, async_op=True)
                self.reductions.append((f, out, work, f.unsharded_grad))
                f.unsharded_grad = None
        unit.grads_ready, unit.reduced = 0, True
        unit.reshard()

    def _finish_reductions(self):
        for f, out, work, _ in self.reductions:
            work.wait()
            f.replicas.all_reduce(out)  # HSDP: the same shard of every replica group
            out.div_(f.divisor)  # sum -> mean (exact for N = 2^k, as FSDP2's AVG)
            f.shard.grad = out if f.shard.grad is None else f.shard.grad.add_(out)
        self.reductions = []

    def _finish_backward(self):
        for unit in self.units:  # units some of whose parameters got no gradient
            if unit.grads_ready or unit.gathered:
                self._reduce_grads(unit)
        self._finish_reductions()
        self.backward_started = False
        for unit in self.units:
            unit.reduced = False


def apply_fsdp(part, setup):
    """The FSDP step of `parallelize`: shard the part over the dp_shard x cp group (custom
    or FSDP2; HSDP: replicated across dp_replicate), before `materialize` (meta units are
    sharded one at a time).

    Gradient accumulation reduce-scatters every micro-step by default (no_sync stays a
    no-op): holding the unsharded fp32 gradients of the whole model between micro-steps
    costs 4 Psi bytes per rank, as much as DDP's, the memory FSDP exists to save; the
    price is one more reduce-scatter, (N-1)/N Psi, per extra micro-step.
    --fsdp_reduce_on_last_micro_step takes the other trade."""
    layout, mesh, model = setup.layout, setup.mesh, part.gpt
    master_dtype = next(model.parameters()).dtype  # fp32, or fp64 under --dtype float64
    compute_dtype = setup.compute_dtype or master_dtype
    placements = part.params.placements
    if layout.implementation == "pytorch":
        device_mesh = mesh.replicate_shard_mesh() if layout.hsdp else mesh.dp_shard_cp.device_mesh
        apply_fsdp2(model, device_mesh, layout.reshard_after_forward, compute_dtype, master_dtype)
        params, no_sync = ModuleParams(model, mesh, placements), partial(fsdp2_no_sync, model)
    else:
        fsdp = FSDP(model, mesh, setup.seed, compute_dtype, layout.reshard_after_forward, placements)
        params, no_sync = FlatParams([fsdp], mesh, placements), fsdp.no_sync
    return dataclasses.replace(part, params=params,
                               no_sync=no_sync if layout.reduce_on_last_micro_step else part.no_sync)


# ---------------------------------------------------------------- PyTorch FSDP2

def apply_fsdp2(model: nn.Module, device_mesh, reshard_after_forward: bool, compute_dtype,
                reduce_dtype):
    """FSDP2: fully_shard every unit of the wrap policy (blocks first, then the root) on
    `device_mesh`: 1-D, or 2-D (replicate, shard) for HSDP. Parameters become DTensors
    sharded on dim 0 (the optimizer and clip.py read that); meta parameters are
    materialised later by `materialize`."""
    # imported here: its module-level tensors, made before metrics.StepMemory starts counting
    # CPU bytes and freed at exit, would make c10 warn that it cannot count them
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    for _, module in reversed(wrap_policy(model)):
        fully_shard(module, mesh=device_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)


def check_fsdp(layout, run):
    """FSDP's rules (rules.py runs them, before the world's: its size needs R | dp)."""
    R = layout.hsdp_replicas
    if R < 1 or layout.dp % R:
        raise UserError(f"--data_parallel_replicas ({R}) must divide --data_parallel_size ({layout.dp})")
    if R > 1 and layout.dp_shard * layout.cp == 1:
        raise UserError(f"--data_parallel_replicas {R} = --data_parallel_size leaves one shard per "
                        f"replica group: that is DDP; use --data_parallel_type ddp")
    if layout.compile and layout.fsdp and layout.implementation == "custom":
        raise UserError("--compile cannot trace the custom FSDP (it frees and regrows parameter "
                        "storage between the ops); use --implementation pytorch with --compile")
