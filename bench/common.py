"""What every benchmark shares: the command line, an interleaved timing loop, the table
and the JSON results.

Machines are noisy (other jobs share the cores), so variants are compared within one
run, step by step in turn, the order flipping every round (A B, B A, A B ...: going
first or second matters, e.g. for what the allocator has cached), and summarised by
their median step time.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from nanodist.run.launch import init_distributed, pick_device
from nanodist.run.metrics import sync

RESULTS = Path(__file__).resolve().parent / "results"


def start_processes() -> tuple[torch.device, int]:
    """Join torchrun's process group (cuda+nccl or cpu+gloo); on CPU the processes share
    the cores, so each takes its share of threads. Returns (device, world size)."""
    device = pick_device("auto")
    _, world = init_distributed(device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device, world


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each variant")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="JSON results")
    return p


def time_interleaved(variants: dict, warmup: int, steps: int, device: torch.device,
                     barrier=None) -> dict[str, list[float]]:
    """{name: step_fn} -> {name: [seconds of each timed step]}, the variants taking
    turns so that they share the machine's ups and downs. `barrier` (e.g.
    dist.barrier) lines the ranks up before each step."""
    times = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, step in list(variants.items())[::1 if i % 2 == 0 else -1]:
            if barrier:
                barrier()
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values) -> float:
    return statistics.median(values)


def paired_speedup(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of baseline time / name time: each round's two steps ran
    back to back, so this ratio shrugs off slow phases of the machine better."""
    return median([b / t for t, b in zip(times[name], times[baseline])])


def print_table(rows: list[dict], title: str = ""):
    """Rows of {column: value}; floats printed with 4 significant digits."""
    if title:
        print(title)
    columns = list(rows[0])
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


def markdown_table(rows: list[dict]) -> str:
    """The rows of `print_table` as a Markdown table."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def write_json(path: str, payload: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}")
