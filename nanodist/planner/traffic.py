"""The analytic model of what each layout sends per rank and optimizer step, and in how
many calls (their latency), beside which the benchmark and the planner's validation put
what the real code counts (comm.py, nanodist_tools/measure.py's TrafficMode). Traffic
follows the dtype each collective carries (`--dtype bfloat16`: see `value_bytes`).

Communication per optimizer step, ring bus bytes each rank sends (comm.py's `bus`):

    DDP       all-reduce      2 (N-1)/N * 4 Psi                  (once per step: no_sync)
    ZeRO-1    reduce-scatter  (N-1)/N * 4 Psi, all-gather the same  (once per step: DDP's
              volume; PyTorch's: DDP's all-reduce, then a broadcast of every parameter, 4 Psi)
    ZeRO-3    all-gather      (N-1)/N * 4 * 2 Psi per micro-step  (every unit twice, the root
              reduce-scatter  (N-1)/N * 4 Psi per micro-step       too: fsdp.py reshards it
    ZeRO-2    all-gather      (N-1)/N * 4 Psi per micro-step       after forward)
    HSDP      the same over the N = dp_shard x cp ranks of a replica group, then an
              all-reduce of the shard's gradient over the R replicas: 2 (R-1)/R * 4 Psi/N
              per micro-step
    TP        activations of B T C floats, per micro-step (`tp_collectives`)
    CP        ring: sends of K/V blocks, (3 cp - 2) L x 2 B T/cp C/tp floats per micro-step
              (`ring_attention_sends`); Ulysses: per layer 2 all-to-alls forward (q, k, v;
              the output) and 2 backward of 4 B T/cp C/tp values each way (`ulysses_sends`),
              (u-1)/u of them sent; hybrid: the ring over cp/u ranks on C/(tp u) wide heads,
              Ulysses over u. DDP / FSDP then run over N = dp x cp ranks and TP's
              activations are T/cp tokens long
    EP        per MoE layer and micro-step, over the ep group: all-to-all of the k B T routed
              rows of C values there and back, forward and again backward: 4 k B T C
              values of payload, (ep-1)/ep of it sent when routing is balanced (`moe_all_to_all`),
              and the (E,) int64 counts forward; the experts' gradients are reduced (DDP)
              or sharded (FSDP, ZeRO-1) over edp = dp x cp / ep ranks instead of dp x cp
              (CP: the router's statistics all-reduced over cp, forward and backward)
    PP        sends of B T C fp32 activations (B T/tp C under SP) per stage boundary and
              micro-batch, forward and the same backward; the first and last stage
              all-reduce the tied wte / lm_head gradient (a 2-rank group)
plus the scalar all-reduces of the loss mean and the gradient norm (4 bytes each).

Each strategy states its own per-layer volume beside its code (tensor_parallel.py's
`tp_collectives`, ring_attention.py's `ring_attention_sends`, ulysses.py's
`ulysses_sends`, expert_parallel.py's `moe_all_to_all`); here one function per axis
(`AXES`, in mesh order) turns them into a chunk's terms, and `collectives` sums them.
"""
import math
from dataclasses import dataclass
from functools import cached_property

from nanodist.model.gpt import GPTConfig
from nanodist.parallel.comm import BUS_FACTOR
from nanodist.parallel.expert_parallel import moe_all_to_all
from nanodist.parallel.layout import Layout
from nanodist.parallel.ring_attention import ring_attention_sends
from nanodist.parallel.schedules import Action
from nanodist.parallel.tensor_parallel import tp_collectives
from nanodist.parallel.ulysses import ulysses_sends
from nanodist.planner.cost import DTYPE_BYTES, FP32, chunks, head_chunks, param_counts, schedule


