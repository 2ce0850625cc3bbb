"""The trainer on one process, the command line, and its bad-input errors."""
import math
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness import assert_records_match, run_train, tiny_run
from nanodist import train
from nanodist.run.config import TrainConfig, parse_args, resolve
from nanodist.errors import UserError
from nanodist.run.faults import RunLock
from nanodist.run.run_dir import new_run_dir
from nanodist.run.step_report import step_report
from nanodist.run.trainer import Trainer, lr_at

TINY = ["--device", "cpu", "--model", "tiny", "--batch_size", "4", "--block_size", "64",
        "--warmup_steps", "2", "--eval_iters", "2"]


def scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)            # (0 + 1) / 10
    assert lr_at(9, cfg) == pytest.approx(1.0)            # warmup ends at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)          # half-way: (max + min) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(0, TrainConfig(max_steps=20)) == pytest.approx(6e-4 / 2)  # auto warmup: 10%
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_a_step_report_names_each_value_once_and_leaves_out_what_is_none():
    """The console line keeps its order and formats and leaves out what is None (as the
    Logger does of the scalars); the gradient norm is a scalar only under clipping; every
    one of the model's metrics is a scalar (those of `in_line` on the line too)."""
    record = dict(step=2, loss=4.17354, val_loss=None, lr=6e-4, grad_norm=1.2345, step_time=0.095,
                  tokens_per_sec=21558.2, peak_memory=None, rss_peak=0.5 * 2**30,
                  metrics={"MoE/aux_loss": 1.03125, "MoE/aux_loss/layer1": 1.03125})
    scalars, line = step_report(record, 50, False, {"MoE/aux_loss": "aux"}, None)
    assert line == ("step     3/50 | loss 4.1735 | aux 1.0312 | lr 6.00e-04 | norm 1.234 | 95 ms"
                    " | 21,558 tok/s | rss 0.50 GiB")
    logged = {tag for tag, value in scalars.items() if value is not None}
    assert logged == {"Loss/train", "LR", "Time/step_ms", "Throughput/tokens_per_sec", "Memory/rss_peak_GiB",
                      "MoE/aux_loss", "MoE/aux_loss/layer1"}
    record.update(val_loss=4.0, peak_memory=2**30, metrics={})
    scalars, line = step_report(record, 50, True, {"MoE/aux_loss": "aux"}, 0.0123)
    assert line.endswith("| val 4.0000 | lr 6.00e-04 | norm 1.234 | 95 ms | 21,558 tok/s | MFU 1.2%"
                         " | mem 1.00 GiB | rss 0.50 GiB")
    assert scalars["GradNorm/train"] == 1.2345 and scalars["Memory/peak_GiB"] == 1.0


def test_flags_keep_the_original_names_and_booleans_take_both_forms():
    cfg = parse_args(["--tensor_parallel_size", "2", "--enable_loss_parallelism",
                      "--data_parallel_type", "fsdp", "--deferred_init", "--gradient_clipping",
                      "--fsdp_reshard_after_forward", "false", "--implementation", "pytorch"])
    assert (cfg.tensor_parallel_size, cfg.enable_loss_parallelism, cfg.deferred_init,
            cfg.gradient_clipping, cfg.fsdp_reshard_after_forward) == (2, True, True, True, False)


def test_layout_and_batch_arithmetic():
    cfg, layout, micro_steps = resolve(TrainConfig(tensor_parallel_size=2, batch_size=4, block_size=64,
                                                   total_batch_size=2048), 4, "cpu")
    assert cfg.data_parallel_size == layout.dp == 2 and layout.tp == 2
    assert micro_steps == 2048 // (4 * 64 * 2)
    with pytest.raises(UserError, match="nproc_per_node=4"):
        resolve(TrainConfig(tensor_parallel_size=2, data_parallel_size=2), 2, "cpu")
    with pytest.raises(UserError, match="--compile cannot trace the custom FSDP"):
        resolve(TrainConfig(data_parallel_type="fsdp", compile=True), 2, "cpu")
    with pytest.raises(UserError, match="block_size"):
        resolve(TrainConfig(tensor_parallel_size=2, sequence_parallel=True, block_size=63), 2, "cpu")
    with pytest.raises(UserError, match="divisible"):
        resolve(TrainConfig(batch_size=3, block_size=64, total_batch_size=1000), 1, "cpu")


