"""Fresh processes for the tools: N gloo ranks on this machine, or one rank of a large
cluster played over torch's fake process group (collectives return at once, move nothing)."""
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanodist import compat
from nanodist.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_file: str, init, work, args):
    torch.set_num_threads(1)  # the processes share the machine's cores
    init()
    try:
        Path(out_file).write_text(json.dumps(work(*args)))
    except UserError as error:  # its one line, for the parent to say (the rank still fails)
        Path(f"{out_file}.error").write_text(str(error))
        raise
    finally:
        dist.destroy_process_group()


def _gloo_rank(rank, world, port, out_dir, work, args):
    _run(str(Path(out_dir, f"{rank}.json")), lambda: dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world), work, args)


def _fake_rank(_, world, rank, out_file, work, args):
    _run(out_file, lambda: dist.init_process_group("fake", store=compat.FakeStore(), rank=rank,
                                                   world_size=world), work, args)


def _join(context, timeout: float | None):
    """Wait for the processes of `context`; past `timeout` seconds, kill them and raise."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(timeout=None if deadline is None else 1.0):  # False: some still run
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"did not finish within {timeout:.0f} s")


def _join_saying(context, timeout: float | None, tmp: str):
    """_join; a rank that failed with a UserError: that error's one line, in this process."""
    try:
        _join(context, timeout)
    except mp.ProcessRaisedException:
        said = sorted(Path(tmp).glob("*.error"))
        if said:
            raise UserError(said[0].read_text()) from None
        raise


def on_processes(world: int, work, *args, timeout: float | None = None) -> list:
    """work(*args) on `world` fresh gloo processes: what each returned (JSON), rank by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        _join_saying(mp.start_processes(_gloo_rank, args=(world, free_port(), tmp, work, args), nprocs=world,
                                        start_method="spawn", join=False), timeout, tmp)
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


def as_rank_of(world: int, rank: int, work, *args, timeout: float | None = None):
    """work(*args) in a fresh process playing rank `rank` of `world` over the fake group."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp, "result.json"))
        _join_saying(mp.start_processes(_fake_rank, args=(world, rank, out_file, work, args), nprocs=1,
                                        start_method="spawn", join=False), timeout, tmp)
        return json.loads(Path(out_file).read_text())
