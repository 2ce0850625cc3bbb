"""The checkpoints of a run directory: which exist, which one --resume means, and what
all ranks do together when one of them fails (no rank left waiting in a collective).

    out_dir/step_0000100/        one checkpoint, complete: renamed into place last
    out_dir/tmp-step_N-<token>/  a save in progress (or one that died: `remove_debris`)
"""
import errno
import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nanodist.errors import UserError

INFO = "trainer.json"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def step_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("step_*") if (p / INFO).exists()), key=step_of)


def remove_debris(out_dir):
    """Removes the temp dirs of saves that died before their rename. Only for the run that
    holds the directory's lock: every temp dir there is then of a run that is dead."""
    for debris in Path(out_dir).glob("tmp-step_*"):
        shutil.rmtree(debris, ignore_errors=True)


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
    if not (path / INFO).exists():
        raise UserError(f"--resume {resume}: not a checkpoint (no {INFO}); pass a "
                        f"step_N directory, or --resume latest")
    return path


def read_info(path: Path) -> dict:
    """trainer.json: step, config, model config, tokenizer, data position, world size."""
    try:
        return json.loads((path / INFO).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({e}); resume from an older one "
                        f"(--resume {path.parent}/step_N)") from e


def cause(error: BaseException) -> str:
    """The last line of an error (DCP's hold every rank's traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def gathered(value, no_dist: bool) -> list:
    """Every rank's `value`, rank by rank (just this one without a process group)."""
    if no_dist:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def together(fn, no_dist: bool):
    """fn() on this rank. If it failed anywhere, every rank raises: the failed ones their
    error, the others a UserError with its line (none waits in a collective for a rank
    that gave up)."""
    error = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - raised again below, on every rank
        error = e
    failures = [f for f in gathered(error and cause(error), no_dist) if f]
    if error is not None:
        raise error
    if failures:
        raise UserError(failures[0])


def disk_full(error: BaseException, directory: Path, needed: int) -> bool:
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


def save_failed(error: BaseException, tmp: Path, keep: int, needed: int, no_dist: bool) -> UserError:
    """Every rank comes here together: the partial save goes, one line says why."""
    full = any(gathered(disk_full(error, tmp.parent, needed), no_dist))  # before space is freed
    if no_dist or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if full:
        return UserError(f"the disk under {tmp.parent} is full (needs ~{-(-needed // 2**20)} MiB per "
                         f"checkpoint, {keep} kept and one being written): free space, lower "
                         f"--keep_checkpoints or pick another --out_dir; the previous checkpoints are intact")
    return UserError(f"checkpoint {tmp.name} could not be written in {tmp.parent} ({cause(error)}); "
                     f"the previous checkpoints are intact")
