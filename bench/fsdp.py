"""Custom FSDP against PyTorch's FSDP2: throughput, memory and traffic, in one run.

    torchrun --standalone --nproc_per_node=2 bench/fsdp.py [--model tiny --block_size 64]

Both sharded models live in each process and take turns step by step. A step is
forward + backward (gather, reduce-scatter) + AdamW on the shards. Reported per rank:
- tokens/s and the paired speedup custom / FSDP2;
- state bytes between steps (parameters + gradients + AdamW moments) against ZeRO-3's
  16 Psi / N bytes (fp32 weights 4, grads 4, moments 8);
- peak live tensor bytes during one step, counted op by op (CPU has no allocator
  statistics), custom / FSDP2;
- bytes the custom step all-gathered and reduce-scattered (counted by the mesh's Comm)
  against the analytic ring volume 3 (N-1)/N Psi 4 bytes (2 all-gathers + 1
  reduce-scatter; ZeRO-2: 2).
"""
import weakref
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common import median, paired_speedup, parser, print_table, start_processes, time_interleaved, write_json
from nanodist import compat
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize


class PeakLiveBytes(compat.TorchDispatchMode):
    """Peak over the ops run inside it of the storage bytes alive: the tensors made
    inside, those of `before`, and the model's parameters as they are at that op (both
    FSDPs regrow gathered storages by resizing them, which no op reports)."""

    def __init__(self, before, model):
        super().__init__()
        self.before = list(before)  # held: DTensor.to_local() hands out fresh aliases
        self.model, self.refs, self.peak = model, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in compat.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.refs[id(t)] = weakref.ref(t)
        alive = (self.before + [_local(p) for p in self.model.parameters()]
                 + [_local(t) for r in self.refs.values() if (t := r()) is not None])
        self.peak = max(self.peak, sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                                        for t in alive}.values()))
        return out


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _state_tensors(opt):
    params = [p for group in opt.param_groups for p in group["params"]]
    return ([_local(p) for p in params] + [_local(p.grad) for p in params if p.grad is not None]
            + [_local(t) for s in opt.state.values() for t in s.values() if t.dim() > 0])


def main():
    p = parser("fsdp", __doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4, help="sequences per rank and micro-step")
    p.add_argument("--reshard_after_forward", type=int, default=1, help="1: ZeRO-3, 0: ZeRO-2")
    args = p.parse_args()

    device, world = start_processes()
    mesh = build_mesh(Layout(dp=world, dp_type="fsdp",
                             reshard_after_forward=bool(args.reshard_after_forward)), device)
    model_cfg = model_config(args.model, args.block_size, 50257)
    runs = {}
    for impl in ("custom", "pytorch"):
        with torch.device("meta"):  # deferred init: each rank materialises its shards only
            model = GPT(model_cfg, seed=None)
        layout = replace(mesh.layout, implementation=impl)
        parallel = parallelize(model, Setup(mesh.with_layout(layout), seed=1))
        runs[impl] = (parallel.parts[0], torch.optim.AdamW(parallel.params.param_groups(0.1), lr=1e-4))
    tokens = torch.randint(0, model_cfg.vocab_size, (args.batch_size, model_cfg.block_size + 1),
                           generator=torch.Generator().manual_seed(mesh.rank)).to(device)

    def step(impl):
        stage, opt = runs[impl]
        stage.module(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_interleaved({impl: (lambda impl=impl: step(impl)) for impl in runs},
                             args.warmup, args.steps, device, dist.barrier)
    n_params = sum(sum(f.numels) for f in runs["custom"][0].params.all_flats)  # tied wte once
    memory = {}
    for impl, (stage, opt) in runs.items():
        stage.module(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for t in _state_tensors(opt))
        opt.zero_grad(set_to_none=True)
        with PeakLiveBytes(_state_tensors(opt), stage.module) as peak:
            step(impl)
        memory[impl] = (state, peak.peak)
    with mesh.comm.counting() as counted:
        step("custom")
    traffic = counted.summary()
    gathered = traffic["all_gather"]["bus_bytes"]
    scattered = traffic["reduce_scatter"]["bus_bytes"]
    analytic = (3 if args.reshard_after_forward else 2) * (world - 1) / world * n_params * 4

    tokens_per_step = world * args.batch_size * model_cfg.block_size
    rows = [{"implementation": impl, "step ms (median)": median(t) * 1e3,
             "tokens/s": tokens_per_step / median(t),
             "throughput vs pytorch (paired)": paired_speedup(times, impl, "pytorch"),
             "state MiB/rank": memory[impl][0] / 2**20,
             "ZeRO-3 16*Psi/N MiB": 16 * n_params / world / 2**20,
             "peak MiB/rank": memory[impl][1] / 2**20,
             "peak vs pytorch": memory[impl][1] / memory["pytorch"][1]}
            for impl, t in times.items()]
    if mesh.is_main:
        zero = "ZeRO-3" if args.reshard_after_forward else "ZeRO-2"
        print_table(rows, f"FSDP {zero}, {args.model} ({n_params / 1e6:.2f}M params), block "
                          f"{model_cfg.block_size}, batch {args.batch_size} x {world} ranks on "
                          f"{device.type}, {args.steps} steps after {args.warmup} warm-up")
        print_table([{"all-gathers/step": traffic["all_gather"]["calls"],
                      "reduce-scatters/step": traffic["reduce_scatter"]["calls"],
                      "all-gather bus bytes": gathered, "reduce-scatter bus bytes": scattered,
                      "analytic": analytic, "measured/analytic": (gathered + scattered) / analytic}])
        write_json(args.out, {"args": vars(args), "world_size": world, "device": str(device),
                              "n_params": n_params, "rows": rows, "step_seconds": times,
                              "traffic": traffic, "analytic_bus_bytes": analytic})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
