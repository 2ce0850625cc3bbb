"""Distributed tests as ordinary pytest tests.

`run_distributed(fn, world_size, *args)` runs `fn(*args)` on `world_size` gloo
processes and returns their results, rank by rank. The processes are started once per
world size and reused (starting torch costs seconds per process); a failure or a
timeout on any rank tears the pool down, so the next test starts clean and a hang can
only cost its own timeout. `fn` must be a module-level function.

Every device mesh a test builds leaves gloo process groups behind, each with threads of
its own, and they cannot be destroyed while DTensor's caches still refer to them: a
worker that has gathered many is slow, so a pool is replaced once its workers hold more
than MAX_GROUPS.
"""
import atexit
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp
from pytest import approx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE_TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_BPE = SHARED_DATA / "gpt2" / "gpt2.tiktoken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_GROUPS = 48


def _worker(rank, world_size, port, tasks, results):
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args), len(_world.pg_map)))
        except BaseException:
            results.put((rank, False, traceback.format_exc(), len(_world.pg_map)))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self.groups = 0  # process groups held by the busiest worker
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, world_size, port, self.tasks[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout):
        for q in self.tasks:
            q.put((fn, args))
        results, deadline = {}, time.monotonic() + timeout
        while len(results) < self.world_size:
            try:
                rank, ok, value, groups = self.results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} on {self.world_size} processes did not finish "
                                   f"in {timeout} s (ranks done: {sorted(results)})") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {self.world_size} failed:\n{value}")
            results[rank] = value
            self.groups = max(self.groups, groups)
        return [results[r] for r in range(self.world_size)]

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_pools: dict[int, _Pool] = {}


def run_distributed(fn, world_size: int, *args, timeout: float = 240):
    pool = _pools.get(world_size) or _pools.setdefault(world_size, _Pool(world_size))
    try:
        results = pool.run(fn, args, timeout)
    except BaseException:
        _discard(world_size)
        raise
    if pool.groups > MAX_GROUPS:
        _discard(world_size)
    return results


def _discard(world_size):
    for p in _pools.pop(world_size).procs:  # ranks may be stuck in a collective: no waiting
        p.kill()


@atexit.register
def _close_pools():
    for pool in _pools.values():
        pool.close()


