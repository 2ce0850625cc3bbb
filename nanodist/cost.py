"""The analytic model of what each layout costs per rank, beside which the benchmark
puts its measurements. Psi = parameters; state is fp32 (master weights), traffic follows
the dtype each collective carries (`--dtype bfloat16`: see `traffic_bytes`).

Parameters of GPT-2 (L layers, width C, padded vocab V, context T, biases on; the tied
wte/lm_head matrix counted once), split by what tensor parallelism does to them:

    root    wte V C (TP: vocab rows)   wpe T C, ln_f 2C (replicated)
    block   c_attn 3C^2+3C, attn.c_proj C^2, c_fc 4C^2+4C, mlp.c_proj 4C^2  (TP: sharded)
            ln_1 2C, ln_2 2C, the two row-parallel biases C + C             (replicated)

State memory (ZeRO paper, fp32 Adam): 4 bytes of parameter + 4 of gradient + 8 of Adam
moments per parameter, = 16 Psi on one rank, and per rank:

    DDP              16 Psi                  (everything replicated)
    FSDP (ZeRO-3)    16 Psi / N              (parameters, grads and moments sharded)
    FSDP "ZeRO-2"    16 Psi / N at rest      (this project's --fsdp_reshard_after_forward
                                              false: keeps gathered parameters from forward
                                              to backward, costs traffic not state)
    TP               16 (Psi_sharded / t + Psi_replicated)

Communication per optimizer step, ring bus bytes each rank sends (comm.py's `bus`):

    DDP       all-reduce      2 (N-1)/N * 4 Psi                  (once per step: no_sync)
    ZeRO-3    all-gather      (N-1)/N * 4 * 2 Psi per micro-step  (every unit twice, the root
              reduce-scatter  (N-1)/N * 4 Psi per micro-step       too: fsdp.py reshards it
    ZeRO-2    all-gather      (N-1)/N * 4 Psi per micro-step       after forward)
    TP        activations of B T C floats, per micro-step (`tp_collectives`)
    CP        sends of K/V blocks, (3 cp - 2) L x 2 B T/cp C/tp floats per micro-step
              (`ring_attention_sends`); DDP / FSDP then run over N = dp x cp ranks and
              TP's activations are T/cp tokens long
    PP        sends of B T C fp32 activations (B T/tp C under SP) per stage boundary and
              micro-batch, forward and the same backward; the first and last stage
              all-reduce the tied wte / lm_head gradient (a 2-rank group)
plus the scalar all-reduces of the loss mean and the gradient norm (4 bytes each).

Pipeline stages (pipeline.py): pp rank r holds chunks r, r + P, ... of `split_layers`;
the first chunk holds wte and wpe, the last ln_f and its own copy of the tied lm_head.
What a rank holds and sends, and the activations it keeps in flight (GPipe: M
micro-batches, 1F1B: at most P - r), follow from walking its schedule (`schedule`).
"""
import math
from dataclasses import dataclass
from functools import lru_cache

from nanodist.config import TrainConfig
from nanodist.model import GPTConfig
from nanodist.parallel.pipeline import split_layers
from nanodist.parallel.schedules import SCHEDULES, Action, bubble_fraction

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class Layout:
    """One layout. zero3: reshard after forward (FSDP only)."""
    name: str
    dp: int = 1
    tp: int = 1
    dp_type: str = "ddp"
    zero3: bool = True
    loss_parallel: bool = False
    sequence_parallel: bool = False
    cp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    checkpointing: str = "none"

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def fsdp(self) -> bool:
        """Sharded: FSDP over more than one rank holding the same parameters (DP x CP)."""
        return self.dp_type == "fsdp" and self.dp * self.cp > 1

    def flags(self) -> list[str]:
        """The train.py flags of this layout."""
        return [f"--data_parallel_size={self.dp}", f"--tensor_parallel_size={self.tp}",
                f"--data_parallel_type={self.dp_type}",
                f"--fsdp_reshard_after_forward={self.zero3}",
                f"--enable_loss_parallelism={self.loss_parallel}",
                f"--sequence_parallel={self.sequence_parallel}",
                f"--context_parallel_size={self.cp}",
                f"--pipeline_parallel_size={self.pp}", f"--pipeline_schedule={self.pp_schedule}",
                f"--virtual_stages={self.virtual_stages}",
                f"--activation_checkpointing={self.checkpointing}"]


