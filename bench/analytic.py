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
    ZeRO-3    all-gather      (N-1)/N * 4 (2 Psi_blocks + Psi_root) per micro-step
              reduce-scatter  (N-1)/N * 4 Psi per micro-step     (root stays gathered from
    ZeRO-2    all-gather      (N-1)/N * 4 Psi per micro-step      forward to backward)
    TP        activations of B T C floats, per micro-step (`tp_collectives`)
plus the scalar all-reduces of the loss mean and the gradient norm (4 bytes each).
"""
from dataclasses import dataclass

from nanodist.model import GPTConfig

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class Layout:
    """One layout of the matrix. fsdp_zero3: reshard after forward (FSDP only)."""
    name: str
    dp: int = 1
    tp: int = 1
    dp_type: str = "ddp"
    zero3: bool = True
    loss_parallel: bool = False
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def flags(self) -> list[str]:
        """The train.py flags of this layout."""
        return [f"--data_parallel_size={self.dp}", f"--tensor_parallel_size={self.tp}",
                f"--data_parallel_type={self.dp_type}",
                f"--fsdp_reshard_after_forward={self.zero3}",
                f"--enable_loss_parallelism={self.loss_parallel}",
                f"--sequence_parallel={self.sequence_parallel}"]


def param_counts(cfg: GPTConfig, tp: int = 1) -> dict[str, float]:
    """Parameters by role: blocks / root (FSDP units), tp_sharded / replicated, total;
    as one rank of `tp` holds them (TP-sharded ones / tp)."""
    L, C, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    block_sharded = (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C) / tp
    block_replicated = 2 * C + 2 * C + C + C
    root_sharded, root_replicated = V * C / tp, T * C + 2 * C
    return {"blocks": L * (block_sharded + block_replicated),
            "root": root_sharded + root_replicated,
            "tp_sharded": L * block_sharded + root_sharded,
            "replicated": L * block_replicated + root_replicated,
            "total": L * (block_sharded + block_replicated) + root_sharded + root_replicated}


def local_params(cfg: GPTConfig, layout: Layout) -> float:
    """Parameters one rank keeps between steps (FSDP padding ignored: < N per flat)."""
    local = param_counts(cfg, layout.tp)["total"]
    return local / layout.dp if layout.dp_type == "fsdp" and layout.dp > 1 else local


def state_bytes(cfg: GPTConfig, layout: Layout) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and AdamW moments after an optimizer step."""
    local = local_params(cfg, layout)
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
                   sizes: dict = FP32_EVERYWHERE, grad_norm: bool = True) -> dict:
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
    """
    act = {what: B * T * C * size for what, size in sizes.items()}
    # per layer: 2 LayerNorm outputs (or their grads) and 2 matmul outputs (or their grads)
    layers = 2 * L * (act["norm"] + act["matmul"])
    if sp:
        counts = {"all_gather": (4 * L + 2, layers + act["residual"] + act["norm"]),
                  "reduce_scatter": (4 * L + 1, layers + act["norm"]),
                  "all_reduce": (1 + 6 * L + 2, act["residual"] + (6 * L + 2) * C * sizes["residual"])}
    else:
        counts = {"all_reduce": (4 * L + 2, layers + act["residual"] + act["norm"])}
    calls, payload = counts["all_reduce"]
    counts["all_reduce"] = (calls + grad_norm + (2 if lp else 0),
                            payload + FP32 * grad_norm + (3 * B * T * FP32 if lp else 0))
    if not lp:
        calls, payload = counts.get("all_gather", (0, 0))
        counts["all_gather"] = (calls + 1, payload + B * T * V * sizes["matmul"])
    return counts


BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0}


def traffic_bytes(cfg: GPTConfig, layout: Layout, micro_batch: int, accum: int,
                  dtype: str = "float32", device_type: str = "cpu") -> dict[str, float]:
    """{kind: bus bytes one rank sends per optimizer step}; kinds with no traffic left out.
    `dtype` bfloat16: FSDP gathers bf16 parameters and reduces fp32 gradients, TP carries
    what `value_bytes` says; DDP's gradients and the scalars stay fp32."""
    n, dp, tp, compute_bytes = param_counts(cfg, layout.tp), layout.dp, layout.tp, DTYPE_BYTES[dtype]
    fsdp = layout.dp_type == "fsdp" and dp > 1
    bus: dict[str, float] = {}

    def add(kind, group_size, payload):
        if group_size > 1:
            bus[kind] = bus.get(kind, 0.0) + BUS_FACTOR[kind](group_size) * payload

    if tp > 1:
        for kind, (_, payload) in tp_collectives(micro_batch, cfg.block_size, cfg.n_embd,
                                                 cfg.vocab_size, cfg.n_layer,
                                                 layout.sequence_parallel, layout.loss_parallel,
                                                 value_bytes(dtype, fsdp, device_type),
                                                 grad_norm=False).items():
            add(kind, tp, accum * payload)
        add("all_reduce", tp, FP32)  # the squared gradient norm, once a step
    if dp > 1:
        add("all_reduce", dp, FP32)  # the trainer's mean of the loss over DP
        if not fsdp:
            add("all_reduce", dp, FP32 * n["total"])
        else:  # this TP rank's parameters
            gathers = 2 * n["blocks"] + n["root"] if layout.zero3 else n["total"]
            add("all_gather", dp, accum * compute_bytes * gathers)
            add("reduce_scatter", dp, accum * FP32 * n["total"])  # every micro-step (fsdp.py)
            # the squared gradient norm of the shards: one per class of flat (replicated
            # over TP, sharded over TP)
            add("all_reduce", dp, FP32 * (2 if tp > 1 else 1))
    return bus


def activation_bytes(cfg: GPTConfig, layout: Layout, micro_batch: int) -> float:
    """Bytes one rank keeps saved for backward after one micro-step's forward (fp32, no
    dropout, flash attention: no T x T matrix). Per layer, b s h = B T C floats, t = TP:

        replicated (no SP)   ln_1 input, c_attn input, ln_2 input, c_fc input   4 b s h
        under SP             LayerNorm inputs sharded (2 b s h / t); column-parallel
                             layers keep their gathered input for backward (2 b s h)
        sharded by heads     q k v (3), attention output = c_proj input (1),
                             gelu input (4), mlp.c_proj input (4)                12 b s h / t
                             + the attention logsumexp                            b s a / t
    head: ln_f and lm_head inputs (2 b s h; ln_f's / t under SP), the log-softmax of the
    logits (b s V, / t with loss parallelism), the token ids (int64).
    """
    b, s, h, a, V, L = micro_batch, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer
    t, sp = layout.tp, layout.sequence_parallel
    bsh = b * s * h
    replicated = 2 * bsh / t + 2 * bsh if sp else 4 * bsh
    per_layer = replicated + 12 * bsh / t + b * s * a / t
    head = (bsh / t if sp else bsh) + bsh + b * s * V / (t if layout.loss_parallel else 1)
    return FP32 * (L * per_layer + head) + 8 * b * s
