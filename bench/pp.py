"""Pipeline parallelism measured: the bubble, micro-batches in flight, point-to-point
bytes, and the hand-written runner against torch.distributed.pipelining.

    torchrun --standalone --nproc_per_node=2 bench/pp.py [--model tiny --block_size 128]
    torchrun --standalone --nproc_per_node=4 bench/pp.py --micro 4 --docs docs/bench

Per schedule and M (micro-batches = P, 2P, 4P, 8P), the same global-batch step on the
PP ranks alone: the runner records every action's start and end (`TracedRunner`) and
the bubble is the measured idle fraction of the step (1 - time in forwards and
backwards / step time, mean over ranks) against `cost.bubble`. Micro-batches in flight:
the peak bytes saved for backward (nanodist_tools/measure.py) over one micro-batch's,
against M (GPipe) and min(P - r, M) (1F1B); interleaved: the peak bytes. Traffic: the
mesh's Comm count of sends against nanodist/planner/traffic.py's ("pp", "send") traffic.
Custom vs native: tokens/s of both runners on the same step, taking turns. --docs DIR:
also DIR/pp_P{P}.md with the tables and DIR/pp_timeline_P{P}.png, what each rank did
when (1F1B and interleaved, the largest M).
On a CPU with fewer cores than processes the ranks take turns on the cores: the measured
bubble then holds the waits for a core too (P = 4 on 2 cores: about 0.5 whatever M).
"""
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from common import (markdown_table, median, parser, print_table, start_processes,
                    time_interleaved, write_json)
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.parallel.pipeline import PipelineRunner
from nanodist.planner.cost import bubble
from nanodist_tools.measure import peak_saved_bytes
from nanodist.planner.traffic import traffic_by_group

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]


class TracedRunner(PipelineRunner):
    """The hand-written runner, recording in `trace` each exchange and action it runs as
    (kind, micro, chunk, start s, end s); exchanges are ("p2p", -1, -1, ...). On CUDA it
    waits for the GPU at both ends: the times are the kernels'."""

    def __init__(self, stages, split):
        super().__init__(stages, split)
        self.trace = []

    def _now(self) -> float:
        if self.mesh.device.type == "cuda":
            torch.cuda.synchronize(self.mesh.device)
        return time.perf_counter()

    @contextmanager
    def span(self, kind: str, micro: int, chunk: int):
        start = self._now()
        yield
        self.trace.append((kind, micro, chunk, start, self._now()))


def build(args, mesh, schedule, V, M, implementation="custom"):
    """The pipeline of `mesh` (its pp ranks) with this schedule, V chunks a rank and M
    micro-batches: (the Parallelized, one step (of another runner of its stages, if given),
    the model config)."""
    layout = replace(mesh.layout, pp_schedule=schedule, virtual_stages=V,
                     implementation=implementation)
    mcfg = replace(model_config(args.model, args.block_size, args.vocab_size), n_layer=args.n_layer)
    setup = Setup(mesh.with_layout(layout), seed=1, micro_batch=(args.batch_size, args.block_size),
                  micro_steps=M)
    parallel = parallelize(GPT(mcfg, seed=1).to(mesh.device), setup)
    batches = [tuple(torch.randint(0, mcfg.vocab_size, (2, args.batch_size, args.block_size),
                                   generator=torch.Generator().manual_seed(m)).to(mesh.device))
               for m in range(M)]
    autocast = torch.autocast(mesh.device.type, enabled=False)

    def step(runner=parallel.runner):
        runner.forward_backward(batches, autocast)
        for p in parallel.params.param_list():
            p.grad = None
    return parallel, step, mcfg


