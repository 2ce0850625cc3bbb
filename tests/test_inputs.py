"""Bad flags and bad files: each ends in one clear line (`error: ...`, exit 2), never a raw
traceback or a silently wrong run. The checks fire before any training, so these are fast."""
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from harness import GPT2_BPE, run_train
from nanodist import train
from nanodist.checkpoint import checkpoints
from nanodist.run.config import RANGES, TrainConfig
from nanodist.model.gpt import GPT, model_config
from test_data import run_prepare

TINY = ["--device", "cpu", "--model", "tiny", "--batch_size", "4", "--block_size", "64",
        "--total_batch_size", "256", "--eval_iters", "1", "--dataset", "shakespeare_char"]


def one_clear_line(capsys, message) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


# ---- flags ----

def test_every_number_of_the_config_has_a_range():
    numbers = {f.name for f in fields(TrainConfig) if type(f.default) in (int, float)}
    assert numbers == {name for names, _, _ in RANGES for name in names}


@pytest.mark.parametrize("flag, value, message", [
    ("learning_rate", "-1", "--learning_rate must be > 0"),
    ("learning_rate", "nan", "--learning_rate must be > 0"),
    ("learning_rate", "inf", "--learning_rate must be > 0"),
    ("min_lr", "-5", "--min_lr must be >= 0"),
    ("min_lr", "1e-2", "--min_lr (0.01) must be <= --learning_rate (0.0006)"),
    ("beta1", "-0.1", "--beta1 must be in [0, 1)"),
    ("beta2", "1.5", "--beta2 must be in [0, 1)"),
    ("dropout", "2", "--dropout must be in [0, 1)"),
    ("dropout", "1", "--dropout must be in [0, 1)"),
    ("weight_decay", "-0.1", "--weight_decay must be >= 0"),
    ("max_grad_norm", "0", "--max_grad_norm must be > 0"),
    ("bucket_cap_mb", "0", "--bucket_cap_mb must be > 0"),
    ("batch_size", "0", "--batch_size must be >= 1"),
    ("block_size", "0", "--block_size must be >= 1"),
    ("total_batch_size", "0", "--total_batch_size must be >= 1"),
    ("max_steps", "0", "--max_steps must be >= 1"),
    ("eval_iters", "0", "--eval_iters must be >= 1"),
    ("tensor_parallel_size", "0", "--tensor_parallel_size must be >= 1"),
    ("data_parallel_size", "-1", "--data_parallel_size must be >= 1 (or 0"),
    ("warmup_steps", "-2", "--warmup_steps must be >= 0 (or -1"),
    ("checkpoint_interval", "-2", "--checkpoint_interval must be K >= 1 steps"),
    ("seed", "-1", "--seed must be in [0, 2**64)"),
])
def test_out_of_range_flags_end_with_one_clear_message(flag, value, message, tmp_path, capsys):
    # no data there: a check that did not fire would end in "not found" instead
    assert train.main(TINY + ["--data_dir", str(tmp_path), f"--{flag}", value]) == 2
    one_clear_line(capsys, message)


