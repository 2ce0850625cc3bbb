"""The trainer end to end: TP=2 and DP x TP = 2 x 2 (TP inside, contiguous ranks), DDP or
FSDP over DP, custom or PyTorch, with the original experiments' flags (loss parallelism,
deferred init, gradient clipping) against one process on the same global batch."""
import pytest

from harness import (assert_printed_losses_match, assert_records_match, run_distributed,
                     run_train, tiny_run, trainer_records)

# float64 (harness.assert_records_match): the bound after AdamW steps holds on any CPU
EXPERIMENT = dict(enable_loss_parallelism=True, deferred_init=True, dtype="float64")  # + clipping (tiny_run)


@pytest.mark.parametrize("implementation", ["custom", "pytorch"])
def test_tp2_matches_one_process(char_data, tmp_path, single, implementation):
    for sp in (False, True):
        kwargs = tiny_run(char_data, tmp_path / str(sp), tensor_parallel_size=2,
                          sequence_parallel=sp, implementation=implementation, **EXPERIMENT)
        for records in run_distributed(trainer_records, 2, kwargs):
            assert_records_match(records, single, f"tp2 {implementation} sp={sp}")


@pytest.mark.parametrize("dp_type", ["ddp", "fsdp"])
@pytest.mark.parametrize("implementation", ["custom", "pytorch"])
def test_2x2_matches_one_process(char_data, tmp_path, single, dp_type, implementation):
    """With SP the loss in 3 chunks too (vocab-parallel chunks: test_loss.py)."""
    for sp in (False, True):
        kwargs = tiny_run(char_data, tmp_path / str(sp), data_parallel_size=2,
                          tensor_parallel_size=2, data_parallel_type=dp_type, sequence_parallel=sp,
                          implementation=implementation, loss_chunks=3 if sp else 1, **EXPERIMENT)
        for records in run_distributed(trainer_records, 4, kwargs):
            assert_records_match(records, single, f"{dp_type} x tp {implementation} sp={sp}")


def test_2x2_command_line(char_data, tmp_path, single):
    """The original experiment's command, as users launch it (torchrun, 4 processes)."""
    kwargs = tiny_run(char_data, tmp_path, data_parallel_size=2, tensor_parallel_size=2,
                      data_parallel_type="ddp", implementation="custom", **EXPERIMENT)
    result = run_train([f"--{k}={v}" for k, v in kwargs.items()], nproc=4)
    assert result.returncode == 0, result.stderr
    assert_printed_losses_match(result.stdout, single)


def test_compiled_custom_tp_matches_one_process(char_data, tmp_path, single):
    """--compile with the hand-written TP layers: the collectives run eagerly (comm.py
    keeps them out of the graph), the compute between them is compiled."""
    kwargs = tiny_run(char_data, tmp_path, tensor_parallel_size=2, sequence_parallel=True,
                      compile=True, **EXPERIMENT)
    for records in run_distributed(trainer_records, 2, kwargs):
        assert_records_match(records, single, "tp2 custom compiled")


def test_compiled_fsdp2_matches_one_process(char_data, tmp_path, single):
    """--compile with FSDP2 in torchtitan's order: each block compiled before fully_shard,
    FSDP2's gathers and reduce-scatters around the compiled blocks; the loss (not compiled)
    in chunks."""
    kwargs = tiny_run(char_data, tmp_path, data_parallel_size=2, data_parallel_type="fsdp",
                      implementation="pytorch", compile=True, deferred_init=True, dtype="float64",
                      loss_chunks=3)
    for records in run_distributed(trainer_records, 2, kwargs):
        assert_records_match(records, single, "fsdp2 compiled")
