"""The first run on GPUs as a checklist: `make gpu-check` (one GPU or several).

    make gpu-check PYTHON=python3          # a GPU machine whose python3 has torch: nothing installed
    python bench/gpu_check.py --device cpu # the dry run: every check that can run on a CPU

One line per check, PASS, FAIL or SKIP (and why), then the figures. Exit status 1 when
anything failed, or when nothing was compared. About 6 minutes on one H100.

    numerics  the tiny model in float64, 3 steps on the GPU and on the CPU: the same losses
              to 1e-12 (only the kernels' summation order differs)
    kernels   ring attention (one rank: both chunks, the diagonal) and a MoE layer in bf16
              under autocast, forward and backward, against the same in fp32
    paths     each hand-written strategy's code on the device, as rank 0 of 2 or 4 over
              torch's fake process group (collectives return at once: it runs every local
              op of the strategy on CUDA tensors, bf16 included; values are not compared)
    layouts   with 2+ GPUs: each layout that fits trains the tiny model over NCCL against
              one process on the same batches (fp32, TF32 off; and bf16)
    speed     gpt2 (124M) bf16 on one GPU, eager and --compile: ms/step, tokens/s, MFU
    memory    the peak memory train.py logs for gpt2, without and with activation
              checkpointing (full, selective), and the loss in chunks, inside the
              planner's predicted band
    matmuls   the planner's matmul shapes timed with CUDA events, against the data sheet's
              assumption; written as a calibrated GPU profile (--profile_out)
"""
import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ["torch", "numpy", "tiktoken", "tqdm", "tensorboard", "safetensors"]
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing:  # before anything imports them
    sys.exit(f"error: {sys.executable} lacks {', '.join(missing)}; install them into it "
             f"(offline: pip install --no-index --find-links <wheels> {' '.join(missing)})")
sys.path.insert(0, str(REPO))
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # the children's

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanodist import compat  # noqa: E402

if tuple(map(int, re.match(r"(\d+)\.(\d+)", torch.__version__).groups())) < \
        tuple(map(int, compat.MINIMUM_TORCH.split("."))):  # a pre-release 2.11.0a0 counts as 2.11
    sys.exit(f"error: torch {torch.__version__} is older than {compat.MINIMUM_TORCH}, the oldest "
             f"nanodist supports")

from nanodist.planner import plan  # noqa: E402

from nanodist.run import preflight
from nanodist.run.config import parse_args, resolve  # noqa: E402
from nanodist.errors import UserError  # noqa: E402
from nanodist.planner.hardware import GPUS, DataSheet  # noqa: E402
from nanodist.model.moe import MoE  # noqa: E402
from nanodist.model.gpt import GPTConfig, model_config  # noqa: E402
from nanodist.parallel.comm import Comm  # noqa: E402
from nanodist.parallel.ring_attention import RingAttention  # noqa: E402
from nanodist_tools.layouts import GPU_CHECK, LAYOUTS, MOE, select  # noqa: E402
from nanodist_tools.processes import as_rank_of, on_processes  # noqa: E402
from nanodist.parallel.rules import check_layout

CHECKS = ["numerics", "kernels", "paths", "layouts", "speed", "memory", "matmuls"]
BF16_LAYOUTS = ["ddp2", "fsdp2", "tp2-sp-lp", "cp2", "pp2-1f1b"]  # the layouts check's bf16 runs
# the paths check: one of each strategy (their code, on the device, as rank 0); --layouts picks too
PATHS = ["ddp2", "zero1-2", "fsdp2", "tp2-sp-lp", "cp2", "pp2-1f1b", "fsdp2-ep2"]
STEPS, MICRO_BATCH, BLOCK = 4, 2, 32
# every layout trains on the same global batch: 8 micro-batches (8 DP ranks at most)
TINY = ["--model=tiny", "--dataset=shakespeare_char", f"--block_size={BLOCK}",
        f"--batch_size={MICRO_BATCH}", f"--total_batch_size={8 * MICRO_BATCH * BLOCK}",
        f"--max_steps={STEPS}", "--warmup_steps=1", "--learning_rate=1e-3", "--deferred_init",
        "--gradient_clipping", "--eval_interval=1000", "--eval_iters=1", "--checkpoint_interval=-1"]