@pytest.mark.parametrize("argv, says", [
    (["--virtual_stages", "2"], "--virtual_stages 2 needs --pipeline_parallel_size > 1"),
    (["--pipeline_schedule", "gpipe"], "--pipeline_schedule gpipe needs --pipeline_parallel_size > 1"),
    (["--fsdp_reshard_after_forward", "false"], "--fsdp_reshard_after_forward false needs --data_parallel_type fsdp"),
    (["--fsdp_reduce_on_last_micro_step"], "--fsdp_reduce_on_last_micro_step true needs --data_parallel_type fsdp"),
    (["--data_parallel_type", "fsdp", "--bucket_cap_mb", "5"],
     "--bucket_cap_mb 5 needs --data_parallel_type ddp or zero1"),
    (["--ac_every", "2"], "--ac_every 2 needs --activation_checkpointing full"),
    (["--activation_checkpointing", "selective", "--ac_every", "2"], "--ac_every 2 needs --activation_checkpointing full"),
    (["--enable_loss_parallelism"], "--enable_loss_parallelism true needs --tensor_parallel_size > 1"),
    (["--moe_top_k", "1"], "--moe_top_k 1 needs --moe_experts > 0"),
    (["--moe_every", "2", "--moe_aux_loss_coef", "0.1"],
     "--moe_every 2, --moe_aux_loss_coef 0.1 needs --moe_experts > 0"),
])
def test_a_flag_that_would_have_no_effect_is_refused(argv, says, tmp_path, capsys):
    """One rule for every option of an axis or mode that is not there (Layout's NEEDS):
    silently ignored no more."""
    assert train.main(TINY + ["--data_dir", str(tmp_path)] + argv) == 2
    one_clear_line(capsys, says + ", and has no effect without it; drop it")