def param_counts(cfg: GPTConfig, tp: int = 1, blocks: range | None = None, first: bool = True,
                 last: bool = True) -> dict[str, float]:
    """Parameters by role: blocks / root (FSDP units), tp_sharded / replicated, total;
    as one rank of `tp` holds them (TP-sharded ones / tp); of the model, or of the chunk
    holding `blocks` (the first: wte, wpe; the last: ln_f, lm_head = its copy of wte)."""
    L, C, V, T = len(blocks or range(cfg.n_layer)), cfg.n_embd, cfg.vocab_size, cfg.block_size
    block_sharded = (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C) / tp
    block_replicated = 2 * C + 2 * C + C + C
    root_sharded = V * C / tp if first or last else 0
    root_replicated = T * C * first + 2 * C * last
    return {"blocks": L * (block_sharded + block_replicated),
            "root": root_sharded + root_replicated,
            "tp_sharded": L * block_sharded + root_sharded,
            "replicated": L * block_replicated + root_replicated,
            "total": L * (block_sharded + block_replicated) + root_sharded + root_replicated}


def chunks(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> list[tuple[range, bool, bool]]:
    """(blocks, first, last) of each model chunk pp rank `pp_rank` holds, as pipeline.py splits."""
    S = layout.pp * layout.virtual_stages
    blocks = split_layers(cfg.n_layer, S)
    return [(blocks[c], c == 0, c == S - 1) for c in range(pp_rank, S, layout.pp)]


def stage_params(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> dict[str, float]:
    """`param_counts` of what pp rank `pp_rank` holds (the whole model without PP)."""
    per_chunk = [param_counts(cfg, layout.tp, *chunk) for chunk in chunks(cfg, layout, pp_rank)]
    return {role: sum(counts[role] for counts in per_chunk) for role in per_chunk[0]}


def local_params(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> float:
    """Parameters one rank keeps between steps (FSDP padding ignored: < N per flat)."""
    local = stage_params(cfg, layout, pp_rank)["total"]
    return local / (layout.dp * layout.cp) if layout.fsdp else local


def state_bytes(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and AdamW moments after an optimizer step."""
    local = local_params(cfg, layout, pp_rank)
    state = {"params": FP32 * local, "grads": FP32 * local, "optimizer": ADAM_STATES * FP32 * local}
    state["total"] = sum(state.values())
    return state


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


BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0,
              "send": lambda n: 1.0}


def ring_attention_sends(B: int, T: int, C: int, L: int, cp: int,
                         value_bytes: int = FP32) -> tuple[int, int]:
    """(sends, payload bytes) of ring attention in one forward + backward per rank: per
    layer cp-1 K/V blocks forward, cp-1 K/V and cp dK/dV blocks backward, each K and V of
    B x T/cp tokens x C (C: the local width, n_embd / TP) values."""
    sends = L * (3 * cp - 2)
    return sends, sends * 2 * B * T * C // cp * value_bytes


@lru_cache(maxsize=None)
def schedule(pp: int, pp_schedule: str, virtual_stages: int, accum: int) -> list[list[Action]]:
    """Per pp rank, its forwards and backwards (micro-batch, local chunk) in order
    (pipeline.py's schedules); without PP, forward then backward of each micro-step."""
    if pp == 1:
        return [[Action(kind, m, 0) for m in range(accum) for kind in "FB"]]
    return SCHEDULES[pp_schedule](pp, accum, virtual_stages)


def fsdp_gathers(actions: list[Action], chunk: int, zero3: bool) -> int:
    """All-gathers of each FSDP unit of local chunk `chunk`: ZeRO-3 gathers it for every
    forward and backward; ZeRO-2 keeps it from a forward until a backward has reduced
    its gradients (fsdp.py), so a forward that follows a forward gathers nothing."""
    count, gathered = 0, False
    for a in actions:
        if a.chunk == chunk:
            count += not gathered
            gathered = a.kind == "F" and not zero3
    return count


def collectives(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                dtype: str = "float32", device_type: str = "cpu",
                pp_rank: int = 0) -> dict[tuple[str, str], tuple[int, float]]:
    """{(group, kind): (calls, bus bytes)} one rank sends per optimizer step; groups: tp,
    cp, dp (the dp x cp ranks that hold the same parameters), pp (stage to stage) and
    embedding (the first and last stage). `dtype` bfloat16: FSDP gathers bf16 parameters
    and reduces fp32 gradients, TP carries what `value_bytes` says, ring attention bf16
    K/V; DDP's gradients, the pipeline's activations and the scalars stay fp32. Under CP,
    TP's activations are T/cp long. The bytes are exact (--validate); the calls (for the
    latency of each) count an FSDP unit (a block, the root) and a DDP bucket as one."""
    tp, cp, P, C, V = layout.tp, layout.cp, layout.pp, cfg.n_embd, cfg.vocab_size
    dp, T, compute_bytes = layout.dp * cp, cfg.block_size // cp, DTYPE_BYTES[dtype]
    sp = layout.sequence_parallel
    actions = schedule(P, layout.pp_schedule, layout.virtual_stages, accum)[pp_rank]
    out: dict[tuple[str, str], tuple[int, float]] = {}

    def add(group, kind, group_size, payload, calls=1):
        if group_size > 1:
            n, bus = out.get((group, kind), (0, 0.0))
            out[group, kind] = n + calls, bus + BUS_FACTOR[kind](group_size) * payload

    for v, (blocks, first, last) in enumerate(chunks(cfg, layout, pp_rank)):
        n = param_counts(cfg, tp, blocks, first, last)  # this TP rank's parameters
        if tp > 1:
            for kind, (calls, payload) in tp_collectives(
                    micro_batch, T, C, V, len(blocks), sp, layout.loss_parallel,
                    value_bytes(dtype, layout.fsdp, device_type), False, first, last).items():
                add("tp", kind, tp, accum * payload, accum * calls)
        if cp > 1:
            sends, payload = ring_attention_sends(micro_batch, cfg.block_size, C // tp, len(blocks),
                                                  cp, compute_bytes)
            add("cp", "send", cp, accum * payload, accum * sends)
        if P > 1:  # activations to the next chunk, their gradients back (master dtype)
            boundary = micro_batch * (T // tp if sp else T) * C * FP32
            hops = (not last) + (not first)
            add("pp", "send", P, accum * boundary * hops, accum * hops)
            if first or last:  # the tied weight's gradient (its shard under FSDP)
                add("embedding", "all_reduce", 2, FP32 * V * C / tp / (dp if layout.fsdp else 1))
        if layout.fsdp:
            units = len(blocks) + (first or last)
            gathers = fsdp_gathers(actions, v, layout.zero3)
            add("dp", "all_gather", dp, gathers * compute_bytes * n["total"], gathers * units)
            add("dp", "reduce_scatter", dp, accum * FP32 * n["total"], accum * units)  # every micro-step
        else:
            buckets = math.ceil(FP32 * n["total"] / (TrainConfig.bucket_cap_mb * 2**20))
            add("dp", "all_reduce", dp, FP32 * n["total"], buckets)
    # scalars, once a step: the squared gradient norm (one all-reduce per class of
    # sharded gradient: over TP; under FSDP over DP and over DP x TP), the trainer's mean
    # of the loss over DP x CP, and across stages the loss and the norm
    add("tp", "all_reduce", tp, FP32)
    scalars = 1 + layout.fsdp * (2 if tp > 1 else 1)
    add("dp", "all_reduce", dp, FP32 * scalars, scalars)
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


def activation_bytes(cfg: GPTConfig, layout: Layout, micro_batch: int, checkpointing: str | None = None,
                     ac_every: int = 1, blocks: range | None = None, first: bool = True,
                     last: bool = True, value_bytes: int = FP32) -> float:
    """Bytes one rank keeps for backward after one micro-step's forward (fp32, no dropout),
    of the whole model or of a pipeline chunk (`blocks`; the embedding's ids if `first`,
    the head if `last`). checkpointing: the layout's unless given. value_bytes: of a
    float (bfloat16: 2, the planner's estimate; measured in fp32 only).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", Table 2) count s b h (34 + 5 a s / h) bytes per layer for fp16 activations,
    1-byte dropout masks and the a s^2 attention scores, softmax and its dropout; tensor
    parallelism leaves s b h (10 + 24/t + 5 a s/(h t)), sequence parallelism s b h (34/t +
    5 a s/(h t)), full recomputation 2 s b h. This model stores fp32 (4 bytes), has no
    dropout, and SDPA (flash / memory-efficient) never keeps the a s^2 matrices, only a
    logsumexp of a s floats per sequence: the 34 becomes 16 floats, the 5as/h term a/h.
    Per layer, in floats, with b s h = B T C and t = TP:

        replicated (no SP)   ln_1 input, c_attn input, ln_2 input, c_fc input   4 b s h
        under SP             LayerNorm inputs sharded (2 b s h / t); column-parallel
                             layers keep their gathered input for backward (2 b s h)
        sharded by heads     q k v (3), attention output = c_proj input (1),
                             gelu input (4), mlp.c_proj input (4)                12 b s h / t
                             + the attention logsumexp                            b s a / t
        LayerNorm statistics mean and 1/std of ln_1 and ln_2                     4 b s (/ t SP)
    = 16 b s h + b s a + 4 b s without TP, as Korthikanti's 34 -> 16 says.

    checkpointing (activation_checkpoint.py):
        full       a checkpointed block keeps its input only: b s h (/ t under SP);
                   with ac_every K, blocks 0, K, 2K, ... are checkpointed, the rest as above
        selective  the block input, and the outputs of the matmuls and of attention:
                   c_attn 3 b s h / t, attention b s h / t + b s a / t, c_fc 4 b s h / t,
                   the two row-parallel matmuls b s h each (before their reduction)
    context parallel: every s above is s / cp (this rank's tokens), and ring attention
        returns its output in (B, heads, T, d) order, copied once more for c_proj: + b s h / t
        per layer (none). Selective keeps nothing of it (an autograd Function: its
        insides are not cached) and recomputes it, ring included.
    head: ln_f input and statistics (/ t under SP), lm_head input (b s h), the log-softmax
    of the logits (b s V, / t with loss parallelism) and nll_loss's total weight (one
    float); int64 token ids, targets and positions.
    """
    b, h, a, V = micro_batch, cfg.n_embd, cfg.n_head, cfg.vocab_size
    blocks, checkpointing = blocks or range(cfg.n_layer), checkpointing or layout.checkpointing
    s = cfg.block_size // layout.cp
    t, sp = layout.tp, layout.sequence_parallel
    bsh, seq_split = b * s * h, (t if sp else 1)
    replicated = 2 * bsh / t + 2 * bsh if sp else 4 * bsh
    attention = bsh / t + b * s * a / t if layout.cp == 1 else 0  # CP: the ring is recomputed
    ring_copy = bsh / t if layout.cp > 1 else 0
    layer = {"none": replicated + 12 * bsh / t + b * s * a / t + 4 * b * s / seq_split + ring_copy,
             "full": bsh / seq_split,
             "selective": bsh / seq_split + 3 * bsh / t + attention + 4 * bsh / t + 2 * bsh}
    if checkpointing == "full":  # the block indices are the whole model's
        checkpointed = sum(i % ac_every == 0 for i in blocks)
        layers = checkpointed * layer["full"] + (len(blocks) - checkpointed) * layer["none"]
    else:
        layers = len(blocks) * layer[checkpointing]
    head = (bsh + 2 * b * s) / seq_split + bsh + b * s * V / (t if layout.loss_parallel else 1) + 1
    return value_bytes * (layers + head * last) + 8 * (b * s + s) * first + 8 * b * s * last


def activations_in_flight(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                          pp_rank: int = 0, ac_every: int = 1, value_bytes: int = FP32) -> float:
    """Peak bytes of activations a rank keeps: its chunks' `activation_bytes` for every
    micro-batch forwarded and not yet backwarded, walking its schedule (one micro-step
    without PP; GPipe all M; 1F1B at most P - r)."""
    per_chunk = [activation_bytes(cfg, layout, micro_batch, None, ac_every, *chunk, value_bytes)
                 for chunk in chunks(cfg, layout, pp_rank)]
    held, peak = [0] * len(per_chunk), 0.0
    for a in schedule(layout.pp, layout.pp_schedule, layout.virtual_stages, accum)[pp_rank]:
        held[a.chunk] += 1 if a.kind == "F" else -1
        peak = max(peak, sum(n * size for n, size in zip(held, per_chunk)))
    return peak


def bubble(layout: Layout, accum: int) -> float:
    """The idle fraction of a pipeline (`schedules.bubble_fraction`), M = `accum` micro-batches."""
    return bubble_fraction(layout.pp, accum, layout.virtual_stages)
