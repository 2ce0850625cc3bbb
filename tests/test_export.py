"""Hugging Face interop: nanodist.export -> from_pretrained -> the same logits, and
export -> --init_from -> the same weights, on one process and on a sharded layout."""
import json
import shutil

import pytest
import torch

import sample
from harness import GPT2_BPE, run_distributed, tiny_run
from nanodist import checkpoint
from nanodist.export import main as export_main
from nanodist.run.trainer import Trainer
from nanodist.run.config import TrainConfig
from nanodist.errors import UserError

transformers = pytest.importorskip("transformers")  # a dev dependency


@pytest.fixture(scope="module")
def exported(char_data, tmp_path_factory):
    """A 3-step tiny run (char vocabulary 65, padded to 128), exported."""
    run, to = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("hf") / "tiny"
    Trainer(TrainConfig(**tiny_run(char_data, run))).train()
    assert export_main(["--out_dir", str(run), "--to", str(to)]) == 0
    return run, to


def _weights_of(cfg_kwargs) -> dict:
    """Rank side: the full GPT-2 tensors a trainer starts from (before any step)."""
    trainer = Trainer(TrainConfig(**cfg_kwargs))
    return {name: full.clone() for name, full in trainer.params.full_tensors(trainer.params.param_list())}


def test_from_pretrained_gives_nanodists_logits(exported):
    run, to = exported
    config = json.loads((to / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["n_layer"]) == (65, 32, 4)
    hf, loading = transformers.GPT2LMHeadModel.from_pretrained(to, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    ours, _ = checkpoint.load_model(checkpoint.find(run, "latest"))
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float64 (the fp32 weights cast exactly): an argument on any CPU
        expected, got = ours.double().eval()(idx)[..., :65], hf.double().eval()(idx).logits
    # the same weights and ops; Conv1D's addmm vs Linear's matmul and HF's attention path
    # reorder sums of <= 512 terms of size <= ~1 over 4 layers: k*u ~ 1e-13 each, far
    # below 1e-10 (a wrong orientation or a missing weight differs by ~1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("world", [1, 2])
def test_init_from_an_export_restores_the_weights_bitwise(exported, char_data, tmp_path, world):
    """nanodist -> HF -> --init_from: every real weight as trained, bitwise (a transpose and
    a copy); the 63 padded vocabulary rows, dropped by the export, come back as zeros."""
    run, to = exported
    trained, _ = checkpoint.load_model(checkpoint.find(run, "latest"))
    kwargs = tiny_run(char_data, tmp_path / "ft", init_from=str(to))
    if world == 1:
        weights = _weights_of(kwargs)
    else:  # FSDP 2: each rank loads its shard of each tensor
        weights = run_distributed(_weights_of, 2, dict(kwargs, data_parallel_type="fsdp"))[0]
    for name, param in trained.named_parameters():
        if name == "transformer.wte.weight":
            assert torch.equal(weights[name][:65], param[:65]) and not weights[name][65:].any()
        else:
            assert torch.equal(weights[name], param), name


def test_init_from_crops_the_block_size_and_refuses_other_models(exported, char_data, tmp_path):
    _, to = exported
    weights = _weights_of({**tiny_run(char_data, tmp_path / "a", init_from=str(to)), "block_size": 16})
    assert weights["transformer.wpe.weight"].shape[0] == 16
    for bad, message in ((dict(block_size=64), "--block_size must be at most"),
                         (dict(init_from=str(tmp_path)), "expected a Hugging Face GPT-2 directory")):
        with pytest.raises(UserError, match=message):
            Trainer(TrainConfig(**{**tiny_run(char_data, tmp_path / "b", init_from=str(to)), **bad}))


def test_bpe_export_carries_a_tokenizer_that_hf_reads(bpe_data, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(**{**tiny_run(bpe_data, run), "dataset": "shakespeare", "max_steps": 1})).train()
    assert export_main(["--out_dir", str(run), "--to", str(tmp_path / "hf"), "--bpe_file", str(GPT2_BPE)]) == 0
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    from nanodist.data.tokenizer import get_gpt2_encoding
    text = "First Citizen:\nBefore we proceed any further, hear me speak. <|endoftext|> 1234 é"
    assert hf_tok.encode(text) == get_gpt2_encoding(str(GPT2_BPE)).encode(text, allowed_special="all")
    capsys.readouterr()
    args = ["--init_from", str(tmp_path / "hf"), "--bpe_file", str(GPT2_BPE), "--max_new_tokens", "3",
            "--num_samples", "1", "--start", "Hello"]
    assert sample.main(args) == 0 and capsys.readouterr().out.startswith("Hello")


def test_export_refuses_what_it_would_overwrite_and_replaces_only_with_force(exported, tmp_path, capsys):
    """A file, or a directory holding anything an export does not write (notes, the run
    itself), is refused even with --force; an earlier export is replaced with --force only,
    whole, and nothing is left beside it."""
    run, earlier = exported
    (tmp_path / "file").write_text("mine")
    assert export_main(["--out_dir", str(run), "--to", str(tmp_path / "file")]) == 2
    assert f"--to {tmp_path / 'file'} is a file" in capsys.readouterr().err
    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    for to, holds in ((held, "notes.txt"), (run, ".lock, events.out.tfevents")):
        assert export_main(["--out_dir", str(run), "--to", str(to), "--force"]) == 2
        assert f"--to {to} holds what an export does not write ({holds}" in capsys.readouterr().err
    assert [p.name for p in held.iterdir()] == ["notes.txt"] and checkpoint.checkpoints(run)
    again = tmp_path / "again"
    shutil.copytree(earlier, again)
    (again / "model.safetensors").write_bytes(b"an older export")
    assert export_main(["--out_dir", str(run), "--to", str(again)]) == 2
    assert "holds an export already: pick a new directory, or --force to replace it" in capsys.readouterr().err
    assert export_main(["--out_dir", str(run), "--to", str(again), "--force"]) == 0
    assert (again / "model.safetensors").read_bytes() == (earlier / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "file", "held"]  # nothing left beside


def test_export_into_an_unwritable_place_or_of_a_missing_step(exported, tmp_path, monkeypatch, capsys):
    run, _ = exported
    (tmp_path / "file").write_text("")
    assert export_main(["--out_dir", str(run), "--to", str(tmp_path / "file" / "hf")]) == 2
    assert "cannot write --to" in capsys.readouterr().err
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    assert export_main(["--out_dir", str(run), "--to", str(tmp_path / "hf")]) == 2
    assert "(Read-only file system): pick a writable directory" in capsys.readouterr().err
    assert export_main(["--out_dir", str(run), "--step", "4", "--to", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--step 4: " in err and "(it holds 3); omit --step for the latest" in err and "--resume" not in err
