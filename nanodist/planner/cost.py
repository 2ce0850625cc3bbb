"""The analytic model of what each layout costs per rank in memory, beside which the
benchmark and the planner's validation put their measurements (its traffic: traffic.py).
Psi = parameters; state is fp32 (master weights).

Parameters of GPT-2 (L layers, width C, padded vocab V, context T, biases on; the tied
wte/lm_head matrix counted once), split by what tensor parallelism does to them:

    root    wte V C (TP: vocab rows)   wpe T C, ln_f 2C (replicated)
    block   c_attn 3C^2+3C, attn.c_proj C^2, c_fc 4C^2+4C, mlp.c_proj 4C^2  (TP: sharded)
            ln_1 2C, ln_2 2C, the two row-parallel biases C + C             (replicated)
    MoE     the MLP's place: router E C (replicated) and E experts of 8C^2+5C each
    block   (replicated by TP, split over EP: `experts` is a rank's E/ep of them)

State memory (ZeRO paper, fp32 Adam): 4 bytes of parameter + 4 of gradient + 8 of Adam
moments per parameter, = 16 Psi on one rank, and per rank:

    DDP              16 Psi                  (everything replicated)
    ZeRO-1           (4 + 4 + 8 / N) Psi     (the moments sharded: Megatron's distributed
                                              optimizer, 8 + 8/d with fp32 gradients)
    FSDP (ZeRO-3)    16 Psi / N              (parameters, grads and moments sharded; HSDP:
                                              N = the dp_shard x cp ranks of a replica group)
    FSDP "ZeRO-2"    16 Psi / N at rest      (this project's --fsdp_reshard_after_forward
                                              false: keeps gathered parameters from forward
                                              to backward, costs traffic not state)
    TP               16 (Psi_sharded / t + Psi_replicated)
    EP               experts: 16 Psi_experts / ep (DDP), 16 Psi_experts / N (FSDP: each
                     rank's E/ep experts sharded over the N/ep ranks that hold them)

Pipeline stages (pipeline.py): pp rank r holds chunks r, r + P, ... of `split_layers`;
the first chunk holds wte and wpe, the last ln_f and its own copy of the tied lm_head.
What a rank holds and sends, and the activations it keeps in flight (GPipe: M
micro-batches, 1F1B: at most P - r), follow from walking its schedule (`schedule`).
"""
import dataclasses
import math
from functools import lru_cache

import torch

from nanodist.model.gpt import GPT, GPTConfig, expert_param_count
from nanodist.model.loss import loss_chunks
from nanodist.parallel.expert_parallel import expert_placements
from nanodist.parallel.layout import Layout
from nanodist.parallel.pipeline import split_layers
from nanodist.parallel.placement import REPLICATED
from nanodist.parallel.tp_plan import gpt_plan, held_plan, tp_placements
from nanodist.parallel.schedules import SCHEDULES, Action, bubble_fraction

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq


def param_counts(cfg: GPTConfig, tp: int = 1, blocks: range | None = None, first: bool = True,
                 last: bool = True, ep: int = 1) -> dict[str, float]:
    """Parameters by role: blocks / root (FSDP units), tp_sharded / replicated / experts,
    total; as one rank of `tp` (TP-sharded ones / tp) and `ep` (experts / ep) holds them;
    of the model, or of the chunk holding `blocks` (the first: wte, wpe; the last: ln_f,
    lm_head = its copy of wte)."""
    blocks = range(cfg.n_layer) if blocks is None else blocks
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    L, moe = len(blocks), sum(cfg.is_moe(i) for i in blocks)
    mlp_sharded, attention_sharded = (4 * C * C + 4 * C + 4 * C * C) / tp, (3 * C * C + 3 * C + C * C) / tp
    sharded = L * attention_sharded + (L - moe) * mlp_sharded
    replicated = L * (2 * C + 2 * C + C) + (L - moe) * C + moe * cfg.moe_experts * C  # a router each
    experts = moe * cfg.moe_experts * expert_param_count(cfg) / ep
    root_sharded = V * C / tp if first or last else 0
    root_replicated = T * C * first + 2 * C * last
    return {"blocks": sharded + replicated + experts,
            "root": root_sharded + root_replicated,
            "tp_sharded": sharded + root_sharded,
            "replicated": replicated + root_replicated,
            "experts": experts,
            "total": sharded + replicated + experts + root_sharded + root_replicated}


