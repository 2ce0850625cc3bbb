"""The checkpoint format, which knows nothing of the layout that wrote it.

    step_0000100/
        __{r}_0.distcp        torch.distributed.checkpoint (DCP) shards, one per rank
        .metadata             DCP's index of the shards (a pickle: read by integrity.Reader)
        rng_rank{r}.pt        each rank's RNG states
        trainer.json          step, config, model config, tokenizer, data position, world size
        manifest.json         the CRC-32 of each file above (integrity.py)

Every tensor is stored under its GPT-2 name with its full (global) shape:

    model/<name>                 the parameter (fp32 master weights; fp64 under --dtype float64)
    optim.exp_avg/<name>         AdamW's first moment
    optim.exp_avg_sq/<name>      AdamW's second moment
    optim.step                   AdamW's step count (one value: every parameter steps together)

A save takes a `TrainState`: the parameters as the layout holds them (params.py), the
optimizer, the data loader (its position) and the step. The layout turns its local
shards into full tensors one parameter at a time (`Params.full_tensors`), and each rank
keeps only its 1/world slice of dim 0, copied to the CPU at once, for DCP to write: no
rank ever holds the whole model, and a GPU no more than one full parameter beyond its
training state. Loading reverses it: DCP reads each rank's slice into CPU memory, one
parameter at a time goes to the device, is gathered, and the layout keeps its own part
(`Params.load_full_tensors`). That is how FSDP 2 resumes as DDP 2, TP 2 as one process,
or 2x2 as FSDP 4.

Writes are atomic: everything goes into `tmp-step_N-<token>/` (the token is this save's),
which rank 0 renames to `step_N/` once all ranks are done. A save that fails (a full
disk) removes its temp dir and ends in one UserError on every rank; the previous
checkpoints stay as they were.
"""
import json
import os
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from nanodist.checkpoint import store
from nanodist.checkpoint.integrity import Reader, open_checked, write_manifest
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, GPTConfig

ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """What a checkpoint holds, whatever the layout."""
    params: object       # params.Params: optimizer parameters, full <-> local by GPT-2 name
    optimizer: torch.optim.Optimizer
    data: object         # the data loader: state_dict() / load_state_dict() of its position
    info: dict           # what trainer.json describes the run with: config, model, tokenizer
    step: int = 0        # the next step to run

    @property
    def device(self) -> torch.device:
        return self.params.mesh.device


def _no_dist() -> bool:
    return not dist.is_initialized()


def _rank() -> int:
    return 0 if _no_dist() else dist.get_rank()


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


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)


@contextmanager
def _quiet():
    """One process has no process group, and DCP warns so at every call: no news here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _read(state: dict, reader: Reader, no_dist: bool):
    """dcp.load into `state`; damaged files end in one clear message."""
    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException is a BaseException
        raise UserError(f"checkpoint {reader.path} could not be read ({store.cause(e)}); resume from "
                        f"an older one") from e


def _moments(states, params, state: str, create: bool = False) -> list[torch.Tensor]:
    """Adam's `state` tensors aligned with `params` (`states`: param -> its optimizer
    state, Params.optimizer_state); zeros where it has not stepped yet, put into the
    optimizer's state when `create` (to load into)."""
    out = []
    for p in params:
        moment = states[p].get(state)
        if moment is None:
            moment = torch.zeros_like(p)
            if create:
                states[p][state] = moment
        out.append(moment)
    return out


def _step_count(states, params) -> torch.Tensor:
    steps = [states[p]["step"] for p in params if "step" in states[p]]
    return steps[0].detach().float().cpu().reshape(1) if steps else torch.zeros(1)


