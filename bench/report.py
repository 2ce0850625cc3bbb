"""bench/run.py's results beside the analytic model: results.json, report.md, PNG plots."""
import json
import time
from dataclasses import replace
from pathlib import Path

from nanodist.planner.hardware import PEAK_TFLOPS
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.layout import Layout
from nanodist.planner.cost import activation_bytes, state_bytes
from nanodist.planner.traffic import traffic_bytes

MiB = 2**20
# custom / pytorch throughput each layout family should reach
TARGET_SPEED = {"ddp": 1.0, "fsdp": 0.9, "tp": 0.9}
COMM_TOLERANCE, STATE_TOLERANCE = 0.05, 0.10


NOTES = """Reading the numbers:
- Throughput is comparable *within* a layout (its implementations take turns step by
  step); between layouts the machine load changed (other jobs ran), so tokens/s of two
  layouts compare only roughly. On 2 shared cores a 2-process layout has no more compute
  than one process: these rows show costs, not speed-ups.
- DDP custom/pytorch on CPU is at parity within the noise: the step is compute-bound
  (exposed communication ≈ 0, the one 3 MiB all-reduce overlaps backward), and repeated
  `bench/ddp.py` runs on the same machine give 0.99–1.03; a single matrix run can land
  a few percent either side of 1.0. The custom path does per-parameter Python hooks and a
  copy of each gradient into its bucket (scaled on the way) where PyTorch's reducer is
  C++; that is the only systematic cost, a few ms per step.
- ZeRO-3 (reshard_after_forward), custom and FSDP2 alike, reshards the root after
  forward too and gathers it again for backward: every unit is gathered twice.
- DTensor TP keeps ~7% more bytes saved for backward than the custom executor (extra
  redistributed copies); the analytic count is the custom executor's.
- The TP rows with loss parallelism move fewer bytes (no B·T·V logits all-gather) in
  more calls; with this small vocabulary (128) the saving is small, and their slower
  steps in this run are not evidence against it: layouts ran at different machine loads.
"""


def _ratio(measured, analytic):
    return measured / analytic if analytic else None


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _max_over_ranks(row: dict, key: str):
    ranks = row.get("per_rank") or [row]
    values = [r[key]["total"] if key == "state" else r[key] for r in ranks]
    return max(values)