def chunks(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> list[tuple[range, bool, bool]]:
    """(blocks, first, last) of each model chunk pp rank `pp_rank` holds, as pipeline.py splits."""
    S = layout.pp * layout.virtual_stages
    blocks = split_layers(cfg.n_layer, S)
    return [(blocks[c], c == 0, c == S - 1) for c in range(pp_rank, S, layout.pp)]


def stage_params(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> dict[str, float]:
    """`param_counts` of what pp rank `pp_rank` holds (the whole model without PP)."""
    per_chunk = [param_counts(cfg, layout.tp, *chunk, ep=layout.ep) for chunk in chunks(cfg, layout, pp_rank)]
    return {role: sum(counts[role] for counts in per_chunk) for role in per_chunk[0]}


def zero_state_bytes(params: float, d: int, zero_stage: int, param_bytes: float = FP32,
                     grad_bytes: float = FP32, optimizer_bytes: float = ADAM_STATES * FP32) -> dict[str, float]:
    """Model state per rank of ZeRO stage `zero_stage` over d data-parallel ranks (Rajbhandari et al.
    2020, section 5): 0 replicates everything (DDP), 1 shards the optimizer state
    (`optimizer_bytes` per parameter: Adam's moments, and a master copy where the
    parameters are kept in another dtype), 2 the gradients too, 3 the parameters too."""
    state = {"params": param_bytes * params / (d if zero_stage >= 3 else 1),
             "grads": grad_bytes * params / (d if zero_stage >= 2 else 1),
             "optimizer": optimizer_bytes * params / (d if zero_stage >= 1 else 1)}
    state["total"] = sum(state.values())
    return state


@lru_cache(maxsize=None)
def placed_parameters(config: tuple, tp: int, ep: int) -> tuple[tuple[str, float, str], ...]:
    """(GPT-2 name, values on one rank, reduce group) of every parameter (`config`: a
    GPTConfig's astuple; the tied weight under both names, as a pipeline's first and last
    stage each hold it), as the placements of TP (tp > 1) and EP (ep > 1) say: the model
    built on the meta device, the strategies' own placement functions asked."""
    with torch.device("meta"):
        model = GPT(GPTConfig(*config), seed=None)
    placements = {**(tp_placements(model, held_plan(model, gpt_plan(model.config.n_layer, False, False))) if tp > 1 else {}),
                  **(expert_placements(model) if ep > 1 else {})}
    sizes = {"tp": tp, "ep": ep}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        placement = placements.get(name, REPLICATED)
        out.append((name, p.numel() / math.prod(sizes[g] for g, _ in placement.shards), placement.reduce))
    return tuple(out)


def _holds(name: str, blocks: range, first: bool, last: bool) -> bool:
    """Whether the pipeline chunk of `blocks` holds parameter `name` (pipeline.py's split)."""
    if name.startswith("transformer.h."):
        return int(name.split(".")[2]) in blocks
    if name in ("transformer.wte.weight", "transformer.wpe.weight"):
        return first
    return last and not (first and name == "lm_head.weight")  # one stage: the tied weight once


def state_bytes(cfg: GPTConfig, layout: Layout, pp_rank: int = 0) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and AdamW moments after an optimizer step,
    all fp32, read from the placements (placement.py): each parameter's piece on this
    rank, then ZeRO stage 3 under FSDP (its "ZeRO-2" too: at rest it holds shards alone;
    over the group that reduces it: a replica group's dp_shard x cp ranks, the experts'
    edp), 1 under ZeRO-1 (over dp x cp, the experts' edp), else 0 (padding ignored)."""
    zero_stage = 3 if layout.fsdp else 1 if layout.zero1 else 0
    over = {"dp_cp": layout.dp_shard * layout.cp if layout.fsdp else layout.dp_cp,
            "edp": layout.dp_cp // layout.ep}
    held = _held(dataclasses.astuple(cfg), layout.tp, layout.ep, tuple(chunks(cfg, layout, pp_rank)))
    per_group = [zero_state_bytes(values, over[reduce], zero_stage) for reduce, values in held]
    return {key: sum(state[key] for state in per_group) for key in per_group[0]}


@lru_cache(maxsize=None)
def _held(config: tuple, tp: int, ep: int, mine: tuple) -> tuple:
    """((reduce group, values a rank holding the chunks `mine` has of its parameters), ...):
    dp_cp's, then edp's."""
    held = {"dp_cp": 0.0, "edp": 0.0}
    for name, values, reduce in placed_parameters(config, tp, ep):
        if any(_holds(name, *chunk) for chunk in mine):
            held[reduce] += values
    return tuple(held.items())


@lru_cache(maxsize=None)
def schedule(pp: int, pp_schedule: str, virtual_stages: int, accum: int) -> list[list[Action]]:
    """Per pp rank, its forwards and backwards (micro-batch, local chunk) in order
    (pipeline.py's schedules); without PP, forward then backward of each micro-step."""
    if pp == 1:
        return [[Action(kind, m, 0) for m in range(accum) for kind in "FB"]]
    return SCHEDULES[pp_schedule](pp, accum, virtual_stages)


def head_chunks(cfg: GPTConfig, layout: Layout, micro_batch: int) -> int:
    """The chunks of the head's loss (model/loss.py) for a micro-batch: 1 = the whole logits."""
    vocab_rows = cfg.vocab_size // (layout.tp if layout.loss_parallel else 1)
    return loss_chunks(layout.loss_chunks, micro_batch * cfg.block_size // layout.cp, vocab_rows, cfg.n_embd)


def activation_bytes(cfg: GPTConfig, layout: Layout, micro_batch: int, checkpointing: str | None = None,
                     ac_every: int | None = None, blocks: range | None = None, first: bool = True,
                     last: bool = True, compute_bytes: int = FP32) -> float:
    """Bytes one rank keeps for backward after one micro-step's forward (no dropout), of
    the whole model or of a pipeline chunk (`blocks`; the embedding's ids if `first`, the
    head if `last`). checkpointing, ac_every: the layout's unless given. compute_bytes:
    of a matmul's input or output (bfloat16 autocast: 2; the residual stream, LayerNorm,
    attention's logsumexp and the loss stay fp32: marked below).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", Table 2) count s b h (34 + 5 a s / h) bytes per layer for fp16 activations,
    1-byte dropout masks and the a s^2 attention scores, softmax and its dropout; tensor
    parallelism leaves s b h (10 + 24/t + 5 a s/(h t)), sequence parallelism s b h (34/t +
    5 a s/(h t)), full recomputation 2 s b h. This model has no dropout, and SDPA (flash /
    memory-efficient) never keeps the a s^2 matrices, only a logsumexp of a s floats per
    sequence: in values the 34 becomes 16, the 5as/h term a/h (tests/test_plan.py derives
    Korthikanti's numbers from these). Per layer, in values, with b s h = B T C, t = TP:

        replicated (no SP)   ln_1 input, ln_2 input (fp32), c_attn input, c_fc input  4 b s h
        under SP             LayerNorm inputs sharded (2 b s h / t); column-parallel
                             layers keep their gathered input for backward (2 b s h)
        sharded by heads     q k v (3), attention output = c_proj input (1),
                             gelu input (4), mlp.c_proj input (4)                12 b s h / t
                             + the attention logsumexp (fp32)                     b s a / t
        LayerNorm statistics mean and 1/std of ln_1 and ln_2 (fp32)              4 b s (/ t SP)
    = 16 b s h + b s a + 4 b s without TP, as Korthikanti's 34 -> 16 says.

    checkpointing (activation_checkpoint.py):
        full       a checkpointed block keeps its input only: b s h (/ t under SP, fp32);
                   with ac_every K, blocks 0, K, 2K, ... are checkpointed, the rest as above
        selective  the block input, and the outputs of the matmuls and of attention:
                   c_attn 3 b s h / t, attention b s h / t + b s a / t, c_fc 4 b s h / t,
                   the two row-parallel matmuls b s h each (before their reduction)
    context parallel: every s above is s / cp (this rank's tokens), and ring attention
        returns its output in (B, heads, T, d) order, copied once more for c_proj: + b s h / t
        per layer (none). Selective keeps nothing of it (an autograd Function: its
        insides are not cached) and recomputes it, ring included.
    mixture of experts, in place of the MLP's c_fc input and 8 b s h / t: the router's
        input b s h, the k b s h routed rows (the experts' inputs), their hidden and gelu
        (8 k b s h: TP replicates experts), the experts' outputs before the gates (k b s h);
        the router's probabilities and the gates (fp32, b s (E + k)), the sort's and the
        gather's int64 indices (b s (E + 2k)). Checkpointing: as a dense block.
    head: ln_f input and statistics (/ t under SP, fp32), lm_head input (b s h), the fp32
    log-softmax of the logits (b s V, / t with loss parallelism) and nll_loss's total
    weight (one float); int64 token ids, targets and positions. The chunked loss
    (--loss_chunks, model/loss.py) keeps no logits: the head's input (as lm_head), the
    targets, their logsumexp (fp32) and their count (int64).
    autocast (compute_bytes < 4) of fp32 weights (not FSDP's: it gathers them in the
    compute dtype) keeps each matmul's weight cast for backward: 12 h^2 / t per block and
    V h / t of the head (not the chunked loss's: it casts again in backward), per
    micro-batch (Megatron keeps bf16 weights to avoid them).
    """
    b, h, a, V = micro_batch, cfg.n_embd, cfg.n_head, cfg.vocab_size
    blocks, checkpointing = blocks or range(cfg.n_layer), checkpointing or layout.checkpointing
    ac_every = ac_every or layout.ac_every
    s = cfg.block_size // layout.cp
    t, sp, c = layout.tp, layout.sequence_parallel, compute_bytes
    bsh, seq_split = b * s * h, (t if sp else 1)
    ring = layout.cp // layout.ulysses > 1  # Ulysses alone runs the model's own attention
    norms = FP32 * (2 * bsh / seq_split + 4 * b * s / seq_split)  # LayerNorm inputs and statistics
    # CP: the attention core keeps its own output beside the one it hands back (the ring's
    # concatenation, Ulysses' all-to-all)
    matmul_inputs = c * (2 * bsh + 12 * bsh / t + (bsh / t if layout.cp > 1 else 0))
    logsumexp = FP32 * b * s * a / t
    block_input = FP32 * bsh / seq_split
    attention = c * bsh / t + logsumexp if not ring else 0  # the ring is recomputed
    layer = {"none": norms + matmul_inputs + logsumexp, "full": block_input,
             "selective": block_input + c * (3 * bsh / t + 4 * bsh / t + 2 * bsh) + attention}
    E, k = cfg.moe_experts, cfg.moe_top_k
    moe = c * (10 * k - 8 / t) * bsh + FP32 * b * s * (E + k) + 8 * b * s * (E + 2 * k)  # - MLP's
    kept = [i for i in blocks if not (checkpointing == "full" and i % ac_every == 0)]
    layers = ((len(blocks) - len(kept)) * layer["full"]
              + len(kept) * layer["selective" if checkpointing == "selective" else "none"]
              + sum(cfg.is_moe(i) for i in kept) * moe)
    whole = head_chunks(cfg, layout, micro_batch) == 1
    loss = FP32 * (b * s * V / (t if layout.loss_parallel else 1) + 1) if whole else FP32 * b * s + 8
    head = FP32 * (bsh + 2 * b * s) / seq_split + c * bsh + loss
    casts = c * (len(blocks) * 12 * h * h + V * h * last * whole) / t if c < FP32 and not layout.fsdp else 0
    return layers + head * last + casts + 8 * (b * s + s) * first + 8 * b * s * last


def activations_in_flight(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                          pp_rank: int = 0, compute_bytes: int = FP32) -> float:
    """Peak bytes of activations a rank keeps: its chunks' `activation_bytes` for every
    micro-batch forwarded and not yet backwarded, walking its schedule (one micro-step
    without PP; GPipe all M; 1F1B at most P - r)."""
    per_chunk = [activation_bytes(cfg, layout, micro_batch, None, None, *chunk, compute_bytes)
                 for chunk in chunks(cfg, layout, pp_rank)]
    held, peak = [0] * len(per_chunk), 0.0
    for a in schedule(layout.pp, layout.pp_schedule, layout.virtual_stages, accum)[pp_rank]:
        held[a.chunk] += 1 if a.kind == "F" else -1
        peak = max(peak, sum(n * size for n, size in zip(held, per_chunk)))
    return peak


def bubble(layout: Layout, accum: int) -> float:
    """The idle fraction of a pipeline (`schedules.bubble_fraction`), M = `accum` micro-batches."""
    return bubble_fraction(layout.pp, accum, layout.virtual_stages)
