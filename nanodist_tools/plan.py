"""The layout planner: which layout trains a GPT-2 fastest on a cluster, and fits.

    python -m nanodist_tools.plan --model gpt2-xl --gpus 64 --gpus_per_node 8 --gpu h100
    python -m nanodist_tools.validate       its predictions against measurement

Its search space (`search_space`: DDP / ZeRO-1 / FSDP ZeRO-3 / ZeRO-2 (and HSDP: FSDP with
every replica count that divides DP) x TP x PP, its schedule and
virtual stages x CP x activation checkpointing x micro-batch; under TP with loss
parallelism, and sequence parallelism where the sequence divides) is filtered by the
layout's own rules (`Layout.check`, what train.py asks on the same device: nothing
listed is refused, nothing accepted is left out) and costed by the cost model
(cost.py, traffic.py), the one the benchmark and the validation hold to measurement.

    memory   per rank: state (16 bytes per parameter of its stage, / DP x CP under FSDP; ZeRO-1:
             4 + 4 + 8 / (DP x CP); HSDP: / the dp_shard x cp ranks of a replica group)
             + activations in flight + FSDP's gathered units in the compute dtype (ZeRO-3:
             two blocks, this one and the prefetched; ZeRO-2: the whole stage). The first and
             the last stage are costed (the first keeps the most micro-batches in flight,
             the last the head); it fits in 90% of the GPU (the rest: CUDA context, NCCL,
             allocator fragmentation).
    compute  (6 N + 12 L T C) FLOPs per token (+ a forward of the blocks `full`
             checkpointing recomputes), spread evenly over the ranks (times the largest
             stage's share of the blocks), at --compute_efficiency of the GPU's peak;
             a pipeline stretches it by 1 / (1 - bubble).
    traffic  bus bytes / bandwidth of the link the group spans (mesh order pp, dp, cp, tp:
             a group of ranks within gpus_per_node consecutive ones stays inside a node),
             plus a latency per collective call (LATENCY_S: TP's many small ones add up).
             DDP's all-reduce (ZeRO-1's reduce-scatter) hides behind the last micro-step's
             backward, FSDP's gathers and reduce-scatters (HSDP's all-reduce) behind each
             micro-step's compute; what sticks out is exposed. TP, CP and PP traffic and
             ZeRO-1's all-gather after the step are on the critical path.
    step     compute / (1 - bubble) + exposed traffic; MFU counts 6N + 12 L T C only.
"""
import argparse
import dataclasses
import itertools
import json
import sys

from nanodist.config import OneLineParser, TrainConfig, build_parser as train_parser
from nanodist.errors import UserError
from nanodist.metrics import PEAK_TFLOPS, flops_per_token
from nanodist.model import PRESETS, model_config
from nanodist.parallel.layout import Layout
from nanodist_tools.cost import (DTYPE_BYTES, activations_in_flight, bubble, chunks, param_counts,
                                 stage_params, state_bytes)
from nanodist_tools.traffic import collectives

GiB = 2**30
USABLE_MEMORY = 0.9
# --gpu: (PEAK_TFLOPS key, memory GiB, in-node GB/s per GPU per direction (NVLink; L40S:
# PCIe 4.0 x16), across-node GB/s per GPU (one 400 / 200 Gb/s NIC each))
GPUS = {"h100": ("H100", 80, 450, 50), "h200": ("H200", 141, 450, 50),
        "a100": ("A100", 80, 300, 25), "l40s": ("L40S", 48, 32, 25)}
# the time of a small NCCL collective (nccl-tests' all-reduce of a few bytes): in a node
# over NVLink, across nodes over InfiniBand / RoCE
LATENCY_S = {"intra_node": 15e-6, "inter_node": 30e-6}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)]
DATA_PARALLEL = {"ddp": ("ddp", True), "zero1": ("zero1", True), "fsdp-zero3": ("fsdp", True),
                 "fsdp-zero2": ("fsdp", False)}
TRAIN_PARSER = train_parser()  # train.py's flags, built once


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def dp_label(layout: Layout) -> str:
    """ddp | zero1 | fsdp-zero3 | fsdp-zero2 (HSDP: xR replicas): the data-parallel column."""
    if layout.dp_type != "fsdp":
        return layout.dp_type
    return f"fsdp-zero{3 if layout.reshard_after_forward else 2}" + (f"x{layout.dp_replicas}" if layout.hsdp else "")


