"""The step-time model: seconds of one rank's compute per optimizer step, and of the
communication that cannot hide behind it, on a machine (hardware.py). plan.py adds them.

Per layer and micro-step, at one rank's shapes (TP: 1/t of the columns, CP: 1/c of the
queries; SP gathers the tokens back before each matmul):

    matmuls       each of a block's and of the head's, forward and the two of backward
                  (the input's gradient, the weight's), at the machine's rate for its shape
                  (a GPU's data sheet: the roofline of the shape; a profile: measured)
    attention     causal and flash-style (SDPA keeps no s x s matrix): the scores and the
                  mix, 2 x 2 m T C FLOPs on the full square, half of it under the mask;
                  backward 2.5x the forward (5 matmuls of the forward's 2: it recomputes
                  the scores)
    memory-bound  what moves more bytes than it computes, priced by the bytes it moves
                  (`LAYER_BYTES`: LayerNorm, GELU, residual adds, autocast's casts, the
                  biases' gradients); per micro-step the head's loss over the vocabulary
                  (`LOSS_BYTES`) and the parameters' casts and gradient sums; once a step
                  the optimizer over this rank's state (`OPTIMIZER_BYTES`). A profile
                  without a memory bandwidth (a CPU's) has them in its time per layer
    host          the framework's time per layer: a profile's, measured (a CPU runs
                  Python, dispatch and kernels on the same cores: it adds); a GPU's host
                  launches `KERNELS` ops per layer while the GPU runs the previous ones:
                  a layer takes the longer of the two (small micro-batches are
                  launch-bound)

full checkpointing adds a forward of the blocks, selective one of their element-wise
ops, the chunked loss a forward of the head's matmul; a pipeline stretches the compute by
1 / (1 - bubble). `compiled` (torch.compile, and the fused kernels of llm.c, Megatron,
flash-attention's training scripts) fuses the element-wise ops: fewer bytes and launches.

Communication (`exposed_s`): each group's calls at the machine's time for their size. On
a GPU (NCCL on streams of its own) DDP's and ZeRO-1's reductions hide behind the last
micro-step's backward but for the last bucket, FSDP's gathers and reduce-scatters (HSDP's
all-reduce) behind each micro-step's compute but for the first unit's gather and the last
one's reduce-scatter (its copies into and out of its buffers: `parameter_bytes`); TP, CP
and PP traffic, EP's all-to-alls and ZeRO-1's all-gather after the step are on the
critical path. On CPU cores (gloo) nothing hides.
"""
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.comm import BUS_FACTOR
from nanodist.parallel.layout import Layout
from nanodist.planner.cost import DTYPE_BYTES, FP32, chunks, head_chunks, param_counts, stage_params, state_bytes
from nanodist.planner.search import Job

# Bytes the memory-bound ops of one block move per token, forward and backward, in units
# of n_embd: eager counted from the model's own ops (each op reads its inputs and writes
# its output; aten ops but views, matmuls and attention, under a dispatch mode: 228 fp32,
# 190 under bf16 autocast); compiled: each fused kernel reads a tensor once and writes
# one, about 0.6 of eager's (hand count of Block's fusible groups: 114 of 194 bf16)
LAYER_BYTES = {(False, "float32"): 228, (False, "bfloat16"): 190, (True, "float32"): 137, (True, "bfloat16"): 114}
# per token of the head, in units of the vocabulary's rows on this rank: the loss's
# log-softmax, its gradient, autocast's casts (counted as above: 44 whole; chunks recompute
# the logits and cast them again: 61 fp32, 79 bf16); fused: logits read in the forward,
# read and their gradient written in the backward
LOSS_BYTES = {(False, False, "float32"): 44, (False, False, "bfloat16"): 44, (False, True, "float32"): 61,
              (False, True, "bfloat16"): 79, (True, False, "bfloat16"): 6, (True, False, "float32"): 12,
              (True, True, "bfloat16"): 6, (True, True, "float32"): 12}  # (compiled, chunked, dtype)
# per parameter of this rank's state, once a step: fused AdamW reads p, g, m, v and writes
# p, m, v (28); clipping reads g for its norm, and reads and scales it (12)
OPTIMIZER_BYTES = 40
# per parameter and micro-step: autocast casts the weight (4 + 2) and its bf16 gradient
# back (2 + 4), summed into .grad (4 + 4); fp32: the sum. FSDP instead copies each
# gathered parameter out of its all-gather's buffer (c + c, twice under ZeRO-3) and each
# fp32 gradient into its reduce-scatter's (4 + 4): `parameter_bytes`
PARAMETER_BYTES = {"float32": 8, "bfloat16": 20}
# ops a block launches per micro-step, forward and backward (counted as LAYER_BYTES: 29
# fp32, 51 bf16, beside one sum into .grad per parameter); compiled about a third
KERNELS = {(False, "float32"): 29, (False, "bfloat16"): 51, (True, "float32"): 10, (True, "bfloat16"): 17}
FLASH_BACKWARD = 2.5  # backward's FLOPs over forward's in flash attention
# the forward's share of the element-wise bytes and ops (counted as LAYER_BYTES: 64 of 190
# bytes bf16, 72 of 228 fp32; 20 of 51 ops, 10 of 29)
FORWARD_SHARE = 1 / 3


