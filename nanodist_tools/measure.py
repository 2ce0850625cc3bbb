"""What the benchmark measures beside time, for custom and PyTorch strategies alike.

    Traffic          a dispatch mode that sees every c10d collective (the custom comm.py
                     calls, DDP's reducer, FSDP2, DTensor's functional collectives) and
                     adds its bytes per kind, with comm.py's payload/bus rules
    state memory     unique storages of parameters, gradients and optimizer state, taken
                     right after optimizer.step() (before zero_grad)
    activations      unique storages kept for backward by one forward (saved-tensor hooks,
                     and new storages still alive after it: selective checkpointing's
                     cache), parameters left out
    peak memory      CUDA: the rise of max_memory_allocated over the step plus this
                     trainer's state at rest (the worker's other trainers left out);
                     CPU: live tensor storage tracked by torch's MemTracker (not the
                     process RSS: allocator caches, the interpreter and gloo's buffers
                     are no tensors)

The measured step of the validation (`measure_step`) puts them together, per rank. (The
benchmark's compute-only twin, its collectives local copies, is bench/worker.py's.)
"""
import gc
import statistics
import time
import weakref
from dataclasses import asdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanodist import compat
from nanodist.run.config import parse_args
from nanodist.run.metrics import sync
from nanodist.parallel.comm import CommCounter
from nanodist.parallel.layout import Layout
from nanodist.run.trainer import Trainer

c10d, funcol = torch.ops.c10d, compat.functional_collectives()
tree_leaves = compat.tree_leaves
# op -> (kind, payload bytes from (args, group size))
_nbytes = lambda t: t.numel() * t.element_size()
_sum = lambda ts: sum(_nbytes(t) for t in ts)
COLLECTIVES = {
    c10d.allreduce_: ("all_reduce", lambda a: _sum(a[0])),
    c10d.allreduce_coalesced_: ("all_reduce", lambda a: _sum(a[0])),
    c10d._allgather_base_: ("all_gather", lambda a: _nbytes(a[0])),
    c10d.allgather_into_tensor_coalesced_: ("all_gather", lambda a: _sum(a[0])),
    c10d._reduce_scatter_base_: ("reduce_scatter", lambda a: _nbytes(a[1])),
    c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", lambda a: _sum(a[1])),
    c10d.broadcast_: ("broadcast", lambda a: _sum(a[0])),
    c10d.alltoall_base_: ("all_to_all", lambda a: _nbytes(a[1])),  # its bus: as if balanced
    funcol.all_reduce: ("all_reduce", lambda a: _nbytes(a[0])),
    funcol.all_gather_into_tensor: ("all_gather", lambda a: _nbytes(a[0]) * a[1]),
    funcol.reduce_scatter_tensor: ("reduce_scatter", lambda a: _nbytes(a[0])),
    funcol.broadcast: ("broadcast", lambda a: _nbytes(a[0])),
}


def _group_size(func, args) -> int:
    if func in (funcol.all_gather_into_tensor, funcol.reduce_scatter_tensor):
        return args[1] if func is funcol.all_gather_into_tensor else args[2]
    if func in (funcol.all_reduce, funcol.broadcast):
        return compat.resolve_process_group(args[2]).size()
    group = next(a for a in args if isinstance(a, torch.ScriptObject))
    return dist.ProcessGroup.unbox(group).size()


class TrafficMode(compat.TorchDispatchMode):
    """`with TrafficMode() as t:` ... `t.counter.summary()` (comm.CommCounter's format)."""

    def __init__(self):
        super().__init__()
        self.counter = CommCounter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor lower itself to collectives first
        packet = getattr(func, "_overloadpacket", None)
        if packet in COLLECTIVES:
            kind, payload = COLLECTIVES[packet]
            n = _group_size(packet, args)
            if n > 1:
                self.counter.add(kind, payload(args), n)
        return func(*args, **(kwargs or {}))


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of the distinct storages under `tensors` (DTensors: local)."""
    out = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def state_bytes(trainer) -> dict[str, int]:
    """Bytes of parameters (the optimizer's: FSDP steps on shards; and the modules' own),
    gradients and optimizer state of a trainer, each storage counted once, in that order."""
    optimizer = trainer.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]] + \
        [p for stage in trainer.parallel.parts for p in stage.module.parameters()]
    states = trainer.params.optimizer_state(optimizer)  # ZeroRedundancyOptimizer: its own
    seen, out = set(), {}
    for what, tensors in (("params", params),
                          ("grads", [p.grad for p in params if p.grad is not None]),
                          ("optimizer", [v for p in trainer.params.param_list() for v in states[p].values()
                                         if isinstance(v, torch.Tensor) and v.dim() > 0])):
        storages = {k: v for k, v in _storages(tensors).items() if k not in seen}
        seen.update(storages)
        out[what] = sum(storages.values())
    out["total"] = sum(out.values())
    return out


def _is_param(t: torch.Tensor) -> bool:
    if not isinstance(t, (DTensor, torch.nn.Parameter)) and t._base is None and t.is_leaf:
        return False  # a leaf that needs a gradient yet no parameter: a pipeline stage's input
    if isinstance(t, DTensor):
        t = t.to_local() if not (t.is_leaf and t.requires_grad) else t
    base = t._base if t._base is not None else t
    return (t.is_leaf and t.requires_grad) or (base.is_leaf and base.requires_grad)


def _data_ptr(t) -> int | None:
    """Of a tensor's storage; None for no tensor, or one whose storage is gone (a functional
    collective's output before its wait)."""
    try:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
    except RuntimeError:
        return None