def search_space(args):
    """(layout, micro-batch) of every combination the planner considers, valid or not."""
    T = args.block_size
    for pp, tp, cp in itertools.product(divisors(args.gpus), repeat=3):
        dp = args.gpus // (pp * tp * cp)
        if pp * tp * cp * dp != args.gpus or tp > args.gpus_per_node:
            continue
        per_rank_batch = args.total_batch_size // (T * dp)
        micro_batches = [int(args.micro_batch_size)] if args.micro_batch_size != "auto" else \
            [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= per_rank_batch]
        for dp_type, replicas, (schedule, V), ac, mb in itertools.product(
                DATA_PARALLEL, divisors(dp), SCHEDULES if pp > 1 else SCHEDULES[1:2],
                ("none", "selective", "full"), micro_batches):
            kind, reshard = DATA_PARALLEL[dp_type]
            if (dp_type != "ddp" and dp * cp == 1) or (kind != "fsdp" and replicas > 1):
                continue  # sharding over one rank is DDP; replicas are HSDP's
            layout = Layout(pp=pp, dp=dp, cp=cp, tp=tp, dp_type=kind, dp_replicas=replicas,
                            reshard_after_forward=reshard, loss_parallel=tp > 1, pp_schedule=schedule,
                            virtual_stages=V, checkpointing=ac, implementation=args.implementation)
            # sequence parallelism wherever it can split the sequence (it saves activations)
            yield dataclasses.replace(layout, sequence_parallel=tp > 1 and layout.sequence_divides(T)), mb


def candidates(args, model_cfg):
    """(layout, micro-batch, M) of every layout of the search space that train.py accepts
    on `args.gpus` ranks of `args.device`."""
    for layout, mb in search_space(args):
        try:
            M = layout.micro_steps(args.total_batch_size, mb, args.block_size)
            layout.check(args.gpus, args.device, args.block_size, 0.0, model_cfg, M)
        except UserError:
            continue
        yield layout, mb, M


def train_config(args, layout: Layout, micro_batch: int) -> TrainConfig:
    """What train.py makes of the layout's flags."""
    return TrainConfig(**vars(TRAIN_PARSER.parse_args([
        f"--model={args.model}", f"--block_size={args.block_size}", f"--batch_size={micro_batch}",
        f"--total_batch_size={args.total_batch_size}", f"--dtype={args.dtype}", *layout.flags()])))


def command(args, layout: Layout, micro_batch: int) -> str:
    """The train.py command of a layout: its flags that differ from the defaults."""
    default, cfg = TrainConfig(), train_config(args, layout, micro_batch)
    flags = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != getattr(default, f.name) or f.name == "data_parallel_size"]
    nodes = args.gpus // args.gpus_per_node
    launch = (f"torchrun --standalone --nproc_per_node={args.gpus}" if nodes <= 1 else
              f"torchrun --nnodes={nodes} --nproc_per_node={args.gpus_per_node} "
              f"--rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500")
    return f"{launch} train.py {' '.join(flags)}" + (" (on each node)" if nodes > 1 else "")


def spans(layout: Layout) -> dict[str, int]:
    """Consecutive ranks each group covers (mesh order pp, dp_replicate, dp_shard, cp, tp;
    "dp": the DP x CP ranks, under HSDP those of one replica group)."""
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    return {"tp": tp, "cp": cp * tp, "dp": (layout.dp_shard if layout.hsdp else dp) * cp * tp,
            "dp_replicate": dp * cp * tp, "pp": layout.world, "embedding": layout.world}


def hides(layout: Layout, group: str, kind: str) -> bool:
    """Whether this traffic overlaps compute: DDP's and ZeRO-1's reductions behind the last
    micro-step's backward, FSDP's everything behind each micro-step (HSDP's replica
    all-reduce too); ZeRO-1's all-gather follows the optimizer step, exposed."""
    return group == "dp_replicate" or (group == "dp" and not (layout.zero1 and kind == "all_gather"))


