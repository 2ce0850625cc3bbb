"""The planner's search space: every layout it considers for a job, and those train.py accepts.

The space (`search_space`): DDP / ZeRO-1 / FSDP ZeRO-3 / ZeRO-2 (and HSDP: FSDP with
every replica count that divides DP) x TP x PP, its schedule and virtual stages x CP and its
type (ring, Ulysses, hybrid) x EP (a mixture of experts: every size that divides DP x CP and the experts) x
activation checkpointing x the loss whole or in chunks (automatic) x micro-batch; under TP with loss parallelism, and sequence
parallelism where the sequence divides. It is filtered by the layout's own rules
(`candidates`: `rules.check_layout`, what train.py asks on the same device: nothing listed is
refused, nothing accepted is left out); plan.py costs and ranks what remains.
"""
import dataclasses
import itertools
from dataclasses import dataclass

from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.planner.cost import head_chunks
from nanodist.parallel.layout import Layout
from nanodist.parallel.rules import check_layout

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)]
DATA_PARALLEL = {"ddp": ("ddp", True), "zero1": ("zero1", True), "fsdp-zero3": ("fsdp", True),
                 "fsdp-zero2": ("fsdp", False)}
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
LOSS_CHUNKS = (1, 0)  # the whole logits, or chunks as large as the head's input (model/loss.py)


@dataclass(frozen=True)
class Job:
    """What is to be trained, whatever the layout."""
    preset: str                   # the model preset (train.py's --model)
    model: GPTConfig
    ranks: int
    ranks_per_node: int
    total_batch_size: int
    dtype: str = "bfloat16"
    device: str = "cuda"          # the layouts' rules differ (PyTorch's CP is CUDA only)
    implementation: str = "custom"
    micro_batch: int | None = None  # None: search MICRO_BATCHES
    compile: bool = False           # torch.compile: not every layout traces

    @property
    def block_size(self) -> int:
        return self.model.block_size


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cp_types(cp: int) -> list[tuple[str, int]]:
    """(type, Ulysses degree) of every context-parallel type on cp ranks (its rules drop
    those whose heads do not divide)."""
    if cp == 1:
        return [("ring", 0)]
    return [("ring", 0), ("ulysses", 0)] + [("hybrid", u) for u in divisors(cp)[1:-1]]


def search_space(job: Job):
    """(layout, micro-batch) of every combination the planner considers, valid or not."""
    T, E = job.block_size, job.model.moe_experts
    for pp, tp, cp in itertools.product(divisors(job.ranks), repeat=3):
        dp = job.ranks // (pp * tp * cp)
        if pp * tp * cp * dp != job.ranks or tp > job.ranks_per_node:
            continue
        per_rank_batch = job.total_batch_size // (T * dp)
        micro_batches = [job.micro_batch] if job.micro_batch else \
            [b for b in MICRO_BATCHES if b <= per_rank_batch]
        expert_parallel = [ep for ep in divisors(dp * cp) if E and E % ep == 0] or [1]
        for dp_type, replicas, (schedule, V), (cp_type, u), ep, ac, chunks, mb in itertools.product(
                DATA_PARALLEL, divisors(dp), SCHEDULES if pp > 1 else SCHEDULES[1:2], cp_types(cp),
                expert_parallel, ("none", "selective", "full"), LOSS_CHUNKS, micro_batches):
            kind, reshard = DATA_PARALLEL[dp_type]
            if (dp_type != "ddp" and dp * cp == 1) or (kind != "fsdp" and replicas > 1):
                continue  # sharding over one rank is DDP; replicas are HSDP's
            layout = Layout(pp=pp, dp=dp, cp=cp, cp_type=cp_type, ulysses_degree=u, tp=tp, ep=ep,
                            dp_type=kind, hsdp_replicas=replicas,
                            reshard_after_forward=reshard, loss_parallel=tp > 1, pp_schedule=schedule,
                            virtual_stages=V, checkpointing=ac, loss_chunks=chunks, compile=job.compile,
                            implementation=job.implementation)
            # sequence parallelism wherever it can split the sequence (it saves activations),
            # but not under a mixture of experts (expert_parallel.py refuses it: not wired up)
            sequence_parallel = tp > 1 and not E and layout.sequence_divides(T)
            layout = dataclasses.replace(layout, sequence_parallel=sequence_parallel)
            if chunks == 0 and head_chunks(job.model, layout, mb) == 1:
                continue  # the automatic count is the whole loss here: listed once, as such
            yield layout, mb


def candidates(job: Job):
    """(layout, micro-batch, M) of every layout of the search space that train.py accepts
    on `job.ranks` ranks of `job.device`."""
    for layout, mb in search_space(job):
        try:
            M = layout.micro_steps(job.total_batch_size, mb, job.block_size)
            check_layout(layout, job.ranks, job.device, job.block_size, job.model.dropout, job.model, M)
        except UserError:
            continue
        yield layout, mb, M
