"""`python -m nanodist_tools.planner --calibrate --out PROFILE`: this machine, measured into
a profile (nanodist/planner/hardware.py `Profile`) for the planner's step-time model.

    matmul       FLOP/s of (m x k) @ (k x n) against its FLOPs, float32 and bfloat16, on
                 1, 2 and 4 processes at once (they share the cores as training does)
    framework    the tiny model's training step on one process at two micro-step counts
                 and two micro-batches: what is not matmul is the time per layer and
                 micro-step (autograd, element-wise ops, Python) and per optimizer step
    collectives  all-reduce, all-gather, reduce-scatter, broadcast and point-to-point
                 sends (a batch of one to each ring neighbour, as the pipeline and ring
                 attention send) against their payload, 4 B to 16 MiB, on groups of 2 of
                 2 processes, 2 of 4 (two groups at once) and 4 of 4, each after a burst
                 of compute as the strategies issue them (the cores' real contention)

Each figure is a median; a run takes about two minutes on 2 cores.

On a GPU (`--calibrate --device cuda`, `gpu_profile`): the matmuls of GPT-2's shapes
(gpt2 to gpt2-xl widths, the vocabulary head, 2k to 16k tokens) timed with CUDA events,
bf16 and fp32 (as TF32, train.py's setting), one process per GPU; a streaming copy's
memory bandwidth and the host's time to launch an op. One GPU measures no collective:
those of the profile are the data sheet's (bandwidth and latency), or, for a GPU without
one, H100's.
"""
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanodist.data.loader import write_meta, write_split
from nanodist.planner.hardware import DTYPES, GPUS, KINDS, DataSheet, Profile
from nanodist.run.metrics import enable_tf32
from nanodist.parallel.comm import Comm
from nanodist.parallel.layout import Layout
from nanodist.planner.search import Job
from nanodist.planner.step_time import compute_s
from nanodist_tools.processes import on_processes

