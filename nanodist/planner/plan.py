"""The layout planner: which layout trains a GPT-2 fastest on a machine, and fits.

train.py asks it before building anything (does the layout fit? `--layout auto`); the
command line, calibration and validation are in nanodist_tools/planner.py.

The layouts of its search space that train.py accepts (search.py: `candidates`) are
costed by the cost model (cost.py, traffic.py) on a machine (hardware.py: a GPU's data
sheet, or this machine's calibrated profile) and ranked (`rank`).

    memory   per rank (`memory`): what lives through the step, state (16 bytes per
             parameter of its stage, / DP x CP under FSDP; ZeRO-1: 4 + 4 + 8 / (DP x CP);
             HSDP: / the dp_shard x cp ranks of a replica group) + activations in flight
             (autocast's weight casts included) + FSDP's gathered units in the compute
             dtype (ZeRO-3: two blocks, this one and the prefetched; ZeRO-2: the whole
             stage); and on top the largest transient: backward's two gradients of its
             widest activation (the MLP's hidden or the fp32 logits; the chunked loss:
             one chunk's and the head's weight gradient), FSDP's unit
             gradients and its reduction in flight, gloo's copies of what it reduces,
             or the optimizer step's temporaries (AdamW's loop on CPU). The measured
             peak lies in that band within MEMORY_MARGIN (--validate, tests); the first
             and the last stage are costed (the first keeps the most micro-batches in
             flight, the last the head); the top fits in USABLE_MEMORY of the device
             (the rest: CUDA context, NCCL, allocator fragmentation).
    time     (step_time.py) per rank and micro-step each matmul of its blocks and head at
             its local shape, causal attention, the memory-bound work by the bytes it
             moves, the host's time per layer; once a step the optimizer; the
             communication that cannot hide behind compute (NCCL on a GPU's own streams:
             DDP's and FSDP's, but for their first and last calls; gloo on CPU cores:
             none). A pipeline stretches the compute by 1 / (1 - bubble).
    step     the slowest rank's compute / (1 - bubble) + exposed traffic; MFU counts
             6N + 12 L T C only.
"""
import dataclasses
import math

from nanodist.planner.cost import (DTYPE_BYTES, FP32, activations_in_flight, bubble, chunks, head_chunks,
                                   param_counts, stage_params, state_bytes)
from nanodist.planner.step_time import compute_s, exposed_s
from nanodist.errors import UserError
from nanodist.planner.hardware import GiB
from nanodist.planner.search import Job, candidates
from nanodist.model.gpt import PRESETS, flops_per_token
from nanodist.parallel.layout import Layout
from nanodist.planner.traffic import collectives

USABLE_MEMORY = 0.9
MEMORY_MARGIN = 0.05  # what the peak leaves out: autograd's and the kernels' small tensors
TIE = 0.02  # step times this close to the fastest rank as equal (the model cannot tell them apart)
MODEL_FLAGS = ("moe_experts", "moe_top_k", "moe_every")  # the job's model beyond its preset, in commands


def dp_label(layout: Layout) -> str:
    """ddp | zero1 | fsdp-zero3 | fsdp-zero2 (HSDP: xR replicas): the data-parallel column."""
    if layout.dp_type != "fsdp":
        return layout.dp_type
    return f"fsdp-zero{3 if layout.reshard_after_forward else 2}" + (f"x{layout.hsdp_replicas}" if layout.hsdp else "")


