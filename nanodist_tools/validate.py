"""`python -m nanodist_tools.validate`: the cost model the planner ranks with (cost.py,
traffic.py), held to what the real code allocates and sends.

For each layout, 2 or 4 gloo processes on this machine train one step of the tiny model
(custom implementation, fp32) and every rank reports

    state    bytes of parameters, gradients and AdamW moments right after optimizer.step()
             (measure.state_bytes: unique storages)
    traffic  bus bytes per collective kind: every c10d collective (measure.TrafficMode: the
             strategies' and the trainer's own loss mean) and the point-to-point sends of
             the pipeline (the Trainer's comm counter; the dispatch mode does not see them)
    activations  the most bytes saved for backward alive at once during the step
             (measure.peak_saved_bytes: one micro-batch's, or a pipeline's in flight)

against cost.state_bytes / traffic.traffic_bytes / cost.activations_in_flight of its
pipeline stage. State and traffic are exact arithmetic on shapes: their tolerance is 0.5%
(what the model leaves out: FSDP's padding to a multiple of N, DDP's one-float "used" flag
per parameter). Activations: 5% (the model counts the tensors each layer keeps; autograd
also keeps a few small ones of its own, e.g. the shapes of views). Writes
docs/plan/validation.md and validation.json; exits 1 when a prediction is off.

A simulated cluster (simulate.py): one process plays one rank of a layout of 64 or 512
ranks over torch's fake process group and runs the same real code on gpt2-medium to
gpt2-xl, held to the same predictions.

Step time: plan.cost's prediction at this machine's calibrated speeds (`calibrate`), for
the step the trainer measured (its tokens per step: CP ranks read the same sequences),
against the median of TIMED_STEPS measured steps of each real layout, compared as orders
(Spearman's rho, at least RHO_MIN): a CPU's absolute times say little about a GPU's.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanodist.errors import UserError
from nanodist.model import GPTConfig
from nanodist.parallel.comm import BUS_FACTOR
from nanodist.parallel.layout import Layout
from nanodist_tools import cost, plan, traffic
from nanodist_tools.layouts import LAYOUTS, VALIDATION
from nanodist_tools.measure import measure_run, step_argv
from nanodist_tools.processes import on_processes
from nanodist_tools.simulate import SIMULATED, simulate

TOLERANCE = {"activations": 0.05}  # every other quantity: EXACT
EXACT = 0.005
TIMED_STEPS = 5
RHO_MIN = 0.48  # Spearman: P(rho >= 0.48 | unrelated orders) < 5% for 13 layouts
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def compare(name: str, layout: Layout, measured: list[dict]) -> list[dict]:
    """Per rank and quantity: measured, predicted, their ratio and whether it is within TOLERANCE."""
    rows = []
    for m in measured:
        cfg, b, accum, stage = GPTConfig(**m["model"]), m["micro_batch"], m["micro_steps"], m["pp_rank"]
        predicted = {"state": cost.state_bytes(cfg, layout, stage)["total"],
                     "activations": cost.activations_in_flight(cfg, layout, b, accum, stage),
                     **traffic.traffic_bytes(cfg, layout, b, accum, "float32", "cpu", stage)}
        got = {"state": m["state"], "activations": m["activations"], **m["traffic"]}
        for what in sorted(set(predicted) | set(got)):
            p, g = predicted.get(what, 0.0), got.get(what, 0.0)
            ratio = g / p if p else (1.0 if g == 0 else float("inf"))
            rows.append({"layout": name, "ranks": layout.world, "rank": m["rank"], "what": what,
                         "measured": g, "predicted": p, "ratio": ratio,
                         "ok": abs(ratio - 1) <= TOLERANCE.get(what, EXACT)})
    return rows


def run_layout(layout: Layout, data_dir: str) -> list[dict]:
    """Measure `layout` (and time TIMED_STEPS steps) on layout.world fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        return on_processes(layout.world, measure_run, step_argv(layout, data_dir, str(Path(tmp) / "run")),
                            TIMED_STEPS)


