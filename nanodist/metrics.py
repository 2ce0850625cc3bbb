"""Throughput, MFU, memory, and the TensorBoard writer (rank 0 only)."""
import resource
import sys
from pathlib import Path

import torch

from nanodist.config import UserError
from nanodist.model import GPTConfig

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0}


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6N + 12 L T C.

    N: all parameters but the position embeddings; the tied wte/lm_head matrix counts
    once (as lm_head it is a matmul; the embedding lookup is free). 6 = forward 2 +
    backward 4 per weight; 12 L T C: attention scores and weighted sum, fwd + bwd.
    """
    n = n_params - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def device_peak_flops(device: torch.device) -> float | None:
    """bf16 peak of the GPU in FLOP/s, or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated tensor memory on CUDA; the process's peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Logger:
    """TensorBoard scalars on the main rank; a no-op elsewhere."""

    def __init__(self, log_dir: str, enabled: bool, resume_step: int = 0):
        """resume_step > 0 continues a run: events logged past it by the run that died
        are dropped (purge_step), so the curves join up."""
        self.writer = None
        if not enabled:
            return
        path = Path(log_dir)
        if not resume_step and any(path.glob("events.out.tfevents.*")):
            raise UserError(f"--log_dir {path} already holds a TensorBoard run; pick a new "
                            f"directory (or omit it: a fresh runs/<time> one), or --resume it")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only on rank 0
        self.writer = SummaryWriter(str(path), purge_step=resume_step or None)

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
