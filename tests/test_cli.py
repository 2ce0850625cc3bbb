"""Every command line ends in one line, never a traceback (nanodist/cli.py): an error no
check foresaw names its type and place (exit 1, --debug for the traceback), a reader that
stops reading ends it quietly, and each tool's files and flags are checked before use."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sample
from harness import GPT2_BPE, REPO, SHAKESPEARE_TEXT
from nanodist import cli, export, train
from nanodist_tools import planner


def load_script(dataset: str):
    """data/<dataset>/prepare.py as a module (its main takes argv)."""
    spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", REPO / "data" / dataset / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def broken(*args, **kwargs):
    raise TypeError("an unforeseen bug")


# every command line, and the function inside it that an unforeseen error is made to hit
CLIS = {
    "train": (train.main, "nanodist.train.Trainer", ["--device", "cpu"]),
    "sample": (sample.main, "sample.checkpoint.load_model", ["--checkpoint", "step_0000001"]),
    "export": (export.main, "nanodist.export.checkpoint.load_model", ["--out_dir", ".", "--to", "x"]),
    "planner": (planner.main, "nanodist_tools.planner.rank", []),
}


@pytest.mark.parametrize("name", list(CLIS) + ["prepare"])
def test_an_unforeseen_error_is_one_line_naming_type_and_place(name, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("NANODIST_DEBUG")
    monkeypatch.chdir(tmp_path)
    if name == "prepare":
        script = load_script("shakespeare_char")
        monkeypatch.setattr(script, "prepare", broken)
        main, argv = script.main, ["--input", str(SHAKESPEARE_TEXT)]
    else:
        main, target, argv = CLIS[name]
        (tmp_path / "step_0000001").mkdir()  # a checkpoint to find(), for sample and the export
        (tmp_path / "step_0000001" / "trainer.json").write_text("{}")
        monkeypatch.setattr(target, broken)
    assert main(argv) == 1
    line = one_line(capsys.readouterr().err)
    assert "unexpected TypeError at tests/test_cli.py:" in line and "(an unforeseen bug)" in line
    assert "--debug" in line
    with pytest.raises(TypeError):  # --debug: the traceback, for a bug report
        main(argv + ["--debug"])


def test_the_line_names_our_innermost_frame():
    def inner():
        {}["model"]
    try:
        inner()
    except KeyError as error:
        assert cli.where(error) == f"tests/test_cli.py:{inner.__code__.co_firstlineno + 1}"


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_stops_reading_ends_the_planner_quietly(unbuffered):
    """`planner --json | head -c 300`: the pipe closes while the planner still writes (or,
    with stdout buffered, before what is left is flushed)."""
    command = f"{sys.executable} -m nanodist_tools.planner --json | head -c 300"
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert len(result.stdout) == 300 and result.stderr == "", result.stderr


@pytest.mark.parametrize("argv, says", [
    (["--block_size", "0"], "--block_size must be >= 1"),
    (["--vocab_size", "0"], "--vocab_size must be >= 1"),
    (["--total_batch_size", "0"], "--total_batch_size must be >= 1"),
    (["--moe_top_k", "4"], "--moe_top_k 4 needs --moe_experts > 0"),
    (["--plot", "/nonexistent/dir/plot.png", "--model", "tiny", "--gpus", "2"],
     "--plot /nonexistent/dir/plot.png cannot be written"),
    (["--calibrate", "--out", "/nonexistent/dir/cpu.json"], "--out /nonexistent/dir/cpu.json: cannot write"),
])
def test_planner_inputs_are_checked(argv, says, capsys):
    assert planner.main(argv) == 2
    assert says in one_line(capsys.readouterr().err)


# ---- data/*/prepare.py

def run_prepare_script(dataset: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / dataset / "prepare.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dataset", ["shakespeare", "shakespeare_char"])
def test_prepare_into_a_file_or_a_read_only_directory(dataset, tmp_path, monkeypatch, capsys):
    script = load_script(dataset)
    args = ["--input", str(SHAKESPEARE_TEXT)] + (["--bpe_file", str(GPT2_BPE)] if dataset == "shakespeare" else [])
    (tmp_path / "file").write_text("")
    assert script.main(args + ["--out_dir", str(tmp_path / "file")]) == 2
    assert f"--out_dir {tmp_path / 'file'} is a file" in one_line(capsys.readouterr().err)
    # a read-only file system (root may write anywhere else): access(2) says EROFS
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr("nanodist.data.loader.os.access", lambda p, mode: Path(p) != locked and access(p, mode))
    assert script.main(args + ["--out_dir", str(locked)]) == 2
    assert f"cannot write {locked} (not writable)" in one_line(capsys.readouterr().err)
    assert list(locked.iterdir()) == []


def test_prepare_openwebtext_from_a_file_that_is_not_utf8(tmp_path):
    source = tmp_path / "docs.txt"
    source.write_bytes(b"caf\xe9 in latin-1, not UTF-8\n")
    result = run_prepare_script("openwebtext", "--input", str(source), "--out_dir", str(tmp_path / "out"),
                                "--bpe_file", str(GPT2_BPE), "--num_proc", "1")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]  # datasets' progress bar comes first
    assert line.startswith("error: --input") and "UnicodeDecodeError" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