def test_help_says_each_default_once():
    """Every flag's help states its default once ((default: X) appended where the help
    does not say it already), and nothing prints an empty default."""
    import re
    from nanodist.run.config import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "any parallel layout" in text and "(default: )" not in text
    # one per flag: "--name NAME help", "--name [NAME] help" or "--name {a,b} help"
    helps = re.split(r" --\w+ (?:[A-Z0-9_]+|\[[A-Z0-9_]+\]|\{[^}]*\}) ", text.split("options:", 1)[1])[1:]
    assert len(helps) == len(fields(TrainConfig))
    assert all(h.count("(default") <= 1 for h in helps), [h for h in helps if h.count("(default") > 1]


def test_single_process_training_loss_falls_and_is_logged(char_data, tmp_path):
    cfg = parse_args(TINY + ["--dataset", "shakespeare_char", "--data_dir", char_data,
                             "--total_batch_size", "512", "--max_steps", "30", "--eval_interval", "15",
                             "--learning_rate", "3e-3", "--gradient_clipping",
                             "--out_dir", str(tmp_path / "run")])
    history = Trainer(cfg).train()
    losses = [r["loss"] for r in history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    logged = scalars(tmp_path / "run", "Loss/train")
    assert [s for s, _ in logged] == list(range(30))
    assert [v for _, v in logged] == pytest.approx(losses, rel=1e-6)
    assert [s for s, _ in scalars(tmp_path / "run", "Loss/val")] == [14, 29]
    for tag in ("GradNorm/train", "LR", "Throughput/tokens_per_sec", "Time/step_ms", "Memory/rss_peak_GiB"):
        assert len(scalars(tmp_path / "run", tag)) == 30
    # live tensor bytes: on CPU measured on the first and the evaluated steps
    assert [s for s, _ in scalars(tmp_path / "run", "Memory/peak_GiB")] == [0, 14, 29]
    # the first loss is that of a model that knows nothing: ln(vocabulary padded to 128)
    assert abs(losses[0] - math.log(128)) < 0.1


def test_steps_is_train_a_step_at_a_time_and_closing_it_ends_the_run(char_data, tmp_path):
    """Trainer.steps() (bench/peer.py drives one): each step's record as the step ends; the
    caller's pause between two steps is not in the next step's time; closed early, the run
    directory is released."""
    out_dir = tmp_path / "run"
    steps = Trainer(TrainConfig(**tiny_run(char_data, out_dir, max_steps=4))).steps()
    first, second = next(steps), next(steps)  # the first measures its memory: the second starts afresh
    time.sleep(2.0)
    third = next(steps)
    assert [first["step"], second["step"], third["step"]] == [0, 1, 2]
    assert third["step_time"] < 2.0
    steps.close()
    RunLock(out_dir).release()  # free: no job holds it now


def test_gradient_accumulation_gives_the_same_step_as_one_big_batch(char_data, tmp_path):
    """Same global batch, 4 micro-steps of 2 vs 1 of 8: the same sums in another order. In
    float64 the bound of harness.assert_records_match after AdamW steps holds on any CPU."""
    def run(batch_size):
        cfg = parse_args(TINY[:4] + ["--batch_size", str(batch_size), "--block_size", "32",
                                     "--dataset", "shakespeare_char", "--data_dir", char_data,
                                     "--total_batch_size", "256", "--max_steps", "3", "--dtype", "float64",
                                     "--eval_interval", "100", "--out_dir", str(tmp_path / str(batch_size))])
        return [(r["loss"], r["grad_norm"]) for r in Trainer(cfg).train()]
    assert_records_match(run(2), run(8), "accumulated", lr=TrainConfig().learning_rate)


def test_train_py_on_bpe_shakespeare_as_in_the_readme(bpe_data, tmp_path):
    """The issue's command: tiny model on GPT-2 BPE Shakespeare, Loss/train falling in DIR."""
    result = run_train(["--device", "cpu", "--model", "tiny", "--batch_size", "4",
                        "--block_size", "64", "--total_batch_size", "512", "--max_steps", "20",
                        "--eval_interval", "10", "--data_dir", bpe_data,
                        "--log_dir", str(tmp_path / "run"), "--out_dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    losses = [v for _, v in scalars(tmp_path / "run", "Loss/train")]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert "step    20/20" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--tensor_parallel_size", "2"], "nproc_per_node=2"),
    (["--total_batch_size", "1000"], "divisible"),
    (["--dataset", "wikitext"], "invalid choice"),
    (["--model", "gpt5"], "invalid choice"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--enable_loss_parallelism"], "tensor_parallel_size > 1"),
    (["--eval_interval", "0"], "--eval_interval must be >= 1"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--resume"], "say which run directory"),
])
def test_bad_flags_end_with_one_clear_message(flags, message, char_data, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        flags = ["--device", "cpu", "--tensor_parallel_size", "3"]  # keep the test meaningful
        message = "nproc_per_node=3"
    code = train.main(TINY + ["--dataset", "shakespeare_char", "--data_dir", char_data,
                              "--total_batch_size", "512"] + flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_missing_or_truncated_data_names_the_prepare_script(char_data, tmp_path, capsys):
    assert train.main(TINY + ["--dataset", "shakespeare", "--data_dir", str(tmp_path)]) == 2
    assert "data/shakespeare/prepare.py" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        data = (Path(char_data) / name).read_bytes()
        (broken / name).write_bytes(data[:-2] if name == "train.bin" else data)
    assert train.main(TINY + ["--dataset", "shakespeare_char", "--data_dir", str(broken)]) == 2
    assert "data/shakespeare_char/prepare.py" in capsys.readouterr().err


def test_a_used_log_dir_is_never_mixed_into(char_data, tmp_path, capsys):
    args = TINY + ["--dataset", "shakespeare_char", "--data_dir", char_data, "--total_batch_size",
                   "256", "--max_steps", "1", "--log_dir", str(tmp_path / "log")]
    assert train.main(args + ["--out_dir", str(tmp_path / "a")]) == 0
    assert train.main(args + ["--out_dir", str(tmp_path / "b")]) == 2
    assert "already holds a TensorBoard run" in capsys.readouterr().err


def test_every_rank_exits_cleanly_on_a_bad_layout(char_data):
    """tiny has 4 heads: TP=3 cannot split them. All 3 ranks stop, no hang, no traceback."""
    result = run_train(TINY + ["--dataset", "shakespeare_char", "--data_dir", char_data,
                               "--tensor_parallel_size", "3", "--total_batch_size", "256"],
                       nproc=3, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: n_head (4) is not divisible by --tensor_parallel_size (3)") == 1
    # torchrun reports the failed workers in its own words; none of ours raised a traceback
    assert "train.py\", line" not in result.stderr and "nanodist/" not in result.stderr


def test_runs_started_in_the_same_second_get_their_own_directory(tmp_path):
    first, second = new_run_dir(tmp_path, "dp1"), new_run_dir(tmp_path, "dp1")
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


def test_compiled_model_trains_like_the_eager_one(char_data, tmp_path):
    """--compile (inductor on the CPU here): the same arithmetic fused in another order. In
    float64 the bound of harness.assert_records_match after AdamW steps holds on any CPU."""
    def records(*extra):
        cfg = parse_args(TINY + ["--dataset", "shakespeare_char", "--data_dir", char_data,
                                 "--total_batch_size", "256", "--max_steps", "3", "--eval_interval",
                                 "100", "--dtype", "float64", "--out_dir", str(tmp_path / str(len(extra))),
                                 *extra])
        return [(r["loss"], r["grad_norm"]) for r in Trainer(cfg).train()]
    assert_records_match(records("--compile"), records(), "compiled", lr=TrainConfig().learning_rate)


def test_the_parallel_flags_are_the_layout_both_ways():
    """layout.FLAGS names a train.py flag for every Layout field; the defaults agree; a
    layout's flags parse back into the same layout."""
    from nanodist.run.config import layout_of
    from nanodist.parallel.layout import FLAGS, Layout
    assert set(FLAGS) == {f.name for f in fields(Layout)}
    assert set(FLAGS.values()) <= {f.name for f in fields(TrainConfig)}
    assert layout_of(TrainConfig(), 1) == Layout()
    layout = Layout(pp=2, dp=2, cp=2, tp=2, dp_type="fsdp", reshard_after_forward=False,
                    sequence_parallel=True, loss_parallel=True, pp_schedule="gpipe",
                    checkpointing="full", ac_every=2, implementation="pytorch", bucket_cap_mb=5.0)
    assert layout_of(parse_args(layout.flags()), 16) == layout
