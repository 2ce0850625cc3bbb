"""What a layout needs, as train.py logs it: Memory/peak_GiB (live tensors) and
Memory/rss_peak_GiB (the process) per rank, for DDP, ZeRO-1 and FSDP, custom and PyTorch,
the loss whole or in chunks, beside the planner's band (plan.memory: what lives through
the step, and that plus its largest transient).

    python bench/memory.py [--model gpt2 --nproc 2 --block_size 256 --batch_size 1
                            --layouts ddp/custom --loss_chunks 1 0]

Each layout is a real `torchrun train.py` run of --steps steps (rank 0's step lines are
read); the table gives the largest measured `mem` and `rss` of the run and `mem` against
the first row's. The state alone is 16 bytes a parameter under DDP, 4 + 4 + 8/N under ZeRO-1
and 16/N under ZeRO-3 (fp32 parameters, gradients, AdamW's two moments): FSDP's peak
adds the gathered parameters of the units in flight and the activations, which sharding
does not touch.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import parser, print_table, write_json
from nanodist.model.gpt import model_config
from nanodist.planner import plan
from nanodist.planner.hardware import GiB
from nanodist.planner.search import Job
from nanodist.parallel.layout import Layout

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [("ddp", "custom"), ("zero1", "custom"), ("fsdp", "custom"),
           ("ddp", "pytorch"), ("zero1", "pytorch"), ("fsdp", "pytorch")]
STEP_LINE = re.compile(r"^step .*\| rss (?P<rss>[\d.]+) GiB", re.M)
MEM = re.compile(r"\| mem (?P<mem>[\d.]+) GiB")


def run_layout(args, dp_type: str, implementation: str, loss_chunks: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}", str(REPO / "train.py"), "--device=cpu",
                f"--model={args.model}", f"--dataset={args.dataset}", f"--data_dir={args.data_dir}",
                f"--block_size={args.block_size}", f"--batch_size={args.batch_size}",
                f"--total_batch_size={args.batch_size * args.block_size * args.nproc}",
                f"--loss_chunks={loss_chunks}",
                f"--max_steps={args.steps}", f"--eval_interval={args.steps}", "--eval_iters=1",
                f"--data_parallel_type={dp_type}", f"--implementation={implementation}",
                "--checkpoint_interval=-1", f"--out_dir={out_dir}"]
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        sys.exit(f"{dp_type}/{implementation} failed:\n{out.stderr[-3000:]}")
    lines = [m.group(0) for m in STEP_LINE.finditer(out.stdout)]
    mems = [float(m.group("mem")) for line in lines if (m := MEM.search(line))]
    cfg = model_config(args.model, args.block_size, 50257 if args.dataset != "shakespeare_char" else 65)
    layout = Layout(dp=args.nproc, dp_type=dp_type, implementation=implementation, loss_chunks=loss_chunks)
    job = Job(args.model, cfg, args.nproc, args.nproc, args.batch_size * args.block_size * args.nproc,
              "float32", "cpu", implementation)
    band = plan.band(plan.memory(job, layout, args.batch_size, 1))
    return {"layout": f"{dp_type} {implementation}", "loss": "whole" if loss_chunks == 1 else f"chunks {loss_chunks}",
            "mem_GiB": max(mems), "predicted_GiB": f"{band[0] / GiB:.2f}-{band[1] / GiB:.2f}",
            "rss_GiB": max(float(STEP_LINE.match(line).group("rss")) for line in lines)}


def main():
    p = parser("memory", __doc__.splitlines()[0])
    p.set_defaults(steps=3)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dataset", default="shakespeare")
    p.add_argument("--data_dir", default="", help="the prepared --dataset (default: data/DATASET)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=1, help="the micro-batch (one a step)")
    p.add_argument("--layouts", nargs="*", choices=[f"{d}/{i}" for d, i in LAYOUTS],
                   default=[f"{d}/{i}" for d, i in LAYOUTS])
    p.add_argument("--loss_chunks", nargs="*", type=int, default=[1],
                   help="train.py's --loss_chunks, each in turn (1: whole; 0: automatic)")
    args = p.parse_args()
    rows = [run_layout(args, *layout.split("/"), chunks) for layout in args.layouts for chunks in args.loss_chunks]
    for row in rows:
        row["mem_vs_first"] = row["mem_GiB"] / rows[0]["mem_GiB"]
    print_table(rows, f"{args.model}, {args.nproc} ranks, CPU, {args.batch_size} x {args.block_size} tokens "
                      f"a rank per step, max over the measured steps of {args.steps}")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
