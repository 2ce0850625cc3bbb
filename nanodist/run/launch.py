"""Joining the processes torchrun started: this process's device and the process group.

    pick_device       cuda when present (one GPU per local process), else cpu
    init_distributed  nccl on CUDA, gloo on CPU; no group at all for one plain process
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from nanodist.errors import UserError


def pick_device(preference: str = "auto") -> torch.device:
    """cuda when present (or asked for), else cpu; the local rank picks the GPU, one
    GPU per process of this machine."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; "
                        "use --device cpu (or auto)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    gpus = torch.cuda.device_count()
    if max(local_world, local_rank + 1) > gpus:  # NCCL: "invalid device ordinal" / "Duplicate GPU"
        raise UserError(f"{local_world} processes on this machine need one GPU each, but "
                        f"{gpus} visible; use --nproc_per_node={gpus} (a smaller layout) or "
                        f"--device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_restartable():
    """torchrun --max-restarts shares its rendezvous store with the workers, and after a
    restart the store still holds the previous round's addresses (pytorch/pytorch#135712):
    gloo groups connect to dead peers, hang or fail. Only the launcher can avoid it; it
    restarts refused workers too, which then exit at once without repeating why."""
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"):
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            raise SystemExit(2)  # the first attempt said it
        raise UserError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                        "environment, or a restart can hang (pytorch/pytorch#135712): run "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...")


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); joining and
    every collective on it give up after `timeout` (None: PyTorch's 10/30 minutes).
    Returns (rank, world_size); (0, 1) with no group when not launched by torchrun
    (an already initialised group, as in the tests, is used as it is)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return 0, 1
        check_restartable()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()
