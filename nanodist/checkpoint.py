"""Checkpoints that any layout can write and any layout can resume from.

    out_dir/step_000100/            one checkpoint (complete: renamed into place last)
        model.* optimizer.*         torch.distributed.checkpoint (DCP) shards
        .metadata                   DCP's index of the shards
        trainer.json                step, config, model config, tokenizer
        rng_rank{r}.pt              each rank's RNG states

The format knows nothing of the layout that wrote it. Every tensor is stored under its
GPT-2 name with its full (global) shape: "model/<name>", "optim/<name>/exp_avg",
"optim/<name>/exp_avg_sq". Each layout turns its local shards into full tensors one
parameter at a time (`Parallel.full_tensors`), and each rank keeps only its 1/world
slice of dim 0 for DCP to write, so no rank ever holds the whole model. Loading reverses
it: DCP reads each rank's slice, one parameter at a time is gathered and each layout
keeps its own shard (`Parallel.load_full_tensors`). That is how FSDP 2 resumes as DDP 2,
TP 2 as one process, or 2x2 as FSDP 4.

Writes are atomic: everything goes into `tmp-step_N/`, which rank 0 renames to `step_N/`
once all ranks are done. A crash mid-write leaves the previous checkpoint as it was.
"""
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from nanodist.config import UserError
from nanodist.model import GPT, GPTConfig

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _world_mesh(device):
    return init_device_mesh(device.type, (dist.get_world_size(),)) if dist.is_initialized() else None


def _dim0_slice(full: torch.Tensor, world, own):
    """This rank's slice of dim 0 (torch.chunk sizes, as DTensor's Shard(0)), made its
    own by `own` (a copy: the full tensor must not stay alive through a view)."""
    if world is None:
        return own(full)
    rank, n = world.get_local_rank(), world.size()
    chunks = full.chunk(n)
    local = chunks[rank] if rank < len(chunks) else full[:0]
    return DTensor.from_local(own(local), world, [Shard(0)], run_check=False,
                              shape=full.shape, stride=full.stride())


@contextmanager
def _quiet():
    """One process has no process group, and DCP warns so at every call: no news here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("step_*") if (p / "trainer.json").exists()),
                  key=step_of)


def _moments(optimizer, params, state: str, create: bool = False) -> list[torch.Tensor]:
    """Adam's `state` tensors aligned with `params`; zeros where it has not stepped yet,
    put into the optimizer's state when `create` (to load into)."""
    out = []
    for p in params:
        moment = optimizer.state[p].get(state)
        if moment is None:
            moment = torch.zeros_like(p)
            if create:
                optimizer.state[p][state] = moment
        out.append(moment)
    return out


def _step_count(optimizer, params) -> torch.Tensor:
    steps = [optimizer.state[p]["step"] for p in params if "step" in optimizer.state[p]]
    return steps[0].detach().float().cpu().reshape(1) if steps else torch.zeros(1)


@torch.no_grad()
def save(trainer, step: int):
    """Collective: every rank calls it. Writes checkpoint `step` (the next step to run)."""
    par, mesh, cfg = trainer.par, trainer.mesh, trainer.cfg
    out_dir = Path(cfg.out_dir)
    tmp, final = out_dir / f"tmp-step_{step:07d}", out_dir / f"step_{step:07d}"
    if mesh.is_main:
        for debris in out_dir.glob("tmp-step_*"):  # of saves that died before their rename
            shutil.rmtree(debris, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    world = _world_mesh(mesh.device)
    params = par.optimizer_param_list()
    groups = {"model": params}
    groups.update({f"optim.{s}": _moments(trainer.optimizer, params, s) for s in ADAM_STATES})
    state = {"optim.step": _step_count(trainer.optimizer, params)}
    for prefix, tensors in groups.items():
        for name, full in par.full_tensors(tensors):  # one parameter at a time
            state[f"{prefix}/{name}"] = _dim0_slice(full.detach(), world, lambda t: t.clone())
    with _quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=world is None)
    rng = {"cpu": torch.get_rng_state()}
    if mesh.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(mesh.device)
    torch.save(rng, tmp / f"rng_rank{mesh.rank}.pt")
    _barrier()
    if mesh.is_main:
        info = {"step": step, "config": asdict(trainer.cfg), "model": asdict(trainer.model_cfg),
                "tokenizer": trainer.data.tokenizer, "world_size": mesh.world_size}
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1))
        os.replace(tmp, final)  # atomic: a reader sees all of it or none
        for old in checkpoints(out_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find(out_dir, resume: str) -> Path | None:
    """The checkpoint `--resume` asks for: latest | auto (latest or none) | a path."""
    if resume in ("latest", "auto"):
        found = checkpoints(out_dir)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise UserError(f"no checkpoint in {out_dir}: train first (train.py --resume auto "
                        f"starts fresh when there is none)")
    path = Path(resume)
    if not (path / "trainer.json").exists():
        raise UserError(f"--resume {resume}: not a checkpoint (no trainer.json); pass a "
                        f"step_N directory, or --resume latest")
    return path


def _read(state: dict, path: Path, no_dist: bool):
    """dcp.load into `state`; damaged files end in one clear message."""
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException is a BaseException
        cause = str(e).strip().splitlines()[-1]
        raise UserError(f"checkpoint {path} could not be read ({cause}); resume from an older one") from e


def read_info(path: Path) -> dict:
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({e}); resume from an older one "
                        f"(--resume {path.parent}/step_N)") from e