# fp32 losses (~4) printed to 4 decimals: rounding (5e-5 each side) + float-order noise.
# bf16: 8 significant bits; two layouts that sum in other orders may round a ~4 loss's
# terms apart by one bf16 step of it, 2^-8 x 4 = 0.016 (CPU dry run: 1e-3 at most).
LOSS_TOLERANCE = {"float32": 2e-4, "bfloat16": 2e-2}
# float64 on two devices: the same arithmetic, other summation orders (blocked matmuls,
# vectorised reductions): ~1e-16 relative per sum, a few hundred sums deep, losses ~4.
FLOAT64_TOLERANCE = 1e-12
# gpt2 124M on one GPU, 16 x 1024 tokens: tuned GPT-2 training is reported at 30-50% MFU
# (nanoGPT, llm.c); the floors catch a run off by 2x or more (syncs, fp32 where bf16 was meant)
MFU_FLOOR = {"eager": 15.0, "compile": 20.0}
GPT2 = ["--model=gpt2", "--dataset=shakespeare", "--dtype=bfloat16", "--block_size=1024",
        "--eval_interval=1000", "--eval_iters=1", "--checkpoint_interval=-1", "--warmup_steps=2"]


DEADLINE = [float("inf")]  # time.monotonic() at which the whole check must end (--budget_s)


def left(cap: float) -> float:
    """Seconds a run may take: `cap`, or what is left of the budget; none left: TimeoutError."""
    remaining = DEADLINE[0] - time.monotonic()
    if remaining < 10:
        raise TimeoutError("out of the check's time budget (--budget_s)")
    return min(cap, remaining)


def need(data: dict, key: str) -> str:
    """The prepared data directory `key`, or the reason it could not be prepared."""
    if isinstance(data[key], Exception):
        raise RuntimeError(f"no data: {data[key]}")
    return data[key]


