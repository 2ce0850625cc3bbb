"""Throughput, MFU, memory, and the TensorBoard writer (rank 0 only)."""
import resource
import sys

import torch

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