def value_bytes(dtype: str, fsdp: bool, device_type: str) -> dict[str, int]:
    """Bytes per value of what the TP collectives carry, by what produced it (measured
    with comm.py on CPU; CUDA's autocast differs in LayerNorm only):

        matmul    matmul outputs (row-parallel outputs, logits) and their grads: the
                  compute dtype (bf16 under autocast)
        residual  the parameters' dtype, fp32, or bf16 under FSDP's mixed precision
                  (it gathers bf16 parameters): the embeddings, hence the residual stream
                  (bf16 matmul outputs + it), and the parameters' grads
        norm      LayerNorm outputs (the column-parallel inputs) and their grads: CUDA
                  autocast runs LayerNorm in fp32, CPU autocast keeps its input's dtype
    """
    matmul = DTYPE_BYTES[dtype]
    residual = matmul if fsdp else FP32
    return {"matmul": matmul, "residual": residual,
            "norm": FP32 if device_type == "cuda" else residual}


def fsdp_gathers(actions: list[Action], chunk: int, reshard_after_forward: bool) -> int:
    """All-gathers of each FSDP unit of local chunk `chunk`: ZeRO-3 gathers it for every
    forward and backward; ZeRO-2 keeps it from a forward until a backward has reduced
    its gradients (fsdp.py), so a forward that follows a forward gathers nothing."""
    count, gathered = 0, False
    for a in actions:
        if a.chunk == chunk:
            count += not gathered
            gathered = a.kind == "F" and not reshard_after_forward
    return count


@dataclass(frozen=True)
class Chunk:
    """One optimizer step of one model chunk on this rank, as the axes' terms read it."""
    cfg: GPTConfig
    layout: Layout
    micro_batch: int
    accum: int                  # micro-steps per optimizer step
    sizes: dict                 # bytes per value of each kind of activation (`value_bytes`)
    compute_bytes: int          # of the matmuls' inputs and outputs
    index: int                  # of this rank's chunks
    blocks: range
    first: bool                 # holds the embeddings
    last: bool                  # holds the head
    actions: list               # this rank's schedule (cost.schedule)

    @property
    def tokens(self) -> int:    # of a sequence on one CP rank
        return self.cfg.block_size // self.layout.cp

    @property
    def moe_blocks(self) -> int:
        return sum(self.cfg.is_moe(i) for i in self.blocks)

    @cached_property
    def counts(self) -> dict:    # this TP (and EP) rank's parameters of the chunk
        return param_counts(self.cfg, self.layout.tp, self.blocks, self.first, self.last, self.layout.ep)

    @property
    def experts(self) -> float:  # EP's parameters on this rank: reduced over edp (ep 1: like any other)
        return self.counts["experts"] if self.layout.ep > 1 else 0.0

    @property
    def dense(self) -> float:    # the rest: reduced (sharded) over dp x cp
        return self.counts["total"] - self.experts


def dense_group(layout: Layout) -> tuple[str, int]:
    """(role, size) of the group the dense gradients are reduced or sharded over."""
    return ("dp_shard_cp", layout.dp_shard * layout.cp) if layout.fsdp else ("dp_cp", layout.dp_cp)


def flat_shards(layout: Layout) -> bool:
    """Whether the optimizer steps on flat shards: the custom FSDP's and ZeRO-1's."""
    return layout.fsdp or (layout.zero1 and layout.implementation == "custom")


# Each axis's terms: (group, kind, group size, payload bytes, calls) of one chunk's step.

def pipeline_terms(c: Chunk):
    """Activations to the next chunk and their gradients back (the residual's dtype); the
    first and last stage's tied-weight gradient (its shard under FSDP, ZeRO-1)."""
    lay, C = c.layout, c.cfg.n_embd
    if lay.pp == 1:
        return
    T = c.tokens // lay.tp if lay.sequence_parallel else c.tokens
    hops = (not c.last) + (not c.first)
    yield "pp", "send", lay.pp, c.accum * c.micro_batch * T * C * c.sizes["residual"] * hops, c.accum * hops
    if c.first or c.last:
        shards = dense_group(lay)[1] if flat_shards(lay) else 1
        yield "embedding", "all_reduce", 2, FP32 * c.cfg.vocab_size * C / lay.tp / shards, 1


