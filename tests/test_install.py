"""nanodist installed (not editable, not the clone) trains from another directory, and
its runs and default data directory are there, never inside site-packages."""
import os
import shutil
import subprocess
import sys

from harness import REPO


def test_an_installed_package_trains_in_the_current_directory(char_data, tmp_path):
    site, work, src = tmp_path / "site", tmp_path / "work", tmp_path / "src"
    shutil.copytree(REPO / "nanodist", src / "nanodist")  # a copy: the build leaves build/ behind
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    # the package alone; torch and the rest are this interpreter's (offline: no build isolation)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=120)
    shutil.copytree(char_data, work / "data" / "shakespeare_char")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanodist.train", *args], cwd=work,  # noqa: E731
                                       env=env, text=True, capture_output=True, timeout=120)
    assert "--init_from" in run("--help").stdout
    result = run("--device", "cpu", "--model", "tiny", "--dataset", "shakespeare_char", "--block_size", "16",
                 "--batch_size", "2", "--total_batch_size", "32", "--max_steps", "1", "--eval_iters", "1")
    assert result.returncode == 0, result.stderr
    assert str(site) in subprocess.run([sys.executable, "-c", "import nanodist; print(nanodist.__file__)"],
                                       cwd=work, env=env, text=True, capture_output=True).stdout
    assert [p.name for p in (work / "runs").iterdir()][0].endswith("-dp1-ddp-tp1-custom")
    assert list((work / "runs").glob("*/step_0000001/trainer.json"))
    assert not (site / "runs").exists() and not (site / "data").exists()
