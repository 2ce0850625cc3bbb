"""Checkpoints: atomic writes, resume equality, resharding across layouts, a real SIGKILL
under torchrun, the NaN guard, and bad checkpoints."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness import (REPO, assert_resumes_across, child_pids, flags, loss_tolerances, run,
                     train_losses, train_records)
from nanodist import checkpoint, train
from nanodist.run.config import parse_args
from nanodist.errors import UserError
from nanodist.run.trainer import Trainer


def test_resume_continues_bitwise_and_old_checkpoints_are_pruned(char_data, tmp_path):
    full = train_losses(flags(char_data, tmp_path / "a", "--checkpoint_interval", "2",
                              "--keep_checkpoints", "2"))
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "a")] == ["step_0000004", "step_0000006"]
    resumed = train_losses(flags(char_data, tmp_path / "b", "--resume", str(tmp_path / "a" / "step_0000004")))
    assert resumed == full[4:]  # fp32 on the CPU: the same arithmetic, bitwise


def test_resume_under_ddp_is_bitwise(char_data, tmp_path):
    ddp = ["--data_parallel_size", "2", "--data_parallel_type", "ddp"]
    full = run(2, flags(char_data, tmp_path / "a", *ddp))
    resumed = run(2, flags(char_data, tmp_path / "b", *ddp, "--resume", str(tmp_path / "a" / "step_0000003")))
    assert resumed == full[3:]


@pytest.mark.parametrize("write, read", [
    ((2, ["--data_parallel_type", "fsdp"]), (2, ["--data_parallel_type", "ddp"])),
    ((2, ["--tensor_parallel_size", "2", "--enable_loss_parallelism"]), (1, [])),
    ((4, ["--tensor_parallel_size", "2", "--data_parallel_type", "fsdp", "--deferred_init"]),
     (4, ["--data_parallel_type", "fsdp", "--implementation", "pytorch"])),
    ((1, []), (2, ["--tensor_parallel_size", "2", "--implementation", "pytorch"])),
], ids=["fsdp2-to-ddp2", "tp2-to-1", "2x2-to-fsdp2native4", "1-to-dtensor-tp2"])
def test_a_checkpoint_resumes_in_another_layout(write, read, char_data, tmp_path):
    # another reduction order from the same bits, in float64: the bound of
    # harness.assert_records_match (lr <= 2e-3) holds on any CPU
    assert_resumes_across(char_data, tmp_path, write, read)


def test_a_crash_between_write_and_rename_leaves_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    trainer = Trainer(parse_args(flags(char_data, tmp_path, "--checkpoint_interval", "-1")))
    trainer.train_step(0)
    good = trainer.save(1)
    trainer.train_step(1)

    def crash(*args):
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(checkpoint.format.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(2)
    monkeypatch.undo()
    debris = list(tmp_path.glob("tmp-step_0000002-*"))
    assert len(debris) == 1
    assert checkpoint.checkpoints(tmp_path) == [good]
    model, info = checkpoint.load_model(good)
    assert info["step"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.save(3).name == "step_0000003"
    assert debris[0].exists()  # a save removes nothing of others: the next run does (its lock)
    checkpoint.remove_debris(tmp_path)
    assert not debris[0].exists() and len(checkpoint.checkpoints(tmp_path)) == 2


def test_a_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(char_data, tmp_path):
    trainer = Trainer(parse_args(flags(char_data, tmp_path, "--checkpoint_interval", "-1")))
    trainer.train_step(0)
    saved = trainer.save(1)
    gpt = trainer.parallel.parts[0].gpt
    with torch.no_grad():
        gpt.transformer.ln_f.bias.fill_(float("nan"))
    before = [p.detach().clone() for p in gpt.parameters()]
    with pytest.raises(UserError, match=f"step 2: the loss is nan.*the last checkpoint, {saved}, is intact"):
        trainer.train_step(1)  # the second step, printed as step 2
    after = list(gpt.parameters())
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(before, after))
    model, _ = checkpoint.load_model(saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_checkpoints_end_with_one_clear_message(char_data, tmp_path, capsys):
    base = flags(char_data, tmp_path / "run")
    assert train.main(base + ["--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert train.main(base) == 0
    assert train.main(base) == 2  # a second fresh run would mix into the first
    assert "--resume" in capsys.readouterr().err
    assert train.main(base + ["--resume", str(tmp_path / "run" / "step_0000003")]) == 2
    assert "past step_0000003 (step_0000006)" in capsys.readouterr().err  # would fork the run
    assert train.main(base + ["--block_size", "16", "--resume"]) == 2
    assert "block_size 32 there vs 16 here" in capsys.readouterr().err

    other_text = tmp_path / "other.txt"  # other characters, the same padded vocabulary (128)
    other_text.write_text((REPO.parent / "shared/data/tinyshakespeare/input.txt").read_text()[:50000] + "#%{}~@")
    other_data = tmp_path / "abc"
    subprocess.run([sys.executable, REPO / "data/shakespeare_char/prepare.py", "--input", other_text,
                    "--out_dir", other_data], check=True, capture_output=True)
    assert train.main(flags(other_data, tmp_path / "run", "--resume")) == 2
    assert "(its tokenizer: 65 characters, vocabulary 128; this data's: 65 other characters" in capsys.readouterr().err

    latest = checkpoint.checkpoints(tmp_path / "run")[-1]
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert train.main(base + ["--resume"]) == 2
    assert "could not be read" in capsys.readouterr().err
    (latest / "trainer.json").write_text("{not json")  # checksums come first: two damaged files
    assert train.main(base + ["--resume"]) == 2
    assert "does not match its checksum in manifest.json (and 1 more)" in capsys.readouterr().err


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(char_data, tmp_path):
    args = flags(char_data, tmp_path, "--max_steps", "2", "--eval_interval", "2")
    assert train.main(args + ["--checkpoint_interval", "-1"]) == 0  # events, no checkpoint
    assert train.main(args + ["--resume", "auto"]) == 0
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_0000002"]


def test_a_killed_worker_restarts_and_finishes_like_an_uninterrupted_run(char_data, tmp_path):
    steps = 20
    args = flags(char_data, tmp_path / "run", "--data_parallel_size", "2", "--max_steps", str(steps),
                 "--checkpoint_interval", "5", "--eval_interval", "100", "--resume", "auto",
                 "--dtype", "float64")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", str(REPO / "train.py"), *args],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # torchelastic issue #135712: sharing its store leaves stale keys that break restarts
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "step_0000005").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.02)
        workers = child_pids(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and any worker left
    assert launcher.returncode == 0, output
    assert "resuming from" in output
    final = float(output.split(f"step {steps:5d}/{steps} | loss ")[-1].split()[0])
    reference = train_records(flags(char_data, tmp_path / "ref", "--max_steps", str(steps),
                                    "--checkpoint_interval", "-1", "--eval_interval", "100",
                                    "--dtype", "float64"))
    # DP=2 vs one process in float64, the last step's loss printed with 4 decimals:
    # rounding (5e-5) plus the bound of harness.loss_tolerances (lr <= 2e-3), on any CPU
    assert final == pytest.approx(reference[-1][0], abs=5e-5 + loss_tolerances(reference, lr=2e-3)[-1])