def command(job: Job, layout: Layout, micro_batch: int, extra: tuple[str, ...] = ()) -> str:
    """The train.py command of a layout (torchrun's beyond one rank): the job's flags, the
    layout's that differ from a plain Layout's (data_parallel_size always), then `extra`.
    A model of no preset (the planner's --n_layer ...) has no command: its layout's flags."""
    default = Layout()
    flags = [f"--model={job.preset}", f"--block_size={job.block_size}", f"--batch_size={micro_batch}",
             f"--total_batch_size={job.total_batch_size}", f"--dtype={job.dtype}"]
    if job.model.moe_experts:  # the model's mixture of experts is the job's, not the layout's
        flags += [f"--{name}={getattr(job.model, name)}" for name in MODEL_FLAGS]
    if job.model.dropout:
        flags.append(f"--dropout={job.model.dropout}")
    flags += [flag for flag, mine, plain in zip(layout.flags(), dataclasses.astuple(layout),
                                                dataclasses.astuple(default))
              if mine != plain or flag.startswith("--data_parallel_size=")]
    flags += extra
    if job.preset not in PRESETS:
        return f"(train.py trains its presets only) the layout's flags: {' '.join(flags[2:])}"
    nodes = job.ranks // job.ranks_per_node
    launch = ("python" if job.ranks == 1 else
              f"torchrun --standalone --nproc_per_node={job.ranks}" if nodes <= 1 else
              f"torchrun --nnodes={nodes} --nproc_per_node={job.ranks_per_node} "
              f"--rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500")
    return f"{launch} train.py {' '.join(flags)}" + (" (on each node)" if nodes > 1 else "")


def spans(layout: Layout) -> dict[str, int]:
    """Consecutive ranks each group of traffic.py covers (the mesh's roles, and the
    pipeline's embedding group: the first and last stage)."""
    return {**layout.spans(), "embedding": layout.world}


def group_sizes(layout: Layout) -> dict[str, int]:
    return {**layout.group_sizes(), "embedding": 2}


def memory(job: Job, layout: Layout, micro_batch: int, M: int, pp_rank: int = 0) -> dict[str, float]:
    """Predicted peak bytes of one rank: what lives through the step (state, activations
    in flight, FSDP's gathered units: "live") and the largest transient on top of it,
    in backward or in the optimizer step ("transient"); the measured peak lies between
    "live" and "total" within MEMORY_MARGIN (tests/test_plan.py)."""
    model, c = job.model, DTYPE_BYTES[job.dtype]
    state = state_bytes(model, layout, pp_rank)["total"]
    activations = activations_in_flight(model, layout, micro_batch, M, pp_rank, compute_bytes=c)
    tokens = micro_batch * job.block_size // layout.cp
    held = chunks(model, layout, pp_rank)
    first, last = held[0][1], held[-1][2]
    # backward holds two gradients of its widest activation at once: the MLP's hidden
    # (b s 4h / t); or three of the head's fp32 logits (b s V, / t with loss parallelism):
    # the loss's gradient, log-softmax's exp(output) and its result (PyTorch's
    # loss_parallel one more: measured 3.7 with GPT-2's vocabulary). The chunked loss
    # (loss.py) holds one chunk's: fp32, and under autocast its matmul's output and the
    # gradient in bf16; and the head's weight gradient, summed in fp32; under autocast
    # also the head's weight cast again for backward (not FSDP's: gathered in bf16), a
    # chunk's bf16 weight gradient, and on CPU its fp32 copy the sum makes (CUDA casts in
    # the kernel)
    gloo = job.device == "cpu"  # gloo copies a reduce-scatter's (all-gather's) whole tensor
    vocab_rows = model.vocab_size / (layout.tp if layout.loss_parallel else 1)
    n_chunks = head_chunks(model, layout, micro_batch)
    if n_chunks == 1:
        copies_of_logits = 4 if layout.loss_parallel and layout.implementation == "pytorch" else 3
        loss = copies_of_logits * FP32 * tokens * vocab_rows
    else:
        mixed = c < FP32
        head_weights = (FP32 + mixed * (c * (1 - layout.fsdp) + c + FP32 * gloo)) * vocab_rows * model.n_embd
        loss = (FP32 + mixed * c) * math.ceil(tokens / n_chunks) * vocab_rows + head_weights
    backward = max(2 * c * tokens * 4 * model.n_embd / layout.tp, loss * last)
    buffers, shards = 0.0, 1
    stage = stage_params(model, layout, pp_rank)["total"]
    if layout.fsdp:  # gathered parameters in the compute dtype
        unit = max([param_counts(model, layout.tp, range(i, i + 1), ep=layout.ep)["blocks"]
                    for i in range(min(model.moe_every, model.n_layer))]  # a block (MoE or not)
                   + [param_counts(model, layout.tp, range(1))["root"]])  # or the root
        buffers = c * (2 * unit if layout.reshard_after_forward else stage)
        # a unit's gradients, summed into its fp32 vector, beside the previous one's in flight
        backward += unit * (c + (2 + gloo) * FP32)
        shards = layout.dp_shard * layout.cp
    # a custom ZeRO-1 bucket in flight, copied by gloo (in backward and in the gather)
    copies = (gloo * min(layout.bucket_cap_mb * 2**20, FP32 * stage)
              if layout.zero1 and layout.implementation == "custom" else 0.0)
    # AdamW on CPU as a loop over parameters made three temporaries of the largest; fused
    # (now on every device) fewer: kept as an upper bound until measured again
    largest = max(4 * model.n_embd ** 2, model.vocab_size * model.n_embd * (first or last)) / layout.tp / shards
    optimizer = 3 * FP32 * largest if gloo else 0.0
    live = state + activations + buffers
    total = max(live + backward, state + optimizer) + copies
    return {"state": state, "activations": activations, "buffers": buffers, "live": live,
            "transient": total - live, "total": total}


