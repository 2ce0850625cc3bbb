"""Checkpoints on disk are not trusted: a .metadata that would run code, damaged or
truncated files, a disk that fills up mid-save, another job's temp dir, and what a save
hands DCP (CPU memory only). Each ends in one clear line, on every rank, with nothing lost."""
import errno
import json
import os
import pickle
import shutil
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint.filesystem import FileSystem

import sample
from harness import run_distributed
from nanodist import checkpoint, export, train
from nanodist.run.config import parse_args
from nanodist.errors import UserError
from nanodist.run.trainer import Trainer


def flags(data_dir, out_dir, *extra, steps=2):
    return ["--device", "cpu", "--model", "tiny", "--dataset", "shakespeare_char",
            "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--batch_size", "2",
            "--block_size", "32", "--total_batch_size", "256", "--max_steps", str(steps),
            "--eval_interval", "2", "--eval_iters", "1", "--warmup_steps", "1", *extra]


def one_error_line(err: str) -> str:
    """The error a user sees: exactly one line (a warning line aside), no traceback."""
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def crc32(path: Path) -> str:
    return f"{zlib.crc32(path.read_bytes()):08x}"


def forge_manifest(step_dir: Path):
    """What an attacker who edits a file can also do: make the manifest agree with it."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["crc32"] = {name: crc32(step_dir / name) for name in manifest["crc32"]}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    """A 2-step one-process run with its checkpoint at step 2 (copy it before damaging it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(flags(char_data, run)) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("manifest", ["forged", "removed"])
@pytest.mark.parametrize("reader", ["resume", "sample"])
def test_a_metadata_that_would_run_code_is_refused(reader, manifest, char_data, run_copy, tmp_path, capsys):
    step_dir = run_copy / "step_0000002"
    with open(step_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # written by the fixture above: trusted here
    marker = tmp_path / "payload-ran"
    metadata.planner_data = _RunsCode(marker)  # a valid index, one object inside runs code
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    if manifest == "forged":
        forge_manifest(step_dir)
    else:
        (step_dir / "manifest.json").unlink()

    trust = ["--trust_unverified_checkpoint"] if manifest == "removed" else []  # else refused unread
    if reader == "resume":
        code = train.main(flags(char_data, run_copy, "--resume", *trust))
    else:
        code = sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "1", *trust])
    assert code == 2
    assert not marker.exists()  # the payload did not run
    line = one_error_line(capsys.readouterr().err)
    assert "refused" in line and f"{os.system.__module__}.system" in line


def test_a_zeroed_region_of_a_shard_is_named_and_nothing_loads(char_data, run_copy, capsys):
    shard = run_copy / "step_0000002" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 1 MiB of zeros in the middle, the size unchanged
        f.seek(size // 2)
        f.write(bytes(2**20))
    assert shard.stat().st_size == size
    assert train.main(flags(char_data, run_copy, "--resume")) == 2
    assert "__0_0.distcp does not match its checksum" in one_error_line(capsys.readouterr().err)
    assert sample.main(["--checkpoint", str(shard.parent), "--max_new_tokens", "1"]) == 2
    assert "__0_0.distcp does not match its checksum" in one_error_line(capsys.readouterr().err)


def test_a_checkpoint_without_manifest_is_refused_unless_trusted(char_data, run_copy, tmp_path, capsys):
    """Checkpoints that predate manifests cannot be verified: refused by every reader, unless
    the user accepts the risk; then what can be checked without checksums is, and damage
    still ends in one line (DCP logs no tracebacks of its own)."""
    step_dir = run_copy / "step_0000002"
    (step_dir / "manifest.json").unlink()
    refusal = f"checkpoint {step_dir} has no manifest.json (it predates them): damage in its files cannot be detected"
    assert train.main(flags(char_data, run_copy, "--resume")) == 2
    assert refusal in one_error_line(capsys.readouterr().err)
    assert sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "1"]) == 2
    assert refusal in one_error_line(capsys.readouterr().err)
    assert export.main(["--out_dir", str(run_copy), "--to", str(tmp_path / "hf")]) == 2
    assert refusal in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()

    trusted = flags(char_data, run_copy, "--resume", "--trust_unverified_checkpoint")
    assert train.main(trusted) == 0
    assert "warning: checkpoint" in capsys.readouterr().err

    rng = step_dir / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    assert train.main(trusted) == 2
    assert "rng_rank0.pt" in one_error_line(capsys.readouterr().err)

    shard = step_dir / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "1", "--trust_unverified_checkpoint"]) == 2
    assert "__0_0.distcp is 1000 bytes, shorter than its index says" in one_error_line(capsys.readouterr().err)
    (step_dir / ".metadata").write_bytes(b"garbage")
    assert sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "1", "--trust_unverified_checkpoint"]) == 2
    assert ".metadata" in one_error_line(capsys.readouterr().err)


