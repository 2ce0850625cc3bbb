"""What each strategy costs, in one command: every layout x implementation, measured
beside the analytic model, written as JSON, a Markdown report and PNG plots.

    python bench/run.py                 # the default matrix (~10 min on 2 CPU cores)
    python bench/run.py --quick         # tiny smoke run
    python bench/run.py --out DIR --layouts ddp tp+lp

Each layout runs as its own `torchrun --standalone --nproc_per_node=N bench/worker.py`
(one process: plain python), on CUDA with NCCL when there is a GPU (layouts with more
processes than GPUs are skipped, and listed), else CPU with gloo.
Inside a worker the implementations take turns step by step, so their ratio is
measured under the same machine load; layouts run one after another.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from nanodist.cost import Layout
from report import analyse, write_report

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

MATRIX = [
    Layout("single"),
    Layout("ddp", dp=2),
    Layout("fsdp-zero3", dp=2, dp_type="fsdp"),
    Layout("fsdp-zero2", dp=2, dp_type="fsdp", zero3=False),
    Layout("tp", tp=2),
    Layout("tp+lp", tp=2, loss_parallel=True),
    Layout("tp+lp+sp", tp=2, loss_parallel=True, sequence_parallel=True),
    Layout("dp2xtp2", dp=2, tp=2, loss_parallel=True),
]


def layouts_that_fit(layouts: list[Layout], device: str) -> tuple[list[Layout], list[Layout]]:
    """(to run, skipped): on GPUs one process per GPU, so a layout needs `world` of them."""
    if device == "cpu" or not torch.cuda.is_available():
        return layouts, []
    gpus = torch.cuda.device_count()
    return [l for l in layouts if l.world <= gpus], [l for l in layouts if l.world > gpus]


def prepare_data(data_dir: str | None) -> str:
    """Character-level tiny Shakespeare (the offline copy when there is one)."""
    if data_dir:
        return data_dir
    out = Path(tempfile.mkdtemp(prefix="nanodist-bench-data-"))
    cmd = [sys.executable, str(REPO / "data" / "shakespeare_char" / "prepare.py"), "--out_dir", str(out)]
    if SHAKESPEARE.exists():
        cmd += ["--input", str(SHAKESPEARE)]
    subprocess.run(cmd, check=True, capture_output=True)
    return str(out)


def run_layout(layout: Layout, args, data_dir: str, out_dir: Path) -> dict:
    result = out_dir / "raw" / f"{layout.name}.json"
    launcher = ([sys.executable] if layout.world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={layout.world}"])
    cmd = launcher + [str(REPO / "bench" / "worker.py"), "--layout", json.dumps(asdict(layout)),
                      "--out", str(result), "--data_dir", data_dir, "--device", args.device,
                      "--model", args.model, "--batch_size", str(args.batch_size),
                      "--block_size", str(args.block_size), "--dtype", args.dtype,
                      "--warmup", str(args.warmup), "--steps", str(args.steps)]
    log = out_dir / "raw" / f"{layout.name}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise SystemExit(f"layout {layout.name} failed (exit {done.returncode}); {log}:\n{tail}")
    return json.loads(result.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "bench"), help="report directory")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed step, small batch")
    p.add_argument("--layouts", nargs="*", help=f"subset of {[l.name for l in MATRIX]}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch per DP rank")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--data_dir", help="prepared shakespeare_char (default: prepare one)")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.steps, args.batch_size, args.block_size = 1, 1, 2, 32
    layouts = [l for l in MATRIX if not args.layouts or l.name in args.layouts]
    if args.layouts and len(layouts) != len(args.layouts):
        p.error(f"--layouts: choose from {[l.name for l in MATRIX]}")

    layouts, skipped = layouts_that_fit(layouts, args.device)
    if skipped:
        print(f"skipped (more processes than the {torch.cuda.device_count()} GPUs): "
              + ", ".join(f"{l.name} ({l.world})" for l in skipped), file=sys.stderr)

    out_dir = Path(args.out)
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.data_dir)
    results = []
    for layout in (bar := tqdm(layouts, desc="layouts", unit="layout")):
        bar.set_postfix_str(f"{layout.name} on {layout.world} process(es)")
        results.append(run_layout(layout, args, data_dir, out_dir))
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    write_report(analyse(results), out_dir, command.strip())


if __name__ == "__main__":
    main()
