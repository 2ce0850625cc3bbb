"""The run directory: where a run writes, which checkpoint it resumes, and that no other
job and no earlier run gets mixed into it. Rank 0 decides; the trainer broadcasts."""
import os
import time
from pathlib import Path

from nanodist import checkpoint

from nanodist.run import faults
from nanodist.run.config import TrainConfig
from nanodist.errors import UserError


def new_run_dir(runs: Path, layout: str) -> str:
    """runs/<time>-<layout>, with a suffix when a run started in the same second."""
    base = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{layout}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create a run directory in {runs} ({e.strerror}); pass --out_dir") from e
    return str(path)


def check_writable_dirs(cfg: TrainConfig):
    """--out_dir and --log_dir: a directory that exists, or can be created, and is writable."""
    for flag in ("out_dir", "log_dir"):
        given = getattr(cfg, flag)
        path = Path(given).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())  # / at the latest
        problem = ("is a file, not a directory" if not existing.is_dir() else
                   "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
        if given and problem:
            raise UserError(f"--{flag} {given}: {existing} {problem}; pick another --{flag}")


def checkpoint_to_resume(cfg: TrainConfig, log_dir: str) -> Path | None:
    """The checkpoint --resume names (None: start fresh), after checking that the run
    directory holds nothing this run would mix with or silently overwrite."""
    checkpoint.remove_debris(cfg.out_dir)  # saves that died mid-write (the run lock keeps other jobs out)
    found = checkpoint.find(cfg.out_dir, cfg.resume) if cfg.resume else None
    later = [p for p in checkpoint.checkpoints(cfg.out_dir)
             if found is None or checkpoint.step_of(p) > checkpoint.step_of(found)]
    if later and found is None:
        raise UserError(f"--out_dir {cfg.out_dir} already holds checkpoints of another run; "
                        f"continue it with --resume, or pick a new --out_dir")
    if later:
        raise UserError(f"--out_dir {cfg.out_dir} holds checkpoints past {found.name} "
                        f"({later[-1].name}): resume the latest, or resume {found.name} into "
                        f"a new --out_dir")
    if not cfg.resume and any(Path(log_dir).glob("events.out.tfevents.*")):
        raise UserError(f"--log_dir {log_dir} already holds a TensorBoard run; pick a new "
                        f"directory (or omit it: a fresh runs/<time> one), or --resume it")
    return found


def claim(cfg: TrainConfig, log_dir: str) -> tuple[faults.RunLock, Path | None]:
    """Lock the run directory against a second job, then pick the checkpoint to resume."""
    lock = faults.RunLock(cfg.out_dir)
    try:
        return lock, checkpoint_to_resume(cfg, log_dir)
    except BaseException:
        lock.release()
        raise
