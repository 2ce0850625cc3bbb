"""Custom DDP against PyTorch's DDP: throughput and all-reduce traffic, in one run.

    torchrun --standalone --nproc_per_node=2 bench/ddp.py [--model gpt2 --block_size 64]

Both replicas of the model live in each process and take turns step by step. A step
is forward + backward + gradient averaging over grad_accum micro-steps (no_sync on all
but the last); the optimizer is left out (it is the same code for both). A third variant
never communicates: the gap to it is what gradient averaging costs. Traffic is
what the mesh's Comm counted in one custom step, against the analytic ring
all-reduce volume 2 (N-1)/N * Psi * 4 bytes per rank (Psi parameters, fp32).
"""
from contextlib import nullcontext

import torch
import torch.distributed as dist

from common import median, paired_speedup, parser, print_table, start_processes, time_interleaved, write_json
from nanodist.model.gpt import GPT, model_config
from nanodist.model.loss import cross_entropy
from nanodist.parallel.ddp import DataParallel
from nanodist.parallel.engines import native_ddp
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh


def main():
    p = parser("ddp", __doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2, help="sequences per rank and micro-step")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--bucket_cap_mb", type=float, default=25.0)
    args = p.parse_args()

    device, world = start_processes()
    mesh = build_mesh(Layout(dp=world), device)
    cfg = model_config(args.model, args.block_size, 50257)
    with torch.device(device):
        custom = GPT(cfg, seed=1)
        sync = DataParallel(custom.parameters(), mesh.dp, args.bucket_cap_mb)
        native = native_ddp(GPT(cfg, seed=1), mesh.dp, device, args.bucket_cap_mb)
    tokens = torch.randint(0, cfg.vocab_size, (args.grad_accum, args.batch_size, cfg.block_size + 1),
                           generator=torch.Generator().manual_seed(mesh.rank)).to(device)

    def step(model, no_sync, communicate=True):
        for micro in range(args.grad_accum):
            with (nullcontext() if communicate and micro == args.grad_accum - 1 else no_sync()):
                x, y = tokens[micro, :, :-1], tokens[micro, :, 1:]
                (cross_entropy(model(x), y) / args.grad_accum).backward()
        model.zero_grad(set_to_none=True)

    variants = {"custom": lambda: step(custom, sync.no_sync),
                "pytorch": lambda: step(native, native.no_sync),
                "no sync (compute only)": lambda: step(custom, sync.no_sync, communicate=False)}
    times = time_interleaved(variants, args.warmup, args.steps, device, dist.barrier)
    with mesh.comm.counting() as counted:
        step(custom, sync.no_sync)
    traffic = counted.summary()["all_reduce"]

    n_params = sum(p.numel() for p in custom.parameters())
    analytic = 2 * (world - 1) / world * n_params * 4
    tokens_per_step = world * args.grad_accum * args.batch_size * cfg.block_size
    rows = [{"implementation": name, "step ms (median)": median(t) * 1e3,
             "tokens/s": tokens_per_step / median(t),
             "speedup vs pytorch (paired)": paired_speedup(times, name, "pytorch")}
            for name, t in times.items()]
    if mesh.is_main:
        print_table(rows, f"DDP, {args.model} ({n_params / 1e6:.1f}M params), block {cfg.block_size}, "
                          f"batch {args.batch_size} x accum {args.grad_accum} x {world} ranks on "
                          f"{device.type}, {args.steps} steps after {args.warmup} warm-up")
        print_table([{"all-reduces/step": traffic["calls"], "buckets": len(sync.buckets),
                      "bus bytes/step": traffic["bus_bytes"], "analytic 2(N-1)/N*Psi*4": analytic,
                      "measured/analytic": traffic["bus_bytes"] / analytic}])
        write_json(args.out, {"args": vars(args), "world_size": world, "device": str(device),
                              "n_params": n_params, "rows": rows, "step_seconds": times,
                              "all_reduce": traffic, "analytic_bus_bytes": analytic})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
