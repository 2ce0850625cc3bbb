"""The named layouts the tools measure, each defined once: the benchmark matrix, the
planner's validation and the GPU check select from them by name."""
from nanodist.parallel.layout import Layout

LAYOUTS = {
    "single": Layout(),
    "ddp2": Layout(dp=2),
    "ddp2-chunks": Layout(dp=2, loss_chunks=4),                          # the loss in 4 chunks
    "fsdp2": Layout(dp=2, dp_type="fsdp"),                              # ZeRO-3
    "zero2": Layout(dp=2, dp_type="fsdp", reshard_after_forward=False),
    "zero1-2": Layout(dp=2, dp_type="zero1"),
    "zero1-4": Layout(dp=4, dp_type="zero1"),
    "hsdp2x2": Layout(dp=4, dp_type="fsdp", hsdp_replicas=2),                 # 2 replicas of 2 shards
    "zero1-2xtp2": Layout(dp=2, tp=2, dp_type="zero1", sequence_parallel=True, loss_parallel=True),
    "pp2xzero1-2": Layout(pp=2, dp=2, dp_type="zero1"),
    "cp2xhsdp2": Layout(cp=2, dp=2, dp_type="fsdp", hsdp_replicas=2),
    "tp2": Layout(tp=2),
    "tp2-lp": Layout(tp=2, loss_parallel=True),
    "tp2-sp-lp": Layout(tp=2, sequence_parallel=True, loss_parallel=True),
    "tp2-sp-lp-chunks": Layout(tp=2, sequence_parallel=True, loss_parallel=True, loss_chunks=4),
    "dp2xtp2": Layout(dp=2, tp=2),
    "dp2xtp2-lp": Layout(dp=2, tp=2, loss_parallel=True),
    "fsdp2xtp2-sp": Layout(dp=2, tp=2, dp_type="fsdp", sequence_parallel=True),
    "cp2": Layout(cp=2),
    "cp2xfsdp2": Layout(cp=2, dp=2, dp_type="fsdp"),
    "pp2-1f1b": Layout(pp=2),
    "pp2-gpipe-zero2": Layout(pp=2, pp_schedule="gpipe", dp=2, dp_type="fsdp",
                              reshard_after_forward=False),
    "pp2-1f1b-zero3": Layout(pp=2, dp=2, dp_type="fsdp"),
    "pp2-interleaved-v2": Layout(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2),
    "pp2xtp2": Layout(pp=2, tp=2),
    "fsdp8": Layout(dp=8, dp_type="fsdp"),
    "fsdp4xtp2-sp-lp": Layout(dp=4, tp=2, dp_type="fsdp", sequence_parallel=True, loss_parallel=True),
    "fsdp2-ep2": Layout(dp=2, dp_type="fsdp", ep=2),  # expert parallel: a MoE model (MOE)
    "ep4": Layout(dp=4, ep=4),
}
# the train.py flags of the MoE model that layouts with ep > 1 train
MOE = ["--moe_experts=4", "--moe_top_k=2", "--moe_every=2"]
BENCH = ["single", "ddp2", "zero1-2", "fsdp2", "zero2", "hsdp2x2", "tp2", "tp2-lp", "tp2-sp-lp",
         "dp2xtp2-lp"]
VALIDATION = ["ddp2", "fsdp2", "zero2", "tp2-sp-lp", "cp2", "pp2-1f1b", "pp2-gpipe-zero2",
              "pp2-1f1b-zero3", "pp2-interleaved-v2", "dp2xtp2", "fsdp2xtp2-sp", "pp2xtp2", "cp2xfsdp2",
              "zero1-2", "zero1-4", "hsdp2x2", "zero1-2xtp2", "pp2xzero1-2", "cp2xhsdp2"]
GPU_CHECK = ["ddp2", "zero1-2", "fsdp2", "zero2", "tp2-sp-lp", "cp2", "pp2-1f1b", "pp2xtp2", "fsdp2xtp2-sp",
             "hsdp2x2", "fsdp8", "fsdp4xtp2-sp-lp", "fsdp2-ep2", "ep4"]  # over NCCL, with 2+ GPUs


def select(names: list[str] | None, default: list[str]) -> list[str]:
    """The names asked for (all of `default` when none), each one of `default`."""
    unknown = sorted(set(names or []) - set(default))
    if unknown:
        raise ValueError(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(default)}")
    return [name for name in default if not names or name in names]