def analyse(results: list[dict]) -> list[dict]:
    """One record per (layout, implementation): measured, analytic, ratios, targets."""
    single = next((r for r in results if r["world"] == 1), None)
    reference_loss = single["rows"]["custom"]["loss"] if single else None
    records = []
    for res in results:
        cfg, layout = GPTConfig(**res["model"]), Layout(**res["layout_fields"])
        state_an = state_bytes(cfg, layout)
        act_an = activation_bytes(cfg, layout, res["micro_batch"])
        family = "tp" if layout.tp > 1 else layout.dp_type if layout.dp > 1 else None
        for impl, row in res["rows"].items():  # (PyTorch's ZeRO-1 sends other collectives)
            traffic_an = traffic_bytes(cfg, replace(layout, implementation=impl), res["micro_batch"],
                                       res["grad_accum"], res["dtype"], res["device"].split(":")[0])
            traffic = {kind: {"measured_bus_bytes": row["traffic"].get(kind, {}).get("bus_bytes", 0.0),
                              "calls": row["traffic"].get(kind, {}).get("calls", 0),
                              "analytic_bus_bytes": traffic_an.get(kind, 0.0)}
                       for kind in sorted(set(row["traffic"]) | set(traffic_an))}
            comm_meas = sum(t["measured_bus_bytes"] for t in traffic.values())
            comm_an = sum(traffic_an.values())
            state_meas = _max_over_ranks(row, "state")
            rec = {
                "layout": res["layout"], "implementation": impl, "world": res["world"],
                "dp": layout.dp, "tp": layout.tp, "device": res["device_name"],
                "tokens_per_s": row["tokens_per_s"], "step_ms": row["median_step_s"] * 1e3,
                "compute_ms": _ms(row.get("compute_s", row["median_step_s"] if res["world"] == 1 else None)),
                "exposed_comm_ms": _ms(row.get("exposed_comm_s", 0.0 if res["world"] == 1 else None)),
                "custom_over_pytorch": row.get("custom_over_pytorch"),
                "speed_target": TARGET_SPEED.get(family) if impl == "custom" else None,
                "state_bytes": state_meas, "state_detail": row["state"],
                "state_analytic_bytes": state_an["total"], "state_analytic_detail": state_an,
                "state_ratio": _ratio(state_meas, state_an["total"]),
                "activation_bytes": _max_over_ranks(row, "activations"),
                "activation_analytic_bytes": act_an,
                "activation_ratio": _ratio(_max_over_ranks(row, "activations"), act_an),
                "peak_bytes": _max_over_ranks(row, "peak"),
                "comm_bus_bytes": comm_meas, "comm_analytic_bus_bytes": comm_an,
                "comm_ratio": _ratio(comm_meas, comm_an), "traffic": traffic,
                "traffic_comm_py": row.get("traffic_comm_py"),
                "mfu": row["mfu"], "flops_per_token": res["flops_per_token"],
                "loss": row["loss"],
                "max_loss_diff_vs_single": (max(abs(a - b) for a, b in zip(row["loss"], reference_loss))
                                            if reference_loss else None),
                "setup": {k: res[k] for k in ("model", "n_params", "micro_batch", "grad_accum",
                                              "tokens_per_step", "warmup", "steps", "peak_flops")},
            }
            rec["speed_ok"] = (None if rec["speed_target"] is None or rec["custom_over_pytorch"] is None
                               else rec["custom_over_pytorch"] >= rec["speed_target"])
            rec["comm_ok"] = None if rec["comm_ratio"] is None else abs(rec["comm_ratio"] - 1) <= COMM_TOLERANCE
            rec["state_ok"] = abs(rec["state_ratio"] - 1) <= STATE_TOLERANCE
            records.append(rec)
    return records