SHAPES = [(m, k, k) for m in (64, 256, 1024) for k in (64, 128, 256, 512, 1024)]
PAYLOADS = [4 * 16**i for i in range(7)]  # 4 B .. 16 MiB
GROUPS = [(2, 2), (2, 4), (4, 4)]         # (group size, processes)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def synthetic_dataset(out_dir, vocab: int = 65, tokens: int = 100_000, seed: int = 0) -> str:
    """Random token ids in the prepared-data format (what is measured does not depend on
    which tokens): train.bin, val.bin and a character tokenizer's meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {f"{split}_tokens": write_split(out, split, rng.integers(0, vocab, tokens))
              for split in ("train", "val")}
    write_meta(out, vocab_size=vocab, tokenizer="char", itos=[chr(32 + i) for i in range(vocab)], **counts)
    return str(out)


def _median_s(fn, repeats: int, between=None) -> float:
    """The median time of `fn` over `repeats` calls (after one untimed); `between` runs
    untimed before each call."""
    fn()
    times = []
    for _ in range(repeats):
        if between is not None:
            between()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_rank(dtype: str) -> list:
    """Rank side: (FLOPs, seconds per call) of each shape, all ranks at once: a run of
    calls from one barrier to its end, so processes beyond the cores share them as in
    training (a single call's time would hide that they take turns)."""
    torch.set_num_threads(1)
    out = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
        repeats = max(3, int(2e8 / (m * k * n)))
        a @ b
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        out.append((2 * m * k * n, (time.perf_counter() - start) / repeats))
    return out


def matmul_table(bar) -> dict:
    table = {}
    for dtype in DTYPES:
        bar.set_postfix_str(f"matmuls, {dtype}")
        table[dtype] = {"1": _matmul_rank(dtype)}
        bar.update()
        for procs in (2, 4):
            ranks = on_processes(procs, _matmul_rank, dtype)
            table[dtype][str(procs)] = [(f, statistics.median(r[i][1] for r in ranks))
                                        for i, (f, _) in enumerate(ranks[0])]
            bar.update()
    return table


def _collective_rank(group_size: int) -> dict:
    """Rank side: seconds per call of each kind and payload, in groups of `group_size`,
    each call after a burst of compute (a small layer's matmuls), as training issues
    them: back to back, gloo's threads stay awake and the peers in step, which hides
    half the latency a training step sees."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, world, group_size)]
    group = Comm().group(groups[rank // group_size])  # the strategies' own calls, as they make them
    me, n = group.rank, group_size
    out = {kind: [] for kind in KINDS}
    layer = torch.randn(256, 256)

    def between():
        for _ in range(4):
            layer @ layer

    for payload in PAYLOADS:
        numel = max(payload // 4 // n, 1)
        full, part = torch.ones(numel * n), torch.ones(numel)
        peer_in, peer_out = torch.empty(numel * n), torch.ones(numel * n)
        calls = {
            "all_reduce": lambda: group.all_reduce(full),
            "all_gather": lambda: group.all_gather(full, part),
            "reduce_scatter": lambda: group.reduce_scatter(part, full),
            "broadcast": lambda: group.broadcast(full),
            "send": lambda: group.send_recv([(peer_out, (me + 1) % n)], [(peer_in, (me - 1) % n)]),
        }
        repeats = 20 if payload < 2**20 else 5
        for kind, call in calls.items():
            dist.barrier()
            out[kind].append((numel * n * 4, _median_s(call, repeats, between)))
    return out


def collective_table(bar) -> dict:
    table = {kind: {} for kind in KINDS}
    for group, procs in GROUPS:
        bar.set_postfix_str(f"collectives, groups of {group} of {procs} processes")
        ranks = on_processes(procs, _collective_rank, group)
        bar.update()
        for kind in KINDS:
            table[kind][f"{group}x{procs}"] = [(p, statistics.median(r[kind][i][1] for r in ranks))
                                               for i, (p, _) in enumerate(ranks[0][kind])]
    return table


def _step_s(argv: list[str]) -> float:
    from nanodist.run.config import parse_args
    from nanodist.run.trainer import Trainer
    torch.set_num_threads(1)
    trainer = Trainer(parse_args(argv))
    trainer.train_step(0)
    times = []
    for step in range(1, 6):
        start = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def framework_overheads(matmul: dict, data_dir: str, bar) -> tuple[float, float]:
    """(per layer and micro-step, per optimizer step): the tiny model's step on one process
    at M = 1 and 4 micro-steps of B = 2 x 32 tokens, less its matmuls at this machine's
    rates (`matmul`: the step-time model's compute of a micro-step without framework).
    t(M) = per_step + M (layers (per_layer + layer's matmuls) + head's)."""
    from nanodist.model.gpt import model_config
    cfg = model_config("tiny", 32, 65)
    rate_table = Profile("calibrating", "cpu", 1, 1.0, matmul, 0.0, 0.0, {k: {} for k in KINDS})
    job = Job("tiny", cfg, 1, 1, 64, "float32", "cpu")
    per_micro_matmuls = compute_s(job, rate_table, Layout(), 2, 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--device=cpu", "--model=tiny", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
                "--block_size=32", "--batch_size=2", "--max_steps=100", "--warmup_steps=0",
                "--checkpoint_interval=-1"]
        bar.set_postfix_str("training steps")
        t1, t4 = (on_processes(1, _step_s, base + [f"--total_batch_size={64 * M}", f"--out_dir={tmp}/{M}"])[0]
                  for M in (1, 4))
        bar.update()
    per_micro = (t4 - t1) / 3
    return max(per_micro - per_micro_matmuls, 0.0) / cfg.n_layer, max(t1 - per_micro, 0.0)


def calibrate(data_dir: str | None = None) -> Profile:
    """Measure this machine (CPU processes over gloo) into a Profile."""
    runs = 3 * len(DTYPES) + 1 + len(GROUPS)  # matmuls on 1, 2, 4 processes; steps; collectives
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=runs, desc="calibrating", unit="run") as bar:
        data_dir = data_dir or synthetic_dataset(tmp)
        matmul = matmul_table(bar)
        per_layer, per_step = framework_overheads(matmul, data_dir, bar)
        collectives = collective_table(bar)
    return Profile(name=f"cpu ({cores()} cores)", device="cpu", cores=cores(),
                   memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, matmul=matmul,
                   per_layer_s=per_layer, per_step_s=per_step, collectives=collectives)


GPU_SHAPES = [(m, k, n) for m in (2048, 8192, 16384)
              for k, n in ((768, 2304), (768, 3072), (3072, 768), (768, 50304), (1600, 6400), (6400, 1600))]


def _gpu_seconds(fn, repeats: int) -> float:
    """The GPU's time of `repeats` calls of fn, between two CUDA events (the host only
    launches; the events time the GPU's own work)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _matmul_gpu(dtype: str, device: torch.device) -> list:
    """(FLOPs, seconds per call) of each GPU shape: enough calls for ~50 ms of work, so a
    small matmul is timed by the GPU, not by its launches."""
    out = []
    for m, k, n in GPU_SHAPES:
        a = torch.randn(m, k, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(k, n, device=device, dtype=getattr(torch, dtype))
        once = _gpu_seconds(lambda: a @ b, 3) / 3  # the warm-up, timed
        repeats = max(10, int(0.05 / max(once, 1e-6)))
        out.append((2 * m * k * n, _gpu_seconds(lambda: a @ b, repeats) / repeats))
    return out


def _memory_gb_s(device: torch.device) -> float:
    """A streaming copy's bandwidth: 256 MiB read and written, timed by the GPU."""
    a = torch.empty(2**26, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # the warm-up
    return 2 * a.numel() * 4 * 20 / _gpu_seconds(lambda: b.copy_(a), 20) / 1e9


def _host_op_s(device: torch.device) -> float:
    """The host's time to launch one small op (the GPU waits for it when kernels are short)."""
    x = torch.zeros(16, device=device)
    x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    seconds = (time.perf_counter() - start) / 1000
    torch.cuda.synchronize(device)
    return seconds


def gpu_profile(device="cuda") -> Profile:
    """This GPU's matmul rates, memory bandwidth and launch time; the collectives of its
    data sheet (see the module doc)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device)
    saved = torch.get_float32_matmul_precision()
    enable_tf32(device, "float32")  # fp32 as train.py runs it: TF32 (unless NVIDIA_TF32_OVERRIDE=0)
    try:
        matmul = {dtype: {"1": _matmul_gpu(dtype, device)} for dtype in DTYPES}
    finally:
        torch.set_float32_matmul_precision(saved)
    gpu = next((key for key, spec in GPUS.items() if spec[0].lower() in name.lower()), "h100")
    sheet = DataSheet(gpu)
    collectives = {kind: {f"{g}x{g}": [(p, sheet.collective_s(kind, p, g, "intra_node", g))
                                        for p in (4 * 16**i for i in range(9))] for g in (2, 4, 8)}
                   for kind in KINDS}
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    return Profile(name=f"{name} (calibrated; collectives: {GPUS[gpu][0]} data sheet)", device="cuda",
                   cores=torch.cuda.device_count(), memory_gib=memory, matmul=matmul,
                   per_layer_s=0.0, per_step_s=0.0, collectives=collectives, overlaps=True,
                   memory_gb_s=_memory_gb_s(device), host_op_s=_host_op_s(device),
                   attention_share=sheet.derate("attention") / sheet.derate("matmul"))
