"""How a run ends when something outside it goes wrong: each case in one clear line.

    SIGTERM / SIGINT /        -> a flag; in the next step the ranks agree on it (one all-reduce
    a dead torchrun launcher     of one number), after it they save a checkpoint, and
                                 exit 128 + signal (SIGTERM 143, SIGINT 130, SIGHUP 129)
    a second job, same dir    -> refused, naming the job that holds the directory (RunLock)
    a peer that died or hangs -> "lost the connection to another rank", exit 1 (lost_peer)
    torchrun --max-restarts   -> needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch.check_restartable)
"""
import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanodist.errors import UserError

LAUNCHER_GRACE_S = 30  # what torchrun gives its workers between SIGTERM and SIGKILL


class Stopped(Exception):
    """The ranks agreed to stop early; the message says where and how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """While in use (`with`), SIGTERM, SIGINT and SIGHUP only set a flag, and under torchrun
    a thread turns the death of the launcher into SIGHUP (a worker whose launcher died
    would otherwise train on unsupervised). `flag()` is the collective that makes every
    rank stop at the same step. The launcher is watched by polling the parent pid:
    Linux's PR_SET_PDEATHSIG would follow the launcher's *thread*, and is Linux only."""

    def __init__(self, device: torch.device, launcher: int | None = None):
        self.device = device
        self.launcher = launcher
        self.signal = 0  # the first signal received; 0: none
        self._previous = {}
        self._done = threading.Event()
        self._flag = torch.zeros((), device=device)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where handlers can go
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._previous[sig] = signal.signal(sig, self._note)
        if self.launcher:
            threading.Thread(target=self._watch_launcher, args=(self.launcher,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame):
        self.signal = self.signal or signum

    def _watch_launcher(self, launcher: int):
        while not self._done.wait(1.0):
            if os.getppid() != launcher:
                self._note(signal.SIGHUP, None)
                if not self._done.wait(LAUNCHER_GRACE_S):  # stuck: end as torchrun would have
                    print(f"error: the launcher (pid {launcher}) died and this worker did not stop "
                          f"within {LAUNCHER_GRACE_S} s; ending it", flush=True)
                    os._exit(128 + signal.SIGKILL)
                return

    @staticmethod
    def find_launcher() -> int | None:
        """The torchrun launcher's pid: our parent, while it lives (None without torchrun)."""
        return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def flag(self) -> torch.Tensor:
        """Collective: the signal any rank received (0: none), a scalar on the device, for
        the trainer to read with the step's other values (no wait of its own)."""
        self._flag.fill_(self.signal)
        if dist.is_initialized():
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return self._flag


def describe(signum: int) -> str:
    return {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)",
            signal.SIGHUP: "SIGHUP (the launcher or terminal went away)"}[signum]


class RunLock:
    """One job per run directory: rank 0 holds an exclusive flock on `out_dir/.lock` for
    the whole run. The kernel releases it when the process ends, however it ends (exit,
    crash, SIGKILL), so it is never stale; the file keeps the holder's pid and host for
    the message a second job gets."""

    def __init__(self, out_dir):
        path = Path(out_dir) / ".lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")
        except OSError as e:
            raise UserError(f"--out_dir {out_dir} cannot be used ({e}); pick a writable directory") from e
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another job"
            self.file.close()
            raise UserError(f"--out_dir {out_dir} is in use by {holder}; wait for that job to end "
                            f"(or stop it), or pick another --out_dir") from None
        self.file.truncate(0)
        self.file.write(f"the job of pid {os.getpid()} on {socket.gethostname()} "
                        f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        self.file.flush()

    def release(self):
        self.file.close()


def lost_peer(error: BaseException, timeout_s: float) -> str | None:
    """One line for an error of a collective (another rank died or hangs); None for others."""
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text)):
        return None
    detail = text.splitlines()[0].split("] ", 1)[-1].split(". This is typically")[0]
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"rank {rank}: no answer from another rank within --dist_timeout ({timeout_s:g} s): "
                f"a peer is stuck or gone ({detail}); raise --dist_timeout if a step legitimately "
                f"takes longer")
    return (f"rank {rank}: lost the connection to another rank ({detail}): that process died; "
            f"its own output or torchrun's summary says why")