def data_parallel_terms(c: Chunk):
    """The gradients' reductions: FSDP's gathers and reduce-scatters per unit (HSDP: and
    the replicas' all-reduce), ZeRO-1's per bucket, DDP's all-reduce per bucket; the
    experts' over edp in their own units or buckets."""
    lay, dense, experts = c.layout, c.dense, c.experts
    group, shards = dense_group(lay)
    edp = lay.dp_cp // lay.ep

    def buckets(numel: float) -> int:  # custom DDP's and ZeRO-1's gradient buckets
        return math.ceil(FP32 * numel / (lay.bucket_cap_mb * 2**20))

    if lay.fsdp:
        units = len(c.blocks) + (c.first or c.last)
        gathers = fsdp_gathers(c.actions, c.index, lay.reshard_after_forward)
        for role, size, numel, count in ((group, shards, dense, units), ("edp", edp, experts, c.moe_blocks)):
            if not numel:  # no experts of their own (ep 1): they are dense
                continue
            yield role, "all_gather", size, gathers * c.compute_bytes * numel, gathers * count
            yield role, "reduce_scatter", size, c.accum * FP32 * numel, c.accum * count  # every micro-step
        yield "dp_replicate", "all_reduce", lay.dp_replicate, c.accum * FP32 * dense / shards, c.accum * units
    elif flat_shards(lay):  # ZeRO-1 by hand: a bucket per class at least (decay, no decay)
        for role, size, numel in (("dp_cp", lay.dp_cp, dense), ("edp", edp, experts)):
            if numel:
                yield role, "reduce_scatter", size, FP32 * numel, buckets(numel) + 1
                yield role, "all_gather", size, FP32 * numel, buckets(numel) + 1
    else:
        yield "dp_cp", "all_reduce", lay.dp_cp, FP32 * dense, buckets(dense)
        if experts:
            yield "edp", "all_reduce", edp, FP32 * experts, buckets(experts)
        if lay.zero1:  # ZeroRedundancyOptimizer: each parameter from its owner
            yield "dp_cp", "broadcast", lay.dp_cp, FP32 * dense, 12 * len(c.blocks) + 4 * (c.first or c.last)