def train_error(args) -> str | None:
    """Rank side: train (or resume) as `args` say; the UserError's message, or None."""
    try:
        Trainer(parse_args(args)).train()
    except UserError as error:
        return str(error)
    return None


def test_two_ranks_agree_on_damage_that_one_rank_finds(char_data, tmp_path):
    ddp2 = ["--data_parallel_size", "2", "--data_parallel_type", "ddp"]
    assert run_distributed(train_error, 2, flags(char_data, tmp_path / "run", *ddp2)) == [None, None]
    step_dir = tmp_path / "run" / "step_0000002"
    resume = flags(char_data, tmp_path / "run", *ddp2, "--resume")

    shard = step_dir / "__0_0.distcp"  # rank 1 hashes it (each rank takes every 2nd file)
    good = shard.read_bytes()
    shard.write_bytes(bytes(len(good)))
    errors = run_distributed(train_error, 2, resume)
    assert errors[0] == errors[1] and "__0_0.distcp does not match" in errors[0]

    shard.write_bytes(good)  # rank 0's RNG file cut short in a trusted checkpoint without manifest
    (step_dir / "manifest.json").unlink()
    rng = step_dir / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    errors = run_distributed(train_error, 2, resume + ["--trust_unverified_checkpoint"])
    assert errors[0] == errors[1] and "rng_rank0.pt" in errors[0] and "\n" not in errors[0]


@contextmanager
def disk_fills_up_at(step: int):
    """This process's disk fills up while checkpoint `step` is written: DCP's file writes
    fail with ENOSPC, and the disk shows no room left."""
    real = FileSystem.create_stream

    class Full:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextmanager
    def create_stream(fs, path, mode):
        with real(fs, path, mode) as stream:
            yield Full(stream) if f"tmp-step_{step:07d}-" in str(path) and "w" in mode else stream

    usage = shutil.disk_usage
    with mock.patch.object(FileSystem, "create_stream", create_stream), \
            mock.patch.object(shutil, "disk_usage", lambda p: usage(p)._replace(free=0)):
        yield


