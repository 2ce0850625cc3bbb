"""Every rule a layout must obey, one function per axis (in mesh order) after the rules
every option shares; `check_layout` runs them all. The first one broken raises a
UserError that names the flags to change.

The trainer, the planner, the benchmarks and the command line all ask `check_layout`:
a layout the planner lists is one train.py accepts on that device, and no other.
"""
from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.layout import CHOICES, NEEDS, Layout, typed_value, flag


def check_layout(layout: Layout, world_size: int, device_type: str, block_size: int,
                 dropout: float = 0.0, model: GPTConfig | None = None, micro_steps: int | None = None):
    """Every rule of a layout; the first one broken raises a UserError that names the
    flags to change. The rules on the model's shape and on the micro-batches apply when
    `model` and `micro_steps` are given (the trainer knows them once the data is open)."""
    for field, allowed in CHOICES.items():
        if getattr(layout, field) not in allowed:
            raise UserError(f"unknown {flag(field)} {getattr(layout, field)!r}; choose from "
                            f"{', '.join(allowed)}")
    for field, needs in NEEDS.items():
        value = getattr(layout, field)
        if value != Layout.__dataclass_fields__[field].default and not needs.applies(layout):
            raise UserError(f"{flag(field)} {typed_value(value)} needs {needs.requirement}, and has no effect "
                            f"without it; drop it (or set {needs.requirement})")
    _data_parallel(layout)  # before the world: the axes' sizes need R | dp
    _world(layout, world_size)
    _tensor_parallel(layout, block_size)
    _context_parallel(layout, device_type, block_size, dropout)
    _expert_parallel(layout)
    if layout.compile and layout.fsdp and layout.implementation == "custom":
        raise UserError("--compile cannot trace the custom FSDP (it frees and regrows parameter "
                        "storage between the ops); use --implementation pytorch with --compile")
    if layout.pp > 1 and layout.implementation == "pytorch" and (layout.cp > 1 or layout.tp > 1):
        what = "PyTorch's context parallel" if layout.cp > 1 else "DTensor TP"
        raise UserError(f"torch.distributed.pipelining x {what} is not wired up here; use "
                        f"--implementation custom for PP x {'CP' if layout.cp > 1 else 'TP'}")
    if layout.pp > 1:
        _pipeline(layout, model, micro_steps)
    if model is not None:
        _model(layout, model)


def _world(layout, world_size: int):
    if layout.world != world_size:
        n = layout.world
        raise UserError(
            f"--pipeline_parallel_size ({layout.pp}) x --data_parallel_size ({layout.dp}) x "
            f"--context_parallel_size ({layout.cp}) x --tensor_parallel_size ({layout.tp}) = {n} "
            f"processes, but {world_size} were launched: launch with torchrun "
            f"--nproc_per_node={n} or change the sizes so that their product is {world_size}")


def _pipeline(layout, model: GPTConfig | None, M: int | None):
    P, V, schedule = layout.pp, layout.virtual_stages, layout.pp_schedule
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


def _data_parallel(layout):
    R = layout.hsdp_replicas
    if R < 1 or layout.dp % R:
        raise UserError(f"--data_parallel_replicas ({R}) must divide --data_parallel_size ({layout.dp})")
    if R > 1 and layout.dp_shard * layout.cp == 1:
        raise UserError(f"--data_parallel_replicas {R} = --data_parallel_size leaves one shard per "
                        f"replica group: that is DDP; use --data_parallel_type ddp")
    if layout.zero1 and layout.implementation == "pytorch" and (layout.tp > 1 or layout.pp > 1):
        raise UserError("--data_parallel_type zero1 --implementation pytorch (DDP + "
                        "ZeroRedundancyOptimizer) holds plain tensors only: no DTensor TP, no "
                        "pipeline stages; use --implementation custom for ZeRO-1 x TP or PP")


