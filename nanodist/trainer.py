"""The training loop: one Trainer for every layout.

    build mesh -> data -> model (on meta with --deferred_init) -> parallelize -> AdamW
    each step: the layout runs the M micro-steps of one global batch (gradient sync on
    the last; a pipeline runs them as its micro-batches), clip, step,
    log the loss over the whole global batch; evaluate every eval_interval steps.
"""
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from nanodist import checkpoint, faults
from nanodist.config import TrainConfig, UserError, grad_accum_steps, resolve_layout
from nanodist.data import BatchLoader
from nanodist.hf import pretrained_tensors
from nanodist.metrics import (Logger, device_peak_flops, enable_tf32, flops_per_token,
                              StepMemory, rss_peak_bytes)
from nanodist.model import GPT, GPTConfig, model_config
from nanodist.parallel.mesh import build_mesh, init_distributed, pick_device
from nanodist.parallel.parallelize import parallelize
from nanodist.profiling import StepProfiler, parse_steps


def check_tensor_parallel_fit(model_cfg: GPTConfig, tp: int):
    for what, size in (("n_head", model_cfg.n_head), ("n_embd", model_cfg.n_embd),
                       ("padded vocab_size", model_cfg.vocab_size)):
        if size % tp:
            raise UserError(f"{what} ({size}) is not divisible by --tensor_parallel_size "
                            f"({tp}); pick a tensor parallel size that divides it")


def new_run_dir(runs: Path, layout: str) -> str:
    """runs/<time>-<layout>, with a suffix when a run started in the same second."""
    base = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{layout}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create a run directory in {runs} ({e.strerror}); pass --out_dir") from e
    return str(path)