def matmul_shapes(cfg: GPTConfig, layout: Layout, micro_batch: int, moe: bool = False) -> tuple[list, list]:
    """(m, n, k) of each forward matmul of one block (a MoE block if `moe`) and of the head,
    at one rank's shape: (m, k) @ (k, n)."""
    C, V, tp, cp = cfg.n_embd, cfg.vocab_size, layout.tp, layout.cp
    m = micro_batch * cfg.block_size // cp  # this rank's tokens of a micro-batch (SP gathers them back)
    attention = [(m, 3 * C / tp, C), (m, C, C / tp)]  # q k v, projection
    head = [(m, V / tp, C)]
    if not moe:
        return attention + [(m, 4 * C / tp, C), (m, C, 4 * C / tp)], head  # MLP in, out
    # the router; then each of a rank's E/ep experts on its k m ep / E rows (balanced), in and out
    E, ep, k = cfg.moe_experts, layout.ep, cfg.moe_top_k
    rows = k * m * ep / E
    return attention + [(m, E, C)] + [(rows, 4 * C, C), (rows, C, 4 * C)] * (E // ep), head


def attention_flops(cfg: GPTConfig, layout: Layout, micro_batch: int) -> float:
    """Forward FLOPs of one layer's causal attention on one rank: q k^T and p v over its
    queries (m of them, each seeing T keys on average / 2) and its heads."""
    m = micro_batch * cfg.block_size // layout.cp
    return 2 * 2 * m * cfg.block_size * cfg.n_embd / layout.tp / 2


def compute_s(job: Job, machine, layout: Layout, micro_batch: int, M: int, pp_rank: int) -> float:
    """Seconds of one rank's compute per optimizer step (see the module doc)."""
    model, dtype, procs, fused = job.model, job.dtype, layout.world, job.compile
    turns = machine.turns(procs)
    full = layout.checkpointing == "full"  # one more forward of everything: 2 of the 6 N
    elementwise = 1 + (layout.checkpointing != "none") * FORWARD_SHARE  # selective recomputes these only
    tokens = micro_batch * job.block_size // layout.cp
    tokens_sp = tokens / (layout.tp if layout.sequence_parallel else 1)  # element-wise ops' tokens

    def gemms(shapes):  # forward, and backward's two of the forward's size
        return 3 * sum(machine.matmul_s(m, n, k, dtype, procs) for m, n, k in shapes)

    def layer_s(moe: bool) -> float:
        gpu = (gemms(matmul_shapes(model, layout, micro_batch, moe)[0]) * (1 + full / 3)
               + (1 + FLASH_BACKWARD + full) * machine.attention_s(attention_flops(model, layout, micro_batch),
                                                                   dtype, procs)
               + machine.memory_s(LAYER_BYTES[fused, dtype] * tokens_sp * model.n_embd) * elementwise)
        host = machine.host_op_s * KERNELS[fused, dtype] * elementwise
        return max(gpu, host) + machine.per_layer_s * turns

    micro = 0.0
    for blocks, _, last in chunks(model, layout, pp_rank):
        micro += sum(layer_s(model.is_moe(i)) for i in blocks)
        if last:  # the chunked loss computes the head's logits once more in backward
            n_chunks = head_chunks(model, layout, micro_batch)
            vocab_rows = model.vocab_size / (layout.tp if layout.loss_parallel else 1)
            micro += (gemms(matmul_shapes(model, layout, micro_batch)[1]) * (1 + (n_chunks > 1) / 3)
                      + machine.memory_s(LOSS_BYTES[fused, n_chunks > 1, dtype] * tokens * vocab_rows))
    micro += machine.memory_s(parameter_bytes(layout, dtype) * stage_params(model, layout, pp_rank)["total"])
    held = state_bytes(model, layout, pp_rank)["optimizer"] / state_bytes(model, Layout())["optimizer"]
    optimizer = machine.memory_s(OPTIMIZER_BYTES * held * param_counts(model)["total"])
    return M * micro + machine.per_step_s * turns * held + optimizer


def parameter_bytes(layout: Layout, dtype: str) -> float:
    """Bytes moved per parameter of a stage and micro-step beside the matmuls (see
    PARAMETER_BYTES)."""
    if layout.fsdp:
        return 2 * DTYPE_BYTES[dtype] * (1 + layout.reshard_after_forward) + 2 * FP32
    return PARAMETER_BYTES[dtype]


def hides(layout: Layout, group: str, kind: str) -> bool:
    """Whether this traffic overlaps compute: DDP's and ZeRO-1's reductions behind the last
    micro-step's backward, FSDP's everything behind each micro-step (HSDP's replica
    all-reduce too); ZeRO-1's all-gather follows the optimizer step, exposed."""
    return group in ("dp_replicate", "dp_shard_cp") or \
        (group in ("dp_cp", "edp") and not (layout.zero1 and kind == "all_gather"))


def exposed_s(machine, layout: Layout, M: int, compute: float, calls: dict, sizes: dict, links: dict) -> float:
    """Seconds of communication on the critical path: `calls` {(group, kind): (calls,
    bus bytes)} over `links` {group: intra_node | inter_node} (see the module doc)."""
    exposed, hideable = 0.0, {}
    for (group, kind), (n, bus) in calls.items():
        if not n:
            continue
        payload = bus / n / BUS_FACTOR[kind](sizes[group])
        call = machine.collective_s(kind, payload, sizes[group], links[group], layout.world)
        if machine.overlaps and hides(layout, group, kind):
            # nothing to hide DDP's last bucket behind, nor FSDP's first gather and last
            # reduce-scatter of each micro-step
            first_or_last = min(n, M if layout.fsdp else 1)
            exposed += first_or_last * call
            hideable[group] = hideable.get(group, 0.0) + (n - first_or_last) * call
        else:
            exposed += n * call
    hidden = compute if layout.fsdp else 2 / 3 * compute / M  # per group
    return exposed + sum(max(0.0, seconds - hidden) for seconds in hideable.values())
