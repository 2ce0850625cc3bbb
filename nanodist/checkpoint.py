"""Checkpoints that any layout can write and any layout can resume from.

    out_dir/step_000100/            one checkpoint (complete: renamed into place last)
        __{r}_0.distcp              torch.distributed.checkpoint (DCP) shards, one per rank
        .metadata                   DCP's index of the shards (a pickle)
        rng_rank{r}.pt              each rank's RNG states
        trainer.json                step, config, model config, tokenizer
        manifest.json               the CRC-32 of each file above

The format knows nothing of the layout that wrote it. Every tensor is stored under its
GPT-2 name with its full (global) shape: "model/<name>", "optim/<name>/exp_avg",
"optim/<name>/exp_avg_sq". Each layout turns its local shards into full tensors one
parameter at a time (`Parallel.full_tensors`), and each rank keeps only its 1/world
slice of dim 0, copied to the CPU at once, for DCP to write: no rank ever holds the whole
model, and a GPU no more than one full parameter beyond its training state. Loading
reverses it: DCP reads each rank's slice into CPU memory, one parameter at a time goes to
the device, is gathered, and each layout keeps its own shard (`Parallel.load_full_tensors`).
That is how FSDP 2 resumes as DDP 2, TP 2 as one process, or 2x2 as FSDP 4.

Writes are atomic: everything goes into `tmp-step_N-<token>/` (the token is this save's),
which rank 0 renames to `step_N/` once all ranks are done. A save that fails (a full
disk) removes its temp dir and ends in one UserError on every rank; the previous
checkpoints stay as they were. A process killed mid-save leaves its temp dir behind: the
next run of the directory, holding its lock, removes it (`remove_debris`).

Nothing loaded runs code, and nothing damaged loads silently: every file is checked
against manifest.json first (the ranks share the hashing), `.metadata` is unpickled
allowing only DCP's metadata classes (DCP's own reader calls pickle.load, which runs
whatever the file names), and tensors are read with torch.load(weights_only=True).
Checkpoints written before manifests existed load unverified, with a warning: they are
still safe to load, and refusing them would strand the runs they belong to.
"""
import errno
import json
import os
import pickle
import secrets
import shutil
import sys
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from nanodist.config import UserError
from nanodist.model import GPT, GPTConfig

ADAM_STATES = ("exp_avg", "exp_avg_sq")
MANIFEST = "manifest.json"


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


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _cause(error: BaseException) -> str:
    """The last line of an error (DCP's hold every rank's traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _gathered(value, no_dist: bool) -> list:
    """Every rank's `value`, rank by rank (just this one without a process group)."""
    if no_dist:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _together(fn, no_dist: bool):
    """fn() on this rank. If it failed anywhere, every rank raises: the failed ones their
    error, the others a UserError with its line (none waits in a collective for a rank
    that gave up)."""
    error = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - raised again below, on every rank
        error = e
    failures = [f for f in _gathered(error and _cause(error), no_dist) if f]
    if error is not None:
        raise error
    if failures:
        raise UserError(failures[0])


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("step_*") if (p / "trainer.json").exists()),
                  key=step_of)


def remove_debris(out_dir):
    """Removes the temp dirs of saves that died before their rename. Only for the run that
    holds the directory's lock: every temp dir there is then of a run that is dead."""
    for debris in Path(out_dir).glob("tmp-step_*"):
        shutil.rmtree(debris, ignore_errors=True)


def _crc32(path: Path) -> str | None:
    """A file's CRC-32 (None if it cannot be read). It catches damage, not forgery: who can
    write the files can write the manifest too (and .metadata runs no code either way)."""
    crc = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return None
    return f"{crc:08x}"


def _checksums(directory: Path, names, no_dist: bool) -> dict[str, str | None]:
    """The CRC-32 of each file of `names`: each rank hashes its share, all get all."""
    rank, world = (0, 1) if no_dist else (dist.get_rank(), dist.get_world_size())
    mine = {name: _crc32(directory / name) for name in sorted(names)[rank::world]}
    return {name: crc for part in _gathered(mine, no_dist) for name, crc in part.items()}