def check_writable_dirs(cfg: TrainConfig):
    """--out_dir and --log_dir: a directory that exists, or can be created, and is writable."""
    for flag in ("out_dir", "log_dir"):
        given = getattr(cfg, flag)
        path = Path(given).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())  # / at the latest
        problem = ("is a file, not a directory" if not existing.is_dir() else
                   "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
        if given and problem:
            raise UserError(f"--{flag} {given}: {existing} {problem}; pick another --{flag}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(715, cfg.max_steps // 10)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - warmup) / max(cfg.max_steps - warmup, 1)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.launcher = faults.StopRequest.find_launcher()  # before it can die unnoticed
        device = pick_device(cfg.device)
        self.memory = StepMemory(device)  # on CPU it counts the tensors made from here on
        # no failure of another rank becomes a silent hang (a bad value: resolve_layout says so)
        timeout = timedelta(seconds=cfg.dist_timeout) if cfg.dist_timeout > 0 else None
        _, world_size = init_distributed(device, timeout)
        self.cfg = cfg = resolve_layout(cfg, world_size)
        self.grad_accum = grad_accum_steps(cfg)
        self.mesh = mesh = build_mesh(cfg.data_parallel_size, cfg.tensor_parallel_size, device,
                                      timeout, pp_size=cfg.pipeline_parallel_size,
                                      cp_size=cfg.context_parallel_size)
        self._decided_by_rank0(lambda: check_writable_dirs(cfg))  # before any work is lost
        self.data = BatchLoader(cfg.data_dir or Path("data", cfg.dataset), cfg.dataset,
                                cfg.block_size, cfg.batch_size, self.grad_accum,
                                mesh.dp_size, mesh.dp_rank, cfg.seed, device)
        self.model_cfg = model_config(cfg.model, cfg.block_size, self.data.vocab_size, cfg.dropout)
        check_tensor_parallel_fit(self.model_cfg, mesh.tp_size)
        parse_steps(cfg.profile_steps)  # a bad value fails before any work

        with torch.device("meta" if cfg.deferred_init else device):
            model = GPT(self.model_cfg, seed=None if cfg.deferred_init else cfg.seed)
        if cfg.dtype == "float64":  # fp32 initial values cast exactly: every layout starts alike
            model.to(torch.float64)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.par = parallelize(model, cfg, mesh)
        self.model = self.par.model
        self.optimizer = torch.optim.AdamW(self.par.param_groups(cfg.weight_decay),
                                           lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                           fused=device.type == "cuda")
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if cfg.dtype == "bfloat16" else nullcontext())
        self.tokens_per_step = cfg.total_batch_size
        self.flops_per_step = flops_per_token(self.model_cfg, self.n_params) * self.tokens_per_step
        tf32 = enable_tf32(device, cfg.dtype)
        self.peak_flops = device_peak_flops(device, cfg.dtype)

        layout = (f"dp{mesh.dp_size}-{cfg.data_parallel_type}-tp{mesh.tp_size}-{cfg.implementation}"
                  + (f"-pp{mesh.pp_size}-{cfg.pipeline_schedule}" if mesh.pp_size > 1 else "")
                  + (f"-cp{mesh.cp_size}" if mesh.cp_size > 1 else ""))
        if not cfg.out_dir:  # a fresh run directory, named by rank 0 for all
            cfg.out_dir = self._decided_by_rank0(lambda: new_run_dir(Path("runs"), layout))
        self.log_dir = cfg.log_dir or cfg.out_dir
        self.run_lock = None  # rank 0's, from here to the end of train()
        try:
            found = self._decided_by_rank0(self._claim_run_dir)
            self.start_step = checkpoint.load(self, found) if found else 0
            if cfg.init_from and not found:  # each rank keeps its part of each full tensor
                full_of = pretrained_tensors(cfg.init_from, self.model_cfg, self.data.vocab_size)
                with torch.no_grad():
                    self.par.load_full_tensors(full_of, self.par.optimizer_param_list())
            # a resumed run drops what the run that died logged past its checkpoint
            self.logger = Logger(self.log_dir, enabled=mesh.is_main,
                                 purge_step=self.start_step if cfg.resume else None)
        except BaseException:
            self._release_run_dir()
            raise
        self.last_checkpoint = found
        self.logger.text("config", "\n".join(f"    {k} = {v}" for k, v in asdict(cfg).items()))
        self.print(f"{layout}: {self.n_params / 1e6:.2f}M parameters, {mesh.world_size} "
                   f"process(es) on {device}{' (fp32 matmuls in TF32)' if tf32 else ''}, "
                   f"M = {self.grad_accum} micro-steps (micro-batches) per step, "
                   f"{self.tokens_per_step} tokens/step, run directory: {cfg.out_dir}"
                   + (f", resumed at step {self.start_step}" if self.start_step else ""))
        if cfg.warmup_steps > cfg.max_steps:
            self.print(f"warning: --warmup_steps ({cfg.warmup_steps}) > --max_steps ({cfg.max_steps}):"
                       f" the learning rate never reaches --learning_rate")

    def _broadcast(self, value):
        if dist.is_initialized():
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _decided_by_rank0(self, decide):
        """Rank 0 reads the run directory and decides for every rank: the same answer, or
        the same UserError, everywhere (no rank left waiting in a collective)."""
        verdict = None
        if self.mesh.is_main:
            try:
                verdict = decide()
            except UserError as error:
                verdict = error
        verdict = self._broadcast(verdict)
        if isinstance(verdict, UserError):
            raise UserError(str(verdict))
        return verdict

    def _claim_run_dir(self):
        """Rank 0: lock the run directory against a second job, then pick the checkpoint."""
        self.run_lock = faults.RunLock(self.cfg.out_dir)
        return self._checkpoint_to_resume()

    def _release_run_dir(self):
        if self.run_lock:
            self.run_lock.release()

    def _checkpoint_to_resume(self):
        """The checkpoint --resume names (None: start fresh), after checking that the run
        directory holds nothing this run would mix with or silently overwrite."""
        cfg = self.cfg
        checkpoint.remove_debris(cfg.out_dir)  # saves that died mid-write (the run lock keeps other jobs out)
        found = checkpoint.find(cfg.out_dir, cfg.resume) if cfg.resume else None
        later = [p for p in checkpoint.checkpoints(cfg.out_dir)
                 if found is None or checkpoint.step_of(p) > checkpoint.step_of(found)]
        if later and found is None:
            raise UserError(f"--out_dir {cfg.out_dir} already holds checkpoints of another run; "
                            f"continue it with --resume, or pick a new --out_dir")
        if later:
            raise UserError(f"--out_dir {cfg.out_dir} holds checkpoints past {found.name} "
                            f"({later[-1].name}): resume the latest, or resume {found.name} into "
                            f"a new --out_dir")
        if not cfg.resume and any(Path(self.log_dir).glob("events.out.tfevents.*")):
            raise UserError(f"--log_dir {self.log_dir} already holds a TensorBoard run; pick a new "
                            f"directory (or omit it: a fresh runs/<time> one), or --resume it")
        if found:
            self.print(f"resuming from {found}")
        return found

    def print(self, *args):
        if self.mesh.is_main:
            print(*args, flush=True)

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over DP x CP ranks (TP ranks of one DP group already agree; CP ranks hold
        the mean of equally many tokens each)."""
        if self.mesh.dp_cp_size > 1:
            dist.all_reduce(value, group=self.mesh.dp_cp_group)
            value /= self.mesh.dp_cp_size
        return value

    def train_step(self, step: int) -> dict:
        self.model.train()
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.data.train_batch(step, micro) for micro in range(self.grad_accum)]
        loss_sum = self.par.forward_backward(batches, self.autocast)
        norm = self.par.clip_grad_norm(self.cfg.max_grad_norm if self.cfg.gradient_clipping else None)
        loss = self._dp_mean(loss_sum).item()
        if not (math.isfinite(loss) and math.isfinite(norm.item())):  # before the weights change
            self.optimizer.zero_grad(set_to_none=True)
            saved = checkpoint.checkpoints(self.cfg.out_dir)
            kept = f"the last checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint yet"
            raise UserError(f"step {step + 1}: the loss is {loss} and the gradient norm {norm.item()}; "
                            f"stopped before the update, {kept}. Lower --learning_rate or enable "
                            f"--gradient_clipping")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": norm.item(), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        loss_sum = 0.0  # a tensor of the loss's dtype after the first add (fp64 under --dtype float64)
        for i in range(self.cfg.eval_iters):  # whole global batches: the same set for every layout
            batches = [self.data.val_batch(i, micro) for micro in range(self.grad_accum)]
            loss_sum += self.par.eval_loss(batches, self.autocast)
        return self._dp_mean(loss_sum / self.cfg.eval_iters).item()

    def train(self) -> list[dict]:
        """Runs max_steps optimizer steps; returns the per-step records (rank-local).
        SIGTERM, SIGINT or a dead launcher stop every rank after the same step, which is
        saved first (faults.Stopped)."""
        try:
            with faults.StopRequest(self.mesh.device, self.launcher) as self.stop:
                return self._train()
        finally:
            self.logger.close()
            self._release_run_dir()

    def _stop(self, step: int, signum: int):
        """Every rank agreed to stop after `step`: save it unless saved (or never to be)."""
        saves = self.cfg.checkpoint_interval >= 0
        if saves and not (self.last_checkpoint and checkpoint.step_of(self.last_checkpoint) == step):
            self.last_checkpoint = checkpoint.save(self, step)
        kept = (f"checkpoint {self.last_checkpoint}: continue with --resume" if saves
                else "no checkpoint (--checkpoint_interval -1)")
        raise faults.Stopped(f"stopped by {faults.describe(signum)} after step {step}; {kept}",
                             exit_code=128 + signum)

    def _train(self) -> list[dict]:
        history = []
        profiler = StepProfiler(self.cfg.profile_steps, self.cfg.out_dir, self.mesh.rank, self.mesh.device)
        for step in range(self.start_step, self.cfg.max_steps):
            last = step == self.cfg.max_steps - 1
            evaluates = (step + 1) % self.cfg.eval_interval == 0 or last
            profiler.before(step)
            # CPU memory is measured on the first step and the evaluated ones (it slows a step)
            measure = (step == self.start_step or evaluates) and not profiler.covers(step)
            with self.memory.step(measure):
                t0 = time.perf_counter()
                record = self.train_step(step)
                if self.mesh.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            profiler.after(step)
            peak = self.memory.peak  # None on CPU steps not measured
            record.update(step=step, step_time=dt, tokens_per_sec=self.tokens_per_step / dt,
                          peak_memory=peak, rss_peak=rss_peak_bytes())
            mfu = (self.flops_per_step / dt / self.mesh.world_size / self.peak_flops
                   if self.peak_flops else None)
            if evaluates:
                record["val_loss"] = self.evaluate()
            self.logger.scalars(step, {
                "Loss/train": record["loss"], "Loss/val": record.get("val_loss"),
                "GradNorm/train": record["grad_norm"] if self.cfg.gradient_clipping else None,
                "LR": record["lr"], "Throughput/tokens_per_sec": record["tokens_per_sec"],
                "Time/step_ms": dt * 1e3, "MFU": mfu,
                "Memory/peak_GiB": peak / 2**30 if peak is not None else None,
                "Memory/rss_peak_GiB": record["rss_peak"] / 2**30})
            self.print(f"step {step + 1:5d}/{self.cfg.max_steps} | loss {record['loss']:.4f}"
                       + (f" | val {record['val_loss']:.4f}" if "val_loss" in record else "")
                       + f" | lr {record['lr']:.2e} | norm {record['grad_norm']:.3f}"
                       f" | {dt * 1e3:.0f} ms | {record['tokens_per_sec']:,.0f} tok/s"
                       + (f" | MFU {mfu:.1%}" if mfu else "")
                       + (f" | mem {peak / 2**30:.2f} GiB" if peak is not None else "")
                       + f" | rss {record['rss_peak'] / 2**30:.2f} GiB")
            history.append(record)
            every = self.cfg.checkpoint_interval or self.cfg.eval_interval
            if self.cfg.checkpoint_interval >= 0 and ((step + 1) % every == 0 or last):
                self.last_checkpoint = checkpoint.save(self, step + 1)
            if signum := self.stop.agreed():
                self._stop(step + 1, signum)
        return history
