"""--profile_steps A:B: a Chrome/Perfetto trace per rank in the run directory."""
import importlib.util
import json

import pytest
import torch

from harness import REPO, run_distributed, run_train, tiny_run, trainer_records
from nanodist.run.config import TrainConfig
from nanodist.errors import UserError
from nanodist.run.profiling import StepProfiler
from nanodist.run.trainer import Trainer


def test_each_rank_writes_a_trace_of_the_profiled_steps(char_data, tmp_path):
    run_distributed(trainer_records, 2, tiny_run(char_data, tmp_path, profile_steps="2:3", data_parallel_size=2))
    traces = sorted((tmp_path / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    for trace in traces:
        names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
        assert any("allreduce" in n for n in names)  # DDP's gradient all-reduce is in the picture
        assert "aten::mm" in names or "aten::addmm" in names
    # scripts/plot_trace.py reads it: kernels on the main thread, DDP's all-reduce on gloo's
    spec = importlib.util.spec_from_file_location("plot_trace", REPO / "scripts" / "plot_trace.py")
    plot_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_trace)
    compute, comm = plot_trace.lanes(tmp_path)
    assert compute and comm and all(s < e for s, e in compute + comm)


@pytest.mark.parametrize("bad", ["3", "0:2", "3:2", "a:b"])
def test_bad_profile_steps_end_with_one_clear_message(char_data, tmp_path, bad):
    with pytest.raises(UserError, match="--profile_steps takes A:B"):
        Trainer(TrainConfig(**tiny_run(char_data, tmp_path, profile_steps=bad)))


def test_a_window_past_the_run_is_clipped_and_the_trace_written(char_data, tmp_path):
    """Once a segmentation fault at exit (rc 139): the profiler was never stopped. Run as
    users run it, in a process of its own, so a crash at exit shows."""
    args = [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path, max_steps=3).items()]
    result = run_train(args + ["--profile_steps", "2:100"], timeout=240)
    assert result.returncode == 0, result.stderr
    assert "warning: --profile_steps 2:100 is clipped to the steps this run trains: 2:3" in result.stdout
    assert [t.name.split(".")[0] for t in (tmp_path / "profile").glob("*.pt.trace.json")] == ["rank0"]


@pytest.mark.parametrize("steps, start, end, window, note", [
    ("2:3", 1, 5, (2, 3), None),
    ("4:9", 1, 5, (4, 5), "is clipped to the steps this run trains: 4:5"),
    ("1:3", 3, 5, (3, 3), "is clipped to the steps this run trains: 3:3"),  # resumed at step 3
    ("1:2", 3, 5, None, "lies outside the steps this run trains (3 to 5): nothing is profiled"),
    ("7:9", 1, 5, None, "lies outside the steps this run trains (1 to 5): nothing is profiled"),
])
def test_the_profiled_window_is_the_part_of_it_the_run_trains(steps, start, end, window, note, tmp_path):
    profiler = StepProfiler(steps, tmp_path, 0, torch.device("cpu"), start, end)
    assert profiler.steps == window
    assert (profiler.note is None) if note is None else (note in profiler.note)


def test_an_error_inside_the_window_still_stops_the_profiler(char_data, tmp_path):
    """lr 1e30 stops step 2 with the NaN guard's error while steps 1-3 are profiled: the
    profiler is stopped on the way out (its trace written), not left running to the exit."""
    trainer = Trainer(TrainConfig(**tiny_run(char_data, tmp_path, profile_steps="1:3", learning_rate=1e30,
                                            warmup_steps=0, gradient_clipping=False)))
    with pytest.raises(UserError, match="step 2: the loss is nan"):
        trainer.train()
    assert len(list((tmp_path / "profile").glob("*.pt.trace.json"))) == 1
