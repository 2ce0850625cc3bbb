"""The first run on GPUs as a checklist: `make gpu-check` (on 1, 2, 4 or 8 GPUs).

    python bench/gpu_check.py                             # every layout that fits, then MFU
    python bench/gpu_check.py --device cpu --layouts ddp2 # the correctness part on CPU

1. Correctness over NCCL: each layout of GPU_CHECK (nanodist_tools/layouts.py) that fits
   the GPU count trains the tiny model for a few steps, custom and pytorch, as users
   launch it (torchrun + train.py), against one process on the same global batches:
   PASS when every logged loss matches. fp32 with TF32 off (NVIDIA_TF32_OVERRIDE=0), so
   only the order of float sums differs. Expert-parallel layouts train the MoE model
   (layouts.MOE) against one process of it, custom only (EP has no PyTorch version).
2. MFU (CUDA only): GPT-2 small on one GPU, bf16, --compile; the median MFU of the
   last steps against the 45% target.
Exit status 1 when anything fails.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from nanodist_tools.layouts import GPU_CHECK, LAYOUTS, MOE, select
from run import layouts_that_fit, prepare_data

REPO = Path(__file__).resolve().parents[1]
STEPS, MICRO_BATCH, BLOCK = 4, 2, 32
# every layout trains on the same global batch: 8 micro-batches (8 DP ranks at most)
TRAIN = ["--model=tiny", "--dataset=shakespeare_char", f"--block_size={BLOCK}",
         f"--batch_size={MICRO_BATCH}", f"--total_batch_size={8 * MICRO_BATCH * BLOCK}",
         f"--max_steps={STEPS}", "--warmup_steps=1", "--learning_rate=1e-3", "--deferred_init",
         "--gradient_clipping", "--eval_interval=1000", "--eval_iters=1", "--checkpoint_interval=-1"]
# fp32 losses (~4) printed to 4 decimals: rounding (5e-5 each side) + float-order noise
LOSS_TOLERANCE = 2e-4
MFU_TARGET = 0.45


def train(args: list[str], nproc: int, env: dict | None = None) -> str:
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"])
    done = subprocess.run(launcher + [str(REPO / "train.py"), *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return done.stdout


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| loss (\S+)", stdout)]


def check_layouts(names: list[str], device: str, data_dir: str, runs: str) -> bool:
    env = {"NVIDIA_TF32_OVERRIDE": "0", "OMP_NUM_THREADS": "1"}
    run = lambda name, flags, n: losses(train(
        TRAIN + [f"--device={device}", f"--data_dir={data_dir}",
                 f"--out_dir={tempfile.mkdtemp(prefix=f'{name}-', dir=runs)}", *flags], n, env))
    references = {}
    for model, flags in (("dense", []), ("MoE", MOE)):
        if model == "dense" or any(LAYOUTS[name].ep > 1 for name in names):
            try:
                references[model] = run("single", flags, 1)
            except RuntimeError as error:
                print(f"FAIL one process of the {model} model (the reference): {error}")
                return False
            print(f"one process, {model} model: losses {references[model]}")
    ok = True
    for name in names:
        layout = LAYOUTS[name]
        moe = layout.ep > 1
        reference = references["MoE" if moe else "dense"]
        for impl in ("custom",) if moe else ("custom", "pytorch"):
            try:
                got = run(name, replace(layout, implementation=impl).flags() + (MOE if moe else []),
                          layout.world)
                worst = max(abs(a - b) for a, b in zip(got, reference)) if len(got) == STEPS else None
                passed = worst is not None and worst <= LOSS_TOLERANCE
                detail = f"max |loss - one process| {worst:.1e}" if worst is not None else f"losses {got}"
            except RuntimeError as error:
                passed, detail = False, str(error)
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {name} {impl} ({layout.world} processes): "
                  f"{detail}", flush=True)
    return ok


def check_mfu(steps: int, runs: str) -> bool:
    bpe_dir = REPO / "data" / "shakespeare"
    if not (bpe_dir / "train.bin").exists():
        subprocess.run([sys.executable, str(bpe_dir / "prepare.py")], check=True)
    out = train(["--model=gpt2", "--dataset=shakespeare", "--dtype=bfloat16", "--compile",
                 "--batch_size=16", "--block_size=1024", "--total_batch_size=16384",
                 f"--max_steps={steps}", "--eval_interval=1000", "--eval_iters=1",
                 "--checkpoint_interval=-1",
                 f"--out_dir={runs}/mfu"], 1)
    mfus = [float(x) / 100 for x in re.findall(r"\| MFU (\S+)%", out)]
    if not mfus:
        print(f"FAIL mfu: no MFU logged (unknown GPU: {torch.cuda.get_device_name()}?)")
        return False
    mfu = statistics.median(mfus[len(mfus) // 2:])  # compilation and warm-up left out
    passed = mfu >= MFU_TARGET
    print(f"{'PASS' if passed else 'FAIL'} mfu: gpt2 bf16 --compile on {torch.cuda.get_device_name()}: "
          f"{mfu:.1%} (target {MFU_TARGET:.0%})")
    return passed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--layouts", nargs="*", help=f"subset of {GPU_CHECK}")
    p.add_argument("--data_dir", help="prepared shakespeare_char (default: prepare one)")
    p.add_argument("--mfu_steps", type=int, default=30)
    args = p.parse_args()
    try:
        names = select(args.layouts, GPU_CHECK)
    except ValueError as error:
        p.error(f"--layouts: {error}")
    names, skipped = layouts_that_fit(names, args.device)
    if skipped:
        print(f"skipped (more processes than the {torch.cuda.device_count()} GPUs): "
              + ", ".join(skipped))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as runs:  # run directories: thrown away
        ok = check_layouts(names, args.device, prepare_data(args.data_dir), runs)
        if args.device != "cpu" and torch.cuda.is_available():
            ok &= check_mfu(args.mfu_steps, runs)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