def run_train(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None):
    """train.py as users run it: `python train.py` for one process, torchrun otherwise."""
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"])
    return subprocess.run(launcher + [str(REPO / "train.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def trainer_records(kwargs: dict):
    """Rank side (or one process): train with TrainConfig(**kwargs); (loss, grad norm) per step."""
    from nanodist.run.config import TrainConfig
    from nanodist.run.trainer import Trainer
    return [(r["loss"], r["grad_norm"]) for r in Trainer(TrainConfig(**kwargs)).train()]


# Runs compared after AdamW steps are compared in float64, which makes the tolerance an
# argument that holds on any CPU: a float64 sum of k <= 1e3 terms whose magnitudes add up
# to <= 1 (a mean loss's gradient) differs between orders by delta <= k*u*1 ~ 1e-13
# (u = 1.1e-16). AdamW's update lr*m/(sqrt(v)+eps) has slope at most 1/eps in g, so it
# lifts delta to at most lr*delta/eps per step (in float32, delta ~ 1e-10 on a near-zero
# gradient gives lr*1e-2: no bound; hence float64).
FLOAT64_GRAD_NOISE = 1e-13


def adamw_param_bound(steps: int, lr: float, eps: float = 1e-8) -> float:
    """Max difference of two float64 layouts' parameters after `steps` AdamW steps."""
    return steps * lr * FLOAT64_GRAD_NOISE / eps


def tiny_params_bound(**moe) -> int:
    """Parameters of the tiny model on char data (vocabulary <= 128, blocks <= 64): a bound.
    `moe`: the model's moe_* fields."""
    import torch
    from nanodist.model.gpt import GPT, model_config
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(model_config("tiny", 64, 128, **moe)).parameters())


def relative_drift(step: int, lr: float = 1e-3, n_params: int | None = None) -> float:
    """Step `step` of two float64 layouts runs on parameters at most B =
    adamw_param_bound(step, lr) apart, so its loss differs by at most ||grad||_1 * B <=
    sqrt(P) * ||grad||_2 * B (P parameters): sqrt(P) * B relative to the grad norm."""
    return (n_params or tiny_params_bound()) ** 0.5 * adamw_param_bound(step, lr)


def loss_tolerances(reference, lr: float = 1e-3, n_params: int | None = None) -> list[float]:
    """Per step, the bound on a float64 layout's loss difference from `reference` (loss, norm)."""
    return [relative_drift(step, lr, n_params) * norm for step, (_, norm) in enumerate(reference)]


def assert_records_match(records, reference, what="", lr: float = 1e-3, n_params: int | None = None):
    """(loss, grad norm) per step of a float64 tiny run against the reference run's:
    losses within `loss_tolerances`, grad norms within the same relative drift (this
    assumes the Hessian's scale is the gradient's); 1e-10 relative covers float64 order
    noise of the sums themselves (<= 1e6 terms). `n_params`: the model's, when larger than
    the dense tiny model's (a mixture of experts)."""
    assert len(records) == len(reference), what
    for step, ((loss, norm), (loss_1, norm_1), tol) in enumerate(
            zip(records, reference, loss_tolerances(reference, lr, n_params))):
        assert loss == approx(loss_1, rel=1e-10, abs=tol), f"{what}: loss at step {step}"
        assert norm == approx(norm_1, rel=1e-10 + relative_drift(step, lr, n_params)), \
            f"{what}: grad norm at step {step}"


def assert_printed_losses_match(stdout: str, reference):
    """train.py prints losses with 4 decimals: rounding (5e-5) plus the float64 bound."""
    import re
    losses = [float(x) for x in re.findall(r"\| loss (\S+)", stdout)]
    assert len(losses) == len(reference), stdout
    for step, (loss, (loss_1, _), tol) in enumerate(zip(losses, reference, loss_tolerances(reference))):
        assert loss == approx(loss_1, abs=5e-5 + tol), f"printed loss at step {step}"


def tiny_run(data_dir, out_dir, **overrides) -> dict:
    """TrainConfig fields of a 3-step tiny run on char-level Shakespeare, AdamW (lr 1e-3,
    the default of `assert_records_match`) + clipping; `overrides` replace any of them."""
    return {**dict(device="cpu", model="tiny", dataset="shakespeare_char", data_dir=data_dir,
                   block_size=32, batch_size=2, total_batch_size=256, max_steps=3, warmup_steps=1,
                   learning_rate=1e-3, gradient_clipping=True, eval_interval=100, eval_iters=1,
                   out_dir=str(out_dir)), **overrides}


# ------------------------------------------------------------------ train.py's flags
# (checkpoints and faults: runs that write, resume and get killed)

STEPS = 6


def flags(data_dir, out_dir, *extra) -> list[str]:
    """train.py's flags of a 6-step tiny run on char-level Shakespeare (AdamW lr 2e-3 +
    clipping, an evaluation and a checkpoint every 3 steps); `extra` follow (the last of a
    repeated flag wins)."""
    return ["--device", "cpu", "--model", "tiny", "--dataset", "shakespeare_char",
            "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--batch_size", "2",
            "--block_size", "32", "--total_batch_size", "256", "--max_steps", str(STEPS),
            "--eval_interval", "3", "--eval_iters", "1", "--warmup_steps", "2",
            "--learning_rate", "2e-3", "--gradient_clipping", *extra]


def train_losses(args: list[str]) -> list[float]:
    """Rank side (or one process): train with train.py's `args`; the per-step losses."""
    from nanodist.run.config import parse_args
    from nanodist.run.trainer import Trainer
    return [r["loss"] for r in Trainer(parse_args(args)).train()]


def train_records(args: list[str]):
    """Rank side (or one process): train with train.py's `args`; (loss, grad norm) per step."""
    from nanodist.run.config import parse_args
    from nanodist.run.trainer import Trainer
    return [(r["loss"], r["grad_norm"]) for r in Trainer(parse_args(args)).train()]


def run(world: int, args: list[str]):
    """`train_records(args)` on `world` processes (1: this one); rank 0's records."""
    return train_records(args) if world == 1 else run_distributed(train_records, world, args)[0]


def assert_resumes_across(data_dir, tmp_path, write, read, *extra, n_params: int | None = None):
    """A checkpoint written by one layout resumes under another: `write` = (world, flags)
    trains all STEPS in float64, `read` = (world, flags) resumes from its step 3; the
    resumed steps match the uninterrupted run's within `assert_records_match` (lr 2e-3):
    another reduction order from the same bits. `extra`: flags of both runs."""
    (w_world, w_flags), (r_world, r_flags) = write, read
    full = run(w_world, flags(data_dir, tmp_path / "a", *extra, *w_flags, "--dtype", "float64"))
    resumed = run(r_world, flags(data_dir, tmp_path / "b", *extra, *r_flags, "--dtype", "float64",
                                 "--resume", str(tmp_path / "a" / "step_0000003")))
    assert_records_match(resumed, full[3:], "resumed", lr=2e-3, n_params=n_params)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
