"""Custom tensor parallelism against DTensor's, from the same plan, in one run.

    torchrun --standalone --nproc_per_node=2 bench/tp.py [--model tiny --block_size 128]

Variants {custom, pytorch} x {TP, TP + sequence parallel}, all with loss parallelism,
take turns step by step (forward + backward + AdamW step, one batch replicated over TP).
Traffic: what the mesh's Comm counted in one custom step, by kind, against the
analytic count of activation collectives (B T C fp32 each, L layers; the call-by-call
derivation is in nanodist/parallel/tensor_parallel.py `tp_collectives`), plus one 4-byte all-reduce
of the squared gradient norm.
"""
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common import median, parser, print_table, start_processes, time_interleaved, write_json
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.parallel.tensor_parallel import tp_collectives


def main():
    p = parser("tp", __doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=8192)
    args = p.parse_args()

    device, world = start_processes()
    mesh = build_mesh(Layout(tp=world), device)
    mcfg = model_config(args.model, args.block_size, args.vocab_size)
    B, T, C, V, L = args.batch_size, args.block_size, mcfg.n_embd, mcfg.vocab_size, mcfg.n_layer
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (2, B, T), generator=gen).to(device)

    def build(implementation, sp, lp=True):
        layout = replace(mesh.layout, implementation=implementation, sequence_parallel=sp,
                         loss_parallel=lp)
        with torch.device(device):
            parallel = parallelize(GPT(mcfg, seed=1), Setup(mesh.with_layout(layout), seed=1))
        stage = parallel.parts[0]
        optimizer = torch.optim.AdamW(parallel.params.param_groups(0.1), lr=1e-4)

        def step():
            with stage.loss_context():
                stage.module(x, targets=y).backward()
            parallel.params.clip_grad_norm(None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return stage, step

    variants = {f"{impl}{'+sp' if sp else ''}": build(impl, sp)
                for sp in (False, True) for impl in ("custom", "pytorch")}
    times = time_interleaved({name: step for name, (_, step) in variants.items()},
                             args.warmup, args.steps, device, dist.barrier)

    rows, results = [], {}
    for sp in (False, True):
        for lp in (True, False):
            step = variants[f"custom{'+sp' if sp else ''}"][1] if lp else build("custom", sp, lp)[1]
            step()  # warm (a fresh optimizer's first step allocates its state)
            with mesh.comm.counting() as counted:
                step()
            measured = counted.summary()
            for kind, (calls, payload) in tp_collectives(B, T, C, V, L, sp, lp).items():
                got = measured.get(kind, {"calls": 0, "payload_bytes": 0, "bus_bytes": 0})
                rows.append({"variant": f"custom{'+sp' if sp else ''}{'' if lp else ' no-lp'}",
                             "kind": kind, "calls": got["calls"], "analytic calls": calls,
                             "payload MiB": got["payload_bytes"] / 2**20,
                             "analytic MiB": payload / 2**20, "bus MiB": got["bus_bytes"] / 2**20})
            results[f"traffic sp={sp} lp={lp}"] = measured
    logit_saving = B * T * V * 4 - (3 * B * T * 4)

    speed_rows = []
    tokens = B * T
    for sp in ("", "+sp"):
        t_custom, t_native = median(times[f"custom{sp}"]), median(times[f"pytorch{sp}"])
        speed_rows.append({"layout": f"tp{world}{sp}", "custom tok/s": tokens / t_custom,
                           "pytorch tok/s": tokens / t_native, "custom / pytorch": t_native / t_custom})

    def local_bytes(model):  # parameters; grads and AdamW's two moments are 3x more alike
        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4
                   for p in model.parameters())
    one = sum(p.numel() * 4 for p in GPT(mcfg, seed=None).parameters())
    memory_rows = [{"variant": name, "param MiB/rank": local_bytes(stage.module) / 2**20,
                    "TP=1 MiB": one / 2**20, "ratio": local_bytes(stage.module) / one}
                   for name, (stage, _) in variants.items()]

    if mesh.is_main:
        print(f"model {args.model}: L={L} C={C} V={V}, batch {B}x{T}, TP={world} on {device}")
        print_table(speed_rows, "\nthroughput (median of interleaved steps)")
        print_table(rows, "\ncommunication per step (custom, counted) vs analytic")
        print(f"\nloss parallelism saves the logits all-gather: {logit_saving / 2**20:.2f} MiB "
              f"payload per step (B T V fp32) for 3 B T floats of all-reduce")
        print_table(memory_rows, "\nparameters per rank vs TP=1 (grads, AdamW states scale alike)")
        write_json(args.out, {"args": vars(args), "speed": speed_rows, "traffic": rows,
                              "logit_saving_bytes": logit_saving, "memory": memory_rows,
                              "measured": results})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
