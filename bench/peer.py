"""nanodist against nanoGPT's training step, in one run: one process, and DDP on 2 processes.

    python bench/peer.py                          # gpt2 (124M), batch 4 x 256, fp32, on the CPU
    python bench/peer.py --modes one --steps 20   # one process only, 20 rounds
    python bench/peer.py --model tiny --block_size 32 --batch_size 2 --steps 2 --warmup 1  # smoke
    python bench/peer.py --nanogpt ~/src/nanoGPT  # nanoGPT's own model.py as the reference
    python bench/peer.py --profile --steps 4      # where each job's step time goes

The reference is nanoGPT's train.py step, written out below from its recipe (nothing is
fetched): GPT-2 as its model.py builds it (biases, vocabulary 50304, lm_head tied to wte,
flash SDPA; the tanh GELU of GPT-2 and nanodist, where nanoGPT has the exact one),
AdamW with its weight decay
groups (>= 2-D) and its choice of kernel (fused on CUDA only: on the CPU torch's default),
its batches (random starts in a memmap reopened per batch, the next batch read during
the step), clipping to 1.0, `loss.item()`; on 2 processes its model in PyTorch's
DistributedDataParallel. `--nanogpt DIR` takes GPT, GPTConfig and configure_optimizers
from DIR/model.py instead. nanodist runs its Trainer's loop, what train.py runs (data,
forward and backward, clipping, AdamW, the host read, TensorBoard logging; no evaluation
or checkpoint in the timed steps), on the same model, data and batch: --gradient_clipping,
and on 2 processes --data_parallel_size 2 (its hand-written DDP).

Each job runs in processes of its own, started here (nothing process-wide is shared:
thread pools, allocator settings): one process with --threads threads, or 2 ranks (gloo)
with one thread each. The jobs take turns, one step each per round, the order flipping
every round (bench/common.py); the first --warmup rounds are dropped, --steps are timed.
The ratio of a round is reference step time / nanodist step time (> 1: nanodist is
faster); the table gives its median over the rounds, its spread, and the same ratio of
the jobs' CPU time (less disturbed by other work on the machine). Writes JSON (--out)
and a Markdown table (--markdown). --profile instead runs the steps under torch.profiler
and prints where each job's step time goes (`Phases`).
"""
import importlib.util
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, record_function

from common import markdown_table, median, paired_speedup, parser, print_table, time_interleaved, write_json
from nanodist.model.gpt import model_config
from nanodist.run.config import parse_args
from nanodist.run.profiling import quiet_profile
from nanodist.run.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "bench"
SHARED = REPO.parent / "shared" / "data"
JOBS = ("reference", "nanodist")
MODES = {"one": 1, "ddp": 2}  # mode -> processes per job


# ---- the reference: nanoGPT's model.py and train.py step, as its recipe has them ----

@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():  # N(0, 0.02), residual projections scaled, biases 0
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets):
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra = dict(fused=True) if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def nanogpt_model(directory: str | None):
    """(GPT, GPTConfig): nanoGPT's, from DIR/model.py, or the ones above."""
    if not directory:
        return GPT, GPTConfig
    path = Path(directory, "model.py")
    if not path.is_file():
        sys.exit(f"--nanogpt {directory}: no model.py there; give the directory of a nanoGPT checkout")
    # by its path (a bare `import model` could find another module of that name first)
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    if not all(hasattr(model, name) for name in ("GPT", "GPTConfig")):
        sys.exit(f"--nanogpt {directory}: its model.py has no GPT and GPTConfig; is it nanoGPT's?")
    return model.GPT, model.GPTConfig