def context_parallel_terms(c: Chunk):
    """Ring attention's sends over cp_ring, on the heads Ulysses left; Ulysses'
    all-to-alls over cp_ulysses; a mixture of experts' router statistics over cp."""
    lay, L, C = c.layout, len(c.blocks), c.cfg.n_embd
    u, ring = lay.ulysses, lay.cp // lay.ulysses
    if ring > 1:
        sends, payload = ring_attention_sends(c.micro_batch, c.cfg.block_size, C // lay.tp // u, L, ring,
                                              c.compute_bytes)
        yield "cp_ring", "send", ring, c.accum * payload, c.accum * sends
    if u > 1:
        calls, payload = ulysses_sends(c.micro_batch, c.tokens, C // lay.tp, u, c.compute_bytes)
        yield "cp_ulysses", "all_to_all", u, c.accum * L * payload, c.accum * L * calls
    if c.moe_blocks and lay.cp > 1:  # counts, probabilities, tokens: forward and backward
        yield ("cp", "all_reduce", lay.cp, c.accum * c.moe_blocks * 2 * FP32 * (2 * c.cfg.moe_experts + 1),
               c.accum * c.moe_blocks * 2)


def tensor_parallel_terms(c: Chunk):
    """The activations' collectives (`tp_collectives`), T/cp tokens long under CP."""
    lay = c.layout
    if lay.tp == 1:
        return
    for kind, (calls, payload) in tp_collectives(
            c.micro_batch, c.tokens, c.cfg.n_embd, c.cfg.vocab_size, len(c.blocks), lay.sequence_parallel,
            lay.loss_parallel, c.sizes, False, c.first, c.last, head_chunks(c.cfg, lay, c.micro_batch)).items():
        yield "tp", kind, lay.tp, c.accum * payload, c.accum * calls


def expert_parallel_terms(c: Chunk):
    """The routed rows' all-to-alls of every MoE block (`moe_all_to_all`)."""
    if c.moe_blocks and c.layout.ep > 1:
        calls, payload = moe_all_to_all(c.micro_batch, c.tokens, c.cfg.n_embd, c.cfg.moe_top_k,
                                        c.cfg.moe_experts, c.sizes)
        yield "ep", "all_to_all", c.layout.ep, c.accum * c.moe_blocks * payload, c.accum * c.moe_blocks * calls


def scalar_terms(cfg: GPTConfig, lay: Layout):
    """Once a step: the squared gradient norm (one all-reduce per class of split gradient:
    over TP; under FSDP and ZeRO-1 over their shards, and over those x TP; the experts'
    over ep, and edp), the trainer's mean of the loss over DP x CP, and across stages the
    loss and the norm."""
    yield "tp", "all_reduce", lay.tp, FP32, 1
    norms = flat_shards(lay) * (2 if lay.tp > 1 else 1)
    if norms:
        group, shards = dense_group(lay)
        yield group, "all_reduce", shards, FP32 * norms, norms
    if cfg.moe_experts and lay.ep > 1:
        yield "ep", "all_reduce", lay.ep, FP32, 1
        if flat_shards(lay):
            yield "edp", "all_reduce", lay.dp_cp // lay.ep, FP32, 1
    yield "dp_cp", "all_reduce", lay.dp_cp, FP32, 1
    yield "pp", "all_reduce", lay.pp, 2 * FP32, 2


AXES = (pipeline_terms, data_parallel_terms, context_parallel_terms, tensor_parallel_terms,
        expert_parallel_terms)  # mesh order: pp, dp, cp, tp; ep within dp x cp


def collectives(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                dtype: str = "float32", device_type: str = "cpu",
                pp_rank: int = 0) -> dict[tuple[str, str], tuple[int, float]]:
    """{(group, kind): (calls, bus bytes)} one rank sends per optimizer step: the sum over
    its chunks of every axis's terms (`AXES`), then the step's scalars. Groups by their
    role in the mesh (mesh.py): tp, cp (the router's statistics), cp_ring, cp_ulysses,
    dp_cp (DDP, ZeRO-1: the ranks holding the same dense parameters), dp_shard_cp (what
    FSDP shards over; HSDP then all-reduces over dp_replicate), ep and edp (the experts),
    pp (stage to stage) and embedding (the first and last stage). `dtype` bfloat16: FSDP
    gathers bf16 parameters and reduces fp32 gradients, TP carries what `value_bytes`
    says, ring attention and Ulysses bf16, the pipeline the residual stream's dtype; DDP's
    gradients and the scalars stay fp32. The bytes are exact (--validate); the calls (for
    the latency of each) count an FSDP unit (a block, the root) and a DDP bucket as one."""
    actions = schedule(layout.pp, layout.pp_schedule, layout.virtual_stages, accum)[pp_rank]
    sizes = value_bytes(dtype, layout.fsdp, device_type)
    terms = [term for v, (blocks, first, last) in enumerate(chunks(cfg, layout, pp_rank))
             for axis in AXES for term in axis(Chunk(cfg, layout, micro_batch, accum, sizes, DTYPE_BYTES[dtype],
                                                      v, blocks, first, last, actions))]
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for group, kind, size, payload, calls in terms + list(scalar_terms(cfg, layout)):
        if size > 1:
            n, bus = out.get((group, kind), (0, 0.0))
            out[group, kind] = n + calls, bus + BUS_FACTOR[kind](size) * payload
    return out


def traffic_by_group(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                     dtype: str = "float32", device_type: str = "cpu",
                     pp_rank: int = 0) -> dict[tuple[str, str], float]:
    """{(group, kind): bus bytes one rank sends per optimizer step} (`collectives`)."""
    return {key: bus for key, (_, bus) in collectives(cfg, layout, micro_batch, accum, dtype,
                                                      device_type, pp_rank).items()}


def traffic_bytes(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                  dtype: str = "float32", device_type: str = "cpu", pp_rank: int = 0) -> dict[str, float]:
    """{kind: bus bytes one rank sends per optimizer step} (`traffic_by_group` summed)."""
    bus: dict[str, float] = {}
    for (_, kind), value in traffic_by_group(cfg, layout, micro_batch, accum, dtype,
                                             device_type, pp_rank).items():
        bus[kind] = bus.get(kind, 0.0) + value
    return bus