def _verify(path: Path, no_dist: bool):
    """Every file of checkpoint `path` against its manifest; the same verdict on all ranks."""
    try:
        expected = json.loads((path / MANIFEST).read_text())["crc32"]
        if not isinstance(expected, dict):
            raise TypeError("no file list")
    except FileNotFoundError:
        if no_dist or dist.get_rank() == 0:
            print(f"warning: checkpoint {path} has no {MANIFEST} (it predates them): its files "
                  f"are not checked for damage", file=sys.stderr, flush=True)
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({MANIFEST}: {e}); resume from an older one") from e
    found = _checksums(path, expected, no_dist)
    bad = [name for name in sorted(expected) if found[name] != expected[name]]
    if bad:
        what = "is missing" if found[bad[0]] is None else f"does not match its checksum in {MANIFEST}"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"checkpoint {path} could not be read ({bad[0]} {what}{more}); "
                        f"resume from an older one")


# Everything DCP's .metadata of these checkpoints holds (found by unpickling real ones).
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each slice lies
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # the checkpoint_id it was saved as
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, refusing any global it does not hold before importing it."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _METADATA_GLOBALS:
            raise UserError(f"checkpoint {self.path} refused: its .metadata asks for {module}.{name}, "
                            f"which DCP metadata never holds (loading it could run code)")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with its .metadata unpickled safely, once, here: a bad one ends in
    one clear line, before DCP could log its own tracebacks."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with open(path / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
            raise UserError(f"checkpoint {path} is corrupt (.metadata: {_cause(e)}); resume from "
                            f"an older one") from e
        index = getattr(metadata, "state_dict_metadata", None) if isinstance(metadata, Metadata) else None
        if not isinstance(index, dict) or not all(isinstance(m, TensorStorageMetadata) and
                                                  isinstance(getattr(m, "size", None), torch.Size)
                                                  for m in index.values()):
            raise UserError(f"checkpoint {path} is corrupt (.metadata is not this project's DCP "
                            f"index); resume from an older one")
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()  # older DCPs
        metadata.storage_meta.load_id = self.load_id  # as DCP's own read_metadata does
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata


def _open(path: Path, no_dist: bool) -> _Reader:
    """Checks checkpoint `path` before anything parses its tensors; its DCP reader."""
    _verify(path, no_dist)
    return _Reader(path)


def _read(state: dict, reader: _Reader, no_dist: bool):
    """dcp.load into `state`; damaged files end in one clear message."""
    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException is a BaseException
        raise UserError(f"checkpoint {reader.path} could not be read ({_cause(e)}); resume from "
                        f"an older one") from e


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