def needed_mib(step_dir: Path) -> int:
    """What the message should say: params and both Adam moments (fp32), and the step count."""
    model, _ = checkpoint.load_model(step_dir)
    n = sum(p.numel() for p in model.parameters())
    return -(-(3 * 4 * n + 4) // 2**20)


def assert_only_the_previous_checkpoint(run: Path, message: str):
    assert f"the disk under {run} is full (needs ~{needed_mib(run / 'step_0000002')} MiB" in message
    assert not list(run.glob("tmp-step_*"))  # no debris
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000002"]


def test_a_full_disk_keeps_the_previous_checkpoint_one_process(char_data, tmp_path, capsys):
    args = flags(char_data, tmp_path / "run", "--checkpoint_interval", "2", steps=4)
    with disk_fills_up_at(4):
        assert train.main(args) == 2
    assert_only_the_previous_checkpoint(tmp_path / "run", one_error_line(capsys.readouterr().err))
    assert train.main(args + ["--resume"]) == 0  # resumable, and the next save works
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run")] == ["step_0000002", "step_0000004"]


def train_on_a_disk_that_fills(args, full_rank: int) -> str | None:
    """Rank side: only rank `full_rank` sees the disk fill up (the others write fine)."""
    with disk_fills_up_at(4) if dist.get_rank() == full_rank else nullcontext():
        return train_error(args)


def test_a_full_disk_on_one_rank_stops_both_and_keeps_the_previous_checkpoint(char_data, tmp_path):
    args = flags(char_data, tmp_path / "run", "--data_parallel_size", "2", "--data_parallel_type", "fsdp",
                 "--checkpoint_interval", "2", steps=4)
    errors = run_distributed(train_on_a_disk_that_fills, 2, args, 1)  # no hang
    assert errors[0] == errors[1]
    assert_only_the_previous_checkpoint(tmp_path / "run", errors[0])
    assert run_distributed(train_error, 2, args + ["--resume"]) == [None, None]
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run")] == ["step_0000002", "step_0000004"]


def test_a_save_leaves_other_temp_dirs_and_the_next_run_clears_them(char_data, run_copy):
    trainer = Trainer(parse_args(flags(char_data, run_copy, "--resume", steps=4)))
    in_flight = run_copy / "tmp-step_0000004-otherjob"  # another job's save, or a dead one's
    in_flight.mkdir()
    (in_flight / "__0_0.distcp").write_bytes(b"partial")
    trainer.train()
    assert in_flight.exists() and checkpoint.checkpoints(run_copy)[-1].name == "step_0000004"
    del trainer
    # a new run of the directory (holding its lock): any temp dir left is of a dead run
    assert train.main(flags(char_data, run_copy, "--resume", steps=4)) == 0
    assert not in_flight.exists()


def test_a_save_hands_dcp_cpu_tensors_only(char_data, tmp_path, monkeypatch):
    """The layout's full tensors live on a GPU (fake CUDA tensors: shapes without data);
    every slice DCP receives must already be in CPU memory (issue 15, item 5)."""
    trainer = Trainer(parse_args(flags(char_data, tmp_path)))
    gathered = trainer.params.full_tensors

    fake = FakeTensorMode()

    def on_gpu(tensors):
        for name, full in gathered(tensors):
            with fake:
                on_device = torch.empty(full.shape, device="cuda")
            yield name, on_device
    monkeypatch.setattr(trainer.params, "full_tensors", on_gpu)
    real_save, devices = checkpoint.format.dcp.save, set()

    def save(state, **kwargs):  # record, then write zeros of the same shapes
        devices.update(t.device.type for t in state.values())
        return real_save({k: torch.zeros(t.shape) for k, t in state.items()}, **kwargs)
    monkeypatch.setattr(checkpoint.format.dcp, "save", save)
    trainer.save(1)
    assert devices == {"cpu"}


def test_the_cause_shown_is_the_line_that_names_the_error(tmp_path):
    """torch.load's refusals end with a pointer to its documentation, DCP's failures with
    every rank's traceback: the message shows the line that says what went wrong."""
    torch.save({"x": _RunsCode(tmp_path / "never")}, tmp_path / "f.pt")  # refused, never run
    with pytest.raises(Exception) as refused:
        torch.load(tmp_path / "f.pt", weights_only=True)
    shown = checkpoint.store.cause(refused.value)  # torch's wording varies by release
    assert f"{os.system.__module__}.system" in shown and "documentation" not in shown
    dcp_like = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                            "RuntimeError: PytorchStreamReader failed reading zip archive. This is an internal error.")
    assert checkpoint.store.cause(dcp_like) == "RuntimeError: PytorchStreamReader failed reading zip archive"


@pytest.mark.parametrize("content", ['{"step": 6}', "null", '{"step": "x"}', '[1, 2]'])
def test_a_trainer_json_of_the_wrong_shape_is_damage_not_a_traceback(content, char_data, run_copy, capsys):
    """Checksums first: an edited trainer.json is damage; with a manifest that agrees (forged),
    its contents are checked before anything reads them."""
    step_dir = run_copy / "step_0000002"
    (step_dir / "trainer.json").write_text(content)
    assert train.main(flags(char_data, run_copy, "--resume")) == 2
    assert "trainer.json does not match its checksum" in one_error_line(capsys.readouterr().err)
    forge_manifest(step_dir)
    readers = [lambda: train.main(flags(char_data, run_copy, "--resume")),
               lambda: sample.main(["--checkpoint", str(step_dir), "--max_new_tokens", "1"]),
               lambda: export.main(["--out_dir", str(run_copy), "--to", str(run_copy / "hf")])]
    for read in readers:
        assert read() == 2
        assert f"checkpoint {step_dir} is corrupt (trainer.json: " in one_error_line(capsys.readouterr().err)