def check_compatible(info: dict, trainer, path: Path):
    ours = {k: v for k, v in asdict(trainer.model_cfg).items() if k != "dropout"}  # shapes only
    diff = {k: (info["model"].get(k), v) for k, v in ours.items() if info["model"].get(k) != v}
    if diff:
        raise UserError(f"checkpoint {path} was written for another model: "
                        + ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items())
                        + "; use the checkpoint's --model/--block_size or a new --out_dir")
    if info["tokenizer"] != trainer.data.tokenizer:
        raise UserError(f"checkpoint {path} was trained with the {info['tokenizer']!r} tokenizer, "
                        f"this dataset uses {trainer.data.tokenizer!r}; pick the matching --dataset")


@torch.no_grad()
def load(trainer, path: Path) -> int:
    """Collective. Loads `path` into the trainer's layout; returns the step to run next."""
    par, mesh = trainer.par, trainer.mesh
    info = read_info(path)
    check_compatible(info, trainer, path)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
        raise UserError(f"checkpoint {path} is corrupt ({e}); resume from an older one") from e
    world = _world_mesh(mesh.device)
    state = {key: _dim0_slice(torch.empty(meta.size, dtype=meta.properties.dtype, device="meta"),
                              world if key != "optim.step" else None,
                              lambda t: torch.empty_like(t, device=mesh.device))
             for key, meta in metadata.state_dict_metadata.items()}
    _read(state, path, no_dist=world is None)

    def full_of(key):
        if key not in state:
            raise UserError(f"checkpoint {path} has no {key!r}: it was written for another model")
        value = state.pop(key)  # free each slice once used
        return value.full_tensor() if isinstance(value, DTensor) else value

    params = par.optimizer_param_list()
    par.load_full_tensors(lambda name: full_of(f"model/{name}"), params)
    for s in ADAM_STATES:
        par.load_full_tensors(lambda name, s=s: full_of(f"optim.{s}/{name}"),
                              _moments(trainer.optimizer, params, s, create=True))
    step_count = state["optim.step"].reshape(())
    on_device = trainer.optimizer.defaults.get("fused") or trainer.optimizer.defaults.get("capturable")
    for p in params:  # where AdamW keeps its step count: with the param when fused, else CPU
        trainer.optimizer.state[p]["step"] = step_count.to(p.device if on_device else "cpu").clone()
    rng_file = path / f"rng_rank{mesh.rank}.pt"
    if info["world_size"] == mesh.world_size and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and mesh.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], mesh.device)
    return info["step"]


@torch.no_grad()
def load_model(path) -> tuple[GPT, dict]:
    """The GPT-2 of checkpoint `path` on one process (for sampling), and its trainer.json."""
    path = Path(path)
    info = read_info(path)
    model = GPT(GPTConfig(**info["model"]), seed=None)
    _read({f"model/{name}": param for name, param in model.named_parameters()}, path, no_dist=True)
    return model, info