def peak_memory(job: Job, layout: Layout, micro_batch: int, M: int) -> dict[str, float]:
    """`memory` of the rank that needs the most (a pipeline's first or last stage)."""
    return max((memory(job, layout, micro_batch, M, r) for r in {0, layout.pp - 1}),
               key=lambda m: m["total"])


def band(predicted: dict[str, float]) -> tuple[float, float]:
    """The (lowest, highest) peak bytes that `memory`'s prediction allows."""
    return (1 - MEMORY_MARGIN) * predicted["live"], (1 + MEMORY_MARGIN) * predicted["total"]


def within_margin(peak: float, predicted: dict[str, float]) -> bool:
    """Whether a measured peak lies in the predicted band (`memory`)."""
    low, high = band(predicted)
    return low <= peak <= high


def estimate(job: Job, machine, layout: Layout, micro_batch: int, M: int) -> dict:
    """One row of the ranking: memory, traffic, time of `layout` on `machine`."""
    model = job.model
    frac = bubble(layout, M)
    ranks = sorted({0, layout.pp - 1})
    peak = peak_memory(job, layout, micro_batch, M)
    sizes, step, links, exposed, t_compute = group_sizes(layout), 0.0, None, 0.0, 0.0
    link_of = {group: "intra_node" if span <= job.ranks_per_node else "inter_node"
               for group, span in spans(layout).items()}
    for r in ranks:
        rank_compute = compute_s(job, machine, layout, micro_batch, M, r)
        calls = collectives(model, layout, micro_batch, M, job.dtype, job.device, r)
        rank_links = {"intra_node": 0.0, "inter_node": 0.0}
        for (group, _), (_, bus) in calls.items():
            rank_links[link_of[group]] += bus
        rank_exposed = exposed_s(machine, layout, M, rank_compute, calls, sizes, link_of)
        rank_step = rank_compute / (1 - frac) + rank_exposed
        if rank_step >= step:
            step, links, exposed, t_compute = rank_step, rank_links, rank_exposed, rank_compute
    fits = peak["total"] <= USABLE_MEMORY * machine.memory_bytes
    tokens_per_s = job.total_batch_size / step
    flops = flops_per_token(model, param_counts(model)["total"])
    return {"dp": layout.dp, "dp_type": dp_label(layout), "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
            "pp_schedule": layout.pp_schedule if layout.pp > 1 else None,
            "virtual_stages": layout.virtual_stages, "cp": layout.cp,
            "cp_type": (layout.cp_type + (f"{layout.ulysses}" if layout.cp_type == "hybrid" else "")
                        if layout.cp > 1 else None),
            "sequence_parallel": layout.sequence_parallel, "activation_checkpointing": layout.checkpointing,
            "loss_chunks": head_chunks(model, layout, micro_batch), "micro_batch_size": micro_batch, "grad_accum": M, "fits": fits,
            "why": None if fits else f"needs {peak['total'] / GiB:.1f} GiB > {USABLE_MEMORY:.0%} of "
                                     f"{machine.memory_bytes / GiB:g} GiB",
            "memory_gib": peak["total"] / GiB, "state_gib": peak["state"] / GiB,
            "activation_gib": peak["activations"] / GiB, "buffer_gib": peak["buffers"] / GiB,
            "transient_gib": peak["transient"] / GiB,
            "comm_bytes_per_step": links, "bubble": frac,
            "compute_s": t_compute, "exposed_comm_s": exposed, "step_time_s": step,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops / (layout.world * machine.peak_flops(job.dtype)),
            "layout": layout, "command": command(job, layout, micro_batch)}