def test_a_run_from_an_unverified_checkpoint_never_rotates_away_the_older_ones(char_data, tmp_path, capsys):
    """Checkpoints 2 and 4 without manifests: 4 may be damaged in ways nothing can tell (a
    zeroed MiB of weights is finite). A run trusted to resume 4 keeps 2 and 4 whatever
    --keep_checkpoints says, and so do the runs that resume its checkpoints."""
    run = tmp_path / "run"
    every_2 = ["--checkpoint_interval", "2", "--keep_checkpoints", "2"]
    assert train.main(flags(char_data, run, *every_2, steps=4)) == 0
    for step_dir in checkpoint.checkpoints(run):
        (step_dir / "manifest.json").unlink()
    trusted = flags(char_data, run, *every_2, "--resume", "--trust_unverified_checkpoint", steps=8)
    assert train.main(trusted) == 0
    assert [p.name for p in checkpoint.checkpoints(run)] == [f"step_000000{s}" for s in (2, 4, 6, 8)]
    assert checkpoint.read_info(run / "step_0000008")["unverified_since"] == 4
    assert train.main(flags(char_data, run, *every_2, "--resume", steps=12)) == 0  # 8 is verified
    assert [p.name for p in checkpoint.checkpoints(run)] == [f"step_{s:07d}" for s in (2, 4, 10, 12)]
    capsys.readouterr()


def test_resuming_at_or_past_max_steps_says_so(char_data, run_copy, capsys):
    """The checkpoint is at step 2: --max_steps 1 is refused, --max_steps 2 finishes at
    once saying the run is complete, and neither writes TensorBoard events."""
    events = sorted(run_copy.glob("events.out.tfevents.*"))
    assert train.main(flags(char_data, run_copy, "--resume", steps=1)) == 2
    assert "is at step 2, past --max_steps 1: nothing to train; raise --max_steps" in \
        one_error_line(capsys.readouterr().err)
    assert train.main(flags(char_data, run_copy, "--resume", steps=2)) == 0
    assert "nothing to train: " in capsys.readouterr().out
    assert sorted(run_copy.glob("events.out.tfevents.*")) == events


def test_resuming_on_another_dataset_names_the_dataset(char_data, bpe_data, run_copy, capsys):
    args = flags(bpe_data, run_copy, "--resume", steps=4)
    args[args.index("shakespeare_char")] = "shakespeare"
    assert train.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was trained on another dataset (its tokenizer: 65 characters, vocabulary 128; this data's: " \
           "GPT-2 BPE, vocabulary 50304); pick the checkpoint's --dataset and --data_dir" in line


def test_a_checkpoint_is_a_step_n_directory(char_data, run_copy, capsys):
    """Its name is its step (rotation and --resume's order read it): a renamed copy is refused."""
    shutil.copytree(run_copy / "step_0000002", run_copy / "mycopy")
    assert train.main(flags(char_data, run_copy, "--resume", str(run_copy / "mycopy"), steps=4)) == 2
    assert f"--resume {run_copy / 'mycopy'}: not a checkpoint (a step_N directory with trainer.json); " \
           f"{run_copy} holds step_0000002" in one_error_line(capsys.readouterr().err)


def test_a_trusted_checkpoint_without_manifest_is_checked_for_non_finite_values(char_data, tmp_path, capsys):
    """What can be checked without checksums is: a NaN weight is refused, naming it, by a
    resume and by sample.py alike."""
    trainer = Trainer(parse_args(flags(char_data, tmp_path / "run")))
    with torch.no_grad():
        trainer.parallel.parts[0].gpt.transformer.ln_f.weight[3] = float("nan")
    saved = trainer.save(1)
    del trainer
    (saved / "manifest.json").unlink()
    says = f"checkpoint {saved} is corrupt (model/transformer.ln_f.weight holds non-finite values)"
    assert train.main(flags(char_data, tmp_path / "run", "--resume", "--trust_unverified_checkpoint")) == 2
    assert says in one_error_line(capsys.readouterr().err)
    assert sample.main(["--checkpoint", str(saved), "--trust_unverified_checkpoint", "--max_new_tokens", "1"]) == 2
    assert says in one_error_line(capsys.readouterr().err)