def _fmt(v, spec=".3g"):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return format(v, spec)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def markdown(records: list[dict], command: str) -> str:
    first = records[0]
    setup, cfg = first["setup"], first["setup"]["model"]
    on_gpu = first["device"].startswith("cpu") is False
    out = ["# nanodist benchmark: what each layout costs\n",
           f"Produced by `{command}` on **{first['device']}**, {time.strftime('%Y-%m-%d')}. "
           f"Model `{cfg['n_layer']}` layers x `{cfg['n_embd']}` wide, {cfg['n_head']} heads, "
           f"vocab {cfg['vocab_size']} (char-level tiny Shakespeare), context {cfg['block_size']}, "
           f"{setup['n_params'] / 1e6:.2f}M parameters, fp32; {setup['tokens_per_step']} tokens per "
           f"optimizer step for every layout (micro-batch {setup['micro_batch']} per DP rank, "
           f"gradient accumulation fills the rest); {setup['warmup']} warm-up + {setup['steps']} "
           f"timed steps per implementation, the implementations of one layout taking turns step "
           f"by step; medians.\n"]
    if not on_gpu:
        out.append("**This is a CPU run** (gloo, processes sharing the cores, other jobs on the "
                   "machine): the figures teach the *shape* of the costs; absolute speeds and the "
                   "custom/PyTorch ratios are noisy. The GPU rows are absent: MFU is not defined "
                   "here (see *MFU and the GPU run* below for how to produce them).\n")
    out.append("## Throughput and time split\n")
    out.append("`compute` is the custom implementation's step with its collectives replaced by "
               "local copies of the same shapes (bench/worker.py `LocalCopies`), "
               "interleaved with the real steps; `exposed comm` = step − compute, the communication "
               "the step did not hide (negative: within the noise). Not measured for PyTorch's "
               "implementations (their collectives are not ours to replace). `custom/pytorch` is "
               "the median over rounds of the paired step-time ratio (> 1: custom faster).\n")
    out.append(_table(
        ["layout", "impl", "procs", "tokens/s", "step ms", "compute ms", "exposed comm ms",
         "custom/pytorch", "target", "met", "MFU"],
        [[r["layout"], r["implementation"], r["world"], _fmt(r["tokens_per_s"], ".0f"),
          _fmt(r["step_ms"], ".0f"), _fmt(r["compute_ms"], ".0f"), _fmt(r["exposed_comm_ms"], ".0f"),
          _fmt(r["custom_over_pytorch"]), _fmt(r["speed_target"], ".1f"), _fmt(r["speed_ok"]),
          _fmt(r["mfu"], ".1%")] for r in records]))
    out.append("\n![throughput](throughput.png)\n")
    out.append("## Memory per rank: measured / analytic\n")
    out.append("`state` = parameters + gradients + AdamW moments (unique storages, right after "
               "`optimizer.step()`), analytic 4 + 4 + 8 bytes per local parameter (ZeRO paper; ZeRO-1: "
               "8/d of Adam's; "
               "nanodist/planner/cost.py). `activations` = storages saved for backward by one "
               "micro-step's forward (saved-tensor hooks, parameters excluded). `peak` = live tensor bytes at "
               "the peak of one step (CUDA: max_memory_allocated; CPU: torch's MemTracker; not "
               "the process RSS). Largest rank shown.\n")
    out.append(_table(
        ["layout", "impl", "state MiB", "analytic", "ratio", "met (±10%)", "activations MiB",
         "analytic", "ratio", "peak MiB"],
        [[r["layout"], r["implementation"], _fmt(r["state_bytes"] / MiB, ".2f"),
          _fmt(r["state_analytic_bytes"] / MiB, ".2f"), _fmt(r["state_ratio"], ".3f"),
          _fmt(r["state_ok"]), _fmt(r["activation_bytes"] / MiB, ".2f"),
          _fmt(r["activation_analytic_bytes"] / MiB, ".2f"), _fmt(r["activation_ratio"], ".3f"),
          _fmt(r["peak_bytes"] / MiB, ".2f")] for r in records]))
    out.append("\n![memory](memory.png)\n")
    out.append("## Communication per optimizer step: measured / analytic\n")
    out.append("Bus bytes each rank sends (ring algorithm: all-reduce 2(N−1)/N × payload, "
               "all-gather and reduce-scatter (N−1)/N × payload), counted for *every* "
               "implementation by a dispatch mode that sees each c10d collective "
               "(nanodist_tools/measure.py `TrafficMode`): the custom comm.py calls, DDP's reducer, "
               "FSDP2 and DTensor alike. Includes the trainer's loss-mean and grad-norm scalars.\n")
    rows = []
    for r in records:
        for kind, t in r["traffic"].items():
            rows.append([r["layout"], r["implementation"], kind, t["calls"],
                         _fmt(t["measured_bus_bytes"] / MiB, ".3f"), _fmt(t["analytic_bus_bytes"] / MiB, ".3f"),
                         _fmt(_ratio(t["measured_bus_bytes"], t["analytic_bus_bytes"]), ".3f")])
        if r["world"] > 1:
            rows.append([r["layout"], r["implementation"], "**total**", "",
                         _fmt(r["comm_bus_bytes"] / MiB, ".3f"), _fmt(r["comm_analytic_bus_bytes"] / MiB, ".3f"),
                         f"{_fmt(r['comm_ratio'], '.3f')} ({'met' if r['comm_ok'] else '**missed**'} ±5%)"])
    out.append(_table(["layout", "impl", "kind", "calls", "measured MiB", "analytic MiB", "ratio"], rows))
    out.append("\n## Same training, every layout\n")
    out.append("Every implementation's timed steps are consecutive optimizer steps from the same "
               "initial weights on the same global batches (DESIGN.md invariants 1–3): their loss "
               "curves coincide up to float reduction order.\n")
    out.append(_table(["layout", "impl", "losses", "max |loss − single|"],
                      [[r["layout"], r["implementation"], " ".join(f"{l:.3f}" for l in r["loss"]),
                        _fmt(r["max_loss_diff_vs_single"], ".1e")] for r in records]))
    out.append("\n![loss](loss.png)\n")
    out.append("## Targets\n")
    missed = [f"{r['layout']} {what} ({value:.3f})" for r in records
              for what, ok, value in (("custom/pytorch", r["speed_ok"], r["custom_over_pytorch"]),
                                      ("comm measured/analytic", r["comm_ok"], r["comm_ratio"]),
                                      ("state measured/analytic", r["state_ok"], r["state_ratio"]))
              if ok is False]
    out.append("custom/pytorch throughput ≥ 1.0 (DDP), ≥ 0.9 (FSDP, TP, 2D); communication "
               "within 5% and state memory within 10% of the analytic model. "
               + (f"Missed in this run: {', '.join(missed)}." if missed else "All met in this run."))
    out.append("\n" + NOTES)
    out.append("## MFU and the GPU run\n")
    out.append("MFU = tokens/s × FLOPs per token / (processes × device peak). FLOPs per token "
               "(nanodist/run/metrics.py `flops_per_token`, PaLM appendix B as nanoGPT): "
               "**6N + 12·L·T·C**, N = all parameters except the position embeddings, the tied "
               "wte/lm_head matrix counted **once** (as lm_head it is a matmul; the embedding "
               f"lookup is free); here {first['flops_per_token']:.4g} FLOPs per token. Device "
               "peaks (dense, no sparsity, vendor data sheets; hardware.PEAK_TFLOPS; float32 runs "
               "use TF32, which the trainer turns on for them on CUDA):\n")
    out.append(_table(["GPU", "bf16 TFLOP/s", "TF32 TFLOP/s"],
                      [[k, bf16, tf32] for k, (bf16, tf32) in PEAK_TFLOPS.items()]))
    out.append("\nOn a CUDA machine the same command runs every layout with NCCL and fills the MFU "
               "column: `python bench/run.py --out docs/bench-gpu` (add `--model gpt2 --block_size "
               "1024 --batch_size 8 --dtype bfloat16` for GPT-2 sizes). The single-GPU reference MFU "
               "is a plain training run: `python train.py --model gpt2 --dataset shakespeare "
               "--dtype bfloat16 --compile --batch_size 16 --block_size 1024 --total_batch_size "
               "16384 --max_steps 50` (fused AdamW is on by default on CUDA), which logs MFU per step.\n")
    return "\n".join(out) + "\n"