class Reference:
    """nanoGPT's train.py, one optimizer step per call (gradient accumulation 1)."""

    def __init__(self, args, data_dir: Path, world: int):
        gpt, gpt_config = nanogpt_model(args.nanogpt)
        torch.manual_seed(1337 + dist.get_rank() if world > 1 else 1337)
        c = model_config(args.model, args.block_size, json.loads((data_dir / "meta.json").read_text())["vocab_size"])
        self.model = gpt(gpt_config(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                    n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=True))
        self.optimizer = self.model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.model)
        self.train_bin, self.batch_size, self.block_size = data_dir / "train.bin", args.batch_size, args.block_size
        self.x, self.y = self.get_batch()

    def get_batch(self):
        data = np.memmap(self.train_bin, dtype=np.uint16, mode="r")  # reopened per batch, as nanoGPT does
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        return x, y

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = 6e-4
        with record_function("forward"):
            _, loss = self.model(self.x, self.y)
        with record_function("data"):
            self.x, self.y = self.get_batch()  # the next batch, while a GPU would run the forward
        with record_function("backward"):
            loss.backward()
        with record_function("grad_norm"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()  # torch labels it, and zero_grad
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def close(self):
        """Nothing to release."""


# ---- nanodist: its Trainer's loop, what train.py runs ----

class Nanodist:
    """nanodist's training loop on the same job, one step per call (Trainer.steps)."""

    def __init__(self, args, data_dir: Path, world: int):
        self.run_dir = tempfile.mkdtemp(prefix="nanodist-peer-")  # TensorBoard events: thrown away
        steps = args.warmup + args.steps + 1  # the last step (evaluated) never runs
        flags = ["--device=cpu", f"--model={args.model}", "--dataset=shakespeare", f"--data_dir={data_dir}",
                 f"--batch_size={args.batch_size}", f"--block_size={args.block_size}",
                 f"--total_batch_size={args.batch_size * args.block_size * world}",
                 f"--max_steps={steps}", f"--eval_interval={steps}", "--eval_iters=1",
                 "--checkpoint_interval=-1", "--gradient_clipping", f"--out_dir={self.run_dir}"]
        if world > 1:
            flags += [f"--data_parallel_size={world}", "--data_parallel_type=ddp", "--implementation=custom"]
        self.steps = Trainer(parse_args(flags)).steps()

    def step(self) -> float:
        return next(self.steps)["loss"]

    def close(self):
        self.steps.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


# ---- --profile: where a step's time goes ----

PHASES = ("data", "forward", "backward", "grad_norm", "optimizer", "other")


class Phases:
    """The seconds of each phase of the step run inside it, under torch.profiler: the
    ranges the code labels with record_function (the reference above; nanodist: data in
    its loader, forward_backward in its Trainer, grad_norm in its Params), the optimizer's
    (torch labels its step and zero_grad); a forward_backward range splits where the
    autograd engine starts. `other`: the rest of the step's wall time (the loss read to
    the host; nanodist's loss mean over the ranks, stop flag, memory figures, logging)."""

    def __enter__(self):
        self.profile = quiet_profile(activities=[ProfilerActivity.CPU])
        self.profile.__enter__()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.start
        self.profile.__exit__(*exc)
        events = self.profile.events()
        seconds = dict.fromkeys(PHASES, 0.0)
        engine = [e.time_range.start for e in events if e.name.startswith("autograd::engine::evaluate_function")]
        for e in events:
            span = e.time_range
            if e.name in PHASES:
                seconds[e.name] += span.elapsed_us() / 1e6
            elif e.name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
                seconds["optimizer"] += span.elapsed_us() / 1e6
            elif e.name == "forward_backward":
                split = min((t for t in engine if span.start <= t <= span.end), default=span.end)
                seconds["forward"] += (split - span.start) / 1e6
                seconds["backward"] += (span.end - split) / 1e6
        seconds["other"] = wall - sum(seconds.values())
        self.seconds = seconds


def phase_table(phases: dict[str, list[dict]], title: str):
    """Median seconds per phase of each job's profiled steps."""
    rows = [{"phase": phase, **{f"{job} s": statistics.median(step[phase] for step in steps)
                                for job, steps in phases.items()}} for phase in PHASES]
    print_table(rows, f"where the step time goes, {title} (under torch.profiler)")


# ---- the processes: each job's own, taking turns ----

def worker(name: str, rank: int, world: int, port: int, args, data_dir: Path, threads: int, conn):
    """One process of one job: builds it, then runs one step per "step" received and
    answers (loss, CPU seconds of the process, phases under --profile else None)."""
    sys.stdout = open(os.devnull, "w")  # nanodist's step lines: the table says it all
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo")
    torch.set_num_threads(threads)
    job = None
    try:
        job = (Reference if name == "reference" else Nanodist)(args, data_dir, world)
        conn.send("ready")
        for step in itertools.count():
            if conn.recv() != "step":
                break
            # not the first step: the trainer profiles its memory there (metrics.StepMemory)
            phases = Phases() if args.profile and step >= args.warmup else None
            cpu = time.process_time()
            with phases or nullcontext():
                loss = job.step()
            conn.send((loss, time.process_time() - cpu, phases.seconds if phases else None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        if job is not None:
            job.close()
        if world > 1:
            dist.destroy_process_group()


class Job:
    """The processes of one job, driven from here: `step()` runs one step on every rank."""

    def __init__(self, name: str, world: int, args, data_dir: Path, threads: int):
        self.name, self.losses, self.cpu_seconds, self.phases = name, [], [], []
        context, port = mp.get_context("spawn"), free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            ours, theirs = context.Pipe()
            proc = context.Process(target=worker, args=(name, rank, world, port, args, data_dir, threads, theirs))
            proc.start()
            theirs.close()  # a worker that dies then reads as EOF here
            self.conns.append(ours)
            self.procs.append(proc)
        for conn in self.conns:
            self.receive(conn)

    def receive(self, conn):
        try:
            message = conn.recv()
        except EOFError:
            raise SystemExit(f"a {self.name} process died (out of memory?)") from None
        if isinstance(message, tuple) and message[0] == "error":
            raise SystemExit(f"a {self.name} process failed:\n{message[1]}")
        return message

    def step(self):
        for conn in self.conns:
            conn.send("step")
        answers = [self.receive(conn) for conn in self.conns]
        self.losses.append(answers[0][0])
        self.cpu_seconds.append(sum(cpu for _, cpu, _ in answers))  # the job's, all its ranks
        if answers[0][2] is not None:
            self.phases.append(answers[0][2])

    def close(self):
        for conn in self.conns:
            conn.send("stop")
        for proc in self.procs:
            proc.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, args, data_dir: Path) -> dict:
    """Both jobs of one mode, built one after the other, then taking turns."""
    world = MODES[mode]
    threads = args.threads if world == 1 else 1
    jobs = {}
    try:
        for name in JOBS:
            jobs[name] = Job(name, world, args, data_dir, threads)
        wall = time_interleaved({name: job.step for name, job in jobs.items()}, args.warmup, args.steps,
                                torch.device("cpu"))
    finally:
        for job in jobs.values():
            job.close()
    timed = slice(args.warmup, None)
    return {"world": world, "threads": threads, "step_seconds": wall,
            "cpu_seconds": {name: job.cpu_seconds[timed] for name, job in jobs.items()},
            "losses": {name: job.losses for name, job in jobs.items()},
            "phases": {name: job.phases for name, job in jobs.items()}}


def summary(mode: str, result: dict) -> dict:
    """The table's row of a mode: medians, the paired ratio and its spread over the rounds."""
    wall, cpu = result["step_seconds"], result["cpu_seconds"]
    ratios = [r / n for r, n in zip(wall["reference"], wall["nanodist"])]
    return {"mode": f"{mode}: {result['world']} process(es) x {result['threads']} thread(s)",
            "reference s/step": median(wall["reference"]), "nanodist s/step": median(wall["nanodist"]),
            "speed ratio (paired median)": paired_speedup(wall, "nanodist", "reference"),
            "min": min(ratios), "max": max(ratios),
            "rounds nanodist faster": f"{sum(r > 1 for r in ratios)} of {len(ratios)}",
            "CPU-time ratio": paired_speedup(cpu, "nanodist", "reference")}


def prepare_data(data_dir: str | None) -> Path:
    """GPT-2 BPE tiny Shakespeare: --data_dir, else ./data/shakespeare if prepared, else
    prepared into a temporary folder from the offline copies when there are some."""
    if data_dir:
        return Path(data_dir)
    if (REPO / "data" / "shakespeare" / "meta.json").exists():
        return REPO / "data" / "shakespeare"
    out = Path(tempfile.mkdtemp(prefix="nanodist-peer-data-"))
    cmd = [sys.executable, str(REPO / "data" / "shakespeare" / "prepare.py"), "--out_dir", str(out)]
    if (SHARED / "tinyshakespeare" / "input.txt").exists():
        cmd += ["--input", str(SHARED / "tinyshakespeare" / "input.txt")]
    if (SHARED / "gpt2" / "gpt2.tiktoken").exists():
        cmd += ["--bpe_file", str(SHARED / "gpt2" / "gpt2.tiktoken")]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def main():
    p = parser("peer", __doc__.splitlines()[0])
    p.set_defaults(warmup=3, steps=12, out=str(DOCS / "peer.json"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--model", default="gpt2", help="nanodist's preset (tiny: a smoke run)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per process and step")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="of a one-process job")
    p.add_argument("--data_dir", help="a prepared dataset (default: GPT-2 BPE tiny Shakespeare)")
    p.add_argument("--nanogpt", help="a nanoGPT checkout: its model.py is the reference's model")
    p.add_argument("--profile", action="store_true", help="print where each job's step time goes")
    p.add_argument("--markdown", default=str(DOCS / "peer_table.md"), help="the Markdown table ('': none)")
    args = p.parse_args()
    nanogpt_model(args.nanogpt)  # a directory without nanoGPT's model.py ends here, before any process starts
    if args.profile and args.warmup < 1:
        p.error("--profile needs --warmup >= 1 (nanodist's first step profiles its own memory)")
    data_dir = prepare_data(args.data_dir)

    results = {mode: run_mode(mode, args, data_dir) for mode in args.modes}
    rows = [summary(mode, result) for mode, result in results.items()]
    title = (f"{args.model}, fp32, batch {args.batch_size} x {args.block_size} per process, CPU "
             f"({os.cpu_count()} cores), {args.steps} rounds after {args.warmup} dropped; reference: "
             + ("nanoGPT's model.py" if args.nanogpt else "bench/peer.py's nanoGPT recipe"))
    if args.profile:
        for row, result in zip(rows, results.values()):
            phase_table(result["phases"], row["mode"])
    print_table(rows, title)
    if args.profile:  # profiled steps are slower: their times are not the results
        return
    kept = {k: v for k, v in vars(args).items() if k not in ("out", "markdown", "data_dir", "nanogpt")}
    write_json(args.out, {"args": kept, "nanogpt": bool(args.nanogpt), "rows": rows, "modes": results})
    if args.markdown:
        Path(args.markdown).write_text(
            f"# nanodist against nanoGPT's step (bench/peer.py)\n\n{title}. Ratios: reference time / "
            f"nanodist time (> 1: nanodist is faster), per round; min and max over the rounds.\n\n"
            f"{markdown_table(rows)}\n\nCommand: `python bench/peer.py`. What it measures and where the "
            f"time goes: [peer.md](peer.md).\n")


if __name__ == "__main__":
    main()