def cost(args, model_cfg, layout: Layout, micro_batch: int, M: int,
         speed: tuple[float, float, float, float] | None = None) -> dict:
    """One row of the ranking: memory, traffic, time of `layout` (see the module doc).
    speed: (FLOP/s reached, in-node and across-node bytes/s, seconds a collective takes
    whatever its size) where measured (--validate); by default the GPU's peak at
    --compute_efficiency, its links and LATENCY_S."""
    latency = LATENCY_S
    if speed is None:
        key, _, intra_gbs, inter_gbs = GPUS[args.gpu]
        peak = PEAK_TFLOPS[key][0 if args.dtype == "bfloat16" else 1] * 1e12
        flop_s = peak * args.compute_efficiency
        intra, inter = (args.intra_node_gb_s or intra_gbs) * 1e9, (args.inter_node_gb_s or inter_gbs) * 1e9
    else:
        flop_s, intra, inter, alpha = speed
        peak, latency = flop_s, {"intra_node": alpha, "inter_node": alpha}
    compute_bytes = DTYPE_BYTES[args.dtype]
    n_params = param_counts(model_cfg)["total"]
    flops_per_step = flops_per_token(model_cfg, n_params) * args.total_batch_size
    recompute = 1 + (layout.checkpointing == "full") / 3  # one more forward: 2 of the 6 N
    largest = max(sum(len(b) for b, _, _ in chunks(model_cfg, layout, r)) for r in range(layout.pp))
    imbalance = largest * layout.pp / model_cfg.n_layer
    t_compute = flops_per_step * recompute * imbalance / layout.world / flop_s
    frac = bubble(layout, M)
    ranks = sorted({0, layout.pp - 1})
    state = max(state_bytes(model_cfg, layout, r)["total"] for r in ranks)
    activations = max(activations_in_flight(model_cfg, layout, micro_batch, M, r,
                                            value_bytes=compute_bytes) for r in ranks)
    buffers = 0.0
    if layout.fsdp:  # gathered parameters in the compute dtype
        stage = max(stage_params(model_cfg, layout, r)["total"] for r in ranks)
        units = param_counts(model_cfg, layout.tp, range(1))  # a block, and the root
        buffers = compute_bytes * (2 * max(units["blocks"], units["root"]) if layout.reshard_after_forward
                                   else stage)
    links, exposed = {"intra_node": 0.0, "inter_node": 0.0}, 0.0
    for r in ranks:
        hideable, rank_links, rank_exposed = {}, {"intra_node": 0.0, "inter_node": 0.0}, 0.0
        for (group, kind), (calls, bus) in collectives(model_cfg, layout, micro_batch, M, args.dtype,
                                                       "cuda", r).items():
            link = "intra_node" if spans(layout)[group] <= args.gpus_per_node else "inter_node"
            rank_links[link] += bus
            seconds = bus / (intra if link == "intra_node" else inter) + calls * latency[link]
            if hides(layout, group, kind):
                hideable[group] = hideable.get(group, 0.0) + seconds
            else:
                rank_exposed += seconds
        hidden = t_compute if layout.fsdp else 2 / 3 * t_compute / M  # per group
        rank_exposed += sum(max(0.0, seconds - hidden) for seconds in hideable.values())
        if rank_exposed >= exposed:
            links, exposed = rank_links, rank_exposed
    memory = state + activations + buffers
    step = t_compute / (1 - frac) + exposed
    tokens_per_s = args.total_batch_size / step
    fits = memory <= USABLE_MEMORY * args.gpu_memory_gib * GiB
    return {"dp": layout.dp, "dp_type": dp_label(layout), "tp": layout.tp, "pp": layout.pp,
            "pp_schedule": layout.pp_schedule if layout.pp > 1 else None,
            "virtual_stages": layout.virtual_stages, "cp": layout.cp,
            "sequence_parallel": layout.sequence_parallel, "activation_checkpointing": layout.checkpointing,
            "micro_batch_size": micro_batch, "grad_accum": M, "fits": fits,
            "why": None if fits else f"needs {memory / GiB:.1f} GiB > {USABLE_MEMORY:.0%} of "
                                     f"{args.gpu_memory_gib:g} GiB",
            "memory_gib": memory / GiB, "state_gib": state / GiB, "activation_gib": activations / GiB,
            "buffer_gib": buffers / GiB, "comm_bytes_per_step": links, "bubble": frac,
            "compute_s": t_compute, "exposed_comm_s": exposed, "step_time_s": step,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_step / args.total_batch_size / (layout.world * peak),
            "command": command(args, layout, micro_batch)}