def _disk_full(error: BaseException, directory: Path, needed: int) -> bool:
    """ENOSPC or EDQUOT anywhere in `error`, or less room left than a checkpoint needs
    (torch.save reports a short write as "unexpected pos", and DCP's errors from other
    ranks lose their cause)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [e.__cause__, e.__context__]
        if isinstance(e, dcp.CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def _save_failed(error: BaseException, tmp: Path, trainer, needed: int, no_dist: bool) -> UserError:
    """Every rank comes here together: the partial save goes, one line says why."""
    full = any(_gathered(_disk_full(error, tmp.parent, needed), no_dist))  # before space is freed
    if trainer.mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if full:
        return UserError(f"the disk under {tmp.parent} is full (needs ~{-(-needed // 2**20)} MiB per "
                         f"checkpoint, {trainer.cfg.keep_checkpoints} kept and one being written): "
                         f"free space, lower --keep_checkpoints or pick another --out_dir; the "
                         f"previous checkpoints are intact")
    return UserError(f"checkpoint {tmp.name} could not be written in {tmp.parent} ({_cause(error)}); "
                     f"the previous checkpoints are intact")


@torch.no_grad()
def save(trainer, step: int):
    """Collective: every rank calls it. Writes checkpoint `step` (the next step to run)."""
    par, mesh, cfg = trainer.par, trainer.mesh, trainer.cfg
    no_dist = not dist.is_initialized()
    out_dir = Path(cfg.out_dir)
    token = _gathered(secrets.token_hex(4), no_dist)[0]  # rank 0's: one temp dir for all
    tmp, final = out_dir / f"tmp-step_{step:07d}-{token}", out_dir / f"step_{step:07d}"
    world = _world_mesh(mesh.device)
    params = par.optimizer_param_list()
    groups = {"model": params}
    groups.update({f"optim.{s}": _moments(trainer.optimizer, params, s) for s in ADAM_STATES})
    state = {"optim.step": _step_count(trainer.optimizer, params)}
    for prefix, tensors in groups.items():
        for name, full in par.full_tensors(tensors):  # one parameter at a time
            state[f"{prefix}/{name}"] = _dim0_slice(full.detach(), world, _to_cpu)
    needed = sum(t.numel() * t.element_size() for t in state.values())  # global sizes
    rng = {"cpu": torch.get_rng_state()}
    if mesh.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(mesh.device)
    info = {"step": step, "config": asdict(cfg), "model": asdict(trainer.model_cfg),
            "tokenizer": trainer.data.tokenizer, "world_size": mesh.world_size}

    def make_dir():
        if mesh.is_main:
            tmp.mkdir(parents=True)

    def write_own_files():
        torch.save(rng, tmp / f"rng_rank{mesh.rank}.pt")
        if mesh.is_main:
            (tmp / "trainer.json").write_text(json.dumps(info, indent=1))

    def write_manifest():
        if mesh.is_main:
            unread = [name for name, crc in sums.items() if crc is None]
            if unread:
                raise OSError(f"{unread[0]} cannot be read back")
            (tmp / MANIFEST).write_text(json.dumps({"crc32": dict(sorted(sums.items()))}, indent=1))

    try:
        _together(make_dir, no_dist)
        with _quiet():
            metadata = dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
        _together(write_own_files, no_dist)
        files = {".metadata", "trainer.json", *(f"rng_rank{r}.pt" for r in range(mesh.world_size)),
                 *(where.relative_path for where in metadata.storage_data.values())}
        sums = _checksums(tmp, files, no_dist)
        _together(write_manifest, no_dist)
    except (Exception, dcp.CheckpointException) as error:  # CheckpointException is a BaseException
        raise _save_failed(error, tmp, trainer, needed, no_dist) from error
    if mesh.is_main:
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


def _load_rng(path: Path, rank: int, device: torch.device):
    rng_file = path / f"rng_rank{rank}.pt"
    try:
        rng = torch.load(rng_file, weights_only=True)  # data, never code
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
        raise UserError(f"checkpoint {path} is corrupt ({rng_file.name}: {_cause(e)}); resume from "
                        f"an older one") from e


@torch.no_grad()
def load(trainer, path: Path) -> int:
    """Collective. Loads `path` into the trainer's layout; returns the step to run next."""
    par, mesh = trainer.par, trainer.mesh
    no_dist = not dist.is_initialized()
    info = read_info(path)
    check_compatible(info, trainer, path)
    reader = _open(path, no_dist)
    world = _world_mesh(mesh.device)
    state = {key: _dim0_slice(torch.empty(meta.size, device="meta"), world if key != "optim.step" else None,
                              lambda t: torch.empty_like(t, device="cpu"))
             for key, meta in reader.metadata.state_dict_metadata.items()}
    _read(state, reader, no_dist)

    def full_of(key):  # on the device one parameter at a time; each slice freed once used
        if key not in state:
            raise UserError(f"checkpoint {path} has no {key!r}: it was written for another model")
        value = state.pop(key).to(mesh.device)
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
    if info["world_size"] == mesh.world_size:  # the same RNG streams: resumes bitwise
        _together(lambda: _load_rng(path, mesh.rank, mesh.device), no_dist)
    return info["step"]


@torch.no_grad()
def load_model(path) -> tuple[GPT, dict]:
    """The GPT-2 of checkpoint `path` on one process (for sampling), and its trainer.json."""
    path = Path(path)
    info = read_info(path)
    reader = _open(path, no_dist=True)
    model = GPT(GPTConfig(**info["model"]), seed=None)
    _read({f"model/{name}": param for name, param in model.named_parameters()}, reader, no_dist=True)
    return model, info
