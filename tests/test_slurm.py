"""scripts/slurm.sbatch: valid bash, and the torchrun it starts is the README's form."""
import os
import re
import shlex
import subprocess

from harness import REPO

SCRIPT = REPO / "scripts" / "slurm.sbatch"


def _flags(words):
    """{--flag: value} of `torchrun` words up to train.py."""
    words = words[words.index("torchrun") + 1: words.index("train.py")]
    return dict(w.split("=", 1) for w in words)


def test_slurm_script_starts_the_readme_torchrun_on_the_first_node(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": 'echo "srun $*"', "scontrol": 'printf "node-a\\nnode-b\\n"'}  # print, run nothing
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, text=True, capture_output=True,
                         check=True, timeout=30).stdout
    words = shlex.split(out)
    assert words[:2] == ["srun", "torchrun"]
    readme = re.search(r"torchrun --nnodes.*?train\.py", (REPO / "README.md").read_text(), re.S).group(0)
    readme_flags = _flags(shlex.split(readme.replace("\\\n", " ")))
    flags = _flags(words)
    assert flags.keys() == readme_flags.keys()
    assert (flags["--nnodes"], flags["--rdzv-backend"], flags["--rdzv-endpoint"], flags["--rdzv-id"]) == (
        "2", "c10d", "node-a:29500", "42")
    assert words[-2:] == ["--resume", "auto"] and "--out_dir" in words
