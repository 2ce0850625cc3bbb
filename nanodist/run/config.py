"""Training configuration: one dataclass, its command line, and the checks that turn
bad flags into one clear message (a `UserError`) instead of a traceback or a hang.

Flag names of the original experiments are kept: --tensor_parallel_size,
--enable_loss_parallelism, --data_parallel_size, --data_parallel_type,
--implementation, --deferred_init, --gradient_clipping, --eval_interval, --dataset.
The parallel flags are the Layout's options (parallel/layout.py declares each once, with
its flag: `LayoutFlags` below is made from them), and rules.py's `check_layout` decides
whether a layout runs: `resolve` before anything is built, `fit` once the dataset's
vocabulary is known.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from nanodist.checkpoint.integrity import TRUST_HELP
from nanodist.cli import OneLineParser
from nanodist.errors import UserError
from nanodist.data.loader import DATASETS
from nanodist.model.gpt import PRESETS, GPTConfig, model_config
from nanodist.parallel.layout import CHOICES as LAYOUT_CHOICES, FLAGS as LAYOUT_FLAGS, Layout
from nanodist.parallel.rules import check_layout


def flag(default, help: str, const=None):
    """A field and its --flag; `const` is the value of the bare flag (a string option)."""
    return field(default=default, metadata={"help": help, "const": const})


# the parallel flags: declared once, with the Layout's fields (layout.option)
LayoutFlags = make_dataclass("LayoutFlags", [
    (f.metadata["flag"], f.type, flag(f.metadata["flag_default"], f.metadata["help"])) for f in fields(Layout)])


@dataclass
class TrainConfig(LayoutFlags):
    # data
    dataset: str = flag("shakespeare", "which prepared dataset to train on")
    data_dir: str = flag("", "folder with train.bin/val.bin/meta.json (default: ./data/<dataset>)")
    # model
    model: str = flag("gpt2", "model preset (tiny: 4 layers, 4 heads, 128 wide, for CPUs)")
    block_size: int = flag(1024, "context length in tokens")
    dropout: float = flag(0.0, "dropout probability")
    moe_experts: int = flag(0, "mixture of experts: E expert MLPs in every --moe_every-th block, dropless "
                               "top-k routing (0: the dense GPT-2)")
    moe_top_k: int = flag(2, "experts per token (gates: their router probabilities, renormalised)")
    moe_every: int = flag(1, "every N-th block is MoE (blocks N-1, 2N-1, ...)")
    moe_aux_loss_coef: float = flag(0.01, "weight of the load-balancing loss (Switch Transformer)")
    init_from: str = flag("", "start from Hugging Face GPT-2 weights: a from_pretrained directory "
                              "(config.json, model.safetensors or pytorch_model.bin)")
    # batch
    batch_size: int = flag(16, "micro-batch per DP rank, in sequences")
    total_batch_size: int = flag(524288, "tokens per optimizer step over all DP ranks (GPT-2: 2**19); "
                                         "gradient accumulation fills the gap")
    # optimizer and schedule: AdamW, linear warmup then cosine to min_lr
    max_steps: int = flag(19073, "optimizer steps")
    warmup_steps: int = flag(-1, "warmup steps (-1: GPT-2's 715, at most 10%% of max_steps)")
    learning_rate: float = flag(6e-4, "peak learning rate")
    min_lr: float = flag(6e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = flag(0.1, "AdamW weight decay of >= 2-D weights (not biases and norms)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    gradient_clipping: bool = flag(False, "clip the global gradient norm to --max_grad_norm")
    max_grad_norm: float = flag(1.0, "gradient norm bound of --gradient_clipping")
    # evaluation and logging
    eval_interval: int = flag(250, "evaluate every this many steps (and after the last)")
    eval_iters: int = flag(20, "global batches of the validation split per evaluation")
    out_dir: str = flag("", "run directory: checkpoints (and TensorBoard events unless --log_dir); "
                            "default: a new ./runs/<time>-<layout>")
    log_dir: str = flag("", "TensorBoard run directory, must be new (default: --out_dir)")
    profile_steps: str = flag("", "A:B: torch.profiler traces of steps A to B on every rank, "
                                  "in <out_dir>/profile (Chrome/Perfetto and TensorBoard format)")
    # checkpoints
    checkpoint_interval: int = flag(0, "checkpoint every K steps and after the last "
                                       "(0: at each evaluation; -1: never)")
    keep_checkpoints: int = flag(2, "how many recent checkpoints to keep")
    resume: str = flag("", "--resume: the latest checkpoint of --out_dir; --resume auto: it if "
                           "any, else start fresh (for torchrun restarts); --resume DIR: that one",
                       const="latest")
    trust_unverified_checkpoint: bool = flag(False, TRUST_HELP + "; it and older checkpoints are then "
                                                                 "never rotated away")
    # parallel layout
    layout: str = flag("flags", "flags: the parallel flags below; auto: the planner's fastest layout "
                                "that fits instead (and --batch_size unless given), and why")
    machine_profile: str = flag("", "a calibrated machine profile (python -m nanodist_tools.planner "
                                    "--calibrate) for --layout auto and the memory check's advice")
    memory_budget_gib: float = flag(0.0, "refuse a layout whose predicted peak per rank exceeds this "
                                         "(0: on CUDA 90%% of the free memory, on CPU no check)")
    deferred_init: bool = flag(False, "build on the meta device, materialise each rank's shard only")
    # system
    device: str = flag("auto", "auto: cuda when available, else cpu")
    dtype: str = flag("float32", "compute dtype (bfloat16: mixed precision, fp32 master weights; "
                                 "float64: reference precision for numerics checks, no autocast)")
    seed: int = flag(1337, "seed of initialisation and data order")
    dist_timeout: float = flag(300.0, "seconds joining the process group or one collective may wait "
                                      "for the other ranks before the run ends with an error")


CHOICES = {
    "dataset": DATASETS,
    "model": tuple(PRESETS),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "bfloat16", "float64"),
    "layout": ("flags", "auto"),
    **{LAYOUT_FLAGS[name]: allowed for name, allowed in LAYOUT_CHOICES.items()},
}


def str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(config_cls=TrainConfig) -> argparse.ArgumentParser:
    """Every dataclass field becomes --name; booleans accept `--flag` or `--flag false`."""
    parser = OneLineParser(description="Train GPT-2 with any parallel layout: PP x DP (DDP or FSDP) "
                                 "x CP x TP, hand-written or PyTorch's.")
    for f in sorted(fields(config_cls), key=lambda f: f.name in LAYOUT_FLAGS.values()):  # the parallel last
        default = f.default
        help = f.metadata.get("help", "")
        if default != "" and "default" not in help:  # a help that says its default keeps it
            help += " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=default,
                                help=help)
        elif f.metadata.get("const") is not None:
            parser.add_argument(f"--{f.name}", type=type(default), nargs="?", default=default,
                                const=f.metadata["const"], help=help)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default,
                                choices=CHOICES.get(f.name), help=help)
    return parser


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# (flags, test, what their values must be): every number of TrainConfig has its range;
# the mixture of experts' are the planner's too (check_moe)
MOE_RANGES = ((("moe_experts",), lambda v: v >= 0, ">= 0"), (("moe_top_k", "moe_every"), lambda v: v >= 1, ">= 1"))
RANGES = MOE_RANGES + (
    (("block_size", "batch_size", "total_batch_size", "max_steps", "eval_interval", "eval_iters",
      "keep_checkpoints", "tensor_parallel_size", "context_parallel_size", "ac_every",
      "expert_parallel_size",
      "data_parallel_replicas",
      "pipeline_parallel_size", "virtual_stages"), lambda v: v >= 1, ">= 1"),
    (("learning_rate", "max_grad_norm", "bucket_cap_mb", "dist_timeout"), lambda v: v > 0, "> 0"),
    (("min_lr", "weight_decay", "memory_budget_gib", "moe_aux_loss_coef", "ulysses_degree", "loss_chunks"),
     lambda v: v >= 0, ">= 0"),
    (("dropout", "beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("warmup_steps",), lambda v: v >= -1, ">= 0 (or -1: GPT-2's 715, at most 10% of max_steps)"),
    (("checkpoint_interval",), lambda v: v >= -1, "K >= 1 steps, 0 (at each evaluation) or -1 (never)"),
    (("data_parallel_size",), lambda v: v >= 0, ">= 1 (or 0: the world size / (pipeline x "
                                                "context x tensor parallel size))"),
    (("seed",), lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
)


def check_ranges(args, ranges):
    """Each flag named in `ranges` (flags, test, what their values must be) within its range."""
    for names, valid, what in ranges:
        for name in names:
            value = getattr(args, name)
            if not (math.isfinite(value) and valid(value)):  # NaN fails every comparison
                raise UserError(f"--{name} must be {what}, got {value}")


def check_values(cfg: TrainConfig):
    """Flags whose bad values would otherwise fail late, deep inside, or silently."""
    check_ranges(cfg, RANGES)
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"--min_lr ({cfg.min_lr}) must be <= --learning_rate ({cfg.learning_rate}): "
                        f"the cosine decays from the one to the other")
    check_moe(cfg)
    if cfg.moe_experts and cfg.init_from:
        raise UserError("--init_from loads Hugging Face GPT-2, which has no experts: drop --moe_experts "
                        "(or --init_from)")
    if cfg.resume in ("latest", "auto") and not cfg.out_dir:
        raise UserError(f"--resume {cfg.resume} looks in --out_dir: say which run directory")


MODEL_LAYERS = {name: preset["n_layer"] for name, preset in PRESETS.items()}
MOE_FLAGS = ("moe_experts", "moe_top_k", "moe_every", "moe_aux_loss_coef")


def check_moe(args):
    """The mixture of experts of train.py's flags or the planner's (`args`: model, moe_experts,
    moe_top_k, moe_every): their ranges, and a model they fit."""
    check_ranges(args, MOE_RANGES)
    given = [f"--{name} {getattr(args, name)}" for name in MOE_FLAGS[1:]
             if getattr(args, name, None) not in (None, getattr(GPTConfig, name))]
    if given and not args.moe_experts:
        raise UserError(f"{', '.join(given)} needs --moe_experts > 0, and has no effect without it; "
                        f"drop it (or add --moe_experts)")
    if args.moe_experts and not args.moe_top_k <= args.moe_experts:
        raise UserError(f"--moe_top_k ({args.moe_top_k}) must be at most --moe_experts ({args.moe_experts})")
    if args.moe_experts and args.moe_every > MODEL_LAYERS[args.model]:
        raise UserError(f"--moe_every {args.moe_every} leaves no MoE block in --model {args.model} "
                        f"({MODEL_LAYERS[args.model]} blocks); use at most {MODEL_LAYERS[args.model]}")


def moe_of(cfg) -> dict:
    """The moe_* fields of GPTConfig the flags set (none when --moe_experts 0: the dense model)."""
    return {name: getattr(cfg, name) for name in MOE_FLAGS} if cfg.moe_experts else {}


def layout_of(cfg: TrainConfig, world_size: int) -> Layout:
    """The Layout the flags describe; --data_parallel_size 0 takes what the world leaves."""
    layout = Layout(**{name: getattr(cfg, flag) for name, flag in LAYOUT_FLAGS.items()})
    layout = layout.with_heads(PRESETS[cfg.model]["n_head"]) if cfg.model in PRESETS else layout
    if layout.dp == 0:
        layout = dataclasses.replace(layout, dp=max(world_size // (layout.pp * layout.cp * layout.tp), 1))
    return layout


def resolve(cfg: TrainConfig, world_size: int, device_type: str) -> tuple[TrainConfig, Layout, int]:
    """Check the flags and the layout's rules that need no data; fill data_parallel_size and
    out_dir (for --resume DIR: the run the checkpoint belongs to). Returns the new config,
    its layout and the micro-steps of one optimizer step."""
    check_values(cfg)
    if cfg.resume not in ("", "latest", "auto") and not cfg.out_dir:
        cfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.resume).parent))
    layout = layout_of(cfg, world_size)
    check_layout(layout, world_size, device_type, cfg.block_size, cfg.dropout)
    micro_steps = layout.micro_steps(cfg.total_batch_size, cfg.batch_size, cfg.block_size)
    cfg = dataclasses.replace(cfg, data_parallel_size=layout.dp, ulysses_degree=layout.ulysses_degree)
    return cfg, layout, micro_steps


def fit(cfg: TrainConfig, layout: Layout, micro_steps: int, vocab_size: int, device_type: str) -> GPTConfig:
    """The model of `cfg` on a dataset of `vocab_size` tokens, after the rest of the
    layout's rules (the model's shape, the pipeline's micro-batches)."""
    model = model_config(cfg.model, cfg.block_size, vocab_size, cfg.dropout, **moe_of(cfg))
    check_layout(layout, layout.world, device_type, cfg.block_size, cfg.dropout, model, micro_steps)
    return model
