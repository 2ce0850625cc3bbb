"""How a training step is reported: its TensorBoard scalars and its console line, from
one table that names each quantity once (its tag, its format in the line, its value).

    step    3/50 | loss 4.1735 | aux 1.0312 | lr 6.00e-04 | norm 1.234 | 95 ms | 21,558 tok/s ...
"""
from nanodist.run.metrics import rss_peak_bytes

GiB = 2**30


def step_report(record: dict, max_steps: int, clipping: bool, in_line: dict[str, str],
                mfu: float | None) -> tuple[dict, str]:
    """(TensorBoard tag -> value, the console line) of the trainer's `record` of a step.
    `record["metrics"]`: the model's tags (gpt.StepMetrics), those of `in_line` (tag ->
    short name) in the line too; the gradient norm is a scalar only under `clipping`. A
    value None is left out of both."""
    peak, metrics = record["peak_memory"], record["metrics"]
    fields = [  # (tag, or None: the line's alone; format in the line; value)
        ("Loss/train", "loss {:.4f}", record["loss"]),
        ("Loss/val", "val {:.4f}", record.get("val_loss")),
        *((tag, f"{name} {{:.4f}}", metrics[tag]) for tag, name in in_line.items() if tag in metrics),
        ("LR", "lr {:.2e}", record["lr"]),
        ("GradNorm/train" if clipping else None, "norm {:.3f}", record["grad_norm"]),
        ("Time/step_ms", "{:.0f} ms", record["step_time"] * 1e3),
        ("Throughput/tokens_per_sec", "{:,.0f} tok/s", record["tokens_per_sec"]),
        ("MFU", "MFU {:.1%}", mfu),
        ("Memory/peak_GiB", "mem {:.2f} GiB", peak / GiB if peak is not None else None),
        ("Memory/rss_peak_GiB", "rss {:.2f} GiB", record["rss_peak"] / GiB)]
    scalars = {**{tag: value for tag, _, value in fields if tag}, **metrics}
    line = " | ".join(form.format(value) for _, form, value in fields if value is not None)
    return scalars, f"step {record['step'] + 1:5d}/{max_steps} | {line}"


class StepLog:
    """Reports each step of a run: completes its record (tokens/s, the process's peak
    resident memory so far), sends its scalars to `logger` (the main rank's TensorBoard
    Logger) and its line to `echo` (the trainer's print: rank 0), with MFU where the
    device's peak FLOP/s is known (`peak_flops`, of each of `world` devices)."""

    def __init__(self, logger, echo, cfg, in_line: dict[str, str], flops_per_step: float,
                 peak_flops: float | None, world: int):
        self.logger, self.echo, self.in_line = logger, echo, in_line
        self.max_steps, self.clipping, self.tokens_per_step = cfg.max_steps, cfg.gradient_clipping, cfg.total_batch_size
        self.flops_per_device, self.peak_flops = flops_per_step / world, peak_flops

    def __call__(self, record: dict):
        """`record`: the trainer's, with its step, step_time, peak_memory (and val_loss)."""
        dt = record["step_time"]
        record.update(tokens_per_sec=self.tokens_per_step / dt, rss_peak=rss_peak_bytes())
        mfu = self.flops_per_device / dt / self.peak_flops if self.peak_flops else None
        scalars, line = step_report(record, self.max_steps, self.clipping, self.in_line, mfu)
        self.logger.scalars(record["step"], scalars)
        self.echo(line)