class _NewStorages(compat.TorchDispatchMode):
    """Weak references to the storages that functional ops create inside the mode."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:  # in-place ops and collectives fill old storages
            inputs = {_data_ptr(t) for t in tree_leaves((args, kwargs))}
            for t in tree_leaves(out):  # views share their input's storage: not new
                if (ptr := _data_ptr(t)) is not None and ptr not in inputs:
                    self.refs.append(weakref.ref(t.untyped_storage()))
        return out

    def alive(self) -> list[torch.UntypedStorage]:
        return [s for s in (ref() for ref in self.refs) if s is not None]


@contextmanager
def saved_activations(params=()):
    """`with saved_activations(model.parameters()) as saved:` ... `sum(saved.values())`
    bytes kept for backward by the block (parameters and their views excluded): the
    tensors saved for backward (saved-tensor hooks), and the storages created inside that
    are still alive at its end (what selective checkpointing caches outside those hooks,
    FSDP's gathered parameters unless `params` names them, the block's own result if the
    caller keeps it)."""
    saved = {}

    def pack(t):
        if not _is_param(t):
            saved.update(_storages([t]))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _NewStorages() as new:
        yield saved
    gc.collect()  # what only a reference cycle holds is garbage, not kept for backward
    excluded = _storages(params)
    for storage in new.alive():
        if storage.nbytes() and storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()


@contextmanager
def peak_saved_bytes():
    """`with peak_saved_bytes() as peak:` ... `peak["bytes"]`: the most bytes of tensors
    saved for backward (parameters excluded) alive at one time inside, as autograd frees
    them (a pipeline's micro-batches in flight)."""
    live, peak = {}, {"bytes": 0}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not _is_param(t) and storage.nbytes() and key not in live:
            live[key] = storage.nbytes()
            weakref.finalize(storage, live.pop, key, None)  # when autograd lets it go
            peak["bytes"] = max(peak["bytes"], sum(live.values()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield peak


def peak_tensor_bytes(trainer, step: int) -> int:
    """Peak bytes of live tensors on this rank during `trainer.train_step(step)`."""
    device = trainer.mesh.device
    if device.type == "cuda":
        return _cuda_peak_bytes(trainer, step)
    tracker = compat.MemTracker()
    tracker.track_external(*(stage.module for stage in trainer.parallel.parts), trainer.optimizer)
    # MemTracker refuses a module's second forward (the next micro-step's) unless its module
    # statistics are reset first (the peak is kept): a global pre-forward hook, registered
    # before the tracker's own, does it
    reset = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: tracker.reset_mod_stats() if module is trainer.parallel.parts[0].module else None)
    try:
        with tracker:
            trainer.train_step(step)
    finally:
        reset.remove()
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def _cuda_peak_bytes(trainer, step: int) -> int:
    """The allocator's peak counts every tensor of the process, other Trainers' states
    too (the worker holds several): the rise over what was allocated before the step,
    plus this trainer's own state at rest (parameters, AdamW moments; grads are None)."""
    device = trainer.mesh.device
    own = state_bytes(trainer)["total"]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(step)
    return torch.cuda.max_memory_allocated(device) - before + own


def step_argv(layout: Layout, data_dir: str, out_dir: str, model: str = "tiny", block_size: int = 32,
             micro_batch: int = 2, micro_steps: int = 4, device: str = "cpu") -> list[str]:
    """train.py's flags of the measured step (char-level data): by default the tiny
    model, 4 micro-batches of 2 x 32 tokens."""
    return [f"--device={device}", f"--model={model}", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
            f"--block_size={block_size}", f"--batch_size={micro_batch}",
            f"--total_batch_size={micro_batch * block_size * layout.dp * micro_steps}",
            "--max_steps=1", "--warmup_steps=0", f"--out_dir={out_dir}", *layout.flags()]


def measure_run(argv: list[str], timed_steps: int = 0, peak: bool = False) -> dict:
    """Rank side: `measure_step` of a Trainer of train.py's flags `argv`."""
    return measure_step(Trainer(parse_args(argv)), timed_steps, peak)


def measure_step(trainer: Trainer, timed_steps: int = 0, peak: bool = False) -> dict:
    """One optimizer step; this rank's state, activation and bus bytes per kind (the sends
    of a pipeline from the trainer's comm counter: the dispatch mode does not see them);
    then the median time of `timed_steps` more steps (none: no time); then (`peak`) one
    more step's peak of live tensor bytes, as train.py logs it (the AdamW moments exist;
    every tensor of the process: measure in a fresh one)."""
    state = {}
    hook = trainer.optimizer.register_step_post_hook(lambda *_: state.update(state_bytes(trainer)))
    with TrafficMode() as counted, trainer.comm.counting() as sent, peak_saved_bytes() as saved:
        trainer.train_step(0)
    hook.remove()
    bus = {kind: v["bus_bytes"] for kind, v in counted.counter.summary().items()}
    if "send" in sent.bus_bytes:
        bus["send"] = sent.bus_bytes["send"]
    times, device = [], trainer.mesh.device
    for step in range(1, timed_steps + 1):
        sync(device)
        start = time.perf_counter()
        trainer.train_step(step)
        sync(device)  # the update too: train_step returns once its values reached the host
        times.append(time.perf_counter() - start)
    if peak:
        with trainer.memory.step(measure=True):
            trainer.train_step(timed_steps + 1)
        peak = trainer.memory.peak
    return {"rank": trainer.rank, "pp_rank": trainer.mesh.pp.rank, "state": state["total"],
            "peak": peak or None,
            "traffic": bus, "activations": saved["bytes"], "micro_batch": trainer.cfg.batch_size,
            "micro_steps": trainer.micro_steps, "tokens_per_step": trainer.tokens_per_step,
            "model": asdict(trainer.model_cfg), "step_s": statistics.median(times) if times else None,
            "flops_per_step": trainer.flops_per_step}