def _all_reduce_seconds(numel: int, repeats: int) -> float:
    x = torch.ones(numel)
    for _ in range(3):
        dist.all_reduce(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(data_dir: str) -> tuple[float, float, dict[int, float]]:
    """This machine's speeds for the step-time predictions: the FLOP/s one process
    reaches training the tiny model (the measured layouts' step; N processes on fewer
    cores share them), gloo's bus bytes/s in an all-reduce of 4 MiB between 2, and the
    time of a 4-byte all-reduce among N processes (the latency of a call; beyond the
    cores, the processes take turns on them)."""
    one = run_layout(Layout(), data_dir)[0]
    seconds = on_processes(2, _all_reduce_seconds, 2**20, 20)
    bus_bytes = BUS_FACTOR["all_reduce"](2) * 4 * 2**20
    latency = {n: max(on_processes(n, _all_reduce_seconds, 1, 50))
               for n in sorted({LAYOUTS[name].world for name in VALIDATION})}
    return one["flops_per_step"] / one["step_s"], bus_bytes / max(seconds), latency


def predicted_step_s(layout: Layout, m: dict, speed: tuple) -> float:
    """plan.cost's step time of the measured step (its own tokens per step), at this
    machine's calibrated speeds."""
    args = plan.build_parser().parse_args([
        "--model=tiny", f"--gpus={layout.world}", f"--gpus_per_node={layout.world}",
        f"--block_size={m['model']['block_size']}", "--dtype=float32", "--device=cpu",
        f"--total_batch_size={m['tokens_per_step']}"])
    flop_s, bus_s, latency = speed
    shared = flop_s * min(1.0, CORES / layout.world)
    return plan.cost(args, GPTConfig(**m["model"]), layout, m["micro_batch"], m["micro_steps"],
                     speed=(shared, bus_s, bus_s, latency[layout.world]))["step_time_s"]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation: Pearson's r of the ranks, equal values sharing their mean rank
    (the model predicts the same time for layouts it cannot tell apart, e.g. DDP and
    FSDP on 2 ranks)."""
    def ranks(values):
        order = sorted(values)
        return [order.index(v) + (order.count(v) - 1) / 2 for v in values]
    return statistics.correlation(ranks(xs), ranks(ys))


def report(rows: list[dict], times: list[dict], rho: float, speed: tuple[float, float]) -> str:
    """Markdown: every rank's prediction per quantity, then the step times."""
    out = ["# Planner validation: predicted against measured, per rank\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n", "![predicted against measured](validation.png)\n",
           "| layout | ranks | rank | what | measured bytes | predicted bytes | measured / predicted | within tolerance |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['ranks']} | {r['rank']} | {r['what']} | {r['measured']:,.0f} | "
                   f"{r['predicted']:,.0f} | {r['ratio']:.4f} | {'yes' if r['ok'] else 'NO'} |")
    out += ["\n## Step time: the predicted order against the measured one\n",
            f"plan.cost's step time at this machine's calibrated speeds ({speed[0] / 1e9:.2f} GFLOP/s "
            f"a process, shared by the processes beyond its {CORES} cores; gloo "
            f"{speed[1] / 1e9:.2f} GB/s of all-reduce bus bytes; a collective call "
            + ", ".join(f"{s * 1e6:.0f} us among {n}" for n, s in speed[2].items())
            + ") against the median of "
            f"{TIMED_STEPS} measured steps of the real layouts. Spearman's rank correlation "
            f"rho = {rho:.2f} over {len(times)} layouts (required: >= {RHO_MIN}, the one-sided 5% "
            f"critical value for 13 layouts; more layouts lower it).\n",
            "| layout | ranks | measured ms | predicted ms | measured / predicted |", "|---|---|---|---|---|"]
    for t in sorted(times, key=lambda t: t["measured_s"]):
        out.append(f"| {t['layout']} | {t['ranks']} | {t['measured_s'] * 1e3:.1f} | "
                   f"{t['predicted_s'] * 1e3:.1f} | {t['measured_s'] / t['predicted_s']:.2f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], times: list[dict], path: Path):
    """Predicted against measured, log-log: bytes per quantity (real and simulated), times."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    for what in sorted({r["what"] for r in rows}):
        for simulated, marker in ((False, "o"), (True, "^")):
            pts = [(r["predicted"], r["measured"]) for r in rows if r["what"] == what
                   and (r["ranks"] >= 64) == simulated and r["predicted"] > 0]
            if pts:
                left.scatter(*zip(*pts), marker=marker, s=18, label=f"{what}{' (simulated)' if simulated else ''}")
    for ax, unit in ((left, "bytes"), (right, "s")):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel(f"predicted ({unit})"), ax.set_ylabel(f"measured ({unit})")
    lo, hi = left.get_xlim()
    left.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    left.set_title("bytes per rank: 2-4 gloo processes (o), 64-512 fake ranks (^)")
    left.legend(fontsize=7)
    right.scatter([t["predicted_s"] for t in times], [t["measured_s"] for t in times])
    for t in times:
        right.annotate(t["layout"], (t["predicted_s"], t["measured_s"]), fontsize=6)
    right.set_title("step time, tiny model on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check the planner's cost model against measurement "
                                            "(nanodist_tools/validate.py).")
    p.add_argument("--data_dir", default="data/shakespeare_char", help="prepared char-level data")
    p.add_argument("--out", default="docs/plan", help="report directory")
    p.add_argument("--layouts", nargs="*", help="a subset of the validated layouts (default: all)")
    args = p.parse_args(argv)
    known = VALIDATION + [name for name, _, _ in SIMULATED]
    try:
        unknown = sorted(set(args.layouts or []) - set(known))
        if unknown:
            raise UserError(f"--layouts: unknown {', '.join(unknown)}; choose from {' '.join(known)}")
        if not Path(args.data_dir, "train.bin").exists():
            raise UserError(f"--data_dir {args.data_dir} holds no prepared shakespeare_char: run "
                            f"python data/shakespeare_char/prepare.py --out_dir {args.data_dir}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    chosen = args.layouts or known
    real = [name for name in VALIDATION if name in chosen]
    simulated = [s for s in SIMULATED if s[0] in chosen]
    speed = calibrate(args.data_dir)
    runs = [(name, LAYOUTS[name], partial(run_layout, LAYOUTS[name], args.data_dir)) for name in real]
    runs += [(name, layout, partial(simulate, layout, model, args.data_dir)) for name, layout, model in simulated]
    rows, times = [], []
    for name, layout, run in tqdm(runs, desc="layouts", unit="layout"):
        measured = run()
        new = compare(name, layout, measured)
        rows += new
        worst = max(new, key=lambda r: abs(r["ratio"] - 1))
        tqdm.write(f"{name:20s} {layout.world:4d} ranks, worst {worst['what']} on rank "
                   f"{worst['rank']}: {worst['ratio']:.4f}")
        if measured[0]["step_s"] is not None:  # the slowest rank is the step
            times.append({"layout": name, "ranks": layout.world,
                          "measured_s": max(m["step_s"] for m in measured),
                          "predicted_s": predicted_step_s(layout, measured[0], speed)})
    rho = spearman([t["predicted_s"] for t in times], [t["measured_s"] for t in times]) if len(times) > 1 else 1.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps({"calibration": dict(zip(("flop_s", "bus_bytes_s", "latency_s"), speed)),
                                                     "bytes": rows, "step_time": times, "spearman": rho},
                                                    indent=1) + "\n")
    (out / "validation.md").write_text(report(rows, times, rho, speed))
    plot(rows, times, out / "validation.png")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"off: {r['layout']} rank {r['rank']} {r['what']}: measured {r['measured']:,.0f}, "
              f"predicted {r['predicted']:,.0f}")
    print(f"{len(rows) - len(failed)} of {len(rows)} byte predictions within tolerance; step-time "
          f"order: Spearman rho {rho:.2f} over {len(times)} layouts (>= {RHO_MIN} required); "
          f"report in {out / 'validation.md'}")
    return 1 if failed or (len(times) >= 3 and rho < RHO_MIN) else 0


if __name__ == "__main__":
    sys.exit(main())
