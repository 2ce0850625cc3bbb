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
"""
import math

from nanodist.model.gpt import GPTConfig
from nanodist.parallel.comm import BUS_FACTOR
from nanodist.parallel.layout import Layout
from nanodist.parallel.schedules import Action
from nanodist.parallel.ulysses import ulysses_sends
from nanodist.planner.cost import DTYPE_BYTES, FP32, chunks, param_counts, schedule


FP32_EVERYWHERE = {"matmul": FP32, "residual": FP32, "norm": FP32}


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


def tp_collectives(B: int, T: int, C: int, V: int, L: int, sp: bool, lp: bool,
                   sizes: dict = FP32_EVERYWHERE, grad_norm: bool = True, first: bool = True,
                   last: bool = True) -> dict:
    """{kind: (calls, payload bytes)} of the TP collectives of one forward + backward
    (custom executor), plus (grad_norm) the 4-byte all-reduce of the squared gradient
    norm. `sizes`: bytes per value of each kind of activation (`value_bytes`).

    without SP   all-reduce   4 per layer (2 forward: row-parallel outputs; 2 backward:
                              column-parallel inputs) + wte forward + lm_head input backward
    with SP      all-gather   4 per layer (2 forward before column, 2 backward after row)
                              + drop scatter backward + lm_head input forward
                 reduce-scatter 4 per layer (mirror) + lm_head input backward
                 all-reduce   wte forward (B T C) + the sequence-sharded replicated
                              parameters' grads (2 LayerNorms x 2 + 2 row biases per layer,
                              + ln_f: C each)
    loss parallel  all-reduce of the max (B T) and of [sum exp, target logit] (2 B T),
                   fp32, instead of an all-gather of the logits (B T V)
    A pipeline chunk of L blocks has the wte parts if `first`, the head's if `last`.
    """
    act = {what: B * T * C * size for what, size in sizes.items()}
    # per layer: 2 LayerNorm outputs (or their grads) and 2 matmul outputs (or their grads)
    layers = 2 * L * (act["norm"] + act["matmul"])
    embedding, head, lp = act["residual"] * first, act["norm"] * last, lp and last
    if sp:
        counts = {"all_gather": (4 * L + first + last, layers + embedding + head),
                  "reduce_scatter": (4 * L + last, layers + head),
                  "all_reduce": (first + 6 * L + 2 * last,
                                 embedding + (6 * L + 2 * last) * C * sizes["residual"])}
    else:
        counts = {"all_reduce": (4 * L + first + last, layers + embedding + head)}
    calls, payload = counts["all_reduce"]
    counts["all_reduce"] = (calls + grad_norm + (2 if lp else 0),
                            payload + FP32 * grad_norm + (3 * B * T * FP32 if lp else 0))
    if last and not lp:
        calls, payload = counts.get("all_gather", (0, 0))
        counts["all_gather"] = (calls + 1, payload + B * T * V * sizes["matmul"])
    return counts


def ring_attention_sends(B: int, T: int, C: int, L: int, cp: int,
                         value_bytes: int = FP32) -> tuple[int, int]:
    """(sends, payload bytes) of ring attention in one forward + backward per rank: per
    layer cp-1 K/V blocks forward, cp-1 K/V and cp dK/dV blocks backward, each K and V of
    B x T/cp tokens x C (C: the local width, n_embd / TP) values; K/V in the matmuls'
    dtype (`value_bytes`), the dK/dV accumulators in fp32 at least."""
    sends = L * (3 * cp - 2)
    block = 2 * B * T * C // cp
    return sends, L * block * ((2 * cp - 2) * value_bytes + cp * max(value_bytes, FP32))


def moe_all_to_all(B: int, T: int, C: int, k: int, E: int, sizes: dict = FP32_EVERYWHERE) -> tuple[int, float]:
    """(calls, payload bytes) of one MoE layer's all-to-alls in one forward + backward of a
    rank's B x T tokens: the counts (E int64), then the routed rows (k B T, the norm's
    dtype: ln_2's output) and the experts' outputs (the matmuls'), each sent forward and
    its gradient backward (expert_parallel.py). Balanced: every rank receives as many
    rows as it sends, so the payload of each is k B T C values."""
    rows = k * B * T * C
    return 5, 8 * E + 2 * rows * (sizes["norm"] + sizes["matmul"])


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


def collectives(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                dtype: str = "float32", device_type: str = "cpu",
                pp_rank: int = 0) -> dict[tuple[str, str], tuple[int, float]]:
    """{(group, kind): (calls, bus bytes)} one rank sends per optimizer step; groups by
    their role in the mesh (mesh.py): tp, cp (the router's statistics), cp_ring (ring
    attention), cp_ulysses, dp_cp (DDP, ZeRO-1: the ranks that hold the same dense
    parameters), dp_shard_cp (what FSDP shards over; HSDP then all-reduces over
    dp_replicate), ep and edp (the experts), pp (stage to stage) and embedding (the first
    and last stage). `dtype` bfloat16: FSDP gathers bf16 parameters
    and reduces fp32 gradients, TP carries what `value_bytes` says, ring attention bf16
    K/V, the pipeline the residual stream's dtype; DDP's gradients and the scalars stay fp32. Under CP,
    TP's activations are T/cp long. The bytes are exact (--validate); the calls (for the
    latency of each) count an FSDP unit (a block, the root) and a DDP bucket as one."""
    tp, cp, P, C, V = layout.tp, layout.cp, layout.pp, cfg.n_embd, cfg.vocab_size
    dp_cp, T, compute_bytes = layout.dp * cp, cfg.block_size // cp, DTYPE_BYTES[dtype]
    shards = layout.dp_shard * cp if layout.fsdp else dp_cp  # the dense gradients' group
    shard_group = "dp_shard_cp" if layout.fsdp else "dp_cp"
    flat_shards = layout.fsdp or (layout.zero1 and layout.implementation == "custom")
    sp = layout.sequence_parallel
    actions = schedule(P, layout.pp_schedule, layout.virtual_stages, accum)[pp_rank]
    out: dict[tuple[str, str], tuple[int, float]] = {}

    def buckets(numel: float) -> int:  # custom DDP's and ZeRO-1's gradient buckets of numel values
        return math.ceil(FP32 * numel / (layout.bucket_cap_mb * 2**20))

    def add(group, kind, group_size, payload, calls=1):
        if group_size > 1:
            n, bus = out.get((group, kind), (0, 0.0))
            out[group, kind] = n + calls, bus + BUS_FACTOR[kind](group_size) * payload

    ep, edp = layout.ep, dp_cp // layout.ep
    sizes = value_bytes(dtype, layout.fsdp, device_type)
    for v, (blocks, first, last) in enumerate(chunks(cfg, layout, pp_rank)):
        n = param_counts(cfg, tp, blocks, first, last, ep)  # this TP (and EP) rank's parameters
        moe = sum(cfg.is_moe(i) for i in blocks)
        experts = n["experts"] if ep > 1 else 0.0  # EP's: over edp (with ep 1 like any other)
        dense = n["total"] - experts                # reduced (sharded) over dp x cp
        if moe and ep > 1:
            calls, payload = moe_all_to_all(micro_batch, T, C, cfg.moe_top_k, cfg.moe_experts, sizes)
            add("ep", "all_to_all", ep, accum * moe * payload, accum * moe * calls)
        if moe and cp > 1:  # the router's statistics: counts, probabilities, tokens
            add("cp", "all_reduce", cp, accum * moe * 2 * FP32 * (2 * cfg.moe_experts + 1), accum * moe * 2)
        if tp > 1:
            for kind, (calls, payload) in tp_collectives(
                    micro_batch, T, C, V, len(blocks), sp, layout.loss_parallel,
                    value_bytes(dtype, layout.fsdp, device_type), False, first, last).items():
                add("tp", kind, tp, accum * payload, accum * calls)
        ring, ulysses = cp // layout.ulysses, layout.ulysses
        if ring > 1:  # over T / ring tokens of C / tp / ulysses values (the heads Ulysses left here)
            sends, payload = ring_attention_sends(micro_batch, cfg.block_size, C // tp // ulysses,
                                                  len(blocks), ring, compute_bytes)
            add("cp_ring", "send", ring, accum * payload, accum * sends)
        if ulysses > 1:
            calls, payload = ulysses_sends(micro_batch, T, C // tp, ulysses, compute_bytes)
            add("cp_ulysses", "all_to_all", ulysses, accum * len(blocks) * payload, accum * len(blocks) * calls)
        if P > 1:  # activations to the next chunk, their gradients back (the residual's dtype)
            boundary = micro_batch * (T // tp if sp else T) * C * value_bytes(dtype, layout.fsdp, device_type)["residual"]
            hops = (not last) + (not first)
            add("pp", "send", P, accum * boundary * hops, accum * hops)
            if first or last:  # the tied weight's gradient (its shard under FSDP, ZeRO-1)
                add("embedding", "all_reduce", 2, FP32 * V * C / tp / (shards if flat_shards else 1))
        if layout.fsdp:
            units = len(blocks) + (first or last)
            gathers = fsdp_gathers(actions, v, layout.reshard_after_forward)
            for group, size, numel, unit_count in (("dp_shard_cp", shards, dense, units), ("edp", edp, experts, moe)):
                add(group, "all_gather", size, gathers * compute_bytes * numel, gathers * unit_count)
                add(group, "reduce_scatter", size, accum * FP32 * numel, accum * unit_count)  # every micro-step
            add("dp_replicate", "all_reduce", layout.dp_replicate, accum * FP32 * dense / shards,
                accum * units)
        elif flat_shards:  # ZeRO-1 by hand: a bucket per class at least (decay, no decay)
            add("dp_cp", "reduce_scatter", dp_cp, FP32 * dense, buckets(dense) + 1)
            add("dp_cp", "all_gather", dp_cp, FP32 * dense, buckets(dense) + 1)
            if experts:  # their own buckets, over the ranks holding the same experts
                add("edp", "reduce_scatter", edp, FP32 * experts, buckets(experts) + 1)
                add("edp", "all_gather", edp, FP32 * experts, buckets(experts) + 1)
        else:
            add("dp_cp", "all_reduce", dp_cp, FP32 * dense, buckets(dense))
            if experts and ep > 1:  # their own buckets, over the ranks holding the same experts
                add("edp", "all_reduce", edp, FP32 * experts, buckets(experts))
            if layout.zero1:  # ZeroRedundancyOptimizer: each parameter from its owner
                add("dp_cp", "broadcast", dp_cp, FP32 * dense, 12 * len(blocks) + 4 * (first or last))
    # scalars, once a step: the squared gradient norm (one all-reduce per class of
    # sharded gradient: over TP; under FSDP and ZeRO-1 over DP and over DP x TP), the
    # trainer's mean of the loss over DP x CP, and across stages the loss and the norm
    add("tp", "all_reduce", tp, FP32)
    norms = flat_shards * (2 if tp > 1 else 1)
    if norms:
        add(shard_group, "all_reduce", shards, FP32 * norms, norms)
    if cfg.moe_experts and ep > 1:  # the experts' class: sharded over ep (and edp: FSDP, ZeRO-1)
        add("ep", "all_reduce", ep, FP32)
        if flat_shards:
            add("edp", "all_reduce", edp, FP32)
    add("dp_cp", "all_reduce", dp_cp, FP32)
    add("pp", "all_reduce", P, 2 * FP32, 2)
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


