"""Faults from outside a run, each ending in one line with nothing lost: SIGTERM under
torchrun, Ctrl-C, a dead launcher, a second job on one run directory, a peer that died or
hangs, torchrun restarts without their workaround. Every process test has a deadline and
kills its process group in `finally`."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO, child_pids, flags, run_distributed, train_losses
from nanodist import checkpoint, train
from nanodist.run import faults, launch
from nanodist.errors import UserError

DDP2 = ["--data_parallel_size", "2"]


def start(args, log: Path, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """train.py under torchrun (or alone for nproc 1), its output into `log`, in a new
    process group so that `finally: stop_all(...)` can end whatever is left of it."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    with open(log, "w") as out:
        return subprocess.Popen(launcher + [str(REPO / "train.py"), *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def stop_all(proc: subprocess.Popen, others=()):
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; output:\n{log.read_text()}"
        assert proc.poll() is None, f"ended early ({proc.returncode}):\n{log.read_text()}"
        time.sleep(0.02)


def printed_step(log: Path, step: int) -> bool:
    return f"step {step:5d}/" in log.read_text()


def gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent, the launcher, is dead and may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def last_step(output: str) -> int:
    """The last step whose line was printed."""
    return int(output.rsplit("\nstep ", 1)[1].split("/")[0])


def test_sigterm_under_torchrun_saves_the_step_reached_and_resume_continues(char_data, tmp_path):
    steps, log = 30, tmp_path / "log"
    args = flags(char_data, tmp_path / "run", *DDP2, "--max_steps", str(steps),
                 "--checkpoint_interval", "1000", "--eval_interval", "1000")
    launcher = start(args, log)
    try:
        wait_for(lambda: printed_step(log, 3), launcher, log)
        launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
        launcher.wait(timeout=60)
    finally:
        stop_all(launcher)
    output = log.read_text()
    reached = last_step(output)
    saved = tmp_path / "run" / f"step_{reached:07d}"
    assert output.count("stopped by SIGTERM") == 1, output
    assert f"stopped by SIGTERM after step {reached}; checkpoint {saved}: continue with --resume" in output
    assert "KeyboardInterrupt" not in output and "[rank" not in output  # no worker traceback
    assert launcher.returncode != 0 and reached < steps
    assert checkpoint.checkpoints(tmp_path / "run") == [saved]

    ddp2 = flags(char_data, tmp_path / "ref", *DDP2, "--max_steps", str(steps),
                 "--checkpoint_interval", "-1", "--eval_interval", "1000")
    reference = run_distributed(train_losses, 2, ddp2)[0]
    resumed = run_distributed(train_losses, 2, args + ["--resume"])[0]
    assert resumed == reference[reached:]  # the same DDP arithmetic: bitwise


def test_ctrl_c_saves_the_step_reached_and_ends_with_one_line(char_data, tmp_path, monkeypatch, capsys):
    step_once = train.Trainer.train_step

    def interrupted_in_the_first_step(trainer, step):
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only raises a flag
        return step_once(trainer, step)
    monkeypatch.setattr(train.Trainer, "train_step", interrupted_in_the_first_step)
    assert train.main(flags(char_data, tmp_path)) == 128 + signal.SIGINT
    saved = tmp_path / "step_0000001"  # not a checkpoint step: saved because of the stop
    assert capsys.readouterr().err.splitlines() == [
        f"stopped by SIGINT (Ctrl-C) after step 1; checkpoint {saved}: continue with --resume"]
    assert checkpoint.checkpoints(tmp_path) == [saved]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    monkeypatch.undo()
    assert train.main(flags(char_data, tmp_path, "--resume")) == 0


def test_workers_stop_when_their_launcher_is_killed(char_data, tmp_path):
    log = tmp_path / "log"
    launcher = start(flags(char_data, tmp_path / "run", *DDP2, "--max_steps", "100000",
                           "--checkpoint_interval", "100000", "--eval_interval", "100000"), log)
    workers = []
    try:
        wait_for(lambda: printed_step(log, 2), launcher, log)
        workers = child_pids(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        killed = time.monotonic()
        bound = 1 + faults.LAUNCHER_GRACE_S + 10  # poll + torchrun's own grace + slack
        while not all(gone(w) for w in workers):
            assert time.monotonic() - killed < bound, f"orphans still running:\n{log.read_text()}"
            time.sleep(0.05)
    finally:
        stop_all(launcher, workers)
    output = log.read_text()
    reached = last_step(output)
    assert f"stopped by SIGHUP (the launcher or terminal went away) after step {reached}" in output
    assert checkpoint.checkpoints(tmp_path / "run") == [tmp_path / "run" / f"step_{reached:07d}"]


def test_a_second_job_on_one_run_directory_is_refused_until_the_first_ends(char_data, tmp_path, capsys):
    log, run = tmp_path / "log", tmp_path / "run"
    second = lambda max_steps: flags(char_data, run, "--max_steps", str(max_steps), "--resume", "auto")  # noqa: E731
    first = start(flags(char_data, run, "--max_steps", "100000", "--checkpoint_interval", "2"), log,
                  nproc=1)
    try:
        wait_for(lambda: printed_step(log, 3), first, log)
        assert train.main(second(1)) == 2
        assert capsys.readouterr().err.startswith(
            f"error: --out_dir {run} is in use by the job of pid {first.pid} on ")
        first.kill()  # a crash: the kernel releases the lock, nothing stale is left
        first.wait(timeout=30)
    finally:
        stop_all(first)
    latest = checkpoint.step_of(checkpoint.checkpoints(run)[-1])
    assert train.main(second(latest + 1)) == 0  # resumes the dead job's checkpoint, trains a step
    assert checkpoint.step_of(checkpoint.checkpoints(run)[-1]) == latest + 1


@pytest.mark.parametrize("fault, line", [
    (signal.SIGKILL, "error: rank 0: lost the connection to another rank ("),
    (signal.SIGSTOP, "error: rank 0: no answer from another rank within --dist_timeout (10 s)"),
], ids=["peer-died", "peer-hangs"])
def test_the_surviving_rank_says_what_happened_to_its_peer(fault, line, char_data, tmp_path):
    log = tmp_path / "log"
    launcher = start(flags(char_data, tmp_path / "run", *DDP2, "--max_steps", "100000",
                           "--dist_timeout", "10"), log)
    workers = []
    try:
        wait_for(lambda: printed_step(log, 2), launcher, log)
        workers = child_pids(launcher.pid)
        os.kill(workers[1], fault)
        wait_for(lambda: line in log.read_text(), launcher, log, timeout=60)
    finally:
        stop_all(launcher, workers)
    assert "[rank0]" not in log.read_text()  # no traceback of rank 0


def test_torchrun_restarts_without_their_workaround_are_refused(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --max-restarts=1 starts a worker
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert train.main(flags(char_data, tmp_path)) == 2  # before joining any process group
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarts the refused worker
    with pytest.raises(SystemExit) as again:
        train.main(flags(char_data, tmp_path))
    assert again.value.code == 2 and capsys.readouterr().err == ""  # said once, by the first
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    launch.check_restartable()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    launch.check_restartable()


def test_a_bad_dist_timeout_is_refused(char_data, tmp_path):
    with pytest.raises(UserError, match="--dist_timeout must be > 0"):
        train.Trainer(train.parse_args(flags(char_data, tmp_path, "--dist_timeout", "0")))
