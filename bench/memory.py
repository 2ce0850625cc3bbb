"""What a layout needs, as train.py logs it: Memory/peak_GiB (live tensors) and
Memory/rss_peak_GiB (the process) per rank, for DDP, ZeRO-1 and FSDP, custom and PyTorch.

    python bench/memory.py [--model gpt2 --nproc 2 --block_size 256]

Each layout is a real `torchrun train.py` run of --steps steps (rank 0's step lines are
read); the table gives the largest measured `mem` and `rss` of the run and `mem` against
custom DDP's. The state alone is 16 bytes a parameter under DDP, 4 + 4 + 8/N under ZeRO-1
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

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [("ddp", "custom"), ("zero1", "custom"), ("fsdp", "custom"),
           ("ddp", "pytorch"), ("zero1", "pytorch"), ("fsdp", "pytorch")]
STEP_LINE = re.compile(r"^step .*\| rss (?P<rss>[\d.]+) GiB", re.M)
MEM = re.compile(r"\| mem (?P<mem>[\d.]+) GiB")


def run_layout(args, dp_type: str, implementation: str) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}", str(REPO / "train.py"), "--device=cpu",
                f"--model={args.model}", f"--dataset={args.dataset}", f"--data_dir={args.data_dir}",
                f"--block_size={args.block_size}", "--batch_size=1",
                f"--total_batch_size={args.block_size * args.nproc}",
                f"--max_steps={args.steps}", f"--eval_interval={args.steps}", "--eval_iters=1",
                f"--data_parallel_type={dp_type}", f"--implementation={implementation}",
                "--checkpoint_interval=-1", f"--out_dir={out_dir}"]
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        sys.exit(f"{dp_type}/{implementation} failed:\n{out.stderr[-3000:]}")
    lines = [m.group(0) for m in STEP_LINE.finditer(out.stdout)]
    mems = [float(m.group("mem")) for line in lines if (m := MEM.search(line))]
    return {"layout": f"{dp_type} {implementation}", "mem_GiB": max(mems),
            "rss_GiB": max(float(STEP_LINE.match(line).group("rss")) for line in lines)}


def main():
    p = parser("memory", __doc__.splitlines()[0])
    p.set_defaults(steps=3)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dataset", default="shakespeare")
    p.add_argument("--data_dir", default="", help="the prepared --dataset (default: data/DATASET)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--block_size", type=int, default=256)
    args = p.parse_args()
    rows = [run_layout(args, *layout) for layout in LAYOUTS]
    for row in rows:
        row["mem_vs_ddp"] = row["mem_GiB"] / rows[0]["mem_GiB"]
    print_table(rows, f"{args.model}, {args.nproc} ranks, CPU, 1 x {args.block_size} tokens a rank "
                      f"per step, max over the measured steps of {args.steps}")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