@torch.no_grad()
def save(state: TrainState, out_dir, keep: int) -> Path:
    """Collective: every rank calls it. Writes checkpoint `state.step` into `out_dir` and
    keeps the `keep` latest."""
    no_dist, rank = _no_dist(), _rank()
    world_size = 1 if no_dist else dist.get_world_size()
    out_dir = Path(out_dir)
    token = store.gathered(secrets.token_hex(4), no_dist)[0]  # rank 0's: one temp dir for all
    final = store.step_dir(out_dir, state.step)
    tmp = out_dir / f"tmp-{final.name}-{token}"
    world = _world_mesh(state.device)
    params, states = state.params.param_list(), state.params.optimizer_state(state.optimizer)
    groups = {"model": params}
    groups.update({f"optim.{s}": _moments(states, params, s) for s in ADAM_STATES})
    tensors = {"optim.step": _step_count(states, params)}
    for prefix, laid_out in groups.items():
        for name, full in state.params.full_tensors(laid_out):  # one parameter at a time
            tensors[f"{prefix}/{name}"] = _dim0_slice(full.detach(), world, _to_cpu)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())  # global sizes
    rng = {"cpu": torch.get_rng_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    info = {"step": state.step, **state.info, "data": state.data.state_dict(), "world_size": world_size}

    def make_dir():
        if rank == 0:
            tmp.mkdir(parents=True)

    def write_own_files():
        torch.save(rng, tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / store.INFO).write_text(json.dumps(info, indent=1))

    try:
        store.together(make_dir, no_dist)
        with _quiet():
            metadata = dcp.save(tensors, checkpoint_id=tmp, no_dist=no_dist)
        store.together(write_own_files, no_dist)
        storage = metadata.storage_data or Reader(tmp).metadata.storage_data  # torch 2.11 returns none
        files = {".metadata", store.INFO, *(f"rng_rank{r}.pt" for r in range(world_size)),
                 *(where.relative_path for where in storage.values())}
        store.together(lambda: write_manifest(tmp, files, no_dist), no_dist)
    except (Exception, dcp.CheckpointException) as error:  # CheckpointException is a BaseException
        raise store.save_failed(error, tmp, keep, needed, no_dist) from error
    if rank == 0:
        os.replace(tmp, final)  # atomic: a reader sees all of it or none
        store.rotate(out_dir, keep, state.info.get(store.UNVERIFIED))
    if not no_dist:
        dist.barrier()
    return final


def _tokenizer_name(tokenizer: dict, other: str = "") -> str:
    return f"{len(tokenizer['itos'])}{other} characters" if tokenizer["name"] == "char" else "GPT-2 BPE"


def _check_compatible(info: dict, state: TrainState, path: Path):
    """The same tokenizer (the dataset) and model shapes (dropout may change on resume)."""
    theirs, ours = info["model"], state.info["model"]
    if info["tokenizer"] != state.info["tokenizer"] or theirs["vocab_size"] != ours["vocab_size"]:
        there = _tokenizer_name(info["tokenizer"])
        here = _tokenizer_name(state.info["tokenizer"])
        here = _tokenizer_name(state.info["tokenizer"], " other") if here == there else here
        raise UserError(f"checkpoint {path} was trained on another dataset (its tokenizer: {there}, "
                        f"vocabulary {theirs['vocab_size']}; this data's: {here}, vocabulary "
                        f"{ours['vocab_size']}); pick the checkpoint's --dataset and --data_dir")
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "dropout" and theirs.get(k) != v}
    if diff:
        raise UserError(f"checkpoint {path} was written for another model: "
                        + ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items())
                        + "; use the checkpoint's --model, --block_size and --moe_* flags, or a new --out_dir")


def _check_finite(tensor: torch.Tensor, key: str, path: Path):
    """What an unverified checkpoint's tensors can be checked for without checksums."""
    if not torch.isfinite(tensor).all():
        raise UserError(f"checkpoint {path} is corrupt ({key} holds non-finite values); resume from an older one")


def _load_rng(path: Path, rank: int, device: torch.device):
    rng_file = path / f"rng_rank{rank}.pt"
    try:
        rng = torch.load(rng_file, weights_only=True)  # data, never code
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
        raise UserError(f"checkpoint {path} is corrupt ({rng_file.name}: {store.cause(e)}); resume from "
                        f"an older one") from e


@torch.no_grad()
def load(state: TrainState, path: Path, trust_unverified: bool = False) -> dict:
    """Collective. Loads checkpoint `path` into `state` (its layout's parameters, the
    optimizer, the data position, this rank's RNG); returns its trainer.json, whose
    store.UNVERIFIED is the step of the newest unverified checkpoint the run descends
    from (`trust_unverified`: one without manifest is loaded, see integrity.py)."""
    no_dist = _no_dist()
    reader, verified = open_checked(path, no_dist, trust_unverified)  # damage first, then contents
    info = store.read_info(path)
    _check_compatible(info, state, path)
    world = _world_mesh(state.device)
    tensors = {key: _dim0_slice(torch.empty(meta.size, dtype=meta.properties.dtype, device="meta"),
                                world if key != "optim.step" else None,
                                lambda t: torch.empty_like(t, device="cpu"))
               for key, meta in reader.metadata.state_dict_metadata.items()}
    _read(tensors, reader, no_dist)

    def full_of(key):  # on the device one parameter at a time; each slice freed once used
        if key not in tensors:
            raise UserError(f"checkpoint {path} has no {key!r}: it was written for another model")
        value = tensors.pop(key).to(state.device)
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if not verified:
            _check_finite(value, key, path)
        return value

    params, optimizer = state.params.param_list(), state.optimizer
    states = state.params.optimizer_state(optimizer)
    state.params.load_full_tensors(lambda name: full_of(f"model/{name}"), params)
    for s in ADAM_STATES:
        state.params.load_full_tensors(lambda name, s=s: full_of(f"optim.{s}/{name}"),
                                       _moments(states, params, s, create=True))
    step_count = tensors["optim.step"].reshape(())
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for p in params:  # where AdamW keeps its step count: with the param when fused, else CPU
        states[p]["step"] = step_count.to(p.device if on_device else "cpu").clone()
    if "data" in info:  # checkpoints before the data position: it follows from the step alone
        state.data.load_state_dict(info["data"])
    if info["world_size"] == (1 if no_dist else dist.get_world_size()):  # the same RNG streams
        store.together(lambda: _load_rng(path, _rank(), state.device), no_dist)
    if not verified:
        info[store.UNVERIFIED] = info["step"]
    state.step = info["step"]
    return info


@torch.no_grad()
def load_model(path, trust_unverified: bool = False) -> tuple[GPT, dict]:
    """The GPT-2 of checkpoint `path` on one process (for sampling), and its trainer.json."""
    path = Path(path)
    reader, verified = open_checked(path, True, trust_unverified)
    info = store.read_info(path)
    model = GPT(GPTConfig(**info["model"]), seed=None)
    _read({f"model/{name}": param for name, param in model.named_parameters()}, reader, no_dist=True)
    if not verified:
        for name, param in model.named_parameters():
            _check_finite(param, f"model/{name}", path)
    return model, info
