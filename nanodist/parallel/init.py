"""Layout-invariant initialisation (DESIGN.md invariant 1).

A parameter's initial value is a function of (seed, its GPT-2 name) alone
(`GPT.initial_value`), so a rank that holds a slice of it draws the full tensor from
that generator and keeps its slice. Never "seed once, draw locally": that hands every
rank the same shard (the bug of the original experiments, and DTensor's RNG on CPU).
"""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from nanodist import compat


def full_value(model: nn.Module, name: str, param, seed: int, device) -> torch.Tensor:
    """The full (global) value of parameter `name`: itself when materialised, else its
    initial value drawn from (seed, name)."""
    if param.is_meta:
        return model.initial_value(name, seed, param.shape).to(device, param.dtype)
    return param.detach()


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out as the (possibly DTensor) parameter `like`."""
    if isinstance(like, DTensor):  # slice locally, no communication (src_data_rank=None)
        return distribute_tensor(full, like.device_mesh, like.placements,
                                 src_data_rank=None).to_local()
    return full


@torch.no_grad()
def materialize(module: nn.Module, model: nn.Module, seed: int, device: torch.device,
                prefix: str = ""):
    """Allocate the meta parameters of `module` on `device` and give them their initial
    values. `model` is the root GPT (its names decide the values); `prefix` is
    `module`'s path in it. Parameters already materialised are left untouched."""
    pending = [(name, param) for name, param in module.named_parameters(prefix=prefix.rstrip("."))
               if param.is_meta]
    if not pending:
        return
    slots = [(mod, key, id(p)) for mod in module.modules() for key, p in mod._parameters.items()
             if p is not None]
    compat.materialize_meta(module, device)
    first = {}  # leaving meta makes new Parameter objects: tie them again (wte / lm_head)
    for mod, key, old_id in slots:
        mod._parameters[key] = first.setdefault(old_id, mod._parameters[key])
    params = dict(module.named_parameters(prefix=prefix.rstrip(".")))
    for name, _ in pending:
        param = params[name]
        full = model.initial_value(name, seed, param.shape).to(device)  # it was on meta
        target = param.to_local() if isinstance(param, DTensor) else param
        target.copy_(local_slice(full, param))
