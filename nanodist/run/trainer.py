"""The training loop: one Trainer for every layout.

    flags -> layout (checked before anything is built; --layout auto: the planner's) ->
    data -> the predicted peak memory checked (preflight.py) -> mesh -> model (on meta
    with --deferred_init) -> parallelize -> AdamW
    each step: the layout's runner runs the M micro-steps of one global batch (gradients
    synchronised on the last; a pipeline runs them as its micro-batches), clip, step, log
    the loss over the whole global batch; evaluate every eval_interval steps.

What `parallelize` returns is all the trainer asks of a layout: the runner (forward and
backward of one global batch), the params (optimizer, gradient norm, full tensors by
GPT-2 name) and the model parts (their own metrics); the mesh gives its loss's group.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from nanodist import checkpoint
from nanodist.run import faults, preflight, run_dir
from nanodist.run.config import TrainConfig, check_values, fit, resolve
from nanodist.data.loader import BatchLoader
from nanodist.errors import UserError
from nanodist.model.hf import pretrained_tensors
from nanodist.run.launch import init_distributed, pick_device
from nanodist.run.metrics import Logger, StepMemory, device_peak_flops, enable_tf32
from nanodist.model.gpt import GPT, StepMetrics, flops_per_token
from nanodist.parallel.comm import Comm
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.run.profiling import StepProfiler, parse_steps
from nanodist.run.step_report import StepLog


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(715, cfg.max_steps // 10)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - warmup) / max(cfg.max_steps - warmup, 1)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def rank0_print(rank: int):  # not a method: the step log holding it would keep a dropped trainer's lock
    return (lambda *args: print(*args, flush=True)) if rank == 0 else (lambda *args: None)


class Trainer:
    def __init__(self, cfg: TrainConfig, comm: Comm | None = None, model_cls=GPT):
        """`comm`: the transport and traffic counter of the hand-written strategies'
        collectives (the tools pass stand-ins); `model_cls`: GPT, or a subclass with other
        initial values (the simulated cluster's zeros)."""
        self.launcher = faults.StopRequest.find_launcher()  # before it can die unnoticed
        device = pick_device(cfg.device)
        self.memory = StepMemory(device)  # on CPU it counts the tensors made from here on
        # no failure of another rank becomes a silent hang (a bad value: resolve says so)
        timeout = timedelta(seconds=cfg.dist_timeout) if cfg.dist_timeout > 0 else None
        self.rank, world_size = init_distributed(device, timeout)
        self.print = rank0_print(self.rank)
        self.comm = comm or Comm()
        if cfg.layout == "auto":  # the flags' layout and batch rules are the planner's to meet
            check_values(cfg)
            self._open_data(cfg, Layout(), 1, device)  # the vocabulary, for the planner's model
            given = cfg
            cfg, why = self._decided_by_rank0(  # rank 0 decides: free memory differs between GPUs
                lambda: preflight.choose_layout(given, self.model_cfg, world_size, device))
            self.print(why)
        self.cfg, self.layout, self.micro_steps = resolve(cfg, world_size, device.type)
        cfg, layout = self.cfg, self.layout
        self._decided_by_rank0(lambda: run_dir.check_writable_dirs(cfg))  # before any work is lost
        self._open_data(cfg, layout, self.micro_steps, device)  # this rank's share of each batch
        self._decided_by_rank0(lambda: preflight.check_memory(cfg, layout, self.micro_steps,
                                                              self.model_cfg, device))
        parse_steps(cfg.profile_steps)  # a bad value fails before any work
        self.mesh = mesh = build_mesh(layout, device, self.comm, timeout)

        with torch.device("meta" if cfg.deferred_init else device):
            model = model_cls(self.model_cfg, seed=None if cfg.deferred_init else cfg.seed)
        if cfg.dtype == "float64":  # fp32 initial values cast exactly: every layout starts alike
            model.to(torch.float64)
        self.n_params = sum(p.numel() for p in model.parameters())
        setup = Setup(mesh, cfg.seed, torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                      (cfg.batch_size, cfg.block_size), self.micro_steps)
        self.parallel = parallelize(model, setup)
        self.runner, self.params = self.parallel.runner, self.parallel.params
        self.metrics = StepMetrics([part.gpt for part in self.parallel.parts], self.micro_steps)
        # fused: one kernel for all parameters, CPU too (torch's default there loops: docs/bench/peer.md)
        self.optimizer = self.params.optimizer(cfg.weight_decay, lr=cfg.learning_rate,
                                               betas=(cfg.beta1, cfg.beta2), fused=True)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if cfg.dtype == "bfloat16" else nullcontext())
        self.tokens_per_step = cfg.total_batch_size
        self.flops_per_step = flops_per_token(self.model_cfg, self.n_params) * self.tokens_per_step
        tf32 = enable_tf32(device, cfg.dtype)

        if not cfg.out_dir:  # a fresh run directory, named by rank 0 for all
            cfg.out_dir = self._decided_by_rank0(lambda: run_dir.new_run_dir(Path("runs"), layout.name))
        self.log_dir = cfg.log_dir or cfg.out_dir
        self.run_lock = None  # rank 0's, from here to the end of train()
        self.unverified_since = None  # the step of an unverified checkpoint this run descends from
        self.stop = None  # faults.StopRequest, while train() runs
        try:
            found = self._decided_by_rank0(self._claim_run_dir)
            info = checkpoint.load(self.state(), found, cfg.trust_unverified_checkpoint) if found else {}
            self.start_step, self.unverified_since = info.get("step", 0), info.get(checkpoint.UNVERIFIED)
            if self.start_step > cfg.max_steps:
                raise UserError(f"{found} is at step {self.start_step}, past --max_steps {cfg.max_steps}: "
                                f"nothing to train; raise --max_steps to continue the run")
            if cfg.init_from and not found:  # each rank keeps its part of each full tensor
                full_of = pretrained_tensors(cfg.init_from, self.model_cfg, self.data.vocab_size)
                with torch.no_grad():
                    self.params.load_full_tensors(full_of, self.params.param_list())
            # a resumed run drops what the run that died logged past its checkpoint; a
            # finished one writes no events at all
            self.logger = Logger(self.log_dir, enabled=mesh.is_main and self.start_step < cfg.max_steps,
                                 purge_step=self.start_step if cfg.resume else None)
        except BaseException:
            self._release_run_dir()
            raise
        self.last_checkpoint = found
        self.report = StepLog(self.logger, self.print, cfg, self.metrics.in_line, self.flops_per_step,
                              device_peak_flops(device, cfg.dtype), mesh.world_size)
        self.logger.text("config", "\n".join(f"    {k} = {v}" for k, v in asdict(cfg).items()))
        self.print(f"{layout.name}: {self.n_params / 1e6:.2f}M parameters, {mesh.world_size} "
                   f"process(es) on {device}{' (fp32 matmuls in TF32)' if tf32 else ''}, "
                   f"M = {self.micro_steps} micro-steps (micro-batches) per step, "
                   f"{self.tokens_per_step} tokens/step, run directory: {cfg.out_dir}"
                   + (f", resumed at step {self.start_step}" if self.start_step else ""))
        self.profiler = StepProfiler(cfg.profile_steps, cfg.out_dir, self.rank, device,
                                     self.start_step + 1, cfg.max_steps)
        if self.profiler.note:
            self.print(self.profiler.note)
        if self.start_step == cfg.max_steps:
            self.print(f"nothing to train: {found} is at --max_steps {cfg.max_steps} (the run is "
                       f"complete); raise --max_steps to continue it")
        if cfg.warmup_steps > cfg.max_steps:
            self.print(f"warning: --warmup_steps ({cfg.warmup_steps}) > --max_steps ({cfg.max_steps}):"
                       f" the learning rate never reaches --learning_rate")

    def _open_data(self, cfg: TrainConfig, layout: Layout, micro_steps: int, device):
        """This rank's batches of the layout, and the model of the dataset's vocabulary."""
        self.data = BatchLoader(cfg.data_dir or Path("data", cfg.dataset), cfg.dataset,
                                cfg.block_size, cfg.batch_size, micro_steps, layout.dp,
                                layout.coordinates(self.rank)["dp"], cfg.seed, device)
        self.model_cfg = fit(cfg, layout, micro_steps, self.data.vocab_size, device.type)

    def _decided_by_rank0(self, decide):
        """Rank 0 reads the run directory and decides for every rank: the same answer, or
        the same UserError, everywhere (no rank left waiting in a collective)."""
        verdict = None
        if self.rank == 0:
            try:
                verdict = decide()
            except UserError as error:
                verdict = error
        if dist.is_initialized():
            box = [verdict]
            self.comm.transport.broadcast_object_list(box, src=0)
            verdict = box[0]
        if isinstance(verdict, UserError):
            raise UserError(str(verdict))
        return verdict

    def _claim_run_dir(self):
        """Rank 0: lock the run directory against a second job, then pick the checkpoint."""
        self.run_lock, found = run_dir.claim(self.cfg, self.log_dir)
        if found:
            self.print(f"resuming from {found}")
        return found

    def _release_run_dir(self):
        if self.run_lock:
            self.run_lock.release()

    def state(self, step: int = 0) -> checkpoint.TrainState:
        """What a checkpoint holds of this run, at the start of step `step`."""
        info = {"config": asdict(self.cfg), "model": asdict(self.model_cfg),
                "tokenizer": self.data.tokenizer, checkpoint.UNVERIFIED: self.unverified_since}
        return checkpoint.TrainState(self.params, self.optimizer, self.data, info, step)

    def save(self, step: int):
        """Collective: checkpoint step `step` (the next step to run) into --out_dir."""
        self.last_checkpoint = checkpoint.save(self.state(step), self.cfg.out_dir, self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over DP x CP ranks (TP ranks of one DP group already agree; CP ranks hold
        the mean of equally many tokens each)."""
        group = self.mesh.dp_cp
        if group.size > 1:
            dist.all_reduce(value, group=group.process_group)
            value /= group.size
        return value

    def train_step(self, step: int) -> dict:
        """One optimizer step. The host waits for the device once: the loss, the gradient
        norm, the stop flag and the model's metrics (StepMetrics) come over in one copy,
        before the update (a non-finite loss or norm stops the run with the weights unchanged)."""
        self.runner.train()
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.data.train_batch(step, micro) for micro in range(self.micro_steps)]
        self.metrics.reset()
        with record_function("forward_backward"):  # a phase of the step in profiler traces
            loss_sum = self.runner.forward_backward(batches, self.autocast)
        norm = self.params.clip_grad_norm(self.cfg.max_grad_norm if self.cfg.gradient_clipping else None)
        signal = self.stop.flag() if self.stop else torch.zeros((), device=norm.device)
        values = [self._dp_mean(loss_sum), norm, signal] + self.metrics.tensors()
        host = torch.cat([t.reshape(-1).double() for t in values]).tolist()  # the one host sync
        loss, norm, signal = host[:3]
        if not (math.isfinite(loss) and math.isfinite(norm)):  # before the weights change
            self.optimizer.zero_grad(set_to_none=True)
            saved = checkpoint.checkpoints(self.cfg.out_dir)
            kept = f"the last checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint yet"
            raise UserError(f"step {step + 1}: the loss is {loss} and the gradient norm {norm}; stopped before "
                            f"the update, {kept}. Lower --learning_rate or enable --gradient_clipping")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": norm, "lr": lr, "signal": int(signal),
                "metrics": self.metrics.read(host[3:])}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.runner.eval()
        loss_sum = 0.0  # a tensor of the loss's dtype after the first add (fp64 under --dtype float64)
        for i in range(self.cfg.eval_iters):  # whole global batches: the same set for every layout
            batches = [self.data.val_batch(i, micro) for micro in range(self.micro_steps)]
            loss_sum += self.runner.eval_loss(batches, self.autocast)
        return self._dp_mean(loss_sum / self.cfg.eval_iters).item()

    def train(self) -> list[dict]:
        """Runs max_steps optimizer steps; returns the per-step records (rank-local)."""
        return list(self.steps())

    def steps(self):
        """train() a step at a time (run it to the end or close it): each step's record once
        it is logged and saved; the caller's time before it asks for the next is not the
        step's. SIGTERM, SIGINT or a dead launcher stop every rank after the same step, saved
        first (faults.Stopped)."""
        with faults.StopRequest(self.mesh.device, self.launcher) as self.stop:
            try:
                yield from self._train()
            finally:  # under the signal handlers: torchrun's SIGTERM, as a peer dies, waits for them
                self.stop = None
                self.logger.close()
                self._release_run_dir()
                self.profiler.close()  # one an error stopped inside its window: never left to the exit

    def _stop(self, step: int, signum: int):
        """Every rank agreed to stop after `step`: save it unless saved (or never to be)."""
        saves = self.cfg.checkpoint_interval >= 0
        if saves and not (self.last_checkpoint and checkpoint.step_of(self.last_checkpoint) == step):
            self.save(step)
        kept = (f"checkpoint {self.last_checkpoint}: continue with --resume" if saves
                else "no checkpoint (--checkpoint_interval -1)")
        raise faults.Stopped(f"stopped by {faults.describe(signum)} after step {step}; {kept}",
                             exit_code=128 + signum)

    def _train(self):
        ready = None  # when the last step's values reached the host (None: something else ran since)
        for step in range(self.start_step, self.cfg.max_steps):
            last = step == self.cfg.max_steps - 1
            evaluates = (step + 1) % self.cfg.eval_interval == 0 or last
            self.profiler.before(step)
            # CPU memory is measured on the first step and the evaluated ones (it slows a step)
            measure = (step == self.start_step or evaluates) and not self.profiler.covers(step)
            with self.memory.step(measure):
                t0 = ready or time.perf_counter()
                record = self.train_step(step)
                # the host waited for this step's values, not for its update (which runs while
                # the next step is prepared): from one such wait to the next is one step
                ready = time.perf_counter()
                dt = ready - t0
            self.profiler.after(step)
            if measure or self.profiler.covers(step):  # their own work ran after the wait
                ready = None
            record.update(step=step, step_time=dt, peak_memory=self.memory.peak)  # None: a CPU step not measured
            if evaluates:
                record["val_loss"] = self.evaluate()
                ready = None
            self.report(record)
            every = self.cfg.checkpoint_interval or self.cfg.eval_interval
            if self.cfg.checkpoint_interval >= 0 and ((step + 1) % every == 0 or last):
                self.save(step + 1)
                ready = None
            if record["signal"]:
                self._stop(step + 1, record["signal"])
            paused = time.perf_counter()
            yield record
            ready = ready and ready + time.perf_counter() - paused  # the caller's time is not the step's
