"""The checkpoints of a run directory: which exist, which one --resume means, and what
all ranks do together when one of them fails (no rank left waiting in a collective).

    out_dir/step_0000100/        one checkpoint, complete: renamed into place last
    out_dir/tmp-step_N-<token>/  a save in progress (or one that died: `remove_debris`)
"""
import dataclasses
import errno
import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig

INFO = "trainer.json"
STEP_DIR = re.compile(r"step_\d+")
UNVERIFIED = "unverified_since"  # in INFO: the step of the unverified checkpoint the run descends from
SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # what every GPTConfig in INFO has


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def step_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("step_*") if STEP_DIR.fullmatch(p.name) and (p / INFO).exists()),
                  key=step_of)


def remove_debris(out_dir):
    """Removes the temp dirs of saves that died before their rename. Only for the run that
    holds the directory's lock: every temp dir there is then of a run that is dead."""
    for debris in Path(out_dir).glob("tmp-step_*"):
        shutil.rmtree(debris, ignore_errors=True)


def find(out_dir, resume: str, flag: str = "--resume") -> Path | None:
    """The checkpoint `flag` (--resume, or another tool's) asks for: latest | auto (latest
    or none) | a path."""
    if resume in ("latest", "auto"):
        found = checkpoints(out_dir)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        hint = " (train.py --resume auto starts fresh when there is none)" if flag == "--resume" else ""
        raise UserError(f"no checkpoint in {out_dir}: train first{hint}")
    path = Path(resume)
    if not (path / INFO).exists() or not STEP_DIR.fullmatch(path.name):  # its name is its step
        held = ", ".join(p.name for p in checkpoints(path.parent)) if path.parent.is_dir() else ""
        raise UserError(f"{flag} {resume}: not a checkpoint (a step_N directory with {INFO})"
                        + (f"; {path.parent} holds {held}" if held else ""))
    return path


def read_info(path: Path) -> dict:
    """trainer.json: step, config, model config, tokenizer, data position, world size;
    its schema checked (read it after the checksums: damage first, then shape)."""
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({e}); resume from an older one "
                        f"(--resume {path.parent}/step_N)") from e
    problem = _info_problem(info)
    if problem:
        raise UserError(f"checkpoint {path} is corrupt ({INFO}: {problem}); resume from an older one "
                        f"(--resume {path.parent}/step_N)")
    return info


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _model_problem(model) -> str | None:
    """What is wrong with trainer.json's GPTConfig (None: nothing): every field of it, of
    its default's type, counts >= 1 (experts >= 0), rates >= 0, the heads dividing the width."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    if not isinstance(model, dict) or not set(SHAPE) <= set(model) <= set(defaults):
        return "model is not a GPT configuration"
    for key, value in model.items():
        default = defaults[key]
        fits = (isinstance(value, bool) if isinstance(default, bool) else
                _count(value, 0 if key == "moe_experts" else 1) if isinstance(default, int) else
                isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
        if not fits:
            return f"model.{key} is {value!r}"
    if model["n_embd"] % model["n_head"]:
        return f"model.n_embd {model['n_embd']} does not divide into {model['n_head']} heads"
    return None


def _info_problem(info) -> str | None:
    """What is wrong with a trainer.json's contents (None: nothing)."""
    if not isinstance(info, dict):
        return f"not an object but {type(info).__name__}"
    for key, low in (("step", 0), ("world_size", 1)):
        if not _count(info.get(key), low):
            return f"{key} is {info.get(key)!r}, not an integer >= {low}"
    problem = _model_problem(info.get("model"))
    if problem:
        return problem
    tokenizer = info.get("tokenizer")
    if not (isinstance(tokenizer, dict) and tokenizer.get("name") in ("char", "gpt2")):
        return "tokenizer is neither char nor gpt2"
    itos = tokenizer.get("itos")
    if tokenizer["name"] == "char" and not (isinstance(itos, list) and itos and
                                            all(isinstance(c, str) and len(c) == 1 for c in itos)):
        return "the char tokenizer has no list of characters"
    if "data" in info and not (isinstance(info["data"], dict) and _count(info["data"].get("seed"))):
        return "data is not a data position"
    if info.get(UNVERIFIED) is not None and not _count(info[UNVERIFIED]):
        return f"{UNVERIFIED} is {info[UNVERIFIED]!r}"
    return None


def rotate(out_dir, keep: int, kept_up_to: int | None):
    """Removes all but the `keep` latest checkpoints, and none at or before step
    `kept_up_to`: a run that descends from an unverified checkpoint keeps it and the
    older ones, the only ones that may be intact (read_info's UNVERIFIED)."""
    for old in checkpoints(out_dir)[:-keep]:
        if kept_up_to is None or step_of(old) > kept_up_to:
            shutil.rmtree(old, ignore_errors=True)


def cause(error: BaseException) -> str:
    """The first sentence of an error's last line, a pointer to documentation aside (DCP's
    errors hold every rank's traceback; torch.load's end in a link to its docs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = ([line for line in lines if "://" not in line] or lines or [type(error).__name__])[-1]
    return line.split(". ")[0]


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