def test_warmup_longer_than_the_run_is_warned_once(char_data, tmp_path, capsys):
    assert train.main(TINY + ["--data_dir", char_data, "--max_steps", "1", "--warmup_steps", "5",
                              "--out_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("warning: --warmup_steps (5) > --max_steps (1)") == 1


# ---- run directories ----

@pytest.mark.parametrize("flag, under_a_file", [("out_dir", False), ("out_dir", True),
                                                ("log_dir", False), ("log_dir", True)])
def test_run_directory_that_is_a_file(flag, under_a_file, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "run" if under_a_file else tmp_path / "file"
    args = ["--out_dir", str(tmp_path / "out")] + [f"--{flag}", str(path)]
    assert train.main(TINY + ["--data_dir", str(tmp_path / "no-data")] + args) == 2
    one_clear_line(capsys, f"--{flag} {path}: {tmp_path / 'file'} is a file, not a directory")
    assert not (tmp_path / "out").exists()


def test_unwritable_run_directory(tmp_path, capsys, monkeypatch):
    # as root every directory is writable: deny the one write-permission query of this run
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr("nanodist.run.run_dir.os.access",
                        lambda path, mode: Path(path) != locked and access(path, mode))
    assert train.main(TINY + ["--data_dir", str(tmp_path), "--out_dir", str(locked / "run")]) == 2
    one_clear_line(capsys, f"--out_dir {locked / 'run'}: {locked} is not writable")


def test_out_dir_that_is_a_file_stops_both_ranks_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_train(TINY + ["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "file"),
                               "--total_batch_size", "512"],
                       nproc=2, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: --out_dir") == 1 and "is a file, not a directory" in result.stderr
    # torchrun reports the failed workers in its own words; none of ours raised a traceback
    assert "train.py\", line" not in result.stderr and "nanodist/" not in result.stderr


# ---- data ----

def test_token_ids_beyond_the_vocabulary_name_the_file(char_data, tmp_path, capsys):
    data = shutil.copytree(char_data, tmp_path / "data")
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = vocab  # same size, one id past the end
    tokens.tofile(data / "val.bin")
    assert train.main(TINY + ["--data_dir", str(data)]) == 2
    one_clear_line(capsys, f"{data / 'val.bin'} holds token id {vocab}, but meta.json's vocab_size "
                           f"is {vocab}: corrupt or from another tokenizer; run `python "
                           f"data/shakespeare_char/prepare.py --out_dir {data}`")


@pytest.mark.parametrize("dataset, text, message", [
    ("shakespeare_char", "", "gives 0 train and 0 val tokens"),
    ("shakespeare_char", "abcdefghi", "gives 8 train and 1 val tokens"),  # 90% / 10%
    ("shakespeare", "", "gives 0 train and 0 val tokens"),
    ("openwebtext", "", "is empty: nothing to tokenize"),
    # two empty documents: one per split, each only its <|endoftext|>
    ("openwebtext", '{"text": ""}\n{"text": ""}\n', "gives 1 train and 1 val tokens"),
])
def test_prepare_refuses_an_input_too_short_for_a_block(dataset, text, message, tmp_path):
    source = tmp_path / ("input.jsonl" if dataset == "openwebtext" else "input.txt")
    source.write_text(text)
    extra = {"shakespeare": ["--bpe_file", str(GPT2_BPE)],
             "openwebtext": ["--bpe_file", str(GPT2_BPE), "--num_proc", "1"]}.get(dataset, [])
    result = run_prepare(dataset, "--input", str(source), "--out_dir", str(tmp_path / "out"), *extra)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---- sample.py ----

def truncated_torch_file(path):
    torch.save({"wpe.weight": torch.zeros(64, 128)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("name, write", [
    ("random.bin", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000))),
    ("text.bin", lambda p: p.write_text("not weights")),
    ("truncated.bin", truncated_torch_file),
    ("random.safetensors", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000))),
])
def test_sample_from_a_garbage_file(name, write, tmp_path, capsys):
    write(tmp_path / name)
    assert sample.main(["--init_from", "gpt2-hf-state-dict", str(tmp_path / name), "--preset", "tiny"]) == 2
    one_clear_line(capsys, "is not a torch or safetensors file")


def test_sample_from_weights_that_are_not_a_state_dict(tmp_path, capsys):
    torch.save([torch.zeros(3)], tmp_path / "list.bin")
    assert sample.main(["--init_from", "gpt2-hf-state-dict", str(tmp_path / "list.bin")]) == 2
    one_clear_line(capsys, "no 2-D wpe.weight, not a GPT-2 state dict")


@pytest.mark.parametrize("flag, value, says", [
    ("temperature", "-0.5", ">= 0"), ("temperature", "nan", ">= 0"), ("top_k", "-1", ">= 0"),
    ("num_samples", "0", ">= 1"), ("max_new_tokens", "-1", "in [1, 100,000]"),
    ("max_new_tokens", "1000000000000", "in [1, 100,000]")])  # once accepted: minutes of silence
def test_sample_flags_out_of_range(flag, value, says, tmp_path, capsys):
    assert sample.main(["--out_dir", str(tmp_path), f"--{flag}", value]) == 2
    one_clear_line(capsys, f"--{flag} must be {says}")


def test_temperature_zero_is_greedy():
    """T -> 0 concentrates softmax(logits / T) on the argmax: the same tokens as sampling
    the single likeliest one (top_k 1), whatever the seed."""
    model = GPT(model_config("tiny", 64, 65), seed=0).eval()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = list(sample.generate(model, prompt, 20, 0.0, None, 65))
    torch.manual_seed(1)
    assert greedy == list(sample.generate(model, prompt, 20, 1.0, 1, 65))
    assert len(set(greedy)) > 1  # not one token repeated: a real test of the path


# ---- the NaN guard ----

@pytest.mark.parametrize("checkpoint_interval", [1, -1])
def test_nan_guard_names_the_printed_step_and_what_checkpoint_is_left(checkpoint_interval, char_data,
                                                                    tmp_path, capsys):
    """lr 1e30: step 1's update makes the weights ~1e30, step 2's logits overflow."""
    out_dir = tmp_path / "run"
    assert train.main(TINY + ["--data_dir", char_data, "--max_steps", "5", "--warmup_steps", "0",
                              "--learning_rate", "1e30", "--out_dir", str(out_dir),
                              "--checkpoint_interval", str(checkpoint_interval)]) == 2
    out, err = capsys.readouterr()
    assert "step     1/5" in out and "step     2/5" not in out  # step 2 is the one stopped
    assert err.startswith("error: step 2: the loss is nan")
    saved = checkpoints(out_dir)
    if checkpoint_interval == 1:
        assert [p.name for p in saved] == ["step_0000001"]
        assert f"the last checkpoint, {saved[0]}, is intact" in err
    else:
        assert saved == [] and "no checkpoint yet" in err
