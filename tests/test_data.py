"""Data preparation, the GPT-2 tokenizer, and layout-invariant batches (invariant 2)."""
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodist.errors import UserError
from nanodist.data.loader import BatchLoader, load_split, split_text, write_meta, write_split
from nanodist.data.tokenizer import EOT, get_gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEXT_FILE = SHARED_DATA / "tinyshakespeare" / "input.txt"
BPE_FILE = SHARED_DATA / "gpt2" / "gpt2.tiktoken"


@pytest.fixture(autouse=True)
def tiktoken_cache(tmp_path, monkeypatch):
    # tiktoken caches even local files; keep its copies out of the machine's /tmp
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))
    monkeypatch.delenv("NANODIST_GPT2_BPE", raising=False)


@pytest.fixture(scope="module")
def enc():
    return get_gpt2_encoding(str(BPE_FILE))


def run_prepare(dataset, *args, driver=None, env=None):
    script = REPO / "data" / dataset / "prepare.py"
    runner = [sys.executable] if driver is None else [sys.executable, "-c", driver]
    return subprocess.run([*runner, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


# ---- tokenizer ----

def test_local_gpt2_encoding_gives_gpt2_ids(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello world") == [31373, 995]   # tiktoken's own test
    assert enc.eot_token == EOT and enc.n_vocab == EOT + 1
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_bpe_file_from_environment(monkeypatch, enc):
    monkeypatch.setenv("NANODIST_GPT2_BPE", str(BPE_FILE))
    line = "To be, or not to be"
    assert get_gpt2_encoding().encode_ordinary(line) == enc.encode_ordinary(line)


def test_tiktoken_download_failure_names_the_fix(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr("tiktoken.get_encoding", offline)
    with pytest.raises(UserError, match="--bpe_file PATH or set NANODIST_GPT2_BPE"):
        get_gpt2_encoding()


def test_missing_bpe_file(tmp_path):
    path = tmp_path / "nope.tiktoken"
    with pytest.raises(UserError, match=f"{path}.*not found"):
        get_gpt2_encoding(str(path))


@pytest.mark.parametrize("content", [b"not base64 !!\n", b"IQ== 0\nIg== 1\n", b""])
def test_malformed_bpe_file(tmp_path, content):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"{path} is malformed"):
        get_gpt2_encoding(str(path))


def test_bpe_file_fixed_in_place_is_read_again(tmp_path):
    # tiktoken caches local files by path: a bad copy must not outlive the fix
    path = tmp_path / "gpt2.tiktoken"
    path.write_bytes(BPE_FILE.read_bytes()[:1000])
    with pytest.raises(UserError):
        get_gpt2_encoding(str(path))
    shutil.copy(BPE_FILE, path)
    assert get_gpt2_encoding(str(path)).encode_ordinary("Hello world") == [15496, 995]


# ---- prepare scripts ----

@pytest.fixture(scope="module")
def text():
    return TEXT_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("shakespeare")
    result = run_prepare("shakespeare", "--input", str(TEXT_FILE), "--bpe_file", str(BPE_FILE),
                         "--out_dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    return out_dir


@pytest.fixture(scope="module")
def shakespeare_char_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("shakespeare_char")
    result = run_prepare("shakespeare_char", "--input", str(TEXT_FILE), "--out_dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    return out_dir


def test_shakespeare_prepare(shakespeare_dir, text, enc):
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    assert meta["vocab_size"] == enc.n_vocab and meta["tokenizer"] == "gpt2"
    train_text, val_text = split_text(text)
    assert len(train_text) == int(0.9 * len(text)) and train_text + val_text == text
    for split, expected_text in (("train", train_text), ("val", val_text)):
        path = shakespeare_dir / f"{split}.bin"
        tokens = read_bin(path)
        assert path.stat().st_size == 2 * len(tokens) == 2 * meta[f"{split}_tokens"]
        assert enc.decode(tokens.tolist()) == expected_text   # the split boundary is 90% of the chars
    assert text.startswith(enc.decode(read_bin(shakespeare_dir / "train.bin")[:50].tolist()))


def test_shakespeare_char_prepare(shakespeare_char_dir, text):
    meta = json.loads((shakespeare_char_dir / "meta.json").read_text())
    itos = meta["itos"]
    assert meta["vocab_size"] == len(itos) == 65 and itos == sorted(set(text))
    assert meta["tokenizer"] == "char"
    decoded = {}
    for split in ("train", "val"):
        tokens = read_bin(shakespeare_char_dir / f"{split}.bin")
        assert tokens.dtype == np.uint16 and len(tokens) == meta[f"{split}_tokens"]
        decoded[split] = "".join(itos[i] for i in tokens)
    assert (decoded["train"], decoded["val"]) == split_text(text)


def test_loader_reads_prepared_shakespeare(shakespeare_char_dir, text):
    loader = BatchLoader(shakespeare_char_dir, "shakespeare_char", block_size=32, batch_size=4,
                         grad_accum=1, dp_size=1, dp_rank=0, seed=0, device="cpu")
    x, y = loader.train_batch(0, 0)
    assert loader.vocab_size == 65 and int(x.max()) < 65
    itos = json.loads((shakespeare_char_dir / "meta.json").read_text())["itos"]
    assert all("".join(itos[i] for i in row) in text for row in x.tolist())


def test_prepare_without_input_file_says_so(tmp_path):
    result = run_prepare("shakespeare_char", "--input", str(tmp_path / "missing.txt"),
                         "--out_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot read --input")


# any name lookup, i.e. any try of the network, is recorded and fails
NO_NETWORK_DRIVER = """
import runpy, socket, sys
def no_network(*args, **kwargs):
    print("NETWORK ATTEMPT", args[:2], file=sys.stderr)
    raise OSError("network disabled in this test")
socket.getaddrinfo = no_network
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_openwebtext_prepare_local_file_offline(tmp_path, enc):
    documents = ["First document.\nIt has two lines.", "Second: <|endoftext|> here is plain text.",
                 "Third, unicode: café ☕", "Fourth\n\nwith a blank line", "fifth", "sixth, the last"]
    input_file = tmp_path / "docs.jsonl"
    input_file.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(documents)))
    # no HF_DATASETS_OFFLINE here: with --input the script must stay off the network by itself
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    out_dir = tmp_path / "out"
    result = run_prepare("openwebtext", "--input", str(input_file), "--text_column", "body",
                         "--val_fraction", "0.2", "--num_proc", "1", "--bpe_file", str(BPE_FILE),
                         "--out_dir", str(out_dir), driver=NO_NETWORK_DRIVER, env=env)
    assert result.returncode == 0, result.stderr
    assert "NETWORK ATTEMPT" not in result.stderr
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["vocab_size"] == enc.n_vocab and meta["tokenizer"] == "gpt2"
    found = []
    for split in ("train", "val"):
        tokens = read_bin(out_dir / f"{split}.bin")
        assert len(tokens) == meta[f"{split}_tokens"] and tokens[-1] == EOT
        ends = np.flatnonzero(tokens == EOT)
        pieces = np.split(tokens, ends + 1)[:-1]   # each document with its trailing EOT
        assert len(pieces) == len(ends) > 0
        for piece in pieces:
            document = enc.decode(piece[:-1].tolist())
            assert piece[:-1].tolist() == enc.encode_ordinary(document)
            found.append(document)
    assert Counter(found) == Counter(documents)   # every document once, in train or val


# ---- loader: checks and layout-invariant batches ----

BLOCK = 16


def make_dataset(data_dir, n_train=5000, n_val=3000):
    """Token i of train is i, of val is n_train + i: a sequence is named by its first token."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_split(data_dir, "train", np.arange(n_train))
    write_split(data_dir, "val", np.arange(n_train, n_train + n_val))
    write_meta(data_dir, vocab_size=n_train + n_val, tokenizer="test", train_tokens=n_train,
               val_tokens=n_val)
    return data_dir


def loader_for(data_dir, dp_size=1, dp_rank=0, grad_accum=1, batch_size=2, seed=1337):
    return BatchLoader(data_dir, "shakespeare", BLOCK, batch_size, grad_accum, dp_size, dp_rank, seed,
                       torch.device("cpu"))


def step_sequences(data_dir, dp_size, grad_accum, batch_size, step, split="train"):
    """All sequences of one step, over every DP rank and micro-step, in (micro, rank) order."""
    rows = []
    for micro_step in range(grad_accum):
        for rank in range(dp_size):
            loader = loader_for(data_dir, dp_size, rank, grad_accum, batch_size)
            batch = loader.train_batch if split == "train" else loader.val_batch
            x, y = batch(step, micro_step)
            assert x.shape == y.shape == (batch_size, BLOCK)
            rows += [tuple(row) for row in x.tolist()]
    return rows


# (dp_size, grad_accum, batch_size), all with G = 8 sequences per step
LAYOUTS = [(1, 4, 2), (2, 2, 2), (4, 1, 2), (1, 2, 4), (2, 1, 4), (8, 1, 1), (1, 8, 1)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_global_batch_is_the_same_for_every_layout(tmp_path, split):
    data_dir = make_dataset(tmp_path / "data")
    for step in (0, 7):
        reference = Counter(step_sequences(data_dir, *LAYOUTS[0], step, split))
        assert sum(reference.values()) == 8
        for layout in LAYOUTS[1:]:
            assert Counter(step_sequences(data_dir, *layout, step, split)) == reference, layout


def test_dp_ranks_read_disjoint_slots_of_the_global_draw(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    dp_size, grad_accum, batch_size = 4, 2, 1
    starts = loader_for(data_dir, dp_size, 0, grad_accum, batch_size).global_starts("train", 3)
    firsts = [row[0] for row in step_sequences(data_dir, dp_size, grad_accum, batch_size, step=3)]
    assert firsts == starts.tolist()   # slot (m * dp_size + r) of the draw, each slot read once


def test_batches_are_deterministic_and_differ_by_step_and_seed(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    x, y = loader_for(data_dir).train_batch(5, 0)
    x2, y2 = loader_for(data_dir).train_batch(5, 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, loader_for(data_dir).train_batch(6, 0)[0])
    assert not torch.equal(x, loader_for(data_dir, seed=1).train_batch(5, 0)[0])
    val_x, _ = loader_for(data_dir).val_batch(0, 0)
    assert torch.equal(val_x, loader_for(data_dir).val_batch(0, 0)[0]) and int(val_x.min()) >= 5000


def test_y_is_x_shifted_by_one(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    x, y = loader_for(data_dir, batch_size=4).train_batch(0, 0)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    expected = x[:, :1] + torch.arange(BLOCK + 1)   # train token i is i
    assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])


def test_shortest_split_still_gives_a_batch(tmp_path):
    data_dir = make_dataset(tmp_path / "data", n_train=BLOCK + 1, n_val=BLOCK + 1)
    x, y = loader_for(data_dir, batch_size=16).train_batch(0, 0)   # the one start, 16 times
    assert torch.equal(x, torch.arange(BLOCK).expand(16, -1)) and int(y[0, -1]) == BLOCK


def truncate_train(data_dir):
    path = data_dir / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])


def odd_size_train(data_dir):
    path = data_dir / "train.bin"
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize("damage, message", [
    (lambda d: shutil.rmtree(d), "not found; run `python data/shakespeare/prepare.py"),
    (lambda d: (d / "val.bin").unlink(), "val.bin not found; run `python data/shakespeare/prepare.py"),
    (lambda d: (d / "meta.json").unlink(), "meta.json not found; run `python data/shakespeare/prepare.py"),
    (lambda d: (d / "meta.json").write_text("{"), "meta.json is malformed"),
    (truncate_train, "truncated or stale; run `python data/shakespeare/prepare.py"),
    (odd_size_train, "truncated or stale"),
])
def test_damaged_data_names_the_prepare_script(tmp_path, damage, message):
    data_dir = make_dataset(tmp_path / "data")
    damage(data_dir)
    with pytest.raises(UserError, match=re.escape(message)):
        loader_for(data_dir)


def test_split_shorter_than_a_block(tmp_path):
    data_dir = make_dataset(tmp_path / "data", n_train=BLOCK, n_val=100)
    with pytest.raises(UserError, match="fewer than block_size"):
        load_split(data_dir, "train", BLOCK, "shakespeare")


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'tinystories'.*shakespeare_char"):
        load_split(make_dataset(tmp_path / "data"), "train", BLOCK, "tinystories")
