import os
import subprocess
import sys

import pytest

from harness import GPT2_BPE, REPO, SHAKESPEARE_TEXT, tiny_run, trainer_records

# an unexpected error in a command line ends in its traceback here, not in one line
# (nanodist/cli.py): no bug hides from a test (tests of that line unset it)
os.environ["NANODIST_DEBUG"] = "1"


def _prepare(dataset: str, out_dir) -> str:
    args = [sys.executable, str(REPO / "data" / dataset / "prepare.py"),
            "--input", str(SHAKESPEARE_TEXT), "--out_dir", str(out_dir)]
    if dataset == "shakespeare":
        args += ["--bpe_file", str(GPT2_BPE)]
    subprocess.run(args, check=True, capture_output=True)
    return str(out_dir)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """Character-level tiny Shakespeare (vocab 65): the fast dataset of the tests."""
    return _prepare("shakespeare_char", tmp_path_factory.mktemp("shakespeare_char"))


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    """Tiny Shakespeare in GPT-2 BPE, as the users' demo prepares it."""
    return _prepare("shakespeare", tmp_path_factory.mktemp("shakespeare"))


@pytest.fixture(scope="session")
def single(char_data, tmp_path_factory):
    """(loss, grad norm) per step of the one-process tiny run in float64 (harness.tiny_run):
    the reference of the layouts' tests, trained once per session. Float64: the bound of
    harness.assert_records_match after AdamW steps holds on any CPU."""
    return trainer_records(tiny_run(char_data, tmp_path_factory.mktemp("single"), dtype="float64"))
