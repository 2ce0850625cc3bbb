"""Expert parallelism against replicated experts, on one MoE model, in one run.

    torchrun --standalone --nproc_per_node=2 bench/moe.py [--model tiny --experts 8 --top_k 2]

One MoE GPT-2 (every --every-th block: E experts, top-k, dropless) laid out four ways on
the same processes: DDP and FSDP with the experts replicated (ep 1: every rank holds all
E and reduces their gradients with the rest) and split over the DP ranks (ep = N: E/N
each, tokens sent to them all-to-all). The variants take turns step by step (forward,
backward, gradient norm, AdamW) on the same random batches. Per variant: step time,
tokens/s and its ratio to DDP ep 1 (paired), the state bytes per rank and the bytes sent
per rank, counted (comm.py) beside the cost model (cost.py, traffic.py: its all-to-all
assumes balanced routing; this rank's routing is what it is). Writes JSON (--out) and a
Markdown table (docs/bench/moe.md unless --markdown).
"""
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from common import (markdown_table, median, paired_speedup, parser, print_table, start_processes,
                    time_interleaved, write_json)
from nanodist.planner.cost import state_bytes as model_state_bytes
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.planner.traffic import traffic_by_group
from nanodist_tools.measure import state_bytes
from nanodist.parallel.rules import check_layout

MiB = 2**20
DOCS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "moe.md"


class Variant:
    """One layout of the model: its mesh, parallelized model and optimizer."""

    def __init__(self, cfg, layout: Layout, device, micro_steps: int):
        self.layout, self.mesh = layout, build_mesh(layout, device)
        with torch.device(device):
            self.parallel = parallelize(GPT(cfg, seed=0), Setup(self.mesh, 0, micro_steps=micro_steps))
        self.params = self.parallel.params
        self.optimizer = self.params.optimizer(0.1, lr=1e-3, betas=(0.9, 0.95))
        self.state = {}
        self.optimizer.register_step_post_hook(lambda *_: self.state.update(state_bytes(self)))

    def step(self, batches):
        loss = self.parallel.runner.forward_backward(batches, nullcontext())
        self.params.clip_grad_norm(1.0)
        self.mesh.dp_cp.all_reduce(loss.detach().clone())  # the trainer's mean loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main():
    p = parser("moe", __doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--every", type=int, default=2, help="every N-th block is MoE")
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per rank and micro-step")
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--markdown", default=str(DOCS), help="the Markdown table")
    args = p.parse_args()

    device, world = start_processes()
    cfg = model_config(args.model, args.block_size, args.vocab_size, moe_experts=args.experts,
                       moe_top_k=args.top_k, moe_every=args.every)
    layouts = {"ddp, experts replicated": Layout(dp=world),
               f"ddp + ep{world}": Layout(dp=world, ep=world),
               "fsdp, experts replicated": Layout(dp=world, dp_type="fsdp"),
               f"fsdp + ep{world}": Layout(dp=world, dp_type="fsdp", ep=world)}
    for layout in layouts.values():
        check_layout(layout, world, device.type, cfg.block_size, model=cfg, micro_steps=args.grad_accum)
    variants = {name: Variant(cfg, layout, device, args.grad_accum) for name, layout in layouts.items()}
    rank = dist.get_rank()
    tokens = torch.randint(0, cfg.vocab_size, (args.grad_accum, args.batch_size, cfg.block_size + 1),
                           generator=torch.Generator().manual_seed(rank)).to(device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]

    times = time_interleaved({name: (lambda v=v: v.step(batches)) for name, v in variants.items()},
                             args.warmup, args.steps, device, dist.barrier)
    rows, baseline = [], next(iter(variants))
    tokens_per_step = world * args.grad_accum * args.batch_size * cfg.block_size
    for name, v in variants.items():
        with v.mesh.comm.counting() as counted:
            v.step(batches)
        sent = counted.summary()
        model = traffic_by_group(cfg, v.layout, args.batch_size, args.grad_accum)
        a2a = model.get(("ep", "all_to_all"), 0.0)
        rows.append({"variant": name, "step ms": median(times[name]) * 1e3,
                     "tokens/s": tokens_per_step / median(times[name]),
                     f"vs {baseline}": paired_speedup(times, name, baseline),
                     "state MiB": v.state["total"] / MiB,
                     "state model": model_state_bytes(cfg, v.layout)["total"] / MiB,
                     "all-to-all MiB": sent.get("all_to_all", {}).get("bus_bytes", 0.0) / MiB,
                     "all-to-all model": a2a / MiB,
                     "traffic MiB": sum(k["bus_bytes"] for k in sent.values()) / MiB,
                     "traffic model": sum(model.values()) / MiB})
    if rank == 0:
        title = (f"MoE {args.model}: {cfg.n_moe_layers} of {cfg.n_layer} blocks with {args.experts} experts, "
                 f"top-{args.top_k}, dropless; vocab {cfg.vocab_size}, block {cfg.block_size}, batch "
                 f"{args.batch_size} x accum {args.grad_accum} x {world} ranks on {device.type}, "
                 f"{args.steps} timed steps after {args.warmup}; bytes are rank 0's")
        print_table(rows, title)
        kept = {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}  # no machine paths
        write_json(args.out, {"args": kept, "world_size": world, "device": str(device),
                              "rows": rows, "step_seconds": times})
        Path(args.markdown).write_text(f"# Expert parallelism (bench/moe.py)\n\n{title}.\n\n"
                                       f"{markdown_table(rows)}\n\nCommand: `torchrun --standalone "
                                       f"--nproc_per_node={world} bench/moe.py`\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