def measure(args, mesh, schedule, V, M) -> dict:
    """This rank's bubble, peak in flight and sends for one schedule and M (custom)."""
    parallel, step, mcfg = build(args, mesh, schedule, V, M)
    runner = TracedRunner(parallel.runner.stages, parallel.runner.split)
    for _ in range(args.warmup):
        step()
    idle, traces = [], []
    for _ in range(args.steps):
        dist.barrier()
        runner.trace = []
        step(runner)
        trace = runner.trace
        busy = sum(end - start for kind, *_, start, end in trace if kind != "p2p")
        idle.append(1 - busy / (trace[-1][-1] - trace[0][-2]))
        traces.append(trace)
    with peak_saved_bytes() as one:  # one micro-batch alone (the same split as V = 1)
        build(args, mesh, "gpipe", 1, 1)[1]()
    with peak_saved_bytes() as peak, mesh.comm.counting() as counted:
        step()
    layout = replace(mesh.layout, pp_schedule=schedule, virtual_stages=V)
    return {"idle": median(idle), "in_flight": peak["bytes"] / one["bytes"] if V == 1 else None,
            "peak_saved": peak["bytes"], "sent": counted.payload_bytes["send"],
            "sent_analytic": traffic_by_group(mcfg, layout, args.batch_size, M,
                                              pp_rank=mesh.pp.rank)["pp", "send"],
            "trace": traces[len(traces) // 2]}


def draw_timelines(traces: dict, path):
    """One panel per schedule: per rank, forwards, backwards and p2p as bars in time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"F": "tab:blue", "B": "tab:orange", "p2p": "tab:gray"}
    fig, axes = plt.subplots(len(traces), 1, figsize=(11, 1 + 0.6 * len(traces) * 4), squeeze=False)
    for ax, (name, per_rank) in zip(axes[:, 0], traces.items()):
        t0 = min(trace[0][-2] for trace in per_rank)
        for rank, trace in enumerate(per_rank):
            for kind, micro, chunk, start, end in trace:
                ax.barh(rank, (end - start) * 1e3, left=(start - t0) * 1e3, color=colours[kind],
                        edgecolor="white", linewidth=0.3)
                if kind != "p2p" and end - start > 0:
                    ax.text((start + end - 2 * t0) / 2 * 1e3, rank, f"{kind}{micro}" + (f"v{chunk}" if "interleaved" in name else ""),
                            ha="center", va="center", fontsize=6, color="white")
        ax.set_yticks(range(len(per_rank)), [f"rank {r}" for r in range(len(per_rank))])
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ms (measured)")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()],
               ["forward", "backward", "send/recv (incl. waiting)"], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"timeline written to {path}")


def write_docs(args, P, device, rows, speed, traces):
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    biggest = max(row["M"] for row in rows)
    draw_timelines({k: v for k, v in traces.items() if f"M={biggest} " in k + " " and "gpipe" not in k},
                   docs / f"pp_timeline_P{P}.png")
    (docs / f"pp_P{P}.md").write_text(
        f"# Pipeline parallelism, P = {P} on {device}\n\n`{' '.join(sys.argv)}` "
        f"(model {args.model} with {args.n_layer} blocks, micro-batch {args.batch_size}x{args.block_size})\n\n"
        f"Bubble (median over steps and ranks), micro-batches in flight on rank 0, sends:\n\n"
        f"{markdown_table(rows)}\n\nThe hand-written runner against torch.distributed.pipelining "
        f"(same step, taking turns):\n\n{markdown_table(speed)}\n\n"
        f"![timeline](pp_timeline_P{P}.png)\n")
    print(f"tables and timeline written to {docs}")


def main():
    p = parser("pp", __doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=8, help="blocks (the preset's width): P x V chunks")
    p.add_argument("--micro", type=int, nargs="*", help="micro-batch counts M (default P, 2P, 4P, 8P)")
    p.add_argument("--docs", help="write the tables (Markdown) and the timeline PNG here")
    args = p.parse_args()
    device, P = start_processes()
    mesh = build_mesh(Layout(pp=P), device)
    rows, traces = [], {}
    for M in args.micro or [P, 2 * P, 4 * P, 8 * P]:
        for schedule, V in SCHEDULES:
            got = measure(args, mesh, schedule, V, M)
            everyone = [None] * P
            dist.all_gather_object(everyone, got)
            traces[f"{schedule} P={P} M={M}" + (f" V={V}" if V > 1 else "")] = [g.pop("trace") for g in everyone]
            in_flight_expected = [M if schedule == "gpipe" else min(P - r, M) for r in range(P)]
            rows.append({"schedule": schedule, "M": M, "bubble measured": median([g["idle"] for g in everyone]),
                         "bubble analytic": bubble(Layout(pp=P, virtual_stages=V), M),
                         "in flight r0": everyone[0]["in_flight"] or "-",
                         "expected r0": in_flight_expected[0] if V == 1 else "-",
                         "saved MiB r0": everyone[0]["peak_saved"] / 2**20,
                         "sent MiB r0": everyone[0]["sent"] / 2**20,
                         "sent = analytic": all(g["sent"] == g["sent_analytic"] for g in everyone)})
    speed = []
    for schedule, V in SCHEDULES[:2]:  # the schedules both runners have
        M = 4 * P
        steps = {impl: build(args, mesh, schedule, V, M, impl)[1] for impl in ("custom", "pytorch")}
        times = time_interleaved(steps, args.warmup, args.steps, device, dist.barrier)
        tokens = M * args.batch_size * args.block_size
        speed.append({"schedule": schedule, "M": M,
                      "custom tok/s": tokens / median(times["custom"]),
                      "native tok/s": tokens / median(times["pytorch"]),
                      "custom / native": median(times["pytorch"]) / median(times["custom"])})
    if dist.get_rank() == 0:
        print(f"PP={P} on {device}, model {args.model} with {args.n_layer} blocks, "
              f"micro-batch {args.batch_size}x{args.block_size}")
        print_table(rows, "\nbubble (median over steps and ranks), micro-batches in flight on rank 0, sends")
        print_table(speed, "\nhand-written runner against torch.distributed.pipelining (same step)")
        write_json(args.out, {"args": vars(args), "P": P, "rows": rows, "speed": speed})
        if args.docs:
            write_docs(args, P, device, rows, speed, traces)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