def rank(job: Job, machine) -> list[dict]:
    """Every runnable layout, fitting ones by predicted step time, then the rest by memory."""
    rows = [estimate(job, machine, *c) for c in candidates(job)]
    if not rows:
        raise UserError(f"no layout of {job.preset} runs on {job.ranks} ranks with --block_size "
                        f"{job.block_size} and --total_batch_size {job.total_batch_size}: the batch "
                        f"must divide into micro-batches x block_size x data parallel ranks")
    # predictions within TIE of the fastest are ties (below the model's resolution): the
    # simplest first (the costs the model prices roughly are those of more axes and of
    # FSDP's per-unit hooks, copies and overlapped kernels), then larger micro-batches
    # (fewer launches), then less memory (ZeRO-1 before DDP)
    fits = sorted((r for r in rows if r["fits"]), key=lambda r: r["step_time_s"])
    tied = [r for r in fits if r["step_time_s"] <= (1 + TIE) * fits[0]["step_time_s"]] if fits else []
    tied.sort(key=lambda r: (r["activation_checkpointing"] != "none", r["loss_chunks"] > 1,
                             sum(r[axis] > 1 for axis in ("tp", "pp", "cp", "ep")), r["layout"].fsdp,
                             -r["micro_batch_size"], r["memory_gib"]))
    return tied + fits[len(tied):] + sorted((r for r in rows if not r["fits"]), key=lambda r: r["memory_gib"])


def table(rows: list[dict]) -> str:
    header = ["#", "dp", "dp type", "tp", "pp", "schedule", "cp", "ep", "ac", "loss", "mb", "M", "GiB", "state",
              "act", "intra GB", "inter GB", "bubble", "step s", "tok/s", "MFU"]
    lines = [[str(i + 1), str(r["dp"]), r["dp_type"], str(r["tp"]), str(r["pp"]),
              (r["pp_schedule"] or "-") + (f" v{r['virtual_stages']}" if r["virtual_stages"] > 1 else ""),
              str(r["cp"]) + (f" {r['cp_type']}" if r["cp_type"] else ""), str(r["ep"]), r["activation_checkpointing"],
              "whole" if r["loss_chunks"] == 1 else f"/{r['loss_chunks']}", str(r["micro_batch_size"]), str(r["grad_accum"]),
              f"{r['memory_gib']:.3g}", f"{r['state_gib']:.3g}", f"{r['activation_gib']:.3g}",
              f"{r['comm_bytes_per_step']['intra_node'] / 1e9:.2f}",
              f"{r['comm_bytes_per_step']['inter_node'] / 1e9:.2f}", f"{r['bubble']:.2f}",
              f"{r['step_time_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}"] for i, r in enumerate(rows)]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header] + lines)
