"""What each strategy costs, in one command: every layout x implementation, measured
beside the analytic model, written as JSON, a Markdown report and PNG plots.

    python bench/run.py                 # the default matrix (~10 min on 2 CPU cores)
    python bench/run.py --quick         # tiny smoke run
    python bench/run.py --out DIR --layouts ddp2 tp2-lp

The layouts are nanodist_tools/layouts.py's BENCH. Each runs as its own `torchrun
--standalone --nproc_per_node=N bench/worker.py` (one process: plain python), on CUDA
with NCCL when there is a GPU (layouts with more processes than GPUs are skipped, and
listed), else CPU with gloo. The workers' logs go to bench/results/logs/ (gitignored:
they hold this machine's paths).
Inside a worker the implementations take turns step by step, so their ratio is
measured under the same machine load; layouts run one after another.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from common import RESULTS
from nanodist_tools.layouts import BENCH, LAYOUTS, select
from report import analyse, write_report

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LOGS = RESULTS / "logs"


def layouts_that_fit(names: list[str], device: str) -> tuple[list[str], list[str]]:
    """(to run, skipped) of the layouts `names`: on GPUs one process per GPU, so a layout
    needs `world` of them."""
    if device == "cpu" or not torch.cuda.is_available():
        return names, []
    gpus = torch.cuda.device_count()
    return ([name for name in names if LAYOUTS[name].world <= gpus],
            [name for name in names if LAYOUTS[name].world > gpus])


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


def run_layout(name: str, args, data_dir: str, out_dir: Path, micro_batches: int) -> dict:
    result, world = out_dir / "raw" / f"{name}.json", LAYOUTS[name].world
    launcher = ([sys.executable] if world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={world}"])
    cmd = launcher + [str(REPO / "bench" / "worker.py"), "--layout", name,
                      "--out", str(result), "--data_dir", data_dir, "--device", args.device,
                      "--model", args.model, "--batch_size", str(args.batch_size),
                      "--block_size", str(args.block_size), "--dtype", args.dtype,
                      "--warmup", str(args.warmup), "--steps", str(args.steps),
                      "--ranks_per_batch", str(micro_batches)]
    log = LOGS / f"{name}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise SystemExit(f"layout {name} failed (exit {done.returncode}); {log}:\n{tail}")
    return json.loads(result.read_text())


def reproducing_command(argv: list[str]) -> str:
    """The command line of this run for the report, without its paths (--out, --data_dir:
    this machine's; the data are tiny Shakespeare either way)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.split("=")[0] in ("--out", "--data_dir"):
            skip = not skip and "=" not in arg
            continue
        kept.append(arg)
    return " ".join(["python bench/run.py", *kept])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "bench"), help="report directory")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed step, small batch")
    p.add_argument("--layouts", nargs="*", help=f"subset of {BENCH}")
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
    try:
        names = select(args.layouts, BENCH)
    except ValueError as error:
        p.error(f"--layouts: {error}")

    names, skipped = layouts_that_fit(names, args.device)
    if skipped:
        print(f"skipped (more processes than the {torch.cuda.device_count()} GPUs): "
              + ", ".join(f"{name} ({LAYOUTS[name].world})" for name in skipped), file=sys.stderr)

    out_dir = Path(args.out)
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.data_dir)
    # one global batch for every layout: a micro-batch for each DP rank of the widest
    micro_batches = max(LAYOUTS[name].dp for name in names)
    results = []
    for name in (bar := tqdm(names, desc="layouts", unit="layout")):
        bar.set_postfix_str(f"{name} on {LAYOUTS[name].world} process(es)")
        results.append(run_layout(name, args, data_dir, out_dir, micro_batches))
    write_report(analyse(results), out_dir, reproducing_command(sys.argv[1:]))


if __name__ == "__main__":
    main()