def _context_parallel(layout, device_type: str, block_size: int, dropout: float):
    if layout.cp == 1:
        return
    if layout.cp_type != "ring" and layout.implementation == "pytorch":
        raise UserError(f"--context_parallel_type {layout.cp_type} is hand-written only (PyTorch 2.13 "
                        f"has no Ulysses attention); use --implementation custom")
    u = layout.ulysses
    if layout.cp_type == "hybrid" and not (1 < u < layout.cp and layout.cp % u == 0):
        raise UserError(f"--context_parallel_type hybrid runs Ulysses over --ulysses_degree ranks and "
                        f"the ring over the rest: it must divide --context_parallel_size ({layout.cp}) "
                        f"and lie between 2 and {layout.cp // 2}, got {u or 'none the heads allow'}"
                        + ("" if u else "; use --context_parallel_type ring or ulysses"))
    if layout.cp_type == "ulysses" and block_size % layout.cp:
        raise UserError(f"--context_parallel_type ulysses splits each sequence over {layout.cp} ranks: "
                        f"--block_size ({block_size}) must be divisible by {layout.cp}")
    if layout.cp_type != "ulysses" and block_size % (2 * layout.cp):
        raise UserError(f"--context_parallel_size {layout.cp} cuts each sequence into {2 * layout.cp} "
                        f"zigzag chunks: --block_size ({block_size}) must be divisible by {2 * layout.cp}")
    if dropout > 0:
        raise UserError("--context_parallel_size > 1 runs attention without dropout: use --dropout 0")
    if layout.implementation == "pytorch" and device_type != "cuda":
        raise UserError("--implementation pytorch --context_parallel_size > 1 runs on CUDA only "
                        "(PyTorch's context parallel has no CPU attention kernel rule); use "
                        "--implementation custom (ring attention by hand) on CPU")


def _tensor_parallel(layout, block_size: int):
    if layout.sequence_parallel and not layout.sequence_divides(block_size):
        what = (f"--block_size ({block_size})" if layout.cp == 1 else f"the {block_size // layout.cp} "
                f"tokens of a CP rank (--block_size / --context_parallel_size)")
        raise UserError(f"--sequence_parallel splits the sequence: {what} must be divisible by "
                        f"--tensor_parallel_size ({layout.tp})")


def _expert_parallel(layout):
    if layout.ep == 1:
        return
    if layout.ep < 1 or layout.dp_cp % layout.ep:
        raise UserError(f"--expert_parallel_size ({layout.ep}) is carved from the data_parallel_size "
                        f"x context_parallel_size = {layout.dp_cp} ranks: it must divide {layout.dp_cp}")
    if layout.implementation == "pytorch":
        raise UserError("--expert_parallel_size > 1 is hand-written only (PyTorch 2.13 offers no "
                        "expert-parallel module or MoE layer); use --implementation custom")
    if layout.hsdp:
        raise UserError("--expert_parallel_size > 1 with --data_parallel_replicas > 1 (HSDP) is not "
                        "wired up; use --data_parallel_type ddp, zero1 or fsdp without replicas")


def _model(layout, model: GPTConfig):
    for what, size in (("n_head", model.n_head), ("n_embd", model.n_embd),
                       ("padded vocab_size", model.vocab_size)):
        if size % layout.tp:
            raise UserError(f"{what} ({size}) is not divisible by --tensor_parallel_size "
                            f"({layout.tp}); pick a tensor parallel size that divides it")
    if layout.cp > 1 and (model.n_head // layout.tp) % layout.ulysses:
        raise UserError(f"Ulysses splits the heads: n_head ({model.n_head}) / --tensor_parallel_size "
                        f"({layout.tp}) = {model.n_head // layout.tp} heads per rank cannot be split over "
                        f"{layout.ulysses} Ulysses ranks; pick a degree that divides them (or the ring)")
    E = model.moe_experts
    if layout.ep > 1 and (E == 0 or E % layout.ep):
        raise UserError(f"--expert_parallel_size {layout.ep} splits the experts over {layout.ep} ranks: "
                        + ("the model has none; add --moe_experts" if E == 0 else
                           f"--moe_experts ({E}) must be divisible by it"))
    if E and layout.sequence_parallel:
        raise UserError("--moe_experts with --sequence_parallel is not wired up (the router and "
                        "experts would see a slice of the sequence per TP rank and need their "
                        "gradients summed over TP); drop --sequence_parallel")
    if E and layout.compile:
        raise UserError("--moe_experts with --compile is not wired up (routing sizes are data-"
                        "dependent: each MoE block would recompile); drop --compile")
    if E and layout.pp > 1 and layout.implementation == "pytorch":
        raise UserError("--moe_experts with torch.distributed.pipelining is not wired up (its "
                        "shape inference cannot run data-dependent routing); use "
                        "--implementation custom for PP x MoE")
