"""Throughput, MFU, memory, and the TensorBoard writer (rank 0 only)."""
import os
import resource
import sys
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity

from nanodist import compat
from nanodist.planner.hardware import PEAK_TFLOPS
from nanodist.run.profiling import quiet_profile

def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of the GPU for the matmuls of a `dtype` run: bf16, or fp32 run as TF32
    (when enabled: `enable_tf32`); None where unknown (CPUs, other GPUs, plain fp32)."""
    if device.type != "cuda" or dtype not in ("bfloat16", "float32"):
        return None  # float64 runs on the CUDA cores: no tensor-core peak applies
    tf32 = dtype == "float32"
    if tf32 and torch.get_float32_matmul_precision() == "highest":
        return None  # fp32 on the CUDA cores: no tensor-core figure applies
    name = torch.cuda.get_device_name(device).lower()
    for key, (bf16_tflops, tf32_tflops) in PEAK_TFLOPS.items():
        if key.lower() in name:
            return (tf32_tflops if tf32 else bf16_tflops) * 1e12
    return None


def enable_tf32(device: torch.device, dtype: str) -> bool:
    """fp32 on CUDA: matmuls on the tensor cores in TF32 (fp32 range, 10-bit mantissa
    products, fp32 sums; nanoGPT's setting), several times the fp32 FLOP/s. Returns
    whether it is on."""
    if device.type != "cuda" or dtype != "float32" or os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return False  # the override turns TF32 off in the driver, whatever torch asks
    torch.set_float32_matmul_precision("high")
    return True


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA runs it after the host has moved on): before
    and after what a timer measures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_peak_bytes() -> int:
    """The process's peak resident set size: what the OS gave it, freed blocks that the C
    allocator keeps included (so on CPU it hides much of what sharding saves)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class StepMemory:
    """Peak live tensor bytes of one training step, the same quantity on CPU as on CUDA.

    CUDA: the caching allocator's peak, reset before the step. CPU: torch keeps no such
    statistic, so the step runs under torch.profiler with profile_memory, whose allocation
    events carry the allocator's running total; that makes the step slower (per-op
    records), so CPU steps are measured only when asked (`measure`; not while another
    profiler runs: the trainer does not ask during --profile_steps), `peak` None otherwise
    or where this torch cannot count (compat.count_cpu_allocations).
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.at_start = device, None, None
        self.cpu_counts = device.type == "cpu" and compat.count_cpu_allocations()

    @contextmanager
    def step(self, measure: bool):
        self.peak = self.at_start = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif measure and self.cpu_counts:
            with quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield
            events = compat.allocation_events(prof)
            if events:  # totals after each (de)allocation: before the first one, the start
                self.at_start = events[0].total_allocated - events[0].alloc_size
                self.peak = max(event.total_allocated for event in events)
        else:
            yield


class Logger:
    """TensorBoard scalars on the main rank; a no-op elsewhere."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None):
        """purge_step: events at or past it (logged by a run that died after its last
        checkpoint) are dropped, so the curves of a resumed run join up."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only on rank 0
            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, step: int, values: dict):
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str):
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def close(self):
        if self.writer is not None:
            self.writer.close()
