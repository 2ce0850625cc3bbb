"""One profiled step of several runs, rank 0, as two lanes: compute and communication.

    python scripts/plot_trace.py RUN_DIR [RUN_DIR ...] --out docs/trace_ddp_fsdp_tp.png

Each RUN_DIR is a train.py run with --profile_steps A:A (one step). Compute: the
innermost ops of the main thread (the kernels: an autograd Function that waits for a
collective encloses no kernel while it waits), collective launches left out;
communication: what gloo's (or NCCL's) threads did, the "gloo:*" / "nccl:*" ranges. The
gaps between kernels are Python and autograd at work (on a tiny model, most of a CPU step).
"""
import argparse
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def lanes(run_dir: Path) -> tuple[list, list]:
    """(compute, communication) intervals in ms from the step's start, rank 0."""
    traces = sorted((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    if not traces:
        raise SystemExit(f"{run_dir}: no profile/rank0.*.pt.trace.json (run with --profile_steps A:A)")
    events = [e for e in json.loads(traces[-1].read_text())["traceEvents"] if e.get("ph") == "X"]
    comm = [e for e in events if e["name"].startswith(("gloo:", "nccl:"))]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    main = max({e["tid"] for e in ops}, key=lambda tid: sum(e["tid"] == tid for e in ops))
    t0 = min(e["ts"] for e in ops)
    ops = sorted((e for e in ops if e["tid"] == main), key=lambda e: e["ts"])
    kernels = [e for e, after in zip(ops, ops[1:] + [None])  # no op starts inside it
               if (after is None or after["ts"] >= e["ts"] + e["dur"]) and not e["name"].startswith("c10d::")]
    span = lambda es: union([((e["ts"] - t0) / 1e3, (e["ts"] + e["dur"] - t0) / 1e3) for e in es])
    return span(kernels), span(comm)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", help="one per run (default: the directory names)")
    p.add_argument("--out", default="trace.png")
    args = p.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    fig, axes = plt.subplots(len(args.runs), 1, figsize=(12, 1.6 * len(args.runs) + 0.6), squeeze=False)
    for ax, run, label in zip(axes[:, 0], args.runs, labels):
        compute, comm = lanes(run)
        comm_ms = sum(e - s for s, e in comm)
        step_ms = max(compute[-1][1], comm[-1][1] if comm else 0.0)
        ax.broken_barh([(s, e - s) for s, e in compute], (10, 8), color="tab:blue")
        ax.broken_barh([(s, e - s) for s, e in comm], (0, 8), color="tab:orange")
        ax.set_yticks([4, 14], ["communication", "compute"])
        ax.set_title(f"{label}: communication {comm_ms:.0f} ms of a {step_ms:.0f} ms step",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms from the start of the step (rank 0)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