def plots(records: list[dict], out_dir: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['layout']}\n{r['implementation']}" for r in records]
    colors = ["tab:blue" if r["implementation"] == "custom" else "tab:orange" for r in records]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar(names, [r["tokens_per_s"] for r in records], color=colors)
    ax.set_ylabel("tokens / s (whole job)")
    ax.set_title(f"throughput per layout ({records[0]['device']}; blue custom, orange pytorch)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)

    fig, ax = plt.subplots(figsize=(11, 4))
    x = range(len(records))
    w = 0.28
    ax.bar([i - w for i in x], [r["state_bytes"] / MiB for r in records], w, label="state measured")
    ax.bar(list(x), [r["state_analytic_bytes"] / MiB for r in records], w, label="state analytic (16 B/param)")
    ax.bar([i + w for i in x], [r["peak_bytes"] / MiB for r in records], w, label="peak tensors measured")
    ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("MiB per rank (largest rank)")
    ax.set_title("memory per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "memory.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        ax.plot(range(len(r["loss"])), r["loss"], marker="o", markersize=3, alpha=0.7,
                linestyle="-" if r["implementation"] == "custom" else "--",
                label=f"{r['layout']} {r['implementation']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("every layout trains the same trajectory")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close("all")


def write_report(records: list[dict], out_dir: Path, command: str):
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps({"command": command, "records": records},
                                                     indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(records, command))
    plots(records, out_dir)
    print(f"report: {out_dir / 'report.md'}")
