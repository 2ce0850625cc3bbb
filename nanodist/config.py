"""Training configuration: one dataclass, its command line, and the checks that turn
bad flags into one clear message (a `UserError`) instead of a traceback or a hang.

Flag names of the original experiments are kept: --tensor_parallel_size,
--enable_loss_parallelism, --data_parallel_size, --data_parallel_type,
--implementation, --deferred_init, --gradient_clipping, --eval_interval, --dataset.
"""
import argparse
import dataclasses
from dataclasses import dataclass, fields


class UserError(Exception):
    """Bad flags or inputs. The message says what is wrong and how to fix it."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare"        # shakespeare | shakespeare_char | openwebtext
    data_dir: str = ""                  # default: data/<dataset> in this repository
    # model
    model: str = "gpt2"                 # preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    block_size: int = 1024
    dropout: float = 0.0
    # batch: total_batch_size tokens per optimizer step over all DP ranks
    batch_size: int = 16                # micro-batch per DP rank, in sequences
    total_batch_size: int = 524288      # GPT-2 124M recipe: 2**19 tokens per step
    # optimizer and schedule (AdamW, warmup then cosine to min_lr)
    max_steps: int = 19073
    warmup_steps: int = -1              # -1: GPT-2's 715, at most 10% of max_steps
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    gradient_clipping: bool = False
    max_grad_norm: float = 1.0
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_dir: str = ""                   # TensorBoard run directory; default runs/<time>
    out_dir: str = "out"
    # parallel layout
    data_parallel_size: int = 0         # 0: world_size / tensor_parallel_size
    data_parallel_type: str = "ddp"     # ddp | fsdp
    tensor_parallel_size: int = 1
    enable_loss_parallelism: bool = False
    sequence_parallel: bool = False
    implementation: str = "custom"      # custom | pytorch
    deferred_init: bool = False
    bucket_cap_mb: float = 25.0         # custom DDP bucket size
    fsdp_reshard_after_forward: bool = True   # False: ZeRO-2 behaviour
    # system
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "float32"              # float32 | bfloat16 (autocast compute)
    compile: bool = False
    seed: int = 1337


CHOICES = {
    "dataset": ("shakespeare", "shakespeare_char", "openwebtext"),
    "model": ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"),
    "data_parallel_type": ("ddp", "fsdp"),
    "implementation": ("custom", "pytorch"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "bfloat16"),
}


def str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the fix, exit code 2
        raise UserError(f"{message} (see --help)")


def build_parser(config_cls=TrainConfig) -> argparse.ArgumentParser:
    """Every dataclass field becomes --name; booleans accept `--flag` or `--flag false`."""
    parser = _Parser(description="Train GPT-2 with any DP x TP layout.")
    for f in fields(config_cls):
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=default)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default,
                                choices=CHOICES.get(f.name))
    return parser


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def resolve_layout(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Fill data_parallel_size and check the layout fits the world; returns a new config."""
    tp = cfg.tensor_parallel_size
    if tp < 1:
        raise UserError(f"--tensor_parallel_size must be >= 1, got {tp}")
    dp = cfg.data_parallel_size or max(world_size // tp, 1)
    if dp * tp != world_size:
        raise UserError(
            f"--tensor_parallel_size ({tp}) x --data_parallel_size ({dp}) = {dp * tp} processes, "
            f"but {world_size} were launched: launch with torchrun --nproc_per_node={dp * tp} "
            f"or change the sizes so that their product is {world_size}")
    if cfg.enable_loss_parallelism and tp == 1:
        raise UserError("--enable_loss_parallelism needs --tensor_parallel_size > 1")
    if cfg.sequence_parallel and tp == 1:
        raise UserError("--sequence_parallel needs --tensor_parallel_size > 1")
    return dataclasses.replace(cfg, data_parallel_size=dp)


def grad_accum_steps(cfg: TrainConfig) -> int:
    """Micro-steps per optimizer step so that every DP size sees the same global batch."""
    per_micro = cfg.batch_size * cfg.block_size * cfg.data_parallel_size
    if cfg.batch_size < 1 or cfg.block_size < 1:
        raise UserError("--batch_size and --block_size must be >= 1")
    if cfg.total_batch_size % per_micro:
        raise UserError(
            f"--total_batch_size ({cfg.total_batch_size}) must be divisible by batch_size x "
            f"block_size x data_parallel_size = {cfg.batch_size} x {cfg.block_size} x "
            f"{cfg.data_parallel_size} = {per_micro}; pick e.g. --total_batch_size "
            f"{per_micro * max(cfg.total_batch_size // per_micro, 1)}")
    return cfg.total_batch_size // per_micro
