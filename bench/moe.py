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

    python bench/moe.py --layer --steps 40 --warmup 5 [--dtype bfloat16]

One process, one MoE layer per expert count E (2, 4, 8, 16): its experts as they run now
(moe.Experts: grouped matmuls, or padded bmm where grouped_mm does not fit) against the
loop of before (one matmul per expert, the counts read on the host), forward + backward,
taking turns; median time, paired speed-up and the host reads per forward. Its table is
its own part of the Markdown file (the part under its heading; the other mode keeps it).
"""
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (markdown_table, median, paired_speedup, parser, print_table, start_processes,
                    time_interleaved, write_json)
from nanodist.planner.cost import state_bytes as model_state_bytes
from nanodist import compat
from nanodist.model.gpt import GPT, model_config
from nanodist.model.moe import Experts, MoE
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.planner.traffic import traffic_by_group
from nanodist_tools.measure import state_bytes
from nanodist.parallel.rules import check_layout
from nanodist.run.launch import pick_device

MiB = 2**20
DOCS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "moe.md"
LAYER = "## The experts' matmuls"  # the heading of --layer's part of the Markdown file


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


class LoopExperts(Experts):
    """The experts as nanodist ran them before grouped matmuls (the baseline): the counts
    read on the host, one matmul per expert."""

    def forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, rows in enumerate(routed.split(self.host(counts))):
            h = rows @ self.fc_weight[e]
            h = h + self.fc_bias[e].to(h.dtype)
            y = F.gelu(h, approximate="tanh") @ self.proj_weight[e]
            outputs.append(y + self.proj_bias[e].to(y.dtype))
        return torch.cat(outputs)


def write_part(path: Path, text: str, heading: str | None = None):
    """`path` with one part replaced by `text`: the part under the line `heading` (to the next
    '## ' line), or with None the part before the first '## ' line; the others are kept."""
    parts = re.split(r"(?m)^(?=## )", path.read_text() if path.exists() else "")
    if heading is None:
        parts[0] = text
    else:
        parts = [part for part in parts if not part.startswith(heading)] + [text]
    path.write_text("\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n")


def layer_rows(args, device) -> tuple[list[dict], str]:
    """One MoE layer per expert count, its experts now against the loop: rows and a title.
    On CPU one thread, timed by its own CPU time (other jobs share the cores; the wall
    clock times them too); on CUDA the wall clock, synced."""
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows, autocast = [], (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                          else nullcontext())
    for E in (2, 4, 8, 16):
        cfg = model_config(args.model, args.block_size, args.vocab_size, moe_experts=E, moe_top_k=args.top_k)
        torch.manual_seed(0)
        now = MoE(cfg).to(device)
        for param in now.parameters():
            nn.init.normal_(param, std=0.02)  # near-uniform routing: each expert about k T / E rows
        before = MoE(cfg).to(device)
        before.experts = LoopExperts(E, cfg.n_embd).to(device)
        before.load_state_dict(now.state_dict())
        x = torch.randn(args.batch_size, cfg.block_size, cfg.n_embd, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        cpu = {"loop": [], "now": []}

        def step(name, moe):
            start = time.thread_time()
            with autocast:
                y = moe(x)
            y.backward(grad)
            cpu[name].append(time.thread_time() - start)
        times = time_interleaved({"loop": lambda: step("loop", before), "now": lambda: step("now", now)},
                                 args.warmup, args.steps, device)
        if device.type == "cpu":
            times = {name: t[args.warmup:] for name, t in cpu.items()}
        dtype = getattr(torch, args.dtype)  # the experts' matmuls', as Experts.run casts
        fits = compat.grouped_mm_fits(x.view(-1, cfg.n_embd).to(dtype), now.experts.fc_weight.to(dtype),
                                      now.experts.proj_weight.to(dtype))
        calls = args.warmup + args.steps
        rows.append({"experts": E, "experts now": "grouped" if fits else "padded",
                     "loop ms": median(times["loop"]) * 1e3, "now ms": median(times["now"]) * 1e3,
                     "speed-up": paired_speedup(times, "now", "loop"),
                     "host reads: loop": before.experts.host_reads / calls, "now": now.experts.host_reads / calls})
    clock = "one thread's CPU time" if device.type == "cpu" else "wall clock"
    title = (f"One MoE layer ({args.model}: C {cfg.n_embd}, {args.batch_size} x {args.block_size} tokens, "
             f"top-{args.top_k}), forward + backward, {args.dtype} on {device.type}, {clock}: median of "
             f"{args.steps} after {args.warmup}, taking turns; host reads per forward")
    return rows, title


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
    p.add_argument("--layer", action="store_true", help="one process: the experts' matmuls, now vs the loop")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--layer: autocast to")
    args = p.parse_args()
    if args.layer:
        rows, title = layer_rows(args, pick_device("auto"))
        print_table(rows, title)
        write_part(Path(args.markdown), f"{LAYER} (bench/moe.py --layer)\n\n{title}.\n\n{markdown_table(rows)}\n\n"
                   f"Command: `python bench/moe.py --layer --steps {args.steps} --warmup {args.warmup}`\n", LAYER)
        return

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
        write_part(Path(args.markdown), f"# Expert parallelism (bench/moe.py)\n\n{title}.\n\n"
                   f"{markdown_table(rows)}\n\nCommand: `torchrun --standalone --nproc_per_node={world} "
                   f"bench/moe.py`")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