class Report:
    """PASS / FAIL / SKIP lines as they come, and the figures for --json."""

    def __init__(self):
        self.lines, self.figures = [], {}

    def add(self, status: str, check: str, detail: str, **figures):
        self.lines.append((status, check))
        self.figures.setdefault(check, []).append({"status": status, "detail": detail, **figures})
        print(f"{status} {check}: {detail}", flush=True)

    def compared(self) -> int:
        return sum(status == "PASS" for status, _ in self.lines)

    def failed(self) -> int:
        return sum(status == "FAIL" for status, _ in self.lines)


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300) -> str:
    """train.py's stdout; RuntimeError with its error line when it fails (TimeoutError past
    `timeout` or the budget)."""
    timeout = left(timeout)
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    done = subprocess.run(launcher + [str(REPO / "train.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **ENV, "OMP_NUM_THREADS": "1", **(env or {})})
    if done.returncode:  # train.py's one line ("error: ..."), else the last exception's
        lines = [re.sub(r"^\[(default)?rank\d+\]:", "", line).strip()  # torchrun's prefix
                 for line in done.stderr.splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("error:")] or [
            line for line in lines if re.match(r"([\w.]+\.)?\w+(Error|Exception):", line)
            and "ChildFailedError" not in line]  # torchrun's summary names no cause
        last = [line for line in lines if line.strip("=-")]
        raise RuntimeError(f"exit {done.returncode}: " + (said[0] if said else last[-1] if last else "no output"))
    return done.stdout


def logged(stdout: str, field: str) -> list[float]:
    """The values of one field of train.py's step lines ('loss', 'ms', 'MFU', 'mem')."""
    pattern = {"loss": r"\| loss (\S+)", "ms": r"\| (\d+) ms", "MFU": r"\| MFU (\S+)%",
               "mem": r"\| mem (\S+) GiB", "tok/s": r"\| ([\d,]+) tok/s"}[field]
    return [float(x.replace(",", "")) for x in re.findall(pattern, stdout)]


def run_check(report: Report, check: str, fn):
    """Run one check; an exception becomes its FAIL line (with the traceback's last lines)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - every failure is the check's FAIL line
        tail = traceback.format_exc().strip().splitlines()[-3:]
        report.add("FAIL", check, f"{type(error).__name__}: {error}".splitlines()[0]
                   + "\n    " + "\n    ".join(tail))


# ---- the checks ----

def check_numerics(report: Report, device: str, data: dict, runs: str):
    if device == "cpu":
        return report.add("SKIP", "numerics", "CPU against CPU compares nothing")
    from nanodist.run.trainer import Trainer
    losses = {}
    for where in (device, "cpu"):
        argv = TINY + [f"--device={where}", "--dtype=float64", "--max_steps=3", f"--data_dir={need(data, 'char')}",
                       f"--out_dir={tempfile.mkdtemp(dir=runs)}"]
        losses[where] = [r["loss"] for r in Trainer(parse_args(argv)).train()]
    worst = max(abs(a - b) for a, b in zip(losses[device], losses["cpu"]))
    report.add("PASS" if worst <= FLOAT64_TOLERANCE else "FAIL", "numerics",
               f"tiny model float64, 3 steps: max |loss({device}) - loss(cpu)| = {worst:.1e} "
               f"(bound {FLOAT64_TOLERANCE:g}); losses {losses[device]}", worst=worst)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def check_kernels(report: Report, device: str):
    """bf16 under autocast against fp32, forward and backward, on `device`."""
    torch.manual_seed(0)
    B, H, T, D = 4, 12, 1024, 64
    q, k, v, probe = (torch.randn(B, H, T, D, device=device).bfloat16() for _ in range(4))
    full = [t.float().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*full, is_causal=True)
    reference.backward(probe.float())
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = RingAttention(Comm().group())(*local)  # a group of one: the ring's local math
    out.backward(probe)
    flash = [t.clone().requires_grad_() for t in (q, k, v)]  # PyTorch's own bf16 attention
    F.scaled_dot_product_attention(*flash, is_causal=True).backward(probe)
    ring = [_relative(out, reference)] + [_relative(t.grad, r.grad) for t, r in zip(local, full)]
    sdpa = [_relative(F.scaled_dot_product_attention(*flash, is_causal=True), reference)] + \
        [_relative(t.grad, r.grad) for t, r in zip(flash, full)]
    dtypes = {out.dtype, *(t.grad.dtype for t in local)}
    # the same roundings as PyTorch's bf16 kernel, over other tiles (tests/test_context_parallel.py)
    ok = dtypes == {torch.bfloat16} and all(r <= 2.5 * f for r, f in zip(ring, sdpa))
    report.add("PASS" if ok else "FAIL", "kernels", f"ring attention bf16 {B}x{H}x{T}x{D} vs fp32: out, "
               f"dq, dk, dv {', '.join(f'{e:.1e}' for e in ring)} of the largest entry; PyTorch's bf16 "
               f"SDPA {', '.join(f'{e:.1e}' for e in sdpa)} (bound 2.5x); dtypes "
               f"{sorted(str(d) for d in dtypes)}", ring=ring, sdpa=sdpa)

    config = model_config("tiny", 64, 65)
    config = replace(config, moe_experts=4, moe_top_k=2)
    moe = MoE(config).to(device)
    torch.nn.init.normal_(moe.router.weight, std=1.0)  # decisive routing: bf16 does not flip it
    for p in (moe.experts.fc_weight, moe.experts.proj_weight):
        torch.nn.init.normal_(p, std=0.02)
    for p in (moe.experts.fc_bias, moe.experts.proj_bias):
        torch.nn.init.zeros_(p)
    x = torch.randn(8, 64, config.n_embd, device=device)
    results = {}
    for dtype in ("float32", "bfloat16"):
        moe.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            routed = moe.route(x.view(-1, config.n_embd))[1]
            y = moe(x)
        y.float().square().mean().backward()
        results[dtype] = (routed, y, moe.experts.fc_weight.grad.clone(), moe.router.weight.grad.clone())
    (e32, y32, g32, r32), (e16, y16, g16, r16) = results["float32"], results["bfloat16"]
    # a token whose 2nd and 3rd router logits lie within bf16's rounding goes elsewhere (~0.5%
    # of them): the outputs are compared where both chose the same experts, the gradients
    # (sums over every token) by their relative norm
    same = (e32 == e16).all(-1)
    norm_error = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    errors = [norm_error(y16.view(-1, config.n_embd)[same], y32.view(-1, config.n_embd)[same]),
              norm_error(g16, g32), norm_error(r16, r32)]
    # the router's gradient is mostly what the flipped tokens' gates contribute: shown, not bounded
    ok = y16.dtype == torch.bfloat16 and all(torch.isfinite(t).all() for t in (y16, g16, r16)) \
        and max(errors[:2]) < 0.03 and same.float().mean() > 0.95
    # bound: each value passes <= 8 bf16 roundings (2^-9 each, half of bf16's last bit) on its
    # way: 0.016 relative if they all added up; the gradients' longer chain: 0.03 for both
    report.add("PASS" if ok else "FAIL", "kernels", f"MoE layer (4 experts, top 2) bf16 vs fp32, "
               f"relative norm: out {errors[0]:.1e} (the {same.float().mean():.1%} of tokens routed "
               f"alike), the experts' gradient {errors[1]:.1e} (bound 0.03); the router's "
               f"{errors[2]:.1e}", errors=errors)


def _steps_as_rank0(jobs: list) -> list[dict]:
    """For each (world, argv): rank 0 of that world over the fake group, one training step:
    its loss and its counted collectives, or its error. One process for all (a process
    start with CUDA costs seconds), the group made anew for each world."""
    import torch.distributed as dist
    from contextlib import redirect_stdout
    from nanodist.run.trainer import Trainer
    from nanodist_tools.simulate import PlayedRank
    results = []
    for world, argv in jobs:
        dist.destroy_process_group()
        dist.init_process_group("fake", store=compat.FakeStore(), rank=0, world_size=world)
        try:
            with redirect_stdout(open(os.devnull, "w")):
                trainer = Trainer(parse_args(argv), comm=Comm(PlayedRank()))
                loss = trainer.train_step(0)["loss"]
            results.append({"loss": loss, "counted": trainer.comm.counter.summary()})
        except Exception as error:  # noqa: BLE001 - the layout's FAIL line
            results.append({"error": f"{type(error).__name__}: {error}".splitlines()[0]})
    return results


def check_paths(report: Report, device: str, data: dict, runs: str, names: list[str]):
    jobs, labels = [], []
    for name in [n for n in PATHS if n in names]:
        layout = LAYOUTS[name]
        for dtype in ("float32", "bfloat16"):
            argv = TINY + [f"--device={device}", f"--dtype={dtype}", f"--data_dir={need(data, 'char')}",
                           "--max_steps=1", f"--out_dir={tempfile.mkdtemp(dir=runs)}", *layout.flags()]
            jobs.append((layout.world, argv + (MOE if layout.ep > 1 else [])))
            labels.append(f"{name} custom {dtype} on {device} (rank 0 of {layout.world}, fake group)")
    for label, got in zip(labels, as_rank_of(1, 0, _steps_as_rank0, jobs, timeout=left(240)) if jobs else []):
        if "error" in got:
            report.add("FAIL", "paths", f"{label}: {got['error']}")
            continue
        kinds = ", ".join(f"{kind} x{v['calls']}" for kind, v in got["counted"].items())
        ok = got["loss"] == got["loss"]  # not NaN
        report.add("PASS" if ok else "FAIL", "paths", f"{label}: one step ran; {kinds}")


def check_layouts(report: Report, device: str, data: dict, runs: str, names: list[str]):
    gpus = torch.cuda.device_count() if device == "cuda" else 8
    fit = [n for n in names if LAYOUTS[n].world <= gpus]
    if not fit:
        return report.add("SKIP", "layouts", f"every layout needs 2+ processes, one per GPU; "
                          f"{gpus} GPU here (the paths check ran their code on this one)")
    if len(fit) < len(names):
        report.add("SKIP", "layouts", f"more processes than the {gpus} GPUs: "
                   + ", ".join(n for n in names if n not in fit))
    env = {"NVIDIA_TF32_OVERRIDE": "0"}  # fp32: only the order of the float sums differs
    train = lambda flags, n: logged(run_train(TINY + [f"--device={device}", f"--data_dir={need(data, 'char')}",
                                                      f"--out_dir={tempfile.mkdtemp(dir=runs)}", *flags],
                                              n, env), "loss")
    for dtype in ("float32", "bfloat16"):
        chosen = fit if dtype == "float32" else [n for n in fit if n in BF16_LAYOUTS]
        references = {}
        for name in chosen:
            layout, moe = LAYOUTS[name], LAYOUTS[name].ep > 1
            model = MOE if moe else []
            key, impl = "MoE" if moe else "dense", "one process"
            try:
                if key not in references:
                    references[key] = train(model + [f"--dtype={dtype}"], 1)
                for impl in ("custom",) if moe else ("custom", "pytorch"):
                    variant = replace(layout, implementation=impl)
                    try:  # what train.py refuses here (PyTorch's CP off CUDA, its PP x TP)
                        check_layout(variant, layout.world, device, BLOCK)
                    except UserError as refused:
                        report.add("SKIP", "layouts", f"{name} {impl} {dtype}: {refused}")
                        continue
                    got = train(variant.flags() + model + [f"--dtype={dtype}"], layout.world)
                    worst = max(abs(a - b) for a, b in zip(got, references[key])) if len(got) == STEPS else None
                    ok = worst is not None and worst <= LOSS_TOLERANCE[dtype]
                    report.add("PASS" if ok else "FAIL", "layouts",
                               f"{name} {impl} {dtype} ({layout.world} processes): " +
                               (f"max |loss - one process| {worst:.1e} (bound {LOSS_TOLERANCE[dtype]:g})"
                                if worst is not None else f"losses {got}"))
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
                report.add("FAIL", "layouts", f"{name} {impl} {dtype}: {error}")


def check_speed(report: Report, device: str, data: dict, runs: str, steps: int):
    if device == "cpu":
        return report.add("SKIP", "speed", "gpt2 bf16 on a CPU measures nothing of a GPU")
    figures = {}
    for mode, extra, n in (("eager", [], steps), ("compile", ["--compile"], 2 * steps)):
        try:
            out = run_train(GPT2 + [f"--device={device}", "--batch_size=16", "--total_batch_size=16384",
                                    f"--max_steps={n}", f"--data_dir={need(data, 'bpe')}",
                                    f"--out_dir={tempfile.mkdtemp(dir=runs)}", *extra], timeout=240)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
            report.add("FAIL", "speed", f"gpt2 bf16 {mode}: {error}")
            continue
        half = lambda xs: statistics.median(xs[len(xs) // 2:]) if xs else None  # warm-up, compilation out
        figures[mode] = {"ms": half(logged(out, "ms")), "tokens_per_s": half(logged(out, "tok/s")),
                         "mfu": half(logged(out, "MFU")), "mem_gib": half(logged(out, "mem"))}
        f = figures[mode]
        floor = MFU_FLOOR[mode]
        report.add("PASS" if f["mfu"] and f["mfu"] >= floor else "FAIL", "speed",
                   f"gpt2 bf16 {mode} on {torch.cuda.get_device_name()}, 16 x 1024 tokens/step: "
                   f"{f['ms']:.0f} ms/step, {f['tokens_per_s']:,.0f} tokens/s, "
                   + (f"MFU {f['mfu']:.1f}% of the dense bf16 peak (floor {floor:g}%)" if f["mfu"]
                      else "no MFU (unknown GPU)")
                   + f", peak {f['mem_gib']} GiB", **f)
    if len(figures) == 2:
        ratio = figures["eager"]["ms"] / figures["compile"]["ms"]
        report.add("PASS" if ratio > 1 else "FAIL", "speed", f"--compile is {ratio:.2f}x eager's speed")


def _peak_of(argv: list[str]) -> dict:
    """measure.measure_run with one step's peak, its Trainer's lines left out."""
    from contextlib import redirect_stdout
    from nanodist_tools.measure import measure_run
    with redirect_stdout(open(os.devnull, "w")):
        return measure_run(argv, 0, True)


def check_memory(report: Report, device: str, data: dict, runs: str):
    """One step's peak of live tensor bytes (as train.py logs it, here in a fresh process)
    against the planner's band for the same run (plan.within_margin)."""
    # a GPU: gpt2 at 8 x 1024; a CPU (the dry run): the tiny model
    base = (GPT2 + ["--batch_size=8", "--total_batch_size=8192", f"--data_dir={need(data, 'bpe')}"]
            if device == "cuda" else TINY + [f"--data_dir={need(data, 'char')}"])
    for policy, chunks in (("none", 1), ("full", 1), ("selective", 1), ("none", 0)):
        argv = base + [f"--device={device}", f"--activation_checkpointing={policy}", f"--loss_chunks={chunks}",
                       "--max_steps=3", f"--out_dir={tempfile.mkdtemp(dir=runs)}"]
        got = on_processes(1, _peak_of, argv, timeout=left(150))[0]
        cfg, layout, micro_steps = resolve(parse_args(argv), 1, device)
        job = preflight.job(cfg, GPTConfig(**got["model"]), 1, torch.device(device))
        predicted = plan.peak_memory(job, layout, cfg.batch_size, micro_steps)
        low, high = plan.band(predicted)
        peak = got["peak"]
        ok = peak is not None and plan.within_margin(peak, predicted)
        report.add("PASS" if ok else "FAIL", "memory",
                   f"{cfg.model} {cfg.batch_size} x {cfg.block_size} {cfg.dtype}, activation checkpointing "
                   f"{policy}, loss {'whole' if chunks == 1 else 'in chunks'}: peak "
                   + (f"{peak / 2**30:.3f} GiB" if peak else "not measured")
                   + f", predicted {low / 2**30:.3f} .. {high / 2**30:.3f} GiB", peak=peak, low=low, high=high)


def check_matmuls(report: Report, device: str, profile_out: str | None):
    if device == "cpu":
        return report.add("SKIP", "matmuls", "the CPU's profile: python -m nanodist_tools.planner --calibrate")
    from nanodist_tools.calibrate import gpu_profile
    name = torch.cuda.get_device_name()
    gpu = next((key for key, spec in GPUS.items() if spec[0].lower() in name.lower()), None)
    sheet = DataSheet(gpu) if gpu else None
    profile = gpu_profile(device)
    if profile_out:
        profile.save(profile_out)
    figures = {}
    for dtype in ("bfloat16", "float32"):
        rates = sorted(f / s for f, s in profile.matmul[dtype]["1"])
        figures[dtype] = {"median_tflops": statistics.median(rates) / 1e12, "max_tflops": rates[-1] / 1e12,
                          "of_peak": statistics.median(rates) / sheet.peak_flops(dtype) if sheet else None}
    f = figures["bfloat16"]
    # the planner prices a large matmul at derate("matmul") x peak: held to its 1.5x band
    ratio = f["of_peak"] / sheet.derate("matmul") if sheet else None
    report.add("PASS" if ratio and 1 / 1.5 <= ratio <= 1.5 else "FAIL", "matmuls", f"{len(profile.matmul['bfloat16']['1'])} GPT-2 shapes, CUDA events: bf16 "
               f"median {f['median_tflops']:.0f}, best {f['max_tflops']:.0f} TFLOP/s"
               + (f" = {f['of_peak']:.0%} of the data sheet's peak, where the planner assumes "
                  f"{sheet.derate('matmul'):.0%}" if sheet else " (no data sheet for this GPU)")
               + f"; fp32 (TF32) median {figures['float32']['median_tflops']:.0f} TFLOP/s"
               + (f"; profile written to {profile_out} (rank with --profile)" if profile_out else ""),
               **figures)


# ---- data, from local files ----

def prepare(out: Path, dataset: str, text: Path | None, bpe_file: str | None) -> str | Exception:
    """data/<dataset> prepared into `out` from the local `text` (else the script downloads);
    the error, for the checks that need it to report, when that fails."""
    cmd = [sys.executable, str(REPO / "data" / dataset / "prepare.py"), "--out_dir", str(out)]
    cmd += ["--input", str(text)] if text else []
    cmd += ["--bpe_file", bpe_file] if bpe_file and dataset == "shakespeare" else []
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if done.returncode:
        return RuntimeError(f"preparing {dataset} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} "
                            f"(offline: --text input.txt, --bpe_file gpt2.tiktoken, or --data_dir)")
    return str(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"),
                   help="cuda (default: a machine whose torch sees no GPU fails), or cpu: the dry run")
    p.add_argument("--checks", nargs="*", choices=CHECKS, help="a subset (default: all)")
    p.add_argument("--layouts", nargs="*", help=f"a subset of the layouts (paths: {PATHS}; layouts: "
                                                f"{GPU_CHECK})")
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"),
                   help="tiny Shakespeare's input.txt (default: ../shared's copy; none: download)")
    p.add_argument("--bpe_file", default=os.environ.get("NANODIST_GPT2_BPE") or None,
                   help="GPT-2's gpt2.tiktoken for an offline machine (default: $NANODIST_GPT2_BPE)")
    p.add_argument("--data_dir", help="a prepared data/ (shakespeare_char/, shakespeare/): nothing prepared")
    p.add_argument("--speed_steps", type=int, default=12)
    p.add_argument("--profile_out", help="write the calibrated GPU profile here (JSON)")
    p.add_argument("--json", help="write every line and figure here")
    p.add_argument("--budget_s", type=float, help="the whole check's time limit in s (default: 480 on "
                                                  "a GPU, none for the dry run)")
    args = p.parse_args()
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget_s must be > 0 (got {args.budget_s:g})")
    if args.speed_steps < 4:
        p.error(f"--speed_steps must be >= 4: the median leaves out the first half (got {args.speed_steps})")
    for flag, path in (("--profile_out", args.profile_out), ("--json", args.json)):
        if path and (Path(path).is_dir() or not os.access(Path(path).absolute().parent, os.W_OK)):
            p.error(f"{flag} {path}: cannot write a file there; pick a writable path")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device cuda, but torch {torch.__version__} sees no GPU "
                 f"(torch.version.cuda = {torch.version.cuda}); check the driver, or --device cpu")
    try:
        layouts = select(args.layouts, GPU_CHECK)
    except ValueError as error:
        p.error(f"--layouts: {error}")
    checks = args.checks or CHECKS
    text = Path(args.text) if args.text and Path(args.text).is_file() else None
    report = Report()
    started = time.perf_counter()
    DEADLINE[0] = time.monotonic() + (args.budget_s or (480 if device == "cuda" else float("inf")))
    print(f"nanodist gpu-check: torch {torch.__version__}, "
          + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device == "cuda" else "CPU (dry run)"),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as runs:  # run directories: thrown away
        if args.data_dir:
            data = {"char": str(Path(args.data_dir, "shakespeare_char")), "bpe": str(Path(args.data_dir, "shakespeare"))}
        else:
            data = {"char": prepare(Path(runs, "char"), "shakespeare_char", text, None)}
            if device == "cuda" and {"speed", "memory"} & set(checks):
                data["bpe"] = prepare(Path(runs, "bpe"), "shakespeare", text, args.bpe_file)
        steps = {"numerics": lambda: check_numerics(report, device, data, runs),
                 "kernels": lambda: check_kernels(report, device),
                 "paths": lambda: check_paths(report, device, data, runs, layouts),
                 "layouts": lambda: check_layouts(report, device, data, runs, layouts),
                 "speed": lambda: check_speed(report, device, data, runs, args.speed_steps),
                 "memory": lambda: check_memory(report, device, data, runs),
                 "matmuls": lambda: check_matmuls(report, device, args.profile_out)}
        for check in checks:
            run_check(report, check, steps[check])
    compared, failed = report.compared(), report.failed()
    verdict = ("FAIL" if failed else "FAIL" if not compared else "PASS")
    print(f"{verdict}: {compared} passed, {failed} failed, "
          f"{sum(s == 'SKIP' for s, _ in report.lines)} skipped in {time.perf_counter() - started:.0f} s"
          + ("; nothing was compared" if not compared else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report.figures, indent=1, default=str))
    sys.exit(1 if failed or not compared else 0)


if __name__ == "__main__":
    main()
