"""Memory/peak_GiB means peak live tensor bytes on CPU as on CUDA (metrics.StepMemory)."""
import subprocess
import sys

import torch

from harness import REPO, tiny_run
from nanodist.run.config import TrainConfig
from nanodist.run.metrics import StepMemory
from nanodist.run.trainer import Trainer

CPU = torch.device("cpu")


def test_a_cpu_step_peak_is_the_bytes_it_allocates_over_what_lives():
    memory = StepMemory(CPU)
    kept = torch.ones(1000, dtype=torch.uint8)  # lives through both steps: in at_start
    with memory.step(measure=True):
        a = torch.empty(3 * 2**20, dtype=torch.uint8)
        del a
        b = torch.empty(2**20, dtype=torch.uint8)  # the peak is a's moment, not b's
    assert memory.peak - memory.at_start == 3 * 2**20
    with memory.step(measure=False):
        c = torch.empty(2**20, dtype=torch.uint8)
    assert memory.peak is None  # CPU steps are measured when asked only (profiling slows them)
    with memory.step(measure=True):
        d = torch.empty(5 * 2**20, dtype=torch.uint8)
    # b and c are alive now, a is not: the allocator's running total moved by exactly that
    assert memory.peak - memory.at_start == 5 * 2**20
    del kept, b, c, d


def test_a_torch_without_the_allocation_events_logs_no_cpu_peak(monkeypatch):
    monkeypatch.delattr(torch._C._profiler, "_ExtraFields_Allocation")  # compat.py falls back
    memory = StepMemory(CPU)
    with memory.step(measure=True):
        torch.empty(2**20)
    assert not memory.cpu_counts and memory.peak is None


def test_the_trainer_measures_cpu_memory_on_the_first_and_the_evaluated_steps(char_data, tmp_path):
    records = Trainer(TrainConfig(**{**tiny_run(char_data, tmp_path), "max_steps": 4, "eval_interval": 3})).train()
    assert [r["peak_memory"] is not None for r in records] == [True, False, True, True]
    assert all(r["rss_peak"] >= r["peak_memory"] for r in records if r["peak_memory"])


LOGGED_VS_MEMTRACKER = """
import sys, torch
from nanodist.run.config import TrainConfig
from nanodist_tools.measure import peak_tensor_bytes
from nanodist.run.trainer import Trainer
trainer = Trainer(TrainConfig(**eval(sys.argv[1])))
trainer.train_step(0)  # AdamW's moments exist from here on
with trainer.memory.step(measure=True):
    trainer.train_step(1)
print(trainer.memory.peak, peak_tensor_bytes(trainer, 2))
"""


def test_the_logged_cpu_peak_is_what_torchs_memtracker_sees(char_data, tmp_path):
    """torch's MemTracker (the bench's peak, slow: a dispatch mode over every op) against
    the allocator's own running total, in a process of their own (the total counts every
    tensor of the process). MemTracker sees the tensors that ops return; the allocator
    also counts the scalars kernels make for themselves (8 bytes each, a few per step):
    equal up to 1 KiB."""
    kwargs = tiny_run(char_data, tmp_path)
    out = subprocess.run([sys.executable, "-c", LOGGED_VS_MEMTRACKER, repr(kwargs)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    logged, tracked = map(int, out.stdout.split()[-2:])
    assert 0 <= logged - tracked <= 1024, (logged, tracked)
