"""Every rule a layout must obey; `check_layout` runs them all. The first one broken
raises a UserError that names the flags to change.

Each strategy states its own axis's rules beside its code (`check_fsdp`, `check_zero1`,
`check_pipeline`, `check_context_parallel`, `check_tensor_parallel`,
`check_expert_parallel`); here are the rules every option shares (its choices, where it
has an effect: layout.option), the world's size, and the registry that runs the axes'
in mesh order. The trainer, the planner, the benchmarks and the command line all ask
`check_layout`: a layout the planner lists is one train.py accepts on that device, and
no other.
"""
from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.context_parallel import check_context_parallel
from nanodist.parallel.expert_parallel import check_expert_parallel
from nanodist.parallel.fsdp import check_fsdp
from nanodist.parallel.layout import CHOICES, NEEDS, Layout, Run, flag, typed_value
from nanodist.parallel.pipeline import check_pipeline
from nanodist.parallel.tensor_parallel import check_tensor_parallel
from nanodist.parallel.zero1 import check_zero1

BEFORE_THE_WORLD = (check_fsdp, check_zero1)  # the axes' sizes need R | dp
AXES = (check_pipeline, check_context_parallel, check_tensor_parallel, check_expert_parallel)  # mesh order


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
    run = Run(world_size, device_type, block_size, dropout, model, micro_steps)
    for rules in BEFORE_THE_WORLD:
        rules(layout, run)
    if layout.world != world_size:
        raise UserError(
            f"--pipeline_parallel_size ({layout.pp}) x --data_parallel_size ({layout.dp}) x "
            f"--context_parallel_size ({layout.cp}) x --tensor_parallel_size ({layout.tp}) = {layout.world} "
            f"processes, but {world_size} were launched: launch with torchrun "
            f"--nproc_per_node={layout.world} or change the sizes so that their product is {world_size}")
    for rules in AXES:
        rules(layout, run)
