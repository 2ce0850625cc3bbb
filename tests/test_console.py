"""A run prints only the project's lines: no deprecation warnings from the APIs we call."""
from harness import run_train, tiny_run


def test_a_sharded_run_prints_no_deprecation_warnings(char_data, tmp_path):
    """Custom FSDP on 2 ranks calls all-gather and reduce-scatter every step (torch 2.13
    warns, FutureWarning, on every call of all_gather_into_tensor/reduce_scatter_tensor).
    Deprecation warnings are switched on, as pytest and `python -W` do. The profiler runs
    too (a trace of step 1; CPU memory on the last step), whose kineto prints by default."""
    kwargs = tiny_run(char_data, tmp_path, data_parallel_type="fsdp", profile_steps="1:1")
    result = run_train([f"--{k}={v}" for k, v in kwargs.items()], nproc=2, timeout=120,
                       env={"PYTHONWARNINGS": "always::DeprecationWarning,always::FutureWarning"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "| mem " in result.stdout.splitlines()[-1]