def plan(args) -> list[dict]:
    """Every runnable layout, fitting ones by predicted step time, then the rest by memory."""
    if args.gpu not in GPUS:
        raise UserError(f"unknown --gpu {args.gpu!r}; choose from {', '.join(GPUS)} (or add it to "
                        f"nanodist_tools/plan.py GPUS)")
    if args.gpus < 1 or args.gpus_per_node < 1 or (args.gpus > args.gpus_per_node
                                                   and args.gpus % args.gpus_per_node):
        raise UserError(f"--gpus {args.gpus} on nodes of --gpus_per_node {args.gpus_per_node}: "
                        f"whole nodes only, give a multiple of {args.gpus_per_node}")
    args.gpu_memory_gib = args.gpu_memory_gib or GPUS[args.gpu][1]
    model_cfg = model_config(args.model, args.block_size, 50257)
    rows = [cost(args, model_cfg, *c) for c in candidates(args, model_cfg)]
    if not rows:
        raise UserError(f"no layout of {args.model} runs on {args.gpus} GPUs with --block_size "
                        f"{args.block_size} and --total_batch_size {args.total_batch_size}: the batch "
                        f"must divide into micro-batches x block_size x data parallel ranks")
    # ties (the model prices neither element-wise recomputation nor small matmuls' lower
    # efficiency): no checkpointing first, then larger micro-batches, then less memory
    return (sorted((r for r in rows if r["fits"]), key=lambda r: (
                round(r["step_time_s"], 9), r["activation_checkpointing"] != "none",
                -r["micro_batch_size"], r["memory_gib"]))
            + sorted((r for r in rows if not r["fits"]), key=lambda r: r["memory_gib"]))


def table(rows: list[dict]) -> str:
    header = ["#", "dp", "dp type", "tp", "pp", "schedule", "cp", "ac", "mb", "M", "GiB", "state",
              "act", "intra GB", "inter GB", "bubble", "step s", "tok/s", "MFU"]
    lines = [[str(i + 1), str(r["dp"]), r["dp_type"], str(r["tp"]), str(r["pp"]),
              (r["pp_schedule"] or "-") + (f" v{r['virtual_stages']}" if r["virtual_stages"] > 1 else ""),
              str(r["cp"]), r["activation_checkpointing"], str(r["micro_batch_size"]), str(r["grad_accum"]),
              f"{r['memory_gib']:.1f}", f"{r['state_gib']:.1f}", f"{r['activation_gib']:.1f}",
              f"{r['comm_bytes_per_step']['intra_node'] / 1e9:.2f}",
              f"{r['comm_bytes_per_step']['inter_node'] / 1e9:.2f}", f"{r['bubble']:.2f}",
              f"{r['step_time_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}"] for i, r in enumerate(rows)]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header] + lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Rank the layouts of a GPT-2 on a cluster (nanodist_tools/plan.py).")
    p.add_argument("--model", default="gpt2", choices=list(PRESETS))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--gpu_memory_gib", type=float, default=0, help="default: the GPU's")
    p.add_argument("--intra_node_gb_s", type=float, default=0, help="GB/s per GPU in a node (default: the GPU's)")
    p.add_argument("--inter_node_gb_s", type=float, default=0, help="GB/s per GPU across nodes (default: the GPU's)")
    p.add_argument("--compute_efficiency", type=float, default=0.5, help="fraction of peak FLOP/s reached")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--total_batch_size", type=int, default=524288)
    p.add_argument("--micro_batch_size", default="auto", help="auto: powers of 2 up to 64")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="what the layouts run on (the rules differ: PyTorch's CP is CUDA only)")
    p.add_argument("--implementation", default="custom", choices=["custom", "pytorch"])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the whole ranking as JSON")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.micro_batch_size != "auto" and not args.micro_batch_size.isdigit():
            raise UserError(f"--micro_batch_size must be auto or a number, got {args.micro_batch_size!r}")
        rows = plan(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows[0]["fits"]:
        print(f"error: no layout fits in {args.gpu_memory_gib:g} GiB per GPU; the closest, "
              f"{rows[0]['command']}, {rows[0]['why']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    key, _, intra, inter = GPUS[args.gpu]
    fitting = sum(r["fits"] for r in rows)
    print(f"{args.model} on {args.gpus} x {key} ({args.gpu_memory_gib:g} GiB; {args.gpus_per_node} per node, "
          f"{args.intra_node_gb_s or intra:g} GB/s inside, {args.inter_node_gb_s or inter:g} GB/s across), "
          f"{args.dtype}, compute at {args.compute_efficiency:.0%} of peak: {len(rows)} layouts run, "
          f"{fitting} fit")
    print(table(rows[:args.top]))
    print(f"\nbest: {rows[0]['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
