"""--profile_steps A:B: a Chrome/Perfetto trace per rank in the run directory."""
import importlib.util
import json

import pytest

from harness import REPO, run_distributed, tiny_run, trainer_records
from nanodist.config import TrainConfig
from nanodist.errors import UserError
from nanodist.trainer import Trainer


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
